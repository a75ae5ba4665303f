//! Launch sequences. Training forward: stats_partials → stats_finalize → apply (x read
//! twice, y written once). Inference: stats_running → apply. Backward: bwd_partials →
//! bwd_finalize → bwd_dx (x and dy read twice, dx written once). All dispatches of an
//! operation go into one submission; nothing is read back.

use super::context::GpuContext;
use super::kernels::{
    encode, Launch, Params, FLAG_ROWS, FLAG_TRAINING, FLAG_UPDATE_RUNNING, WORKGROUP_SIZE,
};
use crate::error::Result;
use crate::shape::View;

/// Reduction workgroups never give a thread more than this many units (keeps each thread's
/// shifted sums short), nor fewer than `MIN_UNITS_PER_THREAD` when splitting for occupancy.
const MAX_UNITS_PER_THREAD: u32 = 32;
const MIN_UNITS_PER_THREAD: u32 = 4;
/// Reduction workgroups to aim for when channels alone are too few to fill a device.
const TARGET_GROUPS: u32 = 1024;
/// Units each thread of the element-wise kernels handles.
const APPLY_UNITS_PER_THREAD: u32 = 8;

/// How one tensor is cut into workgroups.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub vec4: bool,
    outer: u32,
    channels: u32,
    /// Units (V) per run.
    inner: u32,
    total: u32,
    count: u32,
    tiles: u32,
    tile_len: u32,
}

impl Plan {
    pub fn new(v: View) -> Self {
        let vec4 = v.inner % 4 == 0;
        let vw = if vec4 { 4 } else { 1 };
        let inner = (v.inner / vw) as u32;
        let per_channel = v.outer as u32 * inner;
        let channels = v.channels as u32;
        let wg = WORKGROUP_SIZE;
        let tiles_for_work = per_channel.div_ceil(wg * MAX_UNITS_PER_THREAD).max(1);
        let tiles_for_occupancy = TARGET_GROUPS
            .div_ceil(channels.max(1))
            .min(per_channel.div_ceil(wg * MIN_UNITS_PER_THREAD).max(1));
        let tiles = tiles_for_work.max(tiles_for_occupancy);
        let tile_len = per_channel.div_ceil(tiles).next_multiple_of(wg).max(wg);
        let tiles = per_channel.div_ceil(tile_len).max(1);
        Self {
            vec4,
            outer: v.outer as u32,
            channels,
            inner,
            total: (v.numel() / vw) as u32,
            count: v.per_channel() as u32,
            tiles,
            tile_len,
        }
    }

    fn base(&self) -> Params {
        Params {
            outer: self.outer,
            channels: self.channels,
            inner: self.inner.max(1),
            count: self.count,
            ..Params::default()
        }
    }

    /// Parameters of a reduction pass (one workgroup per tile per channel).
    fn reduce(&self) -> Params {
        let wg = WORKGROUP_SIZE;
        let inner = self.inner.max(1);
        let (q, r) = (wg / inner, wg % inner);
        Params {
            tiles: self.tiles,
            tile_len: self.tile_len,
            step_addr: q * self.channels * inner + r,
            step_s: r,
            wrap_addr: (self.channels - 1) * inner,
            groups: self.channels * self.tiles,
            ..self.base()
        }
    }

    /// Parameters of a per-channel finalize pass over `tiles` partials.
    fn finalize(&self, tiles: u32, eps: f32, momentum: f32, flags: u32) -> Params {
        Params {
            tiles,
            groups: self.channels,
            eps,
            momentum,
            flags,
            ..self.base()
        }
    }

    /// Parameters of an element-wise pass: a workgroup per chunk of a run when runs are
    /// long, else a grid-stride loop.
    fn elementwise(&self, flags: u32) -> Params {
        let wg = WORKGROUP_SIZE;
        let inner = self.inner.max(1);
        if inner >= wg {
            let tile_len = wg * APPLY_UNITS_PER_THREAD;
            let tiles = inner.div_ceil(tile_len);
            return Params {
                tiles,
                tile_len,
                groups: self.outer * self.channels * tiles,
                flags: flags | FLAG_ROWS,
                ..self.base()
            };
        }
        let groups = self.total.div_ceil(wg * APPLY_UNITS_PER_THREAD).max(1);
        let gstep = groups * wg;
        Params {
            total: self.total,
            gstep,
            gstep_s: gstep % inner,
            gstep_c: (gstep / inner) % self.channels,
            groups,
            flags,
            ..self.base()
        }
    }

    /// Floats of partials scratch the reductions need.
    pub fn partials_len(&self) -> usize {
        4 * (self.channels * self.tiles) as usize
    }
}

/// Buffers of one forward.
pub(crate) struct ForwardBuffers<'a> {
    pub x: &'a wgpu::Buffer,
    pub state: &'a wgpu::Buffer,
    pub partials: &'a wgpu::Buffer,
    pub saved: &'a wgpu::Buffer,
    pub y: &'a wgpu::Buffer,
}

/// Encodes and submits a forward. `batch_stats`: compute statistics from x (and update the
/// running ones when `momentum` is given); otherwise normalize with the running statistics.
pub(crate) fn forward(
    g: &GpuContext,
    plan: &Plan,
    b: &ForwardBuffers<'_>,
    batch_stats: bool,
    momentum: Option<f32>,
    eps: f32,
) -> Result<()> {
    let k = &g.kernels;
    let mut launches = Vec::with_capacity(3);
    if batch_stats {
        launches.push(Launch {
            kernel: k.stats_partials.get(plan.vec4),
            params: plan.reduce(),
            buffers: vec![b.x, b.partials],
        });
        let flags = if momentum.is_some() {
            FLAG_UPDATE_RUNNING
        } else {
            0
        };
        launches.push(Launch {
            kernel: &k.stats_finalize,
            params: plan.finalize(plan.tiles, eps, momentum.unwrap_or(0.0), flags),
            buffers: vec![b.partials, b.state, b.saved],
        });
    } else {
        let mut params = plan.finalize(0, eps, 0.0, 0);
        params.groups = plan.channels.div_ceil(WORKGROUP_SIZE);
        launches.push(Launch {
            kernel: &k.stats_running,
            params,
            buffers: vec![b.state, b.saved],
        });
    }
    launches.push(Launch {
        kernel: k.apply.get(plan.vec4),
        params: plan.elementwise(0),
        buffers: vec![b.x, b.saved, b.state, b.y],
    });
    run(g, &launches)
}

/// Buffers of one backward.
pub(crate) struct BackwardBuffers<'a> {
    pub x: &'a wgpu::Buffer,
    pub dy: &'a wgpu::Buffer,
    pub saved: &'a wgpu::Buffer,
    pub state: &'a wgpu::Buffer,
    pub partials: &'a wgpu::Buffer,
    pub dweight: &'a wgpu::Buffer,
    pub dbias: &'a wgpu::Buffer,
    pub coef: &'a wgpu::Buffer,
    pub dx: Option<&'a wgpu::Buffer>,
}

/// Encodes and submits a backward. The reduction runs only when `reduce` (dγ/dβ wanted, or
/// the training dx, which needs the sums); the dx pass only when `b.dx` is given.
pub(crate) fn backward(
    g: &GpuContext,
    plan: &Plan,
    b: &BackwardBuffers<'_>,
    training: bool,
    reduce: bool,
) -> Result<()> {
    let k = &g.kernels;
    let flags = if training { FLAG_TRAINING } else { 0 };
    let mut launches = Vec::with_capacity(3);
    if reduce {
        launches.push(Launch {
            kernel: k.bwd_partials.get(plan.vec4),
            params: plan.reduce(),
            buffers: vec![b.x, b.dy, b.saved, b.partials],
        });
    }
    let tiles = if reduce { plan.tiles } else { 0 };
    launches.push(Launch {
        kernel: &k.bwd_finalize,
        params: plan.finalize(tiles, 0.0, 0.0, flags),
        buffers: vec![b.partials, b.saved, b.state, b.dweight, b.dbias, b.coef],
    });
    if let Some(dx) = b.dx {
        launches.push(Launch {
            kernel: k.bwd_dx.get(plan.vec4),
            params: plan.elementwise(flags),
            buffers: vec![b.x, b.dy, b.coef, dx],
        });
    }
    run(g, &launches)
}

fn run(g: &GpuContext, launches: &[Launch<'_>]) -> Result<()> {
    g.guarded(|| {
        let mut encoder = g
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("batchnorm"),
            });
        encode(
            &g.device,
            &mut encoder,
            g.limits.max_compute_workgroups_per_dimension,
            launches,
        );
        g.queue.submit(Some(encoder.finish()));
    })
}
