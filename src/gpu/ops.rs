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
    channels: u32,
    /// Units (V) per run.
    inner: u32,
    /// Values per run (the spatial size for channels-first; 1 for channels-last).
    run_len: u32,
    /// Bytes of one outer row (all channels).
    row_bytes: u64,
    outer: u32,
    rows_per_chunk: u32,
    chunks: u32,
    /// Scalars per channel in the whole tensor.
    count: u32,
    /// Reduction tiles per channel in one (full) chunk, and units per tile.
    tiles: u32,
    tile_len: u32,
}

/// How invocations map onto values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    /// Along each channel's runs of `inner` values (vec4 when inner % 4 = 0).
    Runs { vec4: bool },
    /// Across channels: inner = 1 and C % 4 = 0 ((N, C) and channels-last). `col_block`
    /// quads of channels per workgroup, `col_blocks` workgroups across them.
    Columns { col_block: u32, col_blocks: u32 },
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
        let vec4 = v.inner % 4 == 0;
        let vw = if vec4 { 4 } else { 1 };
        let inner = (v.inner / vw) as u32;
        let channels = v.channels as u32;
        let wg = WORKGROUP_SIZE;
        let mapping = if v.inner == 1 && v.channels % 4 == 0 {
            let quads = channels / 4;
            let col_block = 1 << quads.min(wg).ilog2();
            Mapping::Columns {
                col_block,
                col_blocks: quads.div_ceil(col_block),
            }
        } else {
            Mapping::Runs { vec4 }
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
        // A tile is a range of one channel's units (runs) or of rows (columns); `lanes`
        // invocations share a tile's work and `across` workgroups share its rows.
        let (per_tile_space, lanes, across) = match mapping {
            Mapping::Runs { .. } => (rows_per_chunk * inner, wg, channels),
            Mapping::Columns {
                col_block,
                col_blocks,
            } => (rows_per_chunk, wg / col_block, col_blocks),
        };
        let tiles_for_work = per_tile_space
            .div_ceil(lanes * tuning.max_units_per_thread)
            .max(1);
        let tiles_for_occupancy = tuning
            .target_groups
            .div_ceil(across.max(1))
            .min(per_tile_space.div_ceil(lanes * MIN_UNITS_PER_THREAD).max(1));
        let tiles = tiles_for_work.max(tiles_for_occupancy);
        let tile_len = per_tile_space
            .div_ceil(tiles)
            .next_multiple_of(lanes)
            .max(lanes);
        let tiles = per_tile_space.div_ceil(tile_len).max(1);
        Ok(Self {
            mapping,
            channels,
            inner,
            run_len: v.inner as u32,
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
        Params {
            outer: rows,
            channels: self.channels,
            inner: self.inner.max(1),
            count: self.count,
            ..Params::default()
        }
    }

    /// Parameters of a reduction pass over one chunk (one workgroup per tile per channel).
    fn reduce(&self, chunk: &Chunk) -> Params {
        let wg = WORKGROUP_SIZE;
        if let Mapping::Columns {
            col_block,
            col_blocks,
        } = self.mapping
        {
            return Params {
                tiles: self.tiles,
                tile_len: self.tile_len,
                groups: col_blocks * self.tiles,
                tile_stride: self.tiles * self.chunks,
                tile_offset: self.tiles * chunk.index,
                col_block,
                col_blocks,
                ..self.base(chunk.rows)
            };
        }
        let inner = self.inner.max(1);
        let (q, r) = (wg / inner, wg % inner);
        Params {
            tiles: self.tiles,
            tile_len: self.tile_len,
            step_addr: q * self.channels * inner + r,
            step_s: r,
            wrap_addr: (self.channels - 1) * inner,
            groups: self.channels * self.tiles,
            tile_stride: self.tiles * self.chunks,
            tile_offset: self.tiles * chunk.index,
            ..self.base(chunk.rows)
        }
    }

    /// Parameters of a per-channel finalize pass over `tiles` partials per channel.
    fn finalize(&self, tiles: u32, eps: f32, momentum: f32, flags: u32) -> Params {
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

    /// Whether element-wise passes use the row mapping (a workgroup per chunk of one run:
    /// long runs) rather than the column mapping (short runs, (N, C), channels-last).
    fn long_runs(&self) -> bool {
        matches!(self.mapping, Mapping::Runs { .. }) && self.inner >= WORKGROUP_SIZE
    }

    /// Parameters of an element-wise pass over one chunk.
    fn elementwise(&self, chunk: &Chunk, flags: u32) -> Params {
        let wg = WORKGROUP_SIZE;
        let base = self.base(chunk.rows);
        if self.long_runs() {
            let tile_len = wg * APPLY_UNITS_PER_THREAD;
            let tiles = self.inner.div_ceil(tile_len);
            return Params {
                tiles,
                tile_len,
                groups: chunk.rows * self.channels * tiles,
                flags,
                ..base
            };
        }
        // Columns: rows of C·run_len values, in units of 4 when that divides.
        let row_len = self.channels * self.run_len;
        let units = if row_len % 4 == 0 {
            row_len / 4
        } else {
            row_len
        };
        let col_block = 1 << units.clamp(1, wg).ilog2();
        let col_blocks = units.div_ceil(col_block);
        let tile_len = wg / col_block * APPLY_UNITS_PER_THREAD;
        let tiles = chunk.rows.div_ceil(tile_len);
        Params {
            inner: self.run_len.max(1),
            total: units,
            tiles,
            tile_len,
            groups: col_blocks * tiles,
            col_block,
            col_blocks,
            flags,
            ..base
        }
    }

    /// The element-wise kernel: `rows` for long runs, else `cols` (vec4 when rows of
    /// C·run_len values divide into vec4).
    fn pick_elementwise<'k>(&self, rows: &'k Variants, cols: &'k Variants) -> &'k Kernel {
        match self.mapping {
            Mapping::Runs { vec4 } if self.long_runs() => rows.get(vec4),
            _ => cols.get((self.channels * self.run_len) % 4 == 0),
        }
    }

    /// The kernel of this plan's mapping: `runs` (vec4 or scalar variant) or `columns`.
    fn pick<'k>(&self, runs: &'k Variants, columns: &'k Kernel) -> &'k Kernel {
        match self.mapping {
            Mapping::Runs { vec4 } => runs.get(vec4),
            Mapping::Columns { .. } => columns,
        }
    }

    /// Floats of partials scratch the reductions need.
    pub fn partials_len(&self) -> usize {
        4 * (self.channels * self.tiles * self.chunks) as usize
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
    let chunks = plan.chunk_list();
    let mut launches = Vec::with_capacity(2 * chunks.len() + 1);
    if batch_stats {
        for chunk in &chunks {
            launches.push(Launch {
                kernel: plan.pick(&k.stats_partials, &k.stats_partials_cl),
                params: plan.reduce(chunk),
                buffers: vec![part(b.x, chunk), b.partials.into()],
            });
        }
        let flags = if momentum.is_some() {
            FLAG_UPDATE_RUNNING
        } else {
            0
        };
        let tiles = plan.tiles * plan.chunks;
        launches.push(Launch {
            kernel: &k.stats_finalize,
            params: plan.finalize(tiles, eps, momentum.unwrap_or(0.0), flags),
            buffers: vec![b.partials.into(), b.state.into(), b.saved.into()],
        });
    } else {
        let mut params = plan.finalize(0, eps, 0.0, 0);
        params.groups = plan.channels.div_ceil(WORKGROUP_SIZE);
        launches.push(Launch {
            kernel: &k.stats_running,
            params,
            buffers: vec![b.state.into(), b.saved.into()],
        });
    }
    for chunk in &chunks {
        launches.push(Launch {
            kernel: plan.pick_elementwise(&k.apply, &k.apply_cols),
            params: plan.elementwise(chunk, 0),
            buffers: vec![
                part(b.x, chunk),
                b.saved.into(),
                b.state.into(),
                part(b.y, chunk),
            ],
        });
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
                kernel: plan.pick(&k.bwd_partials, &k.bwd_partials_cl),
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
    let tiles = if reduce { plan.tiles * plan.chunks } else { 0 };
    launches.push(Launch {
        kernel: &k.bwd_finalize,
        params: plan.finalize(tiles, 0.0, 0.0, flags),
        buffers: [b.partials, b.saved, b.state, b.dweight, b.dbias, b.coef]
            .map(Bind::from)
            .to_vec(),
    });
    if let Some(dx) = b.dx {
        for chunk in &chunks {
            launches.push(Launch {
                kernel: plan.pick_elementwise(&k.bwd_dx, &k.bwd_dx_cols),
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
        encode(
            &g.device,
            &mut encoder,
            g.limits.max_compute_workgroups_per_dimension,
            launches,
        );
        g.queue.submit(Some(encoder.finish()));
    })
}
