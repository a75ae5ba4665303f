// Statistics, pass 1, for long runs: one workgroup reduces one tile of one channel to a
// summary (count, k, mean − k, M2) (see chan_merge in common.wgsl). Each thread accumulates
// sums of (x − k) and (x − k)² shifted by the tile's first value k, turns them into a summary,
// and the workgroup merges threads with Chan's formula.

@group(0) @binding(1) var<storage, read> x: array<V>;
@group(0) @binding(2) var<storage, read_write> partials: array<vec4<f32>>;

var<workgroup> sh: array<vec4<f32>, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wid);
    if (g >= p.groups) {
        return;
    }
    let c = g / p.tiles;
    let u0 = (g - c * p.tiles) * p.tile_len;
    let u1 = min(u0 + p.tile_len, p.outer * p.inner);

    // The tile is units [u0, u1) of channel c (unit j is (o, s) = (j / inner, j % inner));
    // it is walked one run segment at a time: no division or wrap test per unit.
    var o = u0 / p.inner;
    var k = V(0.0);
    if (u0 < u1) {
        // Shift: the tile's first value.
        k = x[(o * (p.channels - 1u) + c) * p.inner + u0];
    }
    var cnt = 0u;
    var s1 = V(0.0);
    var s2 = V(0.0);
    var seg = u0;
    loop {
        if (seg >= u1) {
            break;
        }
        let seg_end = min((o + 1u) * p.inner, u1);
        // Index of unit j of this run: (o·C + c)·inner + (j − o·inner).
        let base = (o * (p.channels - 1u) + c) * p.inner;
        let first = seg + lid;
        for (var j = first; j < seg_end; j += WG) {
            let d = x[base + j] - k;
            s1 += d;
            s2 += d * d;
        }
        // Units this invocation took from the segment (counted here, not per unit).
        if (first < seg_end) {
            cnt += (seg_end - first + WG - 1u) / WG;
        }
        seg = seg_end;
        o += 1u;
    }

    var part = vec4<f32>(0.0);
    if (cnt > 0u) {
        let fc = f32(cnt);
        let rel = s1 / fc;
        let m2 = s2 - s1 * s1 / fc;
        for (var l = 0u; l < VW; l++) {
            part = chan_merge(part, vec4<f32>(fc, get_lane(k, l), get_lane(rel, l), get_lane(m2, l)));
        }
    }
    sh[lid] = part;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lid < stride) {
            sh[lid] = chan_merge(sh[lid], sh[lid + stride]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        partials[c * p.tile_stride + p.tile_offset + (g - c * p.tiles)] = sh[0];
    }
}
