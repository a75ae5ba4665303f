// Shared by every kernel. The host prepends `const WG: u32 = …;`, `const CAP`, `const FUSED`
// and one prelude
// (prelude_vec4.wgsl or prelude_scalar.wgsl) that defines `V`, `VW`, `hsum` and `finite_v`.
//
// Data model: every tensor is viewed as (outer, channels, inner) in units of V, so that
// unit (o, c, s) lives at index base + (o * channels + c) * inner + s. NCHW is (N, C, H·W);
// (N, C) and channels-last are (N·spatial, C, 1). A tensor larger than one storage binding
// is processed in chunks of whole outer rows; each dispatch then sees one chunk as its
// tensor (`outer` = rows in the chunk), bound at an aligned offset at or before the chunk's
// first row, which lies `base` units into the binding; reductions place their partials by
// tile_offset.

// Mirrors `gpu::kernels::Params` (src/gpu/kernels.rs) field for field.
struct Params {
    outer: u32,
    channels: u32,
    inner: u32,      // units of V per (outer, channel) run
    tiles: u32,      // reduction tiles per channel; finalize: summaries merged per channel
    tile_len: u32,   // units of one channel handled by one reduction workgroup
    total: u32,      // *_cols kernels: units per outer row
    count: u32,      // scalars per channel (N·spatial) in this dispatch's tensor
    groups: u32,     // workgroups that do work (the grid may be larger)
    groups_x: u32,   // width of the 2-D grid
    flags: u32,      // FLAG_* below
    eps: f32,
    momentum: f32,   // already resolved: momentum, or 1/num_batches_tracked
    tile_stride: u32, // partials per channel over all chunks (reductions)
    tile_offset: u32, // first partial of this chunk within a channel's partials
    col_block: u32,   // column kernels: unit columns per workgroup (a power of two ≤ WG)
    col_blocks: u32,  // column kernels: workgroups across the unit columns
    base: u32,        // data kernels: units from the binding's start to the chunk's first row
    part_cstride: u32, // finalize: summary t of channel c is at c·part_cstride + t·part_tstride
    part_tstride: u32,
    bessel: f32,      // n/(n − 1) of the whole batch, computed on the host in f64
    inv_count: f32,   // 1/n of the whole batch (backward dx), computed on the host in f64
    row_values: u32,  // *_cols kernels over paired rows: values per outer row (odd); else 0
    half_last: u32,   // paired rows: 1 where the chunk's last row holds one outer row only
    _pad2: u32,
}

const FLAG_UPDATE_RUNNING: u32 = 1u;
const FLAG_TRAINING: u32 = 2u;
// Finalize kernels: one invocation per channel merges all its partials (few tiles), instead
// of one workgroup per channel with a tree merge (many tiles).
const FLAG_THREAD_PER_CHANNEL: u32 = 8u;
// γ / β are bound (absent: γ = 1, β = 0).
const FLAG_WEIGHT: u32 = 16u;
const FLAG_BIAS: u32 = 32u;
// stats_finalize: write the saved (mean, invstd); write the merged summaries (Moments).
const FLAG_SAVED: u32 = 64u;
const FLAG_MOMENTS: u32 = 128u;
// bwd_finalize: write the per-channel sums (GradSums) instead of the dx coefficients;
// write dγ; write dβ.
const FLAG_SUMS: u32 = 256u;
const FLAG_DWEIGHT: u32 = 512u;
const FLAG_DBIAS: u32 = 1024u;
// bwd_onepass: write dx.
const FLAG_DX: u32 = 2048u;
// Fused epilogue, y = relu(bn(x) + z), in the kernels' FUSED variants (the host prepends
// `const FUSED: bool`, and picks that variant where a launch sets one of these flags).
// apply*: add the residual z; apply*: relu, and bwd_partials* / bwd_dx*: mask dy by y > 0
// (the fused forward's output).
const FLAG_RESIDUAL: u32 = 4096u;
const FLAG_RELU: u32 = 8192u;
// bwd_dx*: write dz = the masked dy (the residual's gradient).
const FLAG_DZ: u32 = 16384u;

@group(0) @binding(0) var<uniform> p: Params;

// Linear workgroup index of a (possibly 2-D) grid; grids are 2-D past 65535 workgroups.
fn group_index(wid: vec3<u32>) -> u32 {
    return wid.x + wid.y * p.groups_x;
}

// Whether any of the flags in `flag` is set.
fn has(flag: u32) -> bool {
    return (p.flags & flag) != 0u;
}

// max(v, 0) that keeps NaN a NaN (as torch.relu does): WGSL leaves max with NaN open.
fn relu_v(v: V) -> V {
    return select(v, V(0.0), v < V(0.0));
}

// ReLU's backward (PyTorch's threshold_backward on the result): g where y > 0, else 0.
fn relu_grad(g: V, y: V) -> V {
    return select(V(0.0), g, y > V(0.0));
}

fn finite(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7f800000u) != 0x7f800000u;
}

// A partial summary of some values: (count, k, mean − k, sd), where the shift k is one of
// the (finite) values and sd = sqrt(M2/count) their biased standard deviation. Keeping the
// mean relative to k keeps it precise relative to the spread of the data rather than to its
// magnitude (at 1e5 an absolute f32 mean has an ulp of 0.008, more than a tenth of the std
// of a 64-value partial with std 0.5). Keeping the standard deviation rather than M2 or the
// variance keeps every summary finite wherever its variance is below f32's max squared: a
// partial of few values can have a variance far above its channel's (two values ±2e19
// have variance 4e38, past f32's 3.4e38, in a channel whose variance is 1e38), and the
// merges that follow bring it back down.
//
// Chan et al.'s pairwise merge of two summaries, var = wa·var_a + wb·var_b + (d·wa)·(d·wb)
// with wa = n_a/n, wb = n_b/n, evaluated on sd's scaled by the largest of sd_a, sd_b, |d|.
// d = (k_b − k_a) + (m_b − m_a) is exact up to f32 rounding of d itself when the shifts are
// data values of similar magnitude. Where d is not finite (a channel holding ±Inf) the mean
// is the plain weighted mean, so +Inf stays +Inf (and +Inf with −Inf is NaN), as in a sum.
fn chan_merge(a: vec4<f32>, b: vec4<f32>) -> vec4<f32> {
    if (b.x == 0.0) {
        return a;
    }
    if (a.x == 0.0) {
        return b;
    }
    let n = a.x + b.x;
    let wb = b.x / n;
    let wa = a.x / n;
    let d = (b.y - a.y) + (b.z - a.z);
    var rel = a.z + d * wb;
    if (!finite(d)) {
        rel = ((a.y + a.z) * wa + (b.y + b.z) * wb) - a.y;
    }
    return vec4<f32>(n, a.y, rel, merged_sd(a.w, b.w, d, wa, wb));
}

// sqrt(wa·sa² + wb·sb² + (d·wa)·(d·wb)) without overflow. A zero, infinite or NaN scale
// gives sa + sb + |d|: 0, +Inf or NaN, as the formula would.
fn merged_sd(sa: f32, sb: f32, d: f32, wa: f32, wb: f32) -> f32 {
    let s = max(max(sa, sb), abs(d));
    if (!(s > 0.0) || !finite(s)) {
        return sa + sb + abs(d);
    }
    let ra = sa / s;
    let rb = sb / s;
    let rd = d / s;
    return s * sqrt(wa * ra * ra + wb * rb * rb + (wa * rd) * (wb * rd));
}

// A summary from shifted sums s1 = Σ (x − k) and s2 = Σ ((x − k)/sc)² of `cnt` values:
// var = (Σ d² − Σ d · mean(d)) / n, as its sd. sc is 1, or 2^64 in the overflow fallback,
// where the terms are divided by sc before they multiply and the sd is scaled back. A
// variance that rounding made negative (by a few ulps) is taken by its magnitude: abs
// keeps NaN a NaN, where a clamp with max or select does not on every backend (GL's
// compiler turned such a select into a max, which drops the NaN of an infinite channel).
fn scaled_summary(cnt: f32, k: f32, s1: f32, s2: f32, sc: f32) -> vec4<f32> {
    let rel = s1 / cnt;
    let v = (s2 - (s1 / sc) * (rel / sc)) / cnt;
    return vec4<f32>(cnt, k, rel, sqrt(abs(v)) * sc);
}

// The variance of a summary's sd, and 1/sqrt(var + eps): where the variance passes f32's
// range the eps no longer matters and invstd is 1/sd (tiny, finite).
fn variance_of(sd: f32) -> f32 {
    return sd * sd;
}

// The running variance's update, m·(var·bessel) + (1 − m)·running, where var = sd². Past
// sd ≈ 1.8e19 the variance itself overflows f32 although m·var·bessel may not (PyTorch
// updates in double on the CPU and gets the finite value): then the product is taken as
// (m·sd)·(sd·bessel).
fn running_var_update(sd: f32, running: f32) -> f32 {
    var batch = p.momentum * (variance_of(sd) * p.bessel);
    if (!finite(batch) && finite(sd)) {
        batch = (p.momentum * sd) * (sd * p.bessel);
    }
    return batch + (1.0 - p.momentum) * running;
}

fn invstd_of(sd: f32, eps: f32) -> f32 {
    let v = sd * sd;
    if (finite(v)) {
        return 1.0 / sqrt(v + eps);
    }
    return 1.0 / sd;
}

// 2^-64 and 2^64: the overflow fallback of the partial kernels sums (x − k)·2^-64 where
// (x − k)² overflows f32 although the variance fits, and scales the variance back by 2^128.
const TINY: f32 = 5.421010862427522e-20;
const HUGE: f32 = 1.8446744073709552e19;

// A shift that is a finite value, or 0: an infinite shift would turn every difference into
// ±Inf or NaN.
fn finite_shift(k: V) -> V {
    var out = k;
    for (var l = 0u; l < VW; l++) {
        if (!finite(get_lane(k, l))) {
            set_lane(&out, l, 0.0);
        }
    }
    return out;
}

// ---- Column mapping (*_cols.wgsl), for short runs: (N, C), channels-last, and NCHW with a
// small spatial size. The tensor is rows (one per outer index, or two: paired rows below)
// of C·run values, in units of V; `total` units per row of the mapping and `outer` rows of
// it, `inner` = values per run, so the channel of value column j is j / inner (modulo the
// outer row where rows are paired: `column_channel`). A workgroup covers `col_block` unit columns × WG/col_block row lanes:
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

// Paired rows (row_values ≠ 0): a half tensor whose outer rows hold an odd number of
// values (row_values) takes two outer rows as one row of the mapping, so that no pair unit
// straddles two of them. Value column j of a mapping row is then column j − row_values of
// its second outer row from row_values on, and where the chunk has an odd number of outer
// rows (half_last) its last mapping row holds the first one only: there unit
// row_values / 2 straddles the tensor's end (its second lane is the last word's unused
// half) and the units after it lie past the end.

// The channel of value column j of a mapping row.
fn column_channel(j: u32) -> u32 {
    if (p.row_values != 0u && j >= p.row_values) {
        return (j - p.row_values) / p.inner;
    }
    return j / p.inner;
}

// The first partial of value column j of a mapping row (at + tile_offset + tile): the
// tensor's column j of the first outer rows, then the same column of the second ones.
fn column_partial(j: u32) -> u32 {
    if (p.row_values != 0u && j >= p.row_values) {
        return (j - p.row_values) * p.tile_stride + p.tile_stride / 2u;
    }
    return j * p.tile_stride;
}

// The end of unit column q's rows among [.., row1): row1, or one less where the chunk's
// last mapping row holds no value of q.
fn column_end(q: u32, row1: u32) -> u32 {
    if (p.half_last != 0u && row1 == p.outer && q > p.row_values / 2u) {
        return row1 - 1u;
    }
    return row1;
}

// The end of unit column q's rows among [.., row1) in which every lane is a value: one
// less than column_end where q straddles the tensor's end in the last mapping row (only
// its first lane is a value there, which the reductions take alone).
fn column_full_end(q: u32, row1: u32) -> u32 {
    if (p.half_last != 0u && row1 == p.outer && q >= p.row_values / 2u) {
        return row1 - 1u;
    }
    return row1;
}

// Whether the rows o0, o0 + step, … include row o.
fn visits(o0: u32, step: u32, o: u32) -> bool {
    return o >= o0 && (o - o0) % step == 0u;
}

// v with every lane but the first zeroed.
fn first_lane(v: V) -> V {
    var r = V(0.0);
    set_lane(&r, 0u, get_lane(v, 0u));
    return r;
}

// ---- One-pass kernels (*_onepass.wgsl), for channels that fit in workgroup memory: a
// workgroup owns `col_block` (B) whole channels; invocation lid works on channel
// g·B + lid % B (its column j) over the channel's values e = lid / B, + WG/B, …

struct BlockPos {
    c: u32,      // channel of this invocation
    j: u32,      // its column within the workgroup's block of channels
    lane: u32,   // its first value
    lanes: u32,  // the step between its values
}

fn block_pos(g: u32, lid: u32) -> BlockPos {
    let j = lid % p.col_block;
    return BlockPos(g * p.col_block + j, j, lid / p.col_block, WG / p.col_block);
}

// Index of value e (of p.count) of channel c: unit (e / inner, c, e % inner).
fn value_index(e: u32, c: u32) -> u32 {
    if (p.inner == 1u) {
        return p.base + e * p.channels + c;
    }
    let o = e / p.inner;
    return p.base + (o * p.channels + c) * p.inner + (e - o * p.inner);
}
