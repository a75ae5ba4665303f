//! Launch sequences. Training forward: stats_partials → stats_finalize → apply (x read
//! twice, y written once). Inference: stats_running → apply. Backward: bwd_partials →
//! bwd_finalize → bwd_dx (x and dy read twice, dx written once). All dispatches of an
//! operation go into one submission; nothing is read back.

use super::context::GpuContext;
use super::kernels::{
    encode, Bind, Kernel, Launch, Params, Variants, FLAG_THREAD_PER_CHANNEL, FLAG_TRAINING,
    FLAG_UPDATE_RUNNING, WORKGROUP_SIZE,
};
use crate::error::{Error, Result};
use crate::shape::View;

/// Reduction invocations get at least this many units when a tile is split for occupancy.
const MIN_UNITS_PER_THREAD: u32 = 4;
/// A finalize pass merges per channel in one invocation up to this many partials, and with a
/// whole workgroup (tree merge) beyond.
const FINALIZE_THREAD_MAX_TILES: u32 = 64;

/// How a device likes its work cut.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tuning {
    /// Reduction workgroups to aim for when channels alone are too few to fill the device.
    pub target_groups: u32,
    /// Most units one reduction invocation accumulates (its shifted sums stay short).
    pub max_units_per_thread: u32,
}

impl Tuning {
    /// GPUs want thousands of workgroups in flight. CPU implementations of Vulkan/GL run a
    /// workgroup per core at a time and pay for every barrier of every workgroup, so they
    /// want few, long workgroups.
    pub fn for_device(device_type: wgpu::DeviceType) -> Self {
        match device_type {
            wgpu::DeviceType::Cpu => Self {
                target_groups: 16,
                max_units_per_thread: 256,
            },
            _ => Self {
                target_groups: 1024,
                max_units_per_thread: 32,
            },
        }
    }
}
/// Units each thread of the element-wise kernels handles.
const APPLY_UNITS_PER_THREAD: u32 = 8;

/// How one tensor is cut into binding-sized chunks of whole outer rows, and each chunk into
/// workgroups.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    mapping: Mapping,
    vec4: bool,
    channels: u32,
    /// Values per run (the spatial size for channels-first; 1 for channels-last).
    run_len: u32,
    /// Bytes of one outer row (all channels).
    row_bytes: u64,
    outer: u32,
    rows_per_chunk: u32,
    chunks: u32,
    /// Scalars per channel in the whole tensor.
    count: u32,
    /// Reduction tiles per channel (runs) or per column (columns) in one full chunk, and
    /// the units (runs) or rows (columns) of one tile.
    tiles: u32,
    tile_len: u32,
}

/// How invocations map onto values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    /// Long runs: along each channel's runs of `inner` units; the element-wise passes give
    /// a workgroup to a chunk of one run.
    Runs { inner: u32 },
    /// Short runs: rows of `units` units, `col_block` unit columns per workgroup,
    /// `col_blocks` workgroups across a row (see shaders/common.wgsl).
    Columns {
        units: u32,
        col_block: u32,
        col_blocks: u32,
    },
}

/// One chunk: its outer rows and, when the tensor is chunked, its byte range.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    index: u32,
    rows: u32,
    range: Option<(u64, u64)>,
}

impl Plan {
    /// `max_binding`: the largest storage binding to use; `align`: the device's
    /// `min_storage_buffer_offset_alignment`.
    pub fn new(v: View, max_binding: u64, align: u64, tuning: Tuning) -> Result<Self> {
        let wg = WORKGROUP_SIZE;
        let channels = v.channels as u32;
        let run_len = v.inner as u32;
        let (mapping, vec4) = if run_len.is_multiple_of(4) && run_len / 4 >= wg {
            (Mapping::Runs { inner: run_len / 4 }, true)
        } else {
            let row_len = channels * run_len;
            let vec4 = row_len.is_multiple_of(4);
            let units = if vec4 { row_len / 4 } else { row_len };
            let col_block = 1 << units.clamp(1, wg).ilog2();
            let mapping = Mapping::Columns {
                units,
                col_block,
                col_blocks: units.div_ceil(col_block),
            };
            (mapping, vec4)
        };
        let row_bytes = (v.channels * v.inner * 4) as u64;
        let total_bytes = row_bytes * v.outer as u64;
        let rows_per_chunk = if total_bytes <= max_binding {
            v.outer.max(1) as u64
        } else {
            // Chunk offsets must be multiples of `align`.
            let step = align / gcd(row_bytes, align);
            let rows = max_binding / row_bytes / step * step;
            if rows == 0 {
                return Err(Error::TooLarge {
                    bytes: total_bytes,
                    limit_name: "max_storage_buffer_binding_size (one outer row must fit)",
                    limit: max_binding,
                });
            }
            rows
        } as u32;
        let chunks = (v.outer as u32).div_ceil(rows_per_chunk).max(1);
        // A reduction tile is a range of one channel's units (runs) or of rows (columns);
        // `lanes` invocations share a tile and `across` workgroups run beside it.
        let (space, lanes, across) = match mapping {
            Mapping::Runs { inner } => (rows_per_chunk * inner, wg, channels),
            Mapping::Columns {
                col_block,
                col_blocks,
                ..
            } => (rows_per_chunk, wg / col_block, col_blocks),
        };
        let tiles_for_work = space.div_ceil(lanes * tuning.max_units_per_thread).max(1);
        let tiles_for_occupancy = tuning
            .target_groups
            .div_ceil(across.max(1))
            .min(space.div_ceil(lanes * MIN_UNITS_PER_THREAD).max(1));
        let tiles = tiles_for_work.max(tiles_for_occupancy);
        let tile_len = space.div_ceil(tiles).next_multiple_of(lanes).max(lanes);
        let tiles = space.div_ceil(tile_len).max(1);
        Ok(Self {
            mapping,
            vec4,
            channels,
            run_len,
            row_bytes,
            outer: v.outer as u32,
            rows_per_chunk,
            chunks,
            count: v.per_channel() as u32,
            tiles,
            tile_len,
        })
    }

    fn chunk_list(&self) -> Vec<Chunk> {
        (0..self.chunks)
            .map(|index| {
                let o0 = index * self.rows_per_chunk;
                let rows = self.rows_per_chunk.min(self.outer - o0);
                let range = (self.chunks > 1)
                    .then(|| (o0 as u64 * self.row_bytes, rows as u64 * self.row_bytes));
                Chunk { index, rows, range }
            })
            .collect()
    }

    fn base(&self, rows: u32) -> Params {
        let mut p = Params {
            outer: rows,
            channels: self.channels,
            count: self.count,
            ..Params::default()
        };
        match self.mapping {
            Mapping::Runs { inner } => p.inner = inner,
            Mapping::Columns {
                units,
                col_block,
                col_blocks,
            } => {
                p.inner = self.run_len;
                p.total = units;
                p.col_block = col_block;
                p.col_blocks = col_blocks;
            }
        }
        p
    }

    /// Partials per channel, over all chunks: one per tile (runs), one per tile per value
    /// column of the channel (columns).
    fn partials_per_channel(&self) -> u32 {
        let per_column = self.tiles * self.chunks;
        match self.mapping {
            Mapping::Runs { .. } => per_column,
            Mapping::Columns { .. } => per_column * self.run_len,
        }
    }

    /// Parameters of a reduction pass over one chunk.
    fn reduce(&self, chunk: &Chunk) -> Params {
        let mut p = Params {
            tiles: self.tiles,
            tile_len: self.tile_len,
            tile_stride: self.tiles * self.chunks,
            tile_offset: self.tiles * chunk.index,
            ..self.base(chunk.rows)
        };
        match self.mapping {
            Mapping::Runs { .. } => p.groups = self.channels * self.tiles,
            Mapping::Columns { col_blocks, .. } => p.groups = col_blocks * self.tiles,
        }
        p
    }

    /// Parameters of a per-channel finalize pass; `reduced` says whether partials exist.
    fn finalize(&self, reduced: bool, eps: f32, momentum: f32, flags: u32) -> Params {
        let tiles = if reduced {
            self.partials_per_channel()
        } else {
            0
        };
        let (groups, flags) = if tiles <= FINALIZE_THREAD_MAX_TILES {
            (
                self.channels.div_ceil(WORKGROUP_SIZE),
                flags | FLAG_THREAD_PER_CHANNEL,
            )
        } else {
            (self.channels, flags)
        };
        Params {
            tiles,
            groups,
            eps,
            momentum,
            flags,
            ..self.base(self.outer)
        }
    }

    /// Parameters of an element-wise pass over one chunk.
    fn elementwise(&self, chunk: &Chunk, flags: u32) -> Params {
        let wg = WORKGROUP_SIZE;
        let base = self.base(chunk.rows);
        match self.mapping {
            Mapping::Runs { inner } => {
                let tile_len = wg * APPLY_UNITS_PER_THREAD;
                let runs = chunk.rows * self.channels;
                if inner <= tile_len {
                    // One whole run per workgroup (tile_len = 0 tells the kernel).
                    return Params {
                        tiles: 1,
                        tile_len: 0,
                        groups: runs,
                        flags,
                        ..base
                    };
                }
                let tiles = inner.div_ceil(tile_len);
                Params {
                    tiles,
                    tile_len,
                    groups: runs * tiles,
                    flags,
                    ..base
                }
            }
            Mapping::Columns {
                col_block,
                col_blocks,
                ..
            } => {
                let tile_len = wg / col_block * APPLY_UNITS_PER_THREAD;
                let tiles = chunk.rows.div_ceil(tile_len);
                Params {
                    tiles,
                    tile_len,
                    groups: col_blocks * tiles,
                    flags,
                    ..base
                }
            }
        }
    }

    /// The kernel of this plan's mapping, in its vec4 or scalar variant.
    fn pick<'k>(&self, runs: &'k Variants, columns: &'k Variants) -> &'k Kernel {
        match self.mapping {
            Mapping::Runs { .. } => runs.get(self.vec4),
            Mapping::Columns { .. } => columns.get(self.vec4),
        }
    }

    /// Floats of partials scratch the reductions need.
    pub fn partials_len(&self) -> usize {
        4 * (self.channels * self.partials_per_channel()) as usize
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a.max(1)
    } else {
        gcd(b, a % b)
    }
}

/// The chunk's slice of a tensor-sized buffer.
fn part<'a>(buffer: &'a wgpu::Buffer, chunk: &Chunk) -> Bind<'a> {
    Bind {
        buffer,
        range: chunk.range,
    }
}

/// Buffers of one forward.
pub(crate) struct ForwardBuffers<'a> {
    pub x: &'a wgpu::Buffer,
    pub state: &'a wgpu::Buffer,
    pub partials: &'a wgpu::Buffer,
    pub saved: &'a wgpu::Buffer,
    /// None: statistics only (the frozen statistics of an inference backward).
    pub y: Option<&'a wgpu::Buffer>,
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
    let chunks = plan.chunk_list();
    let mut launches = Vec::with_capacity(2 * chunks.len() + 1);
    if batch_stats {
        for chunk in &chunks {
            launches.push(Launch {
                kernel: plan.pick(&k.stats_partials, &k.stats_partials_cols),
                params: plan.reduce(chunk),
                buffers: vec![part(b.x, chunk), b.partials.into()],
            });
        }
        let flags = if momentum.is_some() {
            FLAG_UPDATE_RUNNING
        } else {
            0
        };
        launches.push(Launch {
            kernel: &k.stats_finalize,
            params: plan.finalize(true, eps, momentum.unwrap_or(0.0), flags),
            buffers: vec![b.partials.into(), b.state.into(), b.saved.into()],
        });
    } else {
        let mut params = plan.finalize(false, eps, 0.0, 0);
        params.groups = plan.channels.div_ceil(WORKGROUP_SIZE);
        launches.push(Launch {
            kernel: &k.stats_running,
            params,
            buffers: vec![b.state.into(), b.saved.into()],
        });
    }
    if let Some(y) = b.y {
        for chunk in &chunks {
            launches.push(Launch {
                kernel: plan.pick(&k.apply, &k.apply_cols),
                params: plan.elementwise(chunk, 0),
                buffers: vec![
                    part(b.x, chunk),
                    b.saved.into(),
                    b.state.into(),
                    part(y, chunk),
                ],
            });
        }
    }
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
    let chunks = plan.chunk_list();
    let mut launches = Vec::with_capacity(2 * chunks.len() + 1);
    if reduce {
        for chunk in &chunks {
            launches.push(Launch {
                kernel: plan.pick(&k.bwd_partials, &k.bwd_partials_cols),
                params: plan.reduce(chunk),
                buffers: vec![
                    part(b.x, chunk),
                    part(b.dy, chunk),
                    b.saved.into(),
                    b.partials.into(),
                ],
            });
        }
    }
    launches.push(Launch {
        kernel: &k.bwd_finalize,
        params: plan.finalize(reduce, 0.0, 0.0, flags),
        buffers: [b.partials, b.saved, b.state, b.dweight, b.dbias, b.coef]
            .map(Bind::from)
            .to_vec(),
    });
    if let Some(dx) = b.dx {
        for chunk in &chunks {
            launches.push(Launch {
                kernel: plan.pick(&k.bwd_dx, &k.bwd_dx_cols),
                params: plan.elementwise(chunk, flags),
                buffers: vec![
                    part(b.x, chunk),
                    part(b.dy, chunk),
                    b.coef.into(),
                    part(dx, chunk),
                ],
            });
        }
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
        let stamps = g.timer.as_ref().and_then(|t| t.begin(&g.device));
        encode(
            &g.device,
            &g.queue,
            &mut encoder,
            g.limits.max_compute_workgroups_per_dimension,
            launches,
            stamps.as_ref().map(|s| &s.query_set),
        );
        if let (Some(timer), Some(stamps)) = (&g.timer, stamps) {
            timer.end(&mut encoder, stamps);
        }
        g.queue.submit(Some(encoder.finish()));
    })
}
