//! Every WGSL source, every entry point and the one launch helper.
//!
//! A kernel is `const WG` + a prelude (vec4 or scalar) + `common.wgsl` + its own file. The
//! pipelines and bind-group layouts are built once per context; a launch only fills a
//! uniform with [`Params`] and binds buffers in order (binding 0 is the uniform, then the
//! buffers as listed in the kernel's WGSL file).

use bytemuck::{Pod, Zeroable};

/// Invocations per workgroup in every kernel (`WG` in WGSL). The tree reductions assume a
/// power of two.
pub const WORKGROUP_SIZE: u32 = 256;

/// Mirrors `struct Params` in shaders/common.wgsl. One layout for every kernel keeps the
/// host side to one struct; each kernel reads the fields its WGSL comment names.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub(crate) struct Params {
    pub outer: u32,
    pub channels: u32,
    pub inner: u32,
    pub tiles: u32,
    pub tile_len: u32,
    pub total: u32,
    pub count: u32,
    pub groups: u32,
    pub groups_x: u32,
    pub flags: u32,
    pub eps: f32,
    pub momentum: f32,
    pub tile_stride: u32,
    pub tile_offset: u32,
    pub col_block: u32,
    pub col_blocks: u32,
    pub _pad0: u32,
    pub _pad1: u32,
    pub _pad2: u32,
    pub _pad3: u32,
}

pub(crate) const FLAG_UPDATE_RUNNING: u32 = 1;
pub(crate) const FLAG_TRAINING: u32 = 2;
pub(crate) const FLAG_THREAD_PER_CHANNEL: u32 = 8;

const PRELUDE_VEC4: &str = include_str!("../../shaders/prelude_vec4.wgsl");
const PRELUDE_SCALAR: &str = include_str!("../../shaders/prelude_scalar.wgsl");
const COMMON: &str = include_str!("../../shaders/common.wgsl");

/// The kernel files, by name. `vectorized` kernels are built twice (vec4 and scalar).
pub(crate) const KERNEL_FILES: &[(&str, &str, bool)] = &[
    (
        "stats_partials",
        include_str!("../../shaders/stats_partials.wgsl"),
        true,
    ),
    (
        "stats_finalize",
        include_str!("../../shaders/stats_finalize.wgsl"),
        false,
    ),
    (
        "stats_running",
        include_str!("../../shaders/stats_running.wgsl"),
        false,
    ),
    ("apply", include_str!("../../shaders/apply.wgsl"), true),
    (
        "bwd_partials",
        include_str!("../../shaders/bwd_partials.wgsl"),
        true,
    ),
    (
        "bwd_finalize",
        include_str!("../../shaders/bwd_finalize.wgsl"),
        false,
    ),
    ("bwd_dx", include_str!("../../shaders/bwd_dx.wgsl"), true),
    // Column mapping, for short runs: (N, C), channels-last, NCHW with small spatial size.
    (
        "stats_partials_cols",
        include_str!("../../shaders/stats_partials_cols.wgsl"),
        true,
    ),
    (
        "apply_cols",
        include_str!("../../shaders/apply_cols.wgsl"),
        true,
    ),
    (
        "bwd_partials_cols",
        include_str!("../../shaders/bwd_partials_cols.wgsl"),
        true,
    ),
    (
        "bwd_dx_cols",
        include_str!("../../shaders/bwd_dx_cols.wgsl"),
        true,
    ),
];

/// The complete WGSL of one kernel variant.
pub(crate) fn compose(body: &str, vec4: bool) -> String {
    let prelude = if vec4 { PRELUDE_VEC4 } else { PRELUDE_SCALAR };
    format!("const WG: u32 = {WORKGROUP_SIZE}u;\n{prelude}\n{COMMON}\n{body}")
}

/// Every kernel source the crate compiles, as (name, WGSL). For tests and tools that check
/// the shaders outside wgpu (e.g. translating them to every backend language with naga).
pub fn shader_sources() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for &(name, body, vectorized) in KERNEL_FILES {
        out.push((format!("{name}_scalar"), compose(body, false)));
        if vectorized {
            out.push((format!("{name}_vec4"), compose(body, true)));
        }
    }
    out
}

/// A compute pipeline and the layout of its one bind group.
pub(crate) struct Kernel {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    name: &'static str,
}

impl Kernel {
    fn new(device: &wgpu::Device, name: &'static str, source: &str) -> Self {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(name),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            // Every kernel writes its own slot of workgroup memory before the first barrier
            // and reads only after it, so the zero-fill WebGPU otherwise requires is dead
            // work. It is not free: on GL, naga emits it as one invocation storing the whole
            // array (4096 stores per workgroup for stats_partials_cols), which made that
            // kernel 7× slower than on Vulkan (benches/NOTES.md).
            compilation_options: wgpu::PipelineCompilationOptions {
                zero_initialize_workgroup_memory: false,
                ..Default::default()
            },
            cache: None,
        });
        let layout = pipeline.get_bind_group_layout(0);
        Self {
            pipeline,
            layout,
            name,
        }
    }
}

/// A kernel in its vec4 and scalar variants.
pub(crate) struct Variants {
    vec4: Option<Kernel>,
    scalar: Kernel,
}

impl Variants {
    pub fn get(&self, vec4: bool) -> &Kernel {
        match (&self.vec4, vec4) {
            (Some(k), true) => k,
            _ => &self.scalar,
        }
    }
}

/// All pipelines of a context.
pub(crate) struct Kernels {
    pub stats_partials: Variants,
    pub stats_finalize: Kernel,
    pub stats_running: Kernel,
    pub apply: Variants,
    pub bwd_partials: Variants,
    pub bwd_finalize: Kernel,
    pub bwd_dx: Variants,
    pub stats_partials_cols: Variants,
    pub apply_cols: Variants,
    pub bwd_partials_cols: Variants,
    pub bwd_dx_cols: Variants,
}

impl Kernels {
    pub fn new(device: &wgpu::Device) -> Self {
        let build = |name: &'static str| -> Variants {
            let &(_, body, vectorized) = KERNEL_FILES
                .iter()
                .find(|k| k.0 == name)
                .expect("kernel names are the constants above");
            Variants {
                vec4: vectorized.then(|| Kernel::new(device, name, &compose(body, true))),
                scalar: Kernel::new(device, name, &compose(body, false)),
            }
        };
        Self {
            stats_partials: build("stats_partials"),
            stats_finalize: build("stats_finalize").scalar,
            stats_running: build("stats_running").scalar,
            apply: build("apply"),
            bwd_partials: build("bwd_partials"),
            bwd_finalize: build("bwd_finalize").scalar,
            bwd_dx: build("bwd_dx"),
            stats_partials_cols: build("stats_partials_cols"),
            apply_cols: build("apply_cols"),
            bwd_partials_cols: build("bwd_partials_cols"),
            bwd_dx_cols: build("bwd_dx_cols"),
        }
    }
}

/// A buffer binding: the whole buffer, or a byte range of it (a chunk of a large tensor).
#[derive(Clone, Copy)]
pub(crate) struct Bind<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub range: Option<(u64, u64)>,
}

impl<'a> From<&'a wgpu::Buffer> for Bind<'a> {
    fn from(buffer: &'a wgpu::Buffer) -> Self {
        Self {
            buffer,
            range: None,
        }
    }
}

/// One dispatch: a kernel, its parameters and its buffers in binding order (from 1).
pub(crate) struct Launch<'a> {
    pub kernel: &'a Kernel,
    pub params: Params,
    pub buffers: Vec<Bind<'a>>,
}

/// Splits `groups` workgroups into a grid no wider than `max_dim` (2-D past the limit).
pub(crate) fn grid(groups: u32, max_dim: u32) -> (u32, u32) {
    let x = groups.clamp(1, max_dim);
    (x, groups.div_ceil(x).max(1))
}

/// Encodes the launches, in order, into one compute pass. wgpu orders the dispatches'
/// storage accesses, so a later launch sees what an earlier one wrote.
pub(crate) fn encode(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    encoder: &mut wgpu::CommandEncoder,
    max_dim: u32,
    launches: &[Launch<'_>],
    timestamps: Option<&wgpu::QuerySet>,
) {
    // One uniform buffer for every launch's parameters, each at an aligned offset, written
    // once through the queue (it lands before the submission that uses it runs).
    let align = device.limits().min_uniform_buffer_offset_alignment as u64;
    let stride = (std::mem::size_of::<Params>() as u64).next_multiple_of(align);
    let mut bytes = vec![0u8; (stride * launches.len().max(1) as u64) as usize];
    let mut grids = Vec::with_capacity(launches.len());
    for (i, launch) in launches.iter().enumerate() {
        let (gx, gy) = grid(launch.params.groups, max_dim);
        let params = Params {
            groups_x: gx,
            ..launch.params
        };
        let at = i * stride as usize;
        bytes[at..at + std::mem::size_of::<Params>()].copy_from_slice(bytemuck::bytes_of(&params));
        grids.push((gx, gy));
    }
    let uniform = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("batchnorm params"),
        size: bytes.len() as u64,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    queue.write_buffer(&uniform, 0, &bytes);

    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("batchnorm"),
        timestamp_writes: timestamps.map(|query_set| wgpu::ComputePassTimestampWrites {
            query_set,
            beginning_of_pass_write_index: Some(0),
            end_of_pass_write_index: Some(1),
        }),
    });
    for (i, (launch, &(gx, gy))) in launches.iter().zip(&grids).enumerate() {
        if launch.params.groups == 0 {
            continue;
        }
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &uniform,
                offset: i as u64 * stride,
                size: wgpu::BufferSize::new(std::mem::size_of::<Params>() as u64),
            }),
        }];
        entries.extend(
            launch
                .buffers
                .iter()
                .enumerate()
                .map(|(i, b)| wgpu::BindGroupEntry {
                    binding: i as u32 + 1,
                    resource: match b.range {
                        None => b.buffer.as_entire_binding(),
                        Some((offset, size)) => {
                            wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: b.buffer,
                                offset,
                                size: wgpu::BufferSize::new(size),
                            })
                        }
                    },
                }),
        );
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(launch.kernel.name),
            layout: &launch.kernel.layout,
            entries: &entries,
        });
        pass.set_pipeline(&launch.kernel.pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(gx, gy, 1);
    }
}
