// Shared by every kernel. The host prepends `const WG: u32 = …;` and one prelude
// (prelude_vec4.wgsl or prelude_scalar.wgsl) that defines `V`, `VW` and `hsum`.
//
// Data model: every tensor is viewed as (outer, channels, inner) in units of V, so that
// unit (o, c, s) lives at index (o * channels + c) * inner + s. NCHW is (N, C, H·W);
// (N, C) and channels-last are (N·spatial, C, 1). A tensor larger than one storage binding
// is processed in chunks of whole outer rows; each dispatch then sees one chunk as its
// tensor (`outer` = rows in the chunk) and reductions place their partials by tile_offset.

// Mirrors `gpu::kernels::Params` (src/gpu/kernels.rs) field for field.
struct Params {
    outer: u32,
    channels: u32,
    inner: u32,      // units of V per (outer, channel) run
    tiles: u32,      // reduction tiles per channel
    tile_len: u32,   // units of one channel handled by one reduction workgroup
    total: u32,      // *_cols kernels: units per outer row
    count: u32,      // scalars per channel (N·spatial)
    groups: u32,     // workgroups that do work (the grid may be larger)
    groups_x: u32,   // width of the 2-D grid
    flags: u32,      // FLAG_* below
    eps: f32,
    momentum: f32,   // already resolved: momentum, or 1/num_batches_tracked
    tile_stride: u32, // partials per channel over all chunks (reductions)
    tile_offset: u32, // first partial of this chunk within a channel's partials
    col_block: u32,   // column kernels: unit columns per workgroup (a power of two ≤ WG)
    col_blocks: u32,  // column kernels: workgroups across the unit columns
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    _pad3: u32,
}

const FLAG_UPDATE_RUNNING: u32 = 1u;
const FLAG_TRAINING: u32 = 2u;
// Finalize kernels: one invocation per channel merges all its partials (few tiles), instead
// of one workgroup per channel with a tree merge (many tiles).
const FLAG_THREAD_PER_CHANNEL: u32 = 8u;

@group(0) @binding(0) var<uniform> p: Params;

// Linear workgroup index of a (possibly 2-D) grid; grids are 2-D past 65535 workgroups.
fn group_index(wid: vec3<u32>) -> u32 {
    return wid.x + wid.y * p.groups_x;
}

// A partial summary of some values: (count, k, mean − k, M2), where the shift k is one of
// the values. Keeping the mean relative to k keeps it precise relative to the spread of the
// data rather than to its magnitude (at 1e5 an absolute f32 mean has an ulp of 0.008, more
// than a tenth of the std of a 64-value partial with std 0.5).
//
// Chan et al.'s pairwise merge of two summaries. d = (k_b − k_a) + (m_b − m_a) is exact
// up to f32 rounding of d itself when the shifts are data values of similar magnitude.
fn chan_merge(a: vec4<f32>, b: vec4<f32>) -> vec4<f32> {
    if (b.x == 0.0) {
        return a;
    }
    if (a.x == 0.0) {
        return b;
    }
    let n = a.x + b.x;
    let d = (b.y - a.y) + (b.z - a.z);
    let wb = b.x / n;
    return vec4<f32>(n, a.y, a.z + d * wb, a.w + b.w + d * d * a.x * wb);
}

// ---- Column mapping (*_cols.wgsl), for short runs: (N, C), channels-last, and NCHW with a
// small spatial size. The tensor is rows (one per outer index) of C·run values, in units
// of V; `total` units per row, `inner` = values per run, so the channel of value column j
// is j / inner. A workgroup covers `col_block` unit columns × WG/col_block row lanes:
// neighbouring invocations read neighbouring addresses, and each invocation keeps its
// columns' per-channel parameters in registers for all its rows.

struct ColumnPos {
    q: u32,      // unit column of this invocation
    lane: u32,   // row lane within the workgroup
    lanes: u32,  // row lanes per workgroup
    tile: u32,   // row tile of this workgroup
}

fn column_pos(g: u32, lid: u32) -> ColumnPos {
    let cb = g % p.col_blocks;
    let col = lid % p.col_block;
    return ColumnPos(cb * p.col_block + col, lid / p.col_block, WG / p.col_block, g / p.col_blocks);
}
