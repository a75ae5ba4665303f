// Training forward in one pass, for channels whose values fit in workgroup memory: each
// workgroup owns `col_block` whole channels (B below), loads their values once into
// workgroup memory, reduces them to per-channel summaries exactly as stats_partials +
// stats_finalize do (shifted sums per invocation, Chan merges, the overflow fallback),
// writes the saved (mean, invstd) and the running update as stats_finalize does, and
// normalizes from workgroup memory: x is read once, and one launch replaces three.
//
// Scalar units. The host prepends `const CAP: u32 = …;` (floats of workgroup memory for
// values, from the device's limit) and picks B (a power of two ≤ WG) so that
// count · B ≤ CAP. Invocation lid works on channel g·B + lid % B, over its values
// e = lid / B, + WG/B, … (value e of channel c is at (e / inner, c, e % inner)).

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>; // γ, read with FLAG_WEIGHT
@group(0) @binding(3) var<storage, read> bias: array<f32>;   // β, read with FLAG_BIAS
@group(0) @binding(4) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(5) var<storage, read_write> running_var: array<f32>;
@group(0) @binding(6) var<storage, read_write> saved: array<vec2<f32>>; // (mean, invstd)
@group(0) @binding(7) var<storage, read_write> y: array<f32>;

var<workgroup> vals: array<f32, CAP>;
var<workgroup> sh: array<vec4<f32>, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wid);
    if (g >= p.groups) {
        return;
    }
    let pos = block_pos(g, lid);
    let n = p.count;
    let live = pos.c < p.channels;

    // Load, and accumulate sums shifted by this invocation's first value.
    var k = 0.0;
    var cnt = 0u;
    var s1 = 0.0;
    var s2 = 0.0;
    if (live && pos.lane < n) {
        k = finite_shift(x[value_index(pos.lane, pos.c)]);
        for (var e = pos.lane; e < n; e += pos.lanes) {
            let v = x[value_index(e, pos.c)];
            vals[e * p.col_block + pos.j] = v;
            let d = v - k;
            s1 += d;
            s2 += d * d;
            cnt += 1u;
        }
    }
    var sc = 1.0;
    if (cnt > 0u && !finite(s2) && finite(s1)) {
        // Finite data whose squared differences overflow: sum them scaled by 2^-64.
        s2 = 0.0;
        for (var e = pos.lane; e < n; e += pos.lanes) {
            let d = (vals[e * p.col_block + pos.j] - k) * TINY;
            s2 += d * d;
        }
        sc = HUGE;
    }
    var m = vec4<f32>(0.0);
    if (cnt > 0u) {
        m = scaled_summary(f32(cnt), k, s1, s2, sc);
    }
    sh[lid] = m;
    workgroupBarrier();
    for (var stride = pos.lanes / 2u; stride > 0u; stride >>= 1u) {
        if (pos.lane < stride) {
            sh[lid] = chan_merge(sh[lid], sh[lid + stride * p.col_block]);
        }
        workgroupBarrier();
    }
    if (!live) {
        return;
    }
    let r = sh[pos.j];
    let mean = r.y + r.z;
    let invstd = invstd_of(r.w, p.eps);
    if (pos.lane == 0u) {
        if (has(FLAG_SAVED)) {
            saved[pos.c] = vec2<f32>(mean, invstd);
        }
        if (has(FLAG_UPDATE_RUNNING)) {
            running_mean[pos.c] = p.momentum * mean + (1.0 - p.momentum) * running_mean[pos.c];
            running_var[pos.c] = running_var_update(r.w, running_var[pos.c]);
        }
    }
    var gamma = 1.0;
    if (has(FLAG_WEIGHT)) {
        gamma = weight[pos.c];
    }
    var beta = 0.0;
    if (has(FLAG_BIAS)) {
        beta = bias[pos.c];
    }
    let scale = gamma * invstd;
    for (var e = pos.lane; e < n; e += pos.lanes) {
        y[value_index(e, pos.c)] = (vals[e * p.col_block + pos.j] - mean) * scale + beta;
    }
}
