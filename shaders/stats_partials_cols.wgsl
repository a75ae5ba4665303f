// Statistics, pass 1, column mapping (see common.wgsl): each invocation accumulates
// shifted sums of its unit column over its rows of the tile; the row lanes of each column
// are merged with Chan's formula; each value column j writes one (count, k, mean − k, sd)
// summary (see chan_merge in common.wgsl), at column_partial(j) + tile_offset + tile. A
// channel's columns are adjacent, so its partials are one contiguous range that
// stats_finalize merges.

@group(0) @binding(1) var<storage, read> x: array<S>;
@group(0) @binding(2) var<storage, read_write> partials: array<vec4<f32>>;

// Per lane: count, shift k, mean − k, sd. The lanes of an invocation have equal counts
// except in a unit that straddles the end of a tensor of paired rows (common.wgsl).
struct MomentsV {
    n: V,
    k: V,
    rel: V,
    sd: V,
}

var<workgroup> sh: array<MomentsV, WG>;

// chan_merge (common.wgsl) of each lane, in vector arithmetic.
fn merge_v(a: MomentsV, b: MomentsV) -> MomentsV {
    let n = a.n + b.n;
    let safe = select(n, V(1.0), n == V(0.0));
    let wb = b.n / safe;
    let wa = a.n / safe;
    let d = (b.k - a.k) + (b.rel - a.rel);
    let plain = ((a.k + a.rel) * wa + (b.k + b.rel) * wb) - a.k;
    let rel = select(plain, a.rel + d * wb, finite_lanes(d));
    let sd = merged_sd_v(a.sd, b.sd, d, wa, wb);
    // An empty side gives the other one as it is.
    let a_only = b.n == V(0.0);
    let b_only = a.n == V(0.0);
    return MomentsV(
        n,
        select(a.k, b.k, b_only),
        select(select(rel, a.rel, a_only), b.rel, b_only),
        select(select(sd, a.sd, a_only), b.sd, b_only),
    );
}

// merged_sd (common.wgsl) per lane.
fn merged_sd_v(sa: V, sb: V, d: V, wa: V, wb: V) -> V {
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
    // A unit straddling the tensor's end takes its last row's first lane alone (`tail`).
    let end = column_end(pos.q, row1);
    let full_end = column_full_end(pos.q, row1);
    let tail = full_end != end && visits(o0, pos.lanes, end - 1u);
    if (pos.q < p.total && o0 < end) {
        k = finite_shift(load_unit(x[p.base + o0 * p.total + pos.q]));
        for (var o = o0; o < full_end; o += pos.lanes) {
            let d = load_unit(x[p.base + o * p.total + pos.q]) - k;
            s1 += d;
            s2 += d * d;
            cnt += 1u;
        }
        if (tail) {
            let d = first_lane(load_unit(x[p.base + (end - 1u) * p.total + pos.q]) - k);
            s1 += d;
            s2 += d * d;
        }
    }
    var sc = 1.0;
    if ((cnt > 0u || tail) && !finite_v(s2) && finite_v(s1)) {
        // Finite data whose squared differences overflow: sum them scaled by 2^-64.
        s2 = V(0.0);
        for (var o = o0; o < full_end; o += pos.lanes) {
            let d = (load_unit(x[p.base + o * p.total + pos.q]) - k) * TINY;
            s2 += d * d;
        }
        if (tail) {
            let d = first_lane((load_unit(x[p.base + (end - 1u) * p.total + pos.q]) - k) * TINY);
            s2 += d * d;
        }
        sc = HUGE;
    }
    var counts = V(f32(cnt));
    if (tail) {
        set_lane(&counts, 0u, f32(cnt + 1u));
    }
    var m = MomentsV(V(0.0), V(0.0), V(0.0), V(0.0));
    if (cnt > 0u || tail) {
        var rel = V(0.0);
        var v = V(0.0);
        for (var l = 0u; l < VW; l++) {
            let n = get_lane(counts, l);
            if (n > 0.0) {
                let s = scaled_summary(n, get_lane(k, l), get_lane(s1, l), get_lane(s2, l), sc);
                set_lane(&rel, l, s.z);
                set_lane(&v, l, s.w);
            }
        }
        m = MomentsV(counts, k, rel, v);
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
            partials[column_partial(j) + slot] = vec4<f32>(get_lane(r.n, l), get_lane(r.k, l), get_lane(r.rel, l), get_lane(r.sd, l));
        }
    }
}
