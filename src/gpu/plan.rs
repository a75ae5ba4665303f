//! How a tensor is cut into binding-sized chunks and workgroups (a [`Plan`]), and the
//! kernel parameters of each pass over it. The launch sequences are in
//! [`backend`](super::backend).

use std::sync::Arc;

use super::kernels::{Bind, Family, Params, FLAG_THREAD_PER_CHANNEL, WORKGROUP_SIZE};
use super::pool::GpuBuffer;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shape::View;

/// Reduction invocations get at least this many units when a tile is split for occupancy.
const MIN_UNITS_PER_THREAD: u32 = 4;
/// A finalize pass merges per channel in one invocation up to this many partials, and with a
/// whole workgroup (tree merge) beyond.
const FINALIZE_THREAD_MAX_TILES: u32 = 64;

/// How the reductions cut their work into workgroups. A performance knob: every choice
/// gives the same results within f32 rounding, and the suite runs under both presets on
/// every adapter it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Partitioning {
    /// Per device type: [`SoftwareAdapter`](Self::SoftwareAdapter) on CPU implementations
    /// of Vulkan/GL, [`DiscreteGpu`](Self::DiscreteGpu) on every other device.
    #[default]
    Auto,
    /// Few, long workgroups (16 target workgroups, up to 256 units per invocation): CPU
    /// implementations run a workgroup per core at a time and pay for every barrier of
    /// every workgroup.
    SoftwareAdapter,
    /// Many workgroups (1024 target workgroups, up to 32 units per invocation): GPUs want
    /// thousands of workgroups in flight. Sends the per-channel finalize of most shapes to
    /// its workgroup-per-channel tree merge.
    DiscreteGpu,
    /// Explicit numbers: reduction workgroups to aim for when channels alone are too few
    /// to fill the device, and the most units (vec4 or scalar) one reduction invocation
    /// accumulates. Both at least 1.
    Explicit {
        /// The reduction workgroups to aim for when channels alone are too few.
        target_groups: u32,
        /// The most units (vec4 or scalar) one reduction invocation accumulates.
        max_units_per_thread: u32,
    },
}

impl Partitioning {
    /// The preset `Auto` stands for on a device of `device_type`; other choices as they are.
    pub fn resolve(self, device_type: wgpu::DeviceType) -> Self {
        match (self, device_type) {
            (Partitioning::Auto, wgpu::DeviceType::Cpu) => Partitioning::SoftwareAdapter,
            (Partitioning::Auto, _) => Partitioning::DiscreteGpu,
            (other, _) => other,
        }
    }

    /// (target workgroups, most units per invocation), with `Auto` resolved.
    pub(crate) fn numbers(self, device_type: wgpu::DeviceType) -> Tuning {
        match self.resolve(device_type) {
            Partitioning::SoftwareAdapter => Tuning {
                target_groups: 16,
                max_units_per_thread: 256,
            },
            Partitioning::Explicit {
                target_groups,
                max_units_per_thread,
            } => Tuning {
                target_groups: target_groups.max(1),
                max_units_per_thread: max_units_per_thread.max(1),
            },
            _ => Tuning {
                target_groups: 1024,
                max_units_per_thread: 32,
            },
        }
    }
}

/// How a device likes its work cut (the numbers of a [`Partitioning`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tuning {
    /// Reduction workgroups to aim for when channels alone are too few to fill the device.
    pub target_groups: u32,
    /// Most units one reduction invocation accumulates (its shifted sums stay short).
    pub max_units_per_thread: u32,
}

/// Units each thread of the element-wise kernels handles.
const APPLY_UNITS_PER_THREAD: u32 = 8;

/// How one tensor is cut into binding-sized chunks of whole outer rows, and each chunk into
/// workgroups.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// The device's `min_storage_buffer_offset_alignment`.
    align: u64,
    mapping: Mapping,
    /// Wide units (vec4), or narrow ones: scalars for f32, pairs for the half types.
    pub vec4: bool,
    /// The storage type of the tensor data.
    pub dtype: DType,
    pub channels: u32,
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
    /// the units (runs) or rows of the mapping (columns; a row pair where rows are paired)
    /// of one tile.
    tiles: u32,
    tile_len: u32,
    /// Set where even one reduction tile per chunk passes the device's binding limit:
    /// (the partials' bytes, the limit). See [`check_reducible`](Self::check_reducible).
    scratch: Option<(u64, u64)>,
}

/// How invocations map onto values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    /// Long runs: along each channel's runs of `inner` units; the element-wise passes give
    /// a workgroup to a chunk of one run.
    Runs { inner: u32 },
    /// Short runs: rows of `units` units (one or two outer rows), `col_block` unit columns per workgroup,
    /// `col_blocks` workgroups across a row (see shaders/common.wgsl).
    Columns {
        units: u32,
        col_block: u32,
        col_blocks: u32,
        /// Each row of the mapping is two outer rows (a half tensor whose outer rows hold
        /// an odd number of values); the last may hold one (`Params::half_last`).
        paired: bool,
    },
}

/// One chunk: its outer rows and, when the tensor is chunked, the byte range bound for it
/// (starting at an aligned offset at or before its first row) and the units from there to
/// its first row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Chunk {
    index: u32,
    rows: u32,
    range: Option<(u64, u64)>,
    base: u32,
}

impl Plan {
    /// `max_binding`: the largest storage binding a chunk of the tensor may take;
    /// `scratch_binding`: the largest the reductions' partials may take (the device's
    /// limit: a binding cap in the options chunks tensors, not the crate's scratch);
    /// `align`: the device's `min_storage_buffer_offset_alignment`.
    pub fn new(
        v: View,
        dtype: DType,
        max_binding: u64,
        scratch_binding: u64,
        align: u64,
        tuning: Tuning,
    ) -> Result<Self> {
        let wg = WORKGROUP_SIZE;
        let channels = v.channels as u32;
        let run_len = v.inner as u32;
        // Values per narrow unit: a scalar, or for the half types the pair in one word.
        let narrow = if dtype == DType::F32 { 1 } else { 2 };
        let (mapping, vec4) = if run_len.is_multiple_of(4) && run_len / 4 >= wg {
            (Mapping::Runs { inner: run_len / 4 }, true)
        } else if run_len >= 4 * wg && run_len.is_multiple_of(narrow) {
            // Long runs that are not whole vec4 units: the runs mapping over narrow units.
            // (The column mapping keeps a partial per value column and tile, as many values
            // as a whole row: for runs this long that is a second tensor's worth of scratch.)
            (
                Mapping::Runs {
                    inner: run_len / narrow,
                },
                false,
            )
        } else {
            let row_len = channels * run_len;
            let vec4 = row_len.is_multiple_of(4);
            // A half row of odd length: pair units would straddle two outer rows, so the
            // column mapping takes two outer rows as one row of the mapping (an even number
            // of values; the kernels find a value's channel modulo the outer row).
            let paired = !vec4 && !row_len.is_multiple_of(narrow);
            let units = if vec4 {
                row_len / 4
            } else if paired {
                row_len
            } else {
                row_len / narrow
            };
            let col_block = 1 << units.clamp(1, wg).ilog2();
            let mapping = Mapping::Columns {
                units,
                col_block,
                col_blocks: units.div_ceil(col_block),
                paired,
            };
            (mapping, vec4)
        };
        let row_bytes = (v.channels * v.inner * dtype.size()) as u64;
        // Whole 32-bit words: an odd count of half values ends in half a word.
        let total_bytes = (row_bytes * v.outer as u64).next_multiple_of(4);
        let paired = matches!(mapping, Mapping::Columns { paired: true, .. });
        let rows_per_chunk = if total_bytes <= max_binding {
            v.outer.max(1) as u64
        } else {
            // A chunk is bound from the aligned offset at or before its first row, so it
            // needs up to `align − 4` bytes of slack before its rows.
            // Paired rows are chunked in pairs, so that every chunk starts at a word.
            let step = if paired { 2 } else { 1 };
            let rows =
                max_binding.saturating_sub(align.saturating_sub(4)) / (row_bytes * step) * step;
            if rows == 0 {
                return Err(Error::TooLarge {
                    bytes: row_bytes * step + align.saturating_sub(4),
                    limit_name: "max_storage_buffer_binding_size (one outer row of the input \
                                 (two for half rows of odd length), plus the slack of the \
                                 storage-offset alignment, must fit one binding)",
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
                paired,
                ..
            } => (
                rows_per_chunk.div_ceil(if paired { 2 } else { 1 }),
                wg / col_block,
                col_blocks,
            ),
        };
        let tiles_for_work = space.div_ceil(lanes * tuning.max_units_per_thread).max(1);
        let tiles_for_occupancy = tuning
            .target_groups
            .div_ceil(across.max(1))
            .min(space.div_ceil(lanes * MIN_UNITS_PER_THREAD).max(1));
        // The partials of all chunks are one binding: 16 bytes per tile and channel (runs)
        // or per tile and value column of a mapping row (columns). Where the occupancy
        // target would pass it, tiles grow longer; where one tile per chunk passes it, the
        // reductions cannot run on this device (the element-wise passes still can).
        let tile_bytes: u64 = 16
            * chunks as u64
            * match mapping {
                Mapping::Runs { .. } => channels as u64,
                Mapping::Columns { paired, .. } => {
                    channels as u64 * run_len as u64 * if paired { 2 } else { 1 }
                }
            };
        // (Empty tensors keep no partials.)
        let most_tiles = (scratch_binding.min(u32::MAX as u64) / tile_bytes.max(1)) as u32;
        let tiles = tiles_for_work
            .max(tiles_for_occupancy)
            .min(most_tiles.max(1));
        let tile_len = space.div_ceil(tiles).next_multiple_of(lanes).max(lanes);
        let tiles = space.div_ceil(tile_len).max(1);
        Ok(Self {
            align,
            mapping,
            vec4,
            dtype,
            channels,
            run_len,
            row_bytes,
            outer: v.outer as u32,
            rows_per_chunk,
            chunks,
            count: v.per_channel() as u32,
            tiles,
            tile_len,
            scratch: (most_tiles == 0).then_some((tile_bytes, scratch_binding)),
        })
    }

    /// Fails where the reductions' partials of one tile per chunk would pass the device's
    /// binding limit: before any reduction is recorded, so nothing has changed.
    pub fn check_reducible(&self) -> Result<()> {
        match self.scratch {
            None => Ok(()),
            Some((bytes, limit)) => Err(Error::TooLarge {
                bytes,
                limit_name: "max_storage_buffer_binding_size (the reductions keep 16 bytes \
                             per value of an outer row (two for half rows of odd length) \
                             and chunk of the tensor in one binding)",
                limit,
            }),
        }
    }

    pub fn chunk_list(&self) -> Vec<Chunk> {
        let unit = self.dtype.size() as u64 * if self.vec4 { 4 } else { self.narrow() };
        (0..self.chunks)
            .map(|index| {
                let o0 = index * self.rows_per_chunk;
                let rows = self.rows_per_chunk.min(self.outer - o0);
                if self.chunks == 1 {
                    // The tensor's own bytes: its buffer may be larger (a size class, or a
                    // caller's buffer), and a whole-buffer binding could pass the limit.
                    return Chunk {
                        index,
                        rows,
                        range: Some((0, (rows as u64 * self.row_bytes).next_multiple_of(4))),
                        base: 0,
                    };
                }
                let start = o0 as u64 * self.row_bytes;
                let bound = start - start % self.align;
                let slack = start - bound;
                Chunk {
                    index,
                    rows,
                    range: Some((
                        bound,
                        (slack + rows as u64 * self.row_bytes).next_multiple_of(4),
                    )),
                    // Chunks start at whole units: rows are whole units (16-byte vec4, 8-byte
                    // half quad, 4-byte scalar or half pair), or, for paired half rows of odd
                    // length, every chunk holds an even number of rows and so starts at a
                    // word. The alignment is a multiple of a unit (or smaller than a row's
                    // unit), so the slack is whole units.
                    base: (slack / unit) as u32,
                }
            })
            .collect()
    }

    /// The chunk's slice of a tensor's buffer (whose values start `buffer.offset` bytes in,
    /// a multiple of the alignment, so the chunk's slack is the same).
    pub fn part(&self, buffer: &Arc<GpuBuffer>, chunk: &Chunk) -> Bind {
        Bind::owned(
            buffer,
            chunk.range.map(|(at, size)| (at + buffer.offset, size)),
        )
    }

    /// The kernels' units: (vec4, the storage type).
    pub fn units(&self) -> (bool, DType) {
        (self.vec4, self.dtype)
    }

    /// Values per narrow unit: 1 (f32 scalars) or 2 (half pairs).
    fn narrow(&self) -> u64 {
        if self.dtype == DType::F32 {
            1
        } else {
            2
        }
    }

    /// Whether the tensor holds no values (nothing to launch).
    pub fn is_empty(&self) -> bool {
        self.outer == 0 || self.channels == 0 || self.run_len == 0
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
                paired,
            } => {
                p.inner = self.run_len;
                p.total = units;
                p.col_block = col_block;
                p.col_blocks = col_blocks;
                if paired {
                    p.outer = rows.div_ceil(2);
                    p.row_values = self.channels * self.run_len;
                    p.half_last = rows % 2;
                }
            }
        }
        p
    }

    /// Rows of the mapping in `rows` outer rows: two outer rows each where they are paired.
    fn mapped_rows(&self, rows: u32) -> u32 {
        match self.mapping {
            Mapping::Columns { paired: true, .. } => rows.div_ceil(2),
            _ => rows,
        }
    }

    /// Partials per value column and channel in one chunk's tile: 2 with paired rows
    /// (value columns j and row_values + j of a mapping row are one column of the tensor).
    fn column_halves(&self) -> u32 {
        match self.mapping {
            Mapping::Columns { paired: true, .. } => 2,
            _ => 1,
        }
    }

    /// Partials per channel, over all chunks: one per tile (runs), one per tile per value
    /// column of the channel (columns; two where rows are paired).
    fn partials_per_channel(&self) -> u32 {
        let per_column = self.tiles * self.chunks;
        match self.mapping {
            Mapping::Runs { .. } => per_column,
            Mapping::Columns { .. } => per_column * self.run_len * self.column_halves(),
        }
    }

    /// Parameters of a reduction pass over one chunk.
    pub fn reduce(&self, chunk: &Chunk) -> Params {
        let mut p = Params {
            base: chunk.base,
            tiles: self.tiles,
            tile_len: self.tile_len,
            tile_stride: self.tiles * self.chunks * self.column_halves(),
            tile_offset: self.tiles * chunk.index,
            ..self.base(chunk.rows)
        };
        match self.mapping {
            Mapping::Runs { .. } => p.groups = self.channels * self.tiles,
            Mapping::Columns { col_blocks, .. } => p.groups = col_blocks * self.tiles,
        }
        p
    }

    /// Parameters of a per-channel finalize pass over this plan's tile partials (none when
    /// `reduced` is false).
    pub fn finalize(&self, reduced: bool, flags: u32) -> Params {
        let tiles = if reduced {
            self.partials_per_channel()
        } else {
            0
        };
        per_channel(self.channels, tiles, tiles, 1, flags)
    }

    /// Parameters of an element-wise pass over one chunk.
    pub fn elementwise(&self, chunk: &Chunk, flags: u32) -> Params {
        let wg = WORKGROUP_SIZE;
        let base = Params {
            base: chunk.base,
            ..self.base(chunk.rows)
        };
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
                let tiles = self.mapped_rows(chunk.rows).div_ceil(tile_len);
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

    /// The family of this plan's mapping: `runs` for long runs, `columns` for short ones.
    pub fn pick(&self, runs: Family, columns: Family) -> Family {
        match self.mapping {
            Mapping::Runs { .. } => runs,
            Mapping::Columns { .. } => columns,
        }
    }

    /// The one-pass kernels' cut of this tensor, where they apply: a single chunk whose
    /// channels each hold at most `cap / per_value` values (`per_value`: floats kept per
    /// value, 1 forward, 2 backward). A workgroup then owns B whole channels, B the
    /// largest power of two up to the workgroup size (and no larger than the channels
    /// need) whose B·count·per_value floats fit in `cap`.
    pub fn one_pass(&self, cap: Option<u32>, per_value: u32) -> Option<OnePass> {
        let cap = cap?;
        let need = self.count.checked_mul(per_value)?;
        // f32 kernels only: a half tensor takes the two passes.
        if self.dtype != DType::F32
            || self.chunks != 1
            || self.is_empty()
            || need == 0
            || need > cap
        {
            return None;
        }
        let fit = 1u32 << (cap / need).ilog2();
        let block = fit
            .min(WORKGROUP_SIZE)
            .min(self.channels.next_power_of_two());
        Some(OnePass {
            block,
            channels: self.channels,
            run_len: self.run_len,
            count: self.count,
        })
    }

    /// Floats of partials scratch the reductions need (within one binding: see
    /// [`new`](Self::new)).
    pub fn partials_len(&self) -> usize {
        4 * self.channels as usize * self.partials_per_channel() as usize
    }

    /// The binding of a partials buffer: its first [`partials_len`](Self::partials_len)
    /// floats, not the whole size-class buffer, which may pass the binding limit.
    pub fn partials(&self, buffer: &Arc<GpuBuffer>) -> Bind {
        let bytes = (4 * self.partials_len() as u64).max(16);
        Bind::owned(buffer, Some((buffer.offset, bytes)))
    }
}

/// The one-pass kernels' cut of a tensor (see [`Plan::one_pass`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct OnePass {
    block: u32,
    channels: u32,
    run_len: u32,
    count: u32,
}

impl OnePass {
    /// Parameters of the one dispatch (the caller adds the flags and scalars).
    pub fn params(&self, flags: u32) -> Params {
        Params {
            channels: self.channels,
            inner: self.run_len,
            count: self.count,
            col_block: self.block,
            groups: self.channels.div_ceil(self.block),
            flags,
            ..Params::default()
        }
    }
}

/// Parameters of a per-channel finalize pass merging `tiles` summaries per channel, summary
/// t of channel c at `c·cstride + t·tstride`: one invocation per channel for few summaries,
/// a workgroup per channel (tree merge) for many.
pub(crate) fn per_channel(
    channels: u32,
    tiles: u32,
    cstride: u32,
    tstride: u32,
    flags: u32,
) -> Params {
    let (groups, flags) = if tiles <= FINALIZE_THREAD_MAX_TILES {
        (
            channels.div_ceil(WORKGROUP_SIZE),
            flags | FLAG_THREAD_PER_CHANNEL,
        )
    } else {
        (channels, flags)
    };
    Params {
        channels,
        tiles,
        groups,
        flags,
        part_cstride: cstride,
        part_tstride: tstride,
        ..Params::default()
    }
}
