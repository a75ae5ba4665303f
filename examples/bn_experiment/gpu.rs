//! [`Engine`] on the library context's own wgpu device: the kernels of `dense.wgsl`, built
//! once. Each operation is one dispatch in its own submission, so it is ordered after the
//! library's batch-norm work that produced its inputs and before the work that follows;
//! a library tensor is read in place through [`Tensor::wgpu_buffer`].

use wgpu::util::DeviceExt;
use wgpu_batchnorm::{Context, Tensor};

use crate::data::CLASSES;
use crate::engine::{Act, Engine, Gemm, Result};

const SOURCE: &str = include_str!("dense.wgsl");
/// Invocations per workgroup of the blocked products; each computes a 4 × 4 block of C.
const LANES: usize = 32;

/// Mirrors `struct Params` in dense.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    flags: u32,
    a_rs: u32,
    a_cs: u32,
    b_rs: u32,
    b_cs: u32,
    len: u32,
    alpha: f32,
    row_groups: u32,
    _pad: u32,
}

const FLAG_BIAS: u32 = 1;
const FLAG_SIGMOID: u32 = 2;
const FLAG_SIGMOID_GRAD: u32 = 4;

/// A flat f32 array on the device: the engine's own buffer, or a library tensor's.
pub struct GpuBuf {
    storage: Storage,
    len: usize,
}

enum Storage {
    Own(wgpu::Buffer),
    Tensor(Tensor),
}

impl GpuBuf {
    fn buffer(&self) -> &wgpu::Buffer {
        match &self.storage {
            Storage::Own(b) => b,
            Storage::Tensor(t) => t.wgpu_buffer().expect("GPU tensors have a buffer"),
        }
    }
}

/// A compute pipeline and the layout of its bind group (from the shader: the bindings its
/// entry point uses).
struct Kernel {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// The GPU engine.
pub struct GpuEngine {
    ctx: Context,
    device: wgpu::Device,
    queue: wgpu::Queue,
    gemm: Kernel,
    gemm_nn4: Kernel,
    gemm_tn4: Kernel,
    gemm_nt4: Kernel,
    sigmoid: Kernel,
    axpy: Kernel,
    softmax: Kernel,
    /// Bound where a kernel's optional input (bias, aux) is absent; its flag keeps the
    /// kernel from reading it.
    dummy: GpuBuf,
}

impl GpuEngine {
    /// The kernels on `ctx`'s device; fails on a CPU context.
    pub fn new(ctx: &Context) -> Result<Self> {
        let (device, queue) = ctx.wgpu().ok_or("the GPU engine needs a GPU context")?;
        let (device, queue) = (device.clone(), queue.clone());
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some("dense.wgsl"),
            source: wgpu::ShaderSource::Wgsl(SOURCE.into()),
        };
        let module = if std::env::var("ZZ_UNCHECKED").is_ok() {
            unsafe {
                device.create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked())
            }
        } else {
            device.create_shader_module(desc)
        };
        let kernel = |name: &str| {
            let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(name),
                layout: None,
                module: &module,
                entry_point: Some(name),
                compilation_options: Default::default(),
                cache: None,
            });
            let layout = pipeline.get_bind_group_layout(0);
            Kernel { pipeline, layout }
        };
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dense unused"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        Ok(Self {
            gemm: kernel("gemm"),
            gemm_nn4: kernel("gemm_nn4"),
            gemm_tn4: kernel("gemm_tn4"),
            gemm_nt4: kernel("gemm_nt4"),
            sigmoid: kernel("sigmoid_map"),
            axpy: kernel("axpy"),
            softmax: kernel("softmax_xent"),
            ctx: ctx.clone(),
            device,
            queue,
            dummy: GpuBuf {
                storage: Storage::Own(dummy),
                len: 4,
            },
        })
    }

    fn alloc(&self, len: usize) -> GpuBuf {
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dense"),
            // Padded to 16 bytes: the blocked products read whole vec4s.
            size: (len.max(4) * 4).next_multiple_of(16) as u64,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        GpuBuf {
            storage: Storage::Own(buffer),
            len,
        }
    }

    /// One dispatch of `kernel` over `groups` (x, y) workgroups with `binds` (binding,
    /// buffer) besides the parameters, submitted at once.
    fn launch(
        &self,
        kernel: &Kernel,
        params: Params,
        binds: &[(u32, &GpuBuf)],
        groups: (u32, u32),
    ) {
        let uniform = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("dense params"),
                contents: bytemuck::bytes_of(&params),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        }];
        entries.extend(binds.iter().map(|&(binding, buf)| wgpu::BindGroupEntry {
            binding,
            resource: buf.buffer().as_entire_binding(),
        }));
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("dense"),
            layout: &kernel.layout,
            entries: &entries,
        });
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("dense"),
            });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("dense"),
                timestamp_writes: None,
            });
            pass.set_pipeline(&kernel.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(groups.0.max(1), groups.1.max(1), 1);
        }
        self.queue.submit(Some(encoder.finish()));
    }

    /// A grid of workgroups of `size` covering `invocations`, 2-D past 65535 workgroups.
    fn grid(invocations: usize, size: usize) -> Result<(u32, u32)> {
        let groups = invocations.div_ceil(size).max(1);
        let x = groups.min(65535);
        let y = groups.div_ceil(x);
        if y > 65535 {
            return Err(format!("{invocations} invocations is past one dispatch").into());
        }
        Ok((x as u32, y as u32))
    }
}

fn u32_of(v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| format!("{v} does not fit the kernels' u32 indices").into())
}

impl Engine for GpuEngine {
    type Buf = GpuBuf;

    fn context(&self) -> &Context {
        &self.ctx
    }

    fn upload(&self, data: &[f32]) -> Result<GpuBuf> {
        let out = self.alloc(data.len());
        if !data.is_empty() {
            self.queue
                .write_buffer(out.buffer(), 0, bytemuck::cast_slice(data));
        }
        Ok(out)
    }

    fn download(&self, x: &GpuBuf) -> Result<Vec<f32>> {
        let buffer = match &x.storage {
            Storage::Tensor(t) => return Ok(t.to_vec()?),
            Storage::Own(b) => b,
        };
        if x.len == 0 {
            return Ok(Vec::new());
        }
        let bytes = (x.len * 4) as u64;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dense readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, bytes);
        self.queue.submit(Some(encoder.finish()));
        let (tx, rx) = std::sync::mpsc::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| format!("device lost: {e}"))?;
        rx.recv()
            .map_err(|e| format!("readback: {e}"))?
            .map_err(|e| format!("readback: {e}"))?;
        let out = {
            let view = staging
                .slice(..)
                .get_mapped_range()
                .map_err(|e| format!("readback: {e}"))?;
            bytemuck::cast_slice::<u8, f32>(&view).to_vec()
        };
        staging.unmap();
        Ok(out)
    }

    fn gemm(
        &self,
        g: Gemm,
        a: &GpuBuf,
        b: &GpuBuf,
        bias: Option<&GpuBuf>,
        act: Act,
        aux: Option<&GpuBuf>,
    ) -> Result<GpuBuf> {
        let Gemm { m, n, k, a_t, b_t } = g;
        if a.len < m * k || b.len < k * n || bias.is_some_and(|v| v.len < n) {
            return Err(format!("gemm {g:?}: operands of {} and {} values", a.len, b.len).into());
        }
        if act == Act::SigmoidGrad && aux.is_none_or(|h| h.len < m * n) {
            return Err("gemm: SigmoidGrad needs an m × n aux".into());
        }
        let flags = bias.map_or(0, |_| FLAG_BIAS)
            | match act {
                Act::None => 0,
                Act::Sigmoid => FLAG_SIGMOID,
                Act::SigmoidGrad => FLAG_SIGMOID_GRAD,
            };
        let out = self.alloc(m * n);
        let bias = bias.unwrap_or(&self.dummy);
        let aux = if act == Act::SigmoidGrad { aux } else { None }.unwrap_or(&self.dummy);
        let (a_rs, a_cs) = if a_t { (1, m) } else { (k, 1) };
        let (b_rs, b_cs) = if b_t { (1, k) } else { (n, 1) };
        let mut params = Params {
            m: u32_of(m)?,
            n: u32_of(n)?,
            k: u32_of(k)?,
            flags,
            a_rs: u32_of(a_rs)?,
            a_cs: u32_of(a_cs)?,
            b_rs: u32_of(b_rs)?,
            b_cs: u32_of(b_cs)?,
            ..Default::default()
        };
        // The blocked kernels where the shape is whole 4 × 4 blocks and the vec4 loads run
        // along a stored row; the scalar one otherwise.
        let blocked = match (a_t, b_t) {
            _ if n % 4 != 0 || m % 4 != 0 => None,
            (false, false) if k % 4 == 0 => Some(&self.gemm_nn4),
            (true, false) => Some(&self.gemm_tn4),
            (false, true) if k % 4 == 0 => Some(&self.gemm_nt4),
            _ => None,
        };
        if let Some(kernel) = blocked {
            let groups = ((n / 4).div_ceil(LANES), m / 4);
            if groups.0 > 65535 || groups.1 > 65535 {
                return Err(format!("gemm {g:?} is past one dispatch").into());
            }
            let binds = [(7, a), (8, b), (3, bias), (4, aux), (5, &out)];
            self.launch(kernel, params, &binds, (groups.0 as u32, groups.1 as u32));
        } else {
            let groups = Self::grid(m * n, 64)?;
            params.row_groups = groups.0;
            let binds = [(1, a), (2, b), (3, bias), (4, aux), (5, &out)];
            self.launch(&self.gemm, params, &binds, groups);
        }
        Ok(out)
    }

    fn sigmoid(&self, x: &GpuBuf) -> Result<GpuBuf> {
        let out = self.alloc(x.len);
        let groups = Self::grid(x.len, 256)?;
        let params = Params {
            len: u32_of(x.len)?,
            row_groups: groups.0,
            ..Default::default()
        };
        self.launch(&self.sigmoid, params, &[(1, x), (5, &out)], groups);
        Ok(out)
    }

    fn softmax_xent(
        &self,
        logits: &GpuBuf,
        labels: &GpuBuf,
        rows: usize,
    ) -> Result<(GpuBuf, GpuBuf)> {
        if logits.len < rows * CLASSES || labels.len < rows {
            return Err("softmax_xent: fewer logits or labels than rows".into());
        }
        let grad = self.alloc(rows * CLASSES);
        let stats = self.alloc(rows * 2);
        let groups = Self::grid(rows, 64)?;
        let params = Params {
            m: u32_of(rows)?,
            n: CLASSES as u32,
            alpha: 1.0 / rows as f32,
            row_groups: groups.0,
            ..Default::default()
        };
        let binds = [(1, logits), (2, labels), (5, &grad), (6, &stats)];
        self.launch(&self.softmax, params, &binds, groups);
        Ok((grad, stats))
    }

    fn axpy(&self, y: &mut GpuBuf, alpha: f32, x: &GpuBuf) -> Result<()> {
        if x.len != y.len {
            return Err(format!("axpy: lengths {} and {}", y.len, x.len).into());
        }
        if matches!(y.storage, Storage::Tensor(_)) {
            // Library tensors are values: never written in place.
            *y = self.copy(y)?;
        }
        let groups = Self::grid(x.len, 256)?;
        let params = Params {
            len: u32_of(x.len)?,
            alpha,
            row_groups: groups.0,
            ..Default::default()
        };
        self.launch(&self.axpy, params, &[(1, x), (5, y)], groups);
        Ok(())
    }

    fn copy(&self, x: &GpuBuf) -> Result<GpuBuf> {
        let out = self.alloc(x.len);
        if x.len > 0 {
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            encoder.copy_buffer_to_buffer(x.buffer(), 0, out.buffer(), 0, (x.len * 4) as u64);
            self.queue.submit(Some(encoder.finish()));
        }
        Ok(out)
    }

    fn wrap_tensor(&self, t: Tensor) -> Result<GpuBuf> {
        if t.wgpu_buffer().is_none() {
            return Err("a CPU tensor given to the GPU engine".into());
        }
        if t.layout() != wgpu_batchnorm::Layout::ChannelsFirst && t.dims().len() > 2 {
            return Err("the GPU engine reads channels-first tensors only".into());
        }
        Ok(GpuBuf {
            len: t.numel(),
            storage: Storage::Tensor(t),
        })
    }
}
