//! Shared by the criterion bench (benches/batchnorm.rs) and the report
//! (examples/bench_report.rs): the shape suite, the ops, and the copy ceiling.
#![allow(dead_code)]

use std::sync::Mutex;
use std::time::{Duration, Instant};

use wgpu::util::DeviceExt;
use wgpu_batchnorm::cpu::pool;
use wgpu_batchnorm::half::{bf16, f16};
use wgpu_batchnorm::{
    BatchNorm, BatchNormConfig, Context, ContextOptions, DType, DeviceTuning, ForwardOutput,
    Layout, SavedStats, Tensor,
};

/// One shape of the suite; names are used everywhere (benches, report, notes).
pub struct Case {
    pub name: &'static str,
    pub dims: &'static [usize],
    pub layout: Layout,
}

pub const SUITE: &[Case] = &[
    Case {
        name: "resnet_early",
        dims: &[32, 64, 56, 56],
        layout: Layout::ChannelsFirst,
    },
    Case {
        name: "resnet_late",
        dims: &[32, 512, 7, 7],
        layout: Layout::ChannelsFirst,
    },
    Case {
        name: "tall_2d",
        dims: &[100_000, 32],
        layout: Layout::ChannelsFirst,
    },
    Case {
        name: "mlp_2d",
        dims: &[256, 1024],
        layout: Layout::ChannelsFirst,
    },
    Case {
        name: "video_3d",
        dims: &[4, 32, 16, 56, 56],
        layout: Layout::ChannelsFirst,
    },
    Case {
        name: "resnet_early_nhwc",
        dims: &[32, 64, 56, 56],
        layout: Layout::ChannelsLast,
    },
    Case {
        name: "resnet_late_nhwc",
        dims: &[32, 512, 7, 7],
        layout: Layout::ChannelsLast,
    },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    TrainFwd,
    EvalFwd,
    TrainBwd,
    /// Training forward fused with the add of a residual and a ReLU.
    TrainFwdAddRelu,
    /// The unfused way: a plain training forward, then a separate add + ReLU pass.
    TrainFwdThenAddRelu,
    /// The fused backward: dy masked by y > 0 as it is read, dx, dγ, dβ and dz.
    TrainBwdAddRelu,
}

impl Op {
    pub const ALL: [Op; 3] = [Op::TrainFwd, Op::EvalFwd, Op::TrainBwd];
    /// The fused-epilogue rows (bench_report --fused), each beside its plain op.
    pub const FUSED: [Op; 3] = [
        Op::TrainFwdAddRelu,
        Op::TrainFwdThenAddRelu,
        Op::TrainBwdAddRelu,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::TrainFwd => "train_fwd",
            Op::EvalFwd => "eval_fwd",
            Op::TrainBwd => "train_bwd",
            Op::TrainFwdAddRelu => "train_fwd_add_relu",
            Op::TrainFwdThenAddRelu => "train_fwd+add_relu_pass",
            Op::TrainBwdAddRelu => "train_bwd_add_relu",
        }
    }

    /// Minimal traffic per element: train forward reads x twice and writes y; inference
    /// reads x and writes y; backward reads x and dy twice and writes dx. The fused forward
    /// also reads z (16); the unfused one adds a pass reading y and z and writing the
    /// result (24); the fused backward reads y with dy in its first pass and writes dz
    /// there, and its dx pass reads dz instead of dy (28).
    pub fn bytes_per_element(self) -> usize {
        match self {
            Op::TrainFwd => 12,
            Op::EvalFwd => 8,
            Op::TrainBwd => 20,
            Op::TrainFwdAddRelu => 16,
            Op::TrainFwdThenAddRelu => 24,
            Op::TrainBwdAddRelu => 28,
        }
    }

    /// The plain op a fused row is compared with.
    pub fn plain(self) -> Op {
        match self {
            Op::TrainFwdAddRelu | Op::TrainFwdThenAddRelu => Op::TrainFwd,
            Op::TrainBwdAddRelu => Op::TrainBwd,
            op => op,
        }
    }
}

/// A layer with its inputs resident on the backend.
pub struct Prepared {
    pub ctx: Context,
    pub bn: BatchNorm,
    pub x: Tensor,
    pub dy: Tensor,
    pub saved: SavedStats,
    pub numel: usize,
    /// The residual, the fused forward's output and its statistics (the fused backward's
    /// inputs), and the separate add + ReLU pass of the unfused comparison.
    pub z: Tensor,
    pub fused: ForwardOutput,
    pub add_relu: AddRelu,
}

pub fn data(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).max(1);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 4.0 - 1.0
        })
        .collect()
}

pub fn prepare(ctx: &Context, case: &Case) -> wgpu_batchnorm::Result<Prepared> {
    prepare_typed(ctx, case, DType::F32)
}

/// As [`prepare`], with x, dy and z stored as `dtype`.
pub fn prepare_typed(ctx: &Context, case: &Case, dtype: DType) -> wgpu_batchnorm::Result<Prepared> {
    let numel: usize = case.dims.iter().product();
    let tensor = |seed| {
        let v = data(numel, seed);
        match dtype {
            DType::F16 => {
                let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
                ctx.tensor_from_half(&h, case.dims, case.layout)
            }
            DType::BF16 => {
                let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
                ctx.tensor_from_half(&h, case.dims, case.layout)
            }
            _ => ctx.tensor_with_layout(&v, case.dims, case.layout),
        }
    };
    let (x, dy, z) = (tensor(1)?, tensor(2)?, tensor(4)?);
    let mut bn = BatchNorm::new(ctx, BatchNormConfig::new(case.dims[1]))?;
    let saved = bn.forward_train(&x)?.saved;
    let fused = bn.forward_relu(&x, Some(&z))?;
    let add_relu = AddRelu::new(ctx, numel);
    ctx.synchronize()?;
    Ok(Prepared {
        ctx: ctx.clone(),
        bn,
        x,
        dy,
        saved,
        numel,
        z,
        fused,
        add_relu,
    })
}

impl Prepared {
    /// Runs `op` once; results stay on the device.
    pub fn run(&mut self, op: Op) -> wgpu_batchnorm::Result<()> {
        match op {
            Op::TrainFwd => drop(self.bn.forward_train(&self.x)?),
            Op::EvalFwd => drop(self.bn.forward_eval(&self.x)?),
            Op::TrainBwd => drop(self.bn.backward(&self.dy, &self.x, &self.saved)?),
            Op::TrainFwdAddRelu => drop(self.bn.forward_relu(&self.x, Some(&self.z))?),
            Op::TrainFwdThenAddRelu => {
                drop(self.bn.forward_train(&self.x)?);
                self.add_relu.run();
            }
            Op::TrainBwdAddRelu => {
                let (y, saved) = (&self.fused.y, &self.fused.saved);
                drop(self.bn.backward_relu(&self.dy, y, &self.x, saved, true)?)
            }
        }
        Ok(())
    }

    /// `iters` runs of `op`, then a wait for the device: submit + wait, no readback.
    pub fn time(&mut self, op: Op, iters: u64) -> Duration {
        let t = Instant::now();
        for _ in 0..iters {
            self.run(op).expect("benchmark op failed");
        }
        self.ctx.synchronize().expect("device wait failed");
        t.elapsed()
    }
}

impl Prepared {
    /// Kernel-only milliseconds per run of `op` (timestamp queries), where available.
    pub fn kernel_ms(&mut self, op: Op, iters: u64) -> Option<f64> {
        if !self.ctx.set_kernel_timing(true) {
            return None;
        }
        self.ctx.take_kernel_time().ok()?; // discard earlier passes
        for _ in 0..iters {
            self.run(op).ok()?;
        }
        let t = self.ctx.take_kernel_time().ok().flatten();
        self.ctx.set_kernel_timing(false);
        t.map(|d| d.as_secs_f64() * 1e3 / iters as f64)
    }
}

/// A separate out = max(y + z, 0) pass over resident buffers of a tensor's size: a vec4
/// kernel (benches/add_relu.wgsl) on a GPU, a multithreaded loop on the CPU (`cpu::pool`).
/// It runs on buffers of its own, as a framework's elementwise op would on the batch norm's
/// output: the same traffic.
pub enum AddRelu {
    Gpu {
        device: wgpu::Device,
        queue: wgpu::Queue,
        pipeline: wgpu::ComputePipeline,
        bind_group: wgpu::BindGroup,
        grid: (u32, u32),
    },
    Cpu {
        y: Vec<f32>,
        z: Vec<f32>,
        out: Vec<f32>,
    },
}

impl AddRelu {
    pub fn new(ctx: &Context, numel: usize) -> Self {
        let len = numel.div_ceil(4) * 4;
        let Some((device, queue)) = ctx.wgpu() else {
            return AddRelu::Cpu {
                y: data(len, 5),
                z: data(len, 6),
                out: vec![0.0; len],
            };
        };
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("add_relu"),
            source: wgpu::ShaderSource::Wgsl(include_str!("add_relu.wgsl").into()),
        });
        let usage = wgpu::BufferUsages::STORAGE;
        let input = |seed| {
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("add_relu input"),
                contents: bytemuck::cast_slice(&data(len, seed)),
                usage,
            })
        };
        let (y, z) = (input(5), input(6));
        let out = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("add_relu out"),
            size: (len * 4) as u64,
            usage,
            mapped_at_creation: false,
        });
        let total = (len / 4) as u32;
        let groups = total.div_ceil(256 * 8).max(1);
        let gx = groups.min(65535);
        let params: [u32; 4] = [total, groups * 256, groups, gx];
        let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("add_relu params"),
            contents: bytemuck::cast_slice(&params),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("add_relu"),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        let entries: Vec<_> = [&uniform, &y, &z, &out]
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("add_relu"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        AddRelu::Gpu {
            device: device.clone(),
            queue: queue.clone(),
            pipeline,
            bind_group,
            grid: (gx, groups.div_ceil(gx)),
        }
    }

    /// One pass, submitted (the caller waits).
    pub fn run(&mut self) {
        match self {
            AddRelu::Cpu { y, z, out } => {
                const CHUNK: usize = 1 << 16;
                let chunks: Vec<Mutex<&mut [f32]>> =
                    out.chunks_mut(CHUNK).map(Mutex::new).collect();
                pool::for_each(chunks.len(), |i| {
                    let mut o = chunks[i].lock().expect("not poisoned");
                    let n = o.len();
                    let (ys, zs) = (&y[i * CHUNK..][..n], &z[i * CHUNK..][..n]);
                    for ((o, &a), &b) in o.iter_mut().zip(ys).zip(zs) {
                        *o = (a + b).max(0.0);
                    }
                });
                drop(chunks);
                std::hint::black_box(&out);
            }
            AddRelu::Gpu {
                device,
                queue,
                pipeline,
                bind_group,
                grid,
            } => {
                let mut enc = device.create_command_encoder(&Default::default());
                {
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    pass.set_pipeline(pipeline);
                    pass.set_bind_group(0, &*bind_group, &[]);
                    pass.dispatch_workgroups(grid.0, grid.1, 1);
                }
                queue.submit(Some(enc.finish()));
            }
        }
    }
}

/// Copies `bytes` bytes from one resident buffer to another: the faster of two vec4 copy
/// kernels on a GPU, a multithreaded `copy_from_slice` on the CPU (on the CPU path's own
/// thread pool, `cpu::pool`). The bandwidth ceiling each backend is judged against.
pub enum Copier {
    Gpu {
        device: wgpu::Device,
        queue: wgpu::Queue,
        /// (grid-stride, chunked) pipelines and bind groups.
        variants: Vec<(wgpu::ComputePipeline, wgpu::BindGroup)>,
        /// Which variant `time` runs.
        pick: usize,
        grid: (u32, u32),
    },
    Cpu {
        src: Vec<f32>,
        dst: Vec<f32>,
    },
}

impl Copier {
    pub fn new(ctx: &Context, bytes: usize) -> Self {
        let len = bytes.div_ceil(16) * 4;
        let Some((device, queue)) = ctx.wgpu() else {
            return Copier::Cpu {
                src: data(len, 3),
                dst: vec![0.0; len],
            };
        };
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("copy"),
            source: wgpu::ShaderSource::Wgsl(include_str!("copy.wgsl").into()),
        });
        let usage = wgpu::BufferUsages::STORAGE;
        let src = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("copy src"),
            contents: bytemuck::cast_slice(&data(len, 3)),
            usage,
        });
        let dst = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("copy dst"),
            size: (len * 4) as u64,
            usage,
            mapped_at_creation: false,
        });
        let total = (len / 4) as u32;
        // 8 vec4 per invocation, 2048 per workgroup, in both mappings.
        let groups = total.div_ceil(256 * 8).max(1);
        let gx = groups.min(65535);
        let grid = (gx, groups.div_ceil(gx));
        let params: [u32; 4] = [total, groups * 256, groups, gx];
        let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("copy params"),
            contents: bytemuck::cast_slice(&params),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let variants = ["main", "chunked"]
            .iter()
            .map(|entry| {
                let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some("copy"),
                    layout: None,
                    module: &module,
                    entry_point: Some(entry),
                    compilation_options: Default::default(),
                    cache: None,
                });
                let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("copy"),
                    layout: &pipeline.get_bind_group_layout(0),
                    entries: &[
                        wgpu::BindGroupEntry {
                            binding: 0,
                            resource: uniform.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 1,
                            resource: src.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 2,
                            resource: dst.as_entire_binding(),
                        },
                    ],
                });
                (pipeline, bind_group)
            })
            .collect();
        let mut copier = Copier::Gpu {
            device: device.clone(),
            queue: queue.clone(),
            variants,
            pick: 0,
            grid,
        };
        // The ceiling is the faster mapping on this adapter.
        let times: Vec<f64> = (0..2)
            .map(|v| {
                if let Copier::Gpu { pick, .. } = &mut copier {
                    *pick = v;
                }
                median_ms(|i| copier.time(i), 5, Duration::from_millis(200))
            })
            .collect();
        if let Copier::Gpu { pick, .. } = &mut copier {
            *pick = if times[1] < times[0] { 1 } else { 0 };
        }
        copier
    }

    /// `iters` copies, then a wait.
    pub fn time(&mut self, iters: u64) -> Duration {
        let t = Instant::now();
        match self {
            Copier::Cpu { src, dst } => {
                // Threaded exactly as the CPU path is (the calling thread works too).
                const CHUNK: usize = 1 << 16;
                for _ in 0..iters {
                    let chunks: Vec<Mutex<&mut [f32]>> =
                        dst.chunks_mut(CHUNK).map(Mutex::new).collect();
                    pool::for_each(chunks.len(), |i| {
                        let mut d = chunks[i].lock().expect("not poisoned");
                        let s = &src[i * CHUNK..][..d.len()];
                        d.copy_from_slice(s);
                    });
                    drop(chunks);
                    std::hint::black_box(&dst);
                }
            }
            Copier::Gpu {
                device,
                queue,
                variants,
                pick,
                grid,
            } => {
                let (pipeline, bind_group) = &variants[*pick];
                for _ in 0..iters {
                    let mut enc = device.create_command_encoder(&Default::default());
                    {
                        let mut pass = enc.begin_compute_pass(&Default::default());
                        pass.set_pipeline(pipeline);
                        pass.set_bind_group(0, bind_group, &[]);
                        pass.dispatch_workgroups(grid.0, grid.1, 1);
                    }
                    queue.submit(Some(enc.finish()));
                }
                device
                    .poll(wgpu::PollType::wait_indefinitely())
                    .expect("device wait failed");
            }
        }
        t.elapsed()
    }
}

/// Median milliseconds per call of `f(iters)` (which times `iters` calls): repeats until
/// `min_reps` samples and `min_time` have passed.
pub fn median_ms(mut f: impl FnMut(u64) -> Duration, min_reps: usize, min_time: Duration) -> f64 {
    f(2); // warm-up: pipelines, caches, allocator
    let start = Instant::now();
    let mut samples = Vec::new();
    while samples.len() < min_reps || start.elapsed() < min_time {
        samples.push(f(1).as_secs_f64() * 1e3);
        if samples.len() > 1000 {
            break;
        }
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// A backend's name in bench ids and tables: "cpu", or "<backend>: <adapter>" without the
/// driver's version details in parentheses (e.g. "vulkan: llvmpipe"), so that saved
/// criterion baselines survive a driver update.
pub fn bench_name(ctx: &Context) -> String {
    let name = ctx.name();
    match name.find(" (") {
        Some(i) => name[..i].to_string(),
        None => name,
    }
}

/// The font of every chart (bench_report's PNG, criterion's HTML reports): DejaVu Sans
/// from Debian's fonts-dejavu-core.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Registers [`FONT`] as plotters' "sans-serif" (plotters' pure-Rust text path finds no
/// system fonts by itself).
pub fn register_chart_font() -> Result<(), String> {
    let font = std::fs::read(FONT).map_err(|e| {
        format!("{FONT}: {e} (the charts' font comes from Debian's fonts-dejavu-core)")
    })?;
    plotters::style::register_font(
        "sans-serif",
        plotters::style::FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| format!("{FONT}: not a usable font"))
}

/// Every backend to measure: the CPU path and each GPU adapter.
pub fn contexts() -> Vec<Context> {
    contexts_tuned(DeviceTuning::default())
}

/// As [`contexts`], the GPU contexts with `tuning`.
pub fn contexts_tuned(tuning: DeviceTuning) -> Vec<Context> {
    let mut all = vec![Context::cpu()];
    for ctx in Context::all_gpus_tuned(ContextOptions::default(), tuning) {
        match ctx {
            Ok(c) => all.push(c),
            Err(e) => eprintln!("skipping unusable adapter: {e}"),
        }
    }
    if all.len() == 1 {
        eprintln!("!!! no GPU adapter found: only the CPU path is measured");
    }
    all
}
