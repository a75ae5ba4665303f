//! The typed kernel registry ([`Family`]: one per WGSL file), every WGSL source, and the
//! one launch helper.
//!
//! A kernel is `const WG` + a prelude (vec4 or scalar) + `common.wgsl` + its own file. The
//! pipelines and bind-group layouts are built once per context; a launch only fills a
//! uniform with [`Params`] and binds buffers in order (binding 0 is the uniform, then the
//! buffers as listed in the kernel's WGSL file).

use std::sync::{Arc, OnceLock};

use bytemuck::{Pod, Zeroable};

use super::pool::GpuBuffer;
use crate::dtype::DType;

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
    pub base: u32,
    pub part_cstride: u32,
    pub part_tstride: u32,
    pub bessel: f32,
    pub inv_count: f32,
    pub row_values: u32,
    pub half_last: u32,
    pub _pad2: u32,
}

// The FLAG_* constants of shaders/common.wgsl.
pub(crate) const FLAG_UPDATE_RUNNING: u32 = 1;
pub(crate) const FLAG_TRAINING: u32 = 2;
pub(crate) const FLAG_THREAD_PER_CHANNEL: u32 = 8;
pub(crate) const FLAG_WEIGHT: u32 = 16;
pub(crate) const FLAG_BIAS: u32 = 32;
pub(crate) const FLAG_SAVED: u32 = 64;
pub(crate) const FLAG_MOMENTS: u32 = 128;
pub(crate) const FLAG_SUMS: u32 = 256;
pub(crate) const FLAG_DWEIGHT: u32 = 512;
pub(crate) const FLAG_DBIAS: u32 = 1024;
pub(crate) const FLAG_DX: u32 = 2048;
pub(crate) const FLAG_RESIDUAL: u32 = 4096;
pub(crate) const FLAG_RELU: u32 = 8192;
pub(crate) const FLAG_DZ: u32 = 16384;

const PRELUDE_VEC4: &str = include_str!("../../shaders/prelude_vec4.wgsl");
const PRELUDE_SCALAR: &str = include_str!("../../shaders/prelude_scalar.wgsl");
const PRELUDE_VEC2: &str = include_str!("../../shaders/prelude_vec2.wgsl");
const STORAGE_HALF: &str = include_str!("../../shaders/storage_half.wgsl");
const COMMON: &str = include_str!("../../shaders/common.wgsl");
const REDUCE_TREE: &str = include_str!("../../shaders/reduce_tree.wgsl");
const REDUCE_SUBGROUP: &str = include_str!("../../shaders/reduce_subgroup.wgsl");

/// The kernel families: one per shaders/*.wgsl file. The `_cols` families are the column
/// mapping, for short runs: (N, C), channels-last, NCHW with small spatial size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    StatsPartials,
    StatsPartialsCols,
    StatsFinalize,
    StatsRunning,
    Apply,
    ApplyCols,
    BwdPartials,
    BwdPartialsCols,
    BwdFinalize,
    BwdDx,
    BwdDxCols,
    FwdOnePass,
    BwdOnePass,
}

impl Family {
    pub const ALL: [Family; 13] = [
        Family::StatsPartials,
        Family::StatsPartialsCols,
        Family::StatsFinalize,
        Family::StatsRunning,
        Family::Apply,
        Family::ApplyCols,
        Family::BwdPartials,
        Family::BwdPartialsCols,
        Family::BwdFinalize,
        Family::BwdDx,
        Family::BwdDxCols,
        Family::FwdOnePass,
        Family::BwdOnePass,
    ];

    /// The file stem in shaders/.
    pub fn name(self) -> &'static str {
        match self {
            Family::StatsPartials => "stats_partials",
            Family::StatsPartialsCols => "stats_partials_cols",
            Family::StatsFinalize => "stats_finalize",
            Family::StatsRunning => "stats_running",
            Family::Apply => "apply",
            Family::ApplyCols => "apply_cols",
            Family::BwdPartials => "bwd_partials",
            Family::BwdPartialsCols => "bwd_partials_cols",
            Family::BwdFinalize => "bwd_finalize",
            Family::BwdDx => "bwd_dx",
            Family::BwdDxCols => "bwd_dx_cols",
            Family::FwdOnePass => "fwd_onepass",
            Family::BwdOnePass => "bwd_onepass",
        }
    }

    fn source(self) -> &'static str {
        match self {
            Family::StatsPartials => include_str!("../../shaders/stats_partials.wgsl"),
            Family::StatsPartialsCols => include_str!("../../shaders/stats_partials_cols.wgsl"),
            Family::StatsFinalize => include_str!("../../shaders/stats_finalize.wgsl"),
            Family::StatsRunning => include_str!("../../shaders/stats_running.wgsl"),
            Family::Apply => include_str!("../../shaders/apply.wgsl"),
            Family::ApplyCols => include_str!("../../shaders/apply_cols.wgsl"),
            Family::BwdPartials => include_str!("../../shaders/bwd_partials.wgsl"),
            Family::BwdPartialsCols => include_str!("../../shaders/bwd_partials_cols.wgsl"),
            Family::BwdFinalize => include_str!("../../shaders/bwd_finalize.wgsl"),
            Family::BwdDx => include_str!("../../shaders/bwd_dx.wgsl"),
            Family::BwdDxCols => include_str!("../../shaders/bwd_dx_cols.wgsl"),
            Family::FwdOnePass => include_str!("../../shaders/fwd_onepass.wgsl"),
            Family::BwdOnePass => include_str!("../../shaders/bwd_onepass.wgsl"),
        }
    }

    /// Whether the family keeps whole channels in workgroup memory (`const CAP` floats).
    pub fn one_pass(self) -> bool {
        matches!(self, Family::FwdOnePass | Family::BwdOnePass)
    }

    /// Whether the family has the fused-epilogue variants (`FUSED = true`: the add of a
    /// residual, the ReLU, and its mask in the backward), built on first use.
    fn has_epilogue(self) -> bool {
        matches!(
            self,
            Family::Apply
                | Family::ApplyCols
                | Family::BwdPartials
                | Family::BwdPartialsCols
                | Family::BwdDx
                | Family::BwdDxCols
        )
    }

    /// Whether the family reduces a workgroup to one value (`merge_summaries`, `add_sums`),
    /// with a tree in workgroup memory or with subgroup operations, as the device allows.
    /// (The column and one-pass kernels reduce each column of a workgroup separately, over
    /// invocations `col_block` apart, which subgroups do not map onto in general.)
    pub fn reduces(self) -> bool {
        matches!(
            self,
            Family::StatsPartials
                | Family::BwdPartials
                | Family::StatsFinalize
                | Family::BwdFinalize
        )
    }

    /// Whether the family reads or writes tensor data (x, dy, y, z, dx, dz) through `load_unit` /
    /// `store_unit`, and so has variants for half-precision storage (built on first use). The
    /// one-pass kernels are f32 only: a half tensor takes the two passes.
    fn stores_data(self) -> bool {
        self.vectorized()
    }

    /// Whether the family is built twice, over vec4 and scalar units (the per-channel
    /// finalize passes are scalar only).
    fn vectorized(self) -> bool {
        !matches!(
            self,
            Family::StatsFinalize
                | Family::StatsRunning
                | Family::BwdFinalize
                | Family::FwdOnePass
                | Family::BwdOnePass
        )
    }
}

/// The complete WGSL of one kernel variant of `family`; `cap`: the one-pass kernels' floats
/// of workgroup memory for values; `fused`: the fused-epilogue variant; `subgroups`: the
/// reducing families' workgroup reductions with subgroup operations (reduce_subgroup.wgsl)
/// rather than a tree (reduce_tree.wgsl); `native_f16`: float16 data as WGSL `f16`
/// ([`native_f16_glue`]; other dtypes ignore it). `FUSED` is a constant
/// so that the plain variant compiles to the plain kernel: the epilogue's code is dead
/// there (a uniform test instead cost the plain kernels 5–20 % on the software adapters,
/// benches/NOTES.md), while its bindings stay in the layout, so that both variants bind
/// alike.
pub(crate) fn compose(
    family: Family,
    vec4: bool,
    cap: u32,
    fused: bool,
    subgroups: bool,
    dtype: DType,
    native_f16: bool,
) -> String {
    let half = dtype != DType::F32;
    let prelude = match (vec4, half) {
        (true, _) => PRELUDE_VEC4,
        (false, false) => PRELUDE_SCALAR,
        (false, true) => PRELUDE_VEC2,
    };
    let reduce = match (family.reduces(), subgroups) {
        (false, _) => "",
        (true, false) => REDUCE_TREE,
        (true, true) => REDUCE_SUBGROUP,
    };
    let native = native_f16 && dtype == DType::F16;
    let (enable, storage) = if native {
        ("enable f16;\n", native_f16_glue(vec4))
    } else {
        ("", storage_glue(dtype, vec4))
    };
    let body = family.source();
    format!(
        "{enable}const WG: u32 = {WORKGROUP_SIZE}u;\nconst CAP: u32 = {cap}u;\nconst FUSED: bool = {fused};\n{prelude}\n{storage}\n{COMMON}\n{reduce}\n{body}"
    )
}

/// [`storage_glue`] for float16 through WGSL's own `f16` (`enable f16`, on devices with
/// `Features::SHADER_F16`): a pair unit is a `vec2<f16>`, a vec4 unit a `vec4<f16>`, the
/// same bytes as the packed words, and the conversions are the device's. Loads are exact
/// (every f16 is an f32, and WGSL conversions keep subnormals unless the device flushes
/// them). WGSL lets a store round either way and saturate between 65504 and 65536, and lets
/// an implementation assume no NaN or infinity. IEEE 754's default conversion (round to
/// nearest even, overflow to ±Inf, NaN kept) is what the packed path does bit by bit and
/// what lavapipe's does; tests/half.rs checks each of these on every device it runs on
/// (subnormals, every pattern, store rounding). `DeviceTuning::native_f16(false)` keeps the
/// packed words on a device that fails them.
fn native_f16_glue(vec4: bool) -> String {
    let s = if vec4 { "vec4<f16>" } else { "vec2<f16>" };
    format!(
        "alias S = {s};\nfn load_unit(w: S) -> V {{ return V(w); }}\nfn store_unit(v: V) -> S {{ return S(v); }}\nfn round_unit(v: V) -> V {{ return V(S(v)); }}\n"
    )
}

/// The storage element `S` of a data binding, its `load_unit` / `store_unit` to and from a
/// unit `V`, and `round_unit` (a unit rounded to the storage type):
/// the unit itself for f32; for the half types one 32-bit word per pair unit (vec2) and two
/// per vec4 unit, through storage_half.wgsl's conversions.
fn storage_glue(dtype: DType, vec4: bool) -> String {
    let prefix = match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => {
            return "alias S = V;\nfn load_unit(w: S) -> V { return w; }\nfn store_unit(v: V) -> S { return v; }\nfn round_unit(v: V) -> V { return v; }\n"
                .into()
        }
    };
    if vec4 {
        format!(
            "{STORAGE_HALF}\nalias S = vec2<u32>;\nfn load_unit(w: S) -> V {{ return vec4<f32>({prefix}_ld2(w.x), {prefix}_ld2(w.y)); }}\nfn store_unit(v: V) -> S {{ return vec2<u32>({prefix}_st2(v.xy), {prefix}_st2(v.zw)); }}\nfn round_unit(v: V) -> V {{ return load_unit(store_unit(v)); }}\n"
        )
    } else {
        format!(
            "{STORAGE_HALF}\nalias S = u32;\nfn load_unit(w: S) -> V {{ return {prefix}_ld2(w); }}\nfn store_unit(v: V) -> S {{ return {prefix}_st2(v); }}\nfn round_unit(v: V) -> V {{ return load_unit(store_unit(v)); }}\n"
        )
    }
}

/// Whether kernels on a device with `features` and subgroups of `min_size ..= max_size`
/// invocations can reduce with subgroup operations: the feature, and subgroups that divide
/// a workgroup (a power of two of at most [`WORKGROUP_SIZE`]), so that the subgroups of a
/// workgroup are full (reduce_subgroup.wgsl still counts the lanes that run).
pub(crate) fn subgroups_usable(features: wgpu::Features, min_size: u32, max_size: u32) -> bool {
    features.contains(wgpu::Features::SUBGROUP)
        && min_size >= 1
        && min_size.is_power_of_two()
        && max_size.is_power_of_two()
        && max_size <= WORKGROUP_SIZE
}

/// Whether a launch of a family with epilogue variants takes the fused one.
fn fused(flags: u32) -> bool {
    flags & (FLAG_RESIDUAL | FLAG_RELU | FLAG_DZ) != 0
}

/// Floats of workgroup memory the one-pass kernels keep values in, on a device with
/// `limit` bytes of workgroup storage: what is left beside their 4 KiB of reduction
/// scratch, at most 16 KiB (3072 floats at WebGPU's guaranteed 16 KiB).
pub(crate) fn one_pass_cap(limit: u32) -> u32 {
    (limit.saturating_sub(4096) / 4).min(4096)
}

/// Storage buffers a one-pass kernel binds (WebGPU guarantees 8 per stage).
pub(crate) const ONE_PASS_STORAGE_BUFFERS: u32 = 7;

/// Every kernel source the crate compiles, as (name, WGSL). For tests and tools that check
/// the shaders outside wgpu (e.g. translating them to every backend language with naga).
/// Names with `_subgroup_` use subgroup operations (naga's `Capabilities::SUBGROUP`), which
/// only devices with `Features::SUBGROUP` compile; names with `_f16native_` store float16
/// as WGSL's `f16` (`Capabilities::SHADER_FLOAT16`, devices with `Features::SHADER_F16`).
pub fn shader_sources() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let cap = one_pass_cap(16 << 10);
    for family in Family::ALL {
        let name = family.name();
        for (fused, subgroups) in [(false, false), (true, false), (false, true), (true, true)] {
            if fused && !family.has_epilogue() || subgroups && !family.reduces() {
                continue;
            }
            let name = format!(
                "{name}{}{}",
                if fused { "_fused" } else { "" },
                if subgroups { "_subgroup" } else { "" }
            );
            out.push((
                format!("{name}_scalar"),
                compose(family, false, cap, fused, subgroups, DType::F32, false),
            ));
            if family.vectorized() {
                out.push((
                    format!("{name}_vec4"),
                    compose(family, true, cap, fused, subgroups, DType::F32, false),
                ));
            }
            if family.stores_data() {
                for (dtype, native, tag) in [
                    (DType::F16, false, "f16"),
                    (DType::F16, true, "f16native"),
                    (DType::BF16, false, "bf16"),
                ] {
                    for (vec4, units) in [(false, "pair"), (true, "quad")] {
                        out.push((
                            format!("{name}_{tag}_{units}"),
                            compose(family, vec4, cap, fused, subgroups, dtype, native),
                        ));
                    }
                }
            }
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

/// A kernel in its vec4 and scalar variants, and, for the families with an epilogue, its
/// fused variants (built on first use: most contexts never fuse).
pub(crate) struct Variants {
    vec4: Option<Kernel>,
    scalar: Kernel,
    fused_vec4: OnceLock<Kernel>,
    fused_scalar: OnceLock<Kernel>,
    /// The half-storage variants, by [`half_slot`].
    half: [OnceLock<Kernel>; 8],
}

/// The slot of a half-storage variant: (dtype, vec4 or pair units, fused).
fn half_slot(dtype: DType, vec4: bool, fused: bool) -> usize {
    (dtype == DType::BF16) as usize * 4 + vec4 as usize * 2 + fused as usize
}

impl Variants {
    fn get(&self, vec4: bool) -> &Kernel {
        match (&self.vec4, vec4) {
            (Some(k), true) => k,
            _ => &self.scalar,
        }
    }
}

/// All pipelines of a context, by [`Family`].
pub(crate) struct Kernels {
    device: wgpu::Device,
    families: Vec<Option<Variants>>,
    /// Floats of workgroup memory the one-pass kernels hold values in; None where they
    /// are not asked for or the device cannot run them (too few storage buffers per
    /// stage), and then they are not built.
    pub one_pass_cap: Option<u32>,
    /// Whether the reducing families were built with subgroup operations.
    pub subgroups: bool,
    /// Whether float16 variants store WGSL `f16` ([`native_f16_glue`]) rather than
    /// packed words.
    pub native_f16: bool,
}

impl Kernels {
    pub fn new(device: &wgpu::Device, one_pass: bool, subgroups: bool, native_f16: bool) -> Self {
        let limits = device.limits();
        let one_pass_cap = (one_pass
            && limits.max_storage_buffers_per_shader_stage >= ONE_PASS_STORAGE_BUFFERS)
            .then(|| one_pass_cap(limits.max_compute_workgroup_storage_size));
        let families = Family::ALL
            .iter()
            .map(|&f| {
                if f.one_pass() && one_pass_cap.is_none() {
                    return None;
                }
                let cap = one_pass_cap.unwrap_or(0);
                let name = f.name();
                let source = |vec4| compose(f, vec4, cap, false, subgroups, DType::F32, false);
                Some(Variants {
                    vec4: f
                        .vectorized()
                        .then(|| Kernel::new(device, name, &source(true))),
                    scalar: Kernel::new(device, name, &source(false)),
                    fused_vec4: OnceLock::new(),
                    fused_scalar: OnceLock::new(),
                    half: Default::default(),
                })
            })
            .collect();
        Self {
            device: device.clone(),
            families,
            one_pass_cap,
            subgroups,
            native_f16,
        }
    }

    /// The pipeline of `family` over vec4 or scalar units (scalar-only families ignore
    /// `vec4`), its fused-epilogue variant where `flags` ask for an epilogue, over tensor
    /// data of `dtype` (families that touch no tensor data ignore it; for a half type the
    /// narrow units are pairs).
    pub fn get(&self, family: Family, vec4: bool, dtype: DType, flags: u32) -> &Kernel {
        let index = Family::ALL
            .iter()
            .position(|&f| f == family)
            .expect("ALL lists every family");
        let variants = self.families[index]
            .as_ref()
            .expect("plans pick the one-pass kernels only where they are built");
        let fused = family.has_epilogue() && fused(flags);
        if dtype != DType::F32 && family.stores_data() {
            return variants.half[half_slot(dtype, vec4, fused)].get_or_init(|| {
                let source = compose(
                    family,
                    vec4,
                    0,
                    fused,
                    self.subgroups,
                    dtype,
                    self.native_f16,
                );
                Kernel::new(&self.device, family.name(), &source)
            });
        }
        if !fused {
            return variants.get(vec4);
        }
        let vec4 = vec4 && family.vectorized();
        let slot = if vec4 {
            &variants.fused_vec4
        } else {
            &variants.fused_scalar
        };
        slot.get_or_init(|| {
            let cap = self.one_pass_cap.unwrap_or(0);
            let source = compose(family, vec4, cap, true, self.subgroups, DType::F32, false);
            Kernel::new(&self.device, family.name(), &source)
        })
    }
}

/// A buffer binding: the whole buffer, or a byte range of it (a chunk of a large tensor).
///
/// A pooled buffer is bound through its owner, which the binding holds: the buffer cannot
/// go back to the pool, to be handed to other work (another thread's upload, say), while
/// a batch that binds it is unsubmitted. Its next owner's queued writes would otherwise
/// run before this batch, which could overwrite them (with its own results, or with the
/// zeros of wgpu's lazy initialization, which a submission resolves before it takes the
/// queue's pending writes).
#[derive(Clone)]
pub(crate) struct Bind {
    pub buffer: wgpu::Buffer,
    pub range: Option<(u64, u64)>,
    pub owner: Option<Arc<GpuBuffer>>,
}

impl Bind {
    /// `range` of a pooled (or caller's) buffer, held until the batch is dropped.
    pub fn owned(owner: &Arc<GpuBuffer>, range: Option<(u64, u64)>) -> Self {
        Self {
            buffer: (***owner).clone(),
            range,
            owner: Some(owner.clone()),
        }
    }
}

/// The context's own buffers (the unused-binding dummies), which no pool hands out.
impl From<&wgpu::Buffer> for Bind {
    fn from(buffer: &wgpu::Buffer) -> Self {
        Self {
            buffer: buffer.clone(),
            range: None,
            owner: None,
        }
    }
}

impl From<&Arc<GpuBuffer>> for Bind {
    fn from(owner: &Arc<GpuBuffer>) -> Self {
        Self::owned(owner, None)
    }
}

/// One dispatch: a kernel, its parameters and its buffers in binding order (from 1).
pub(crate) struct Launch {
    pub family: Family,
    pub vec4: bool,
    /// The storage type of the tensor data the kernel reads and writes.
    pub dtype: DType,
    pub params: Params,
    pub buffers: Vec<Bind>,
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
    kernels: &Kernels,
    encoder: &mut wgpu::CommandEncoder,
    max_dim: u32,
    launches: &[&Launch],
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
                                buffer: &b.buffer,
                                offset,
                                size: wgpu::BufferSize::new(size),
                            })
                        }
                    },
                }),
        );
        let kernel = kernels.get(
            launch.family,
            launch.vec4,
            launch.dtype,
            launch.params.flags,
        );
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel.name),
            layout: &kernel.layout,
            entries: &entries,
        });
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(gx, gy, 1);
    }
}
