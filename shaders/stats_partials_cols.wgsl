// Statistics, pass 1, column mapping (see common.wgsl): each invocation accumulates
// shifted sums of its unit column over its rows of the tile; the row lanes of each column
// are merged with Chan's formula; each value column j writes one (count, k, mean − k, sd)
// summary (see chan_merge in common.wgsl), at j·tile_stride + tile_offset + tile. A
// channel's columns are adjacent, so its partials are one contiguous range that
// stats_finalize merges.

@group(0) @binding(1) var<storage, read> x: array<S>;
@group(0) @binding(2) var<storage, read_write> partials: array<vec4<f32>>;

// Per lane: count (equal for all lanes), shift k, mean − k, sd.
struct MomentsV {
    n: f32,
    k: V,
    rel: V,
    sd: V,
}

var<workgroup> sh: array<MomentsV, WG>;

// chan_merge (common.wgsl) of each lane, in vector arithmetic (the lanes of one invocation
// have equal counts).
fn merge_v(a: MomentsV, b: MomentsV) -> MomentsV {
    if (b.n == 0.0) {
        return a;
    }
    if (a.n == 0.0) {
        return b;
    }
    let n = a.n + b.n;
    let wb = b.n / n;
    let wa = a.n / n;
    let d = (b.k - a.k) + (b.rel - a.rel);
    let plain = ((a.k + a.rel) * wa + (b.k + b.rel) * wb) - a.k;
    let rel = select(plain, a.rel + d * wb, finite_lanes(d));
    return MomentsV(n, a.k, rel, merged_sd_v(a.sd, b.sd, d, wa, wb));
}

// merged_sd (common.wgsl) per lane.
fn merged_sd_v(sa: V, sb: V, d: V, wa: f32, wb: f32) -> V {
    let s = max(max(sa, sb), abs(d));
    let usable = (s > V(0.0)) & finite_lanes(s);
    let safe = select(V(1.0), s, usable);
    let ra = sa / safe;
    let rb = sb / safe;
    let rd = d / safe;
    let merged = s * sqrt(wa * ra * ra + wb * rb * rb + (wa * rd) * (wb * rd));
    return select(sa + sb + abs(d), merged, usable);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wid);
    if (g >= p.groups) {
        return;
    }
    let pos = column_pos(g, lid);
    let row0 = pos.tile * p.tile_len;
    let row1 = min(row0 + p.tile_len, p.outer);

    var cnt = 0u;
    var k = V(0.0);
    var s1 = V(0.0);
    var s2 = V(0.0);
    let o0 = row0 + pos.lane;
    if (pos.q < p.total && o0 < row1) {
        k = finite_shift(load_unit(x[p.base + o0 * p.total + pos.q]));
        for (var o = o0; o < row1; o += pos.lanes) {
            let d = load_unit(x[p.base + o * p.total + pos.q]) - k;
            s1 += d;
            s2 += d * d;
            cnt += 1u;
        }
    }
    var sc = 1.0;
    if (cnt > 0u && !finite_v(s2) && finite_v(s1)) {
        // Finite data whose squared differences overflow: sum them scaled by 2^-64.
        s2 = V(0.0);
        for (var o = o0; o < row1; o += pos.lanes) {
            let d = (load_unit(x[p.base + o * p.total + pos.q]) - k) * TINY;
            s2 += d * d;
        }
        sc = HUGE;
    }
    var m = MomentsV(0.0, V(0.0), V(0.0), V(0.0));
    if (cnt > 0u) {
        let n = f32(cnt);
        var rel = V(0.0);
        var v = V(0.0);
        for (var l = 0u; l < VW; l++) {
            let s = scaled_summary(n, get_lane(k, l), get_lane(s1, l), get_lane(s2, l), sc);
            set_lane(&rel, l, s.z);
            set_lane(&v, l, s.w);
        }
        m = MomentsV(n, k, rel, v);
    }
    sh[lid] = m;
    workgroupBarrier();
    for (var stride = pos.lanes / 2u; stride > 0u; stride >>= 1u) {
        if (pos.lane < stride) {
            sh[lid] = merge_v(sh[lid], sh[lid + stride * p.col_block]);
        }
        workgroupBarrier();
    }
    if (pos.lane == 0u && pos.q < p.total) {
        let r = sh[lid];
        let slot = p.tile_offset + pos.tile;
        for (var l = 0u; l < VW; l++) {
            let j = pos.q * VW + l;
            partials[j * p.tile_stride + slot] = vec4<f32>(r.n, get_lane(r.k, l), get_lane(r.rel, l), get_lane(r.sd, l));
        }
    }
}
