// Statistics, pass 1, for long runs: one workgroup reduces one tile of one channel to a
// summary (count, k, mean − k, sd) (see chan_merge in common.wgsl). Each thread accumulates
// sums of (x − k) and (x − k)² shifted by the tile's first value k, turns them into a summary,
// and the workgroup merges threads with Chan's formula (merge_summaries: reduce_tree.wgsl
// or reduce_subgroup.wgsl).

@group(0) @binding(1) var<storage, read> x: array<S>;
@group(0) @binding(2) var<storage, read_write> partials: array<vec4<f32>>;

// Σ (x − k)·scale and Σ ((x − k)·scale)² over this invocation's units of tile [u0, u1) of
// channel c, walked one run segment at a time (no division or wrap test per unit), and the
// number of units. `scale` is 1 except in the overflow fallback.
struct Sums {
    s1: V,
    s2: V,
    cnt: u32,
}

fn tile_sums(c: u32, u0: u32, u1: u32, lid: u32, k: V, scaled: bool) -> Sums {
    var o = u0 / p.inner;
    var r = Sums(V(0.0), V(0.0), 0u);
    var seg = u0;
    loop {
        if (seg >= u1) {
            break;
        }
        let seg_end = min((o + 1u) * p.inner, u1);
        // Index of unit j of this run: base + (o·C + c)·inner + (j − o·inner).
        let run = p.base + (o * (p.channels - 1u) + c) * p.inner;
        let first = seg + lid;
        if (scaled) {
            for (var j = first; j < seg_end; j += WG) {
                let d = (load_unit(x[run + j]) - k) * TINY;
                r.s1 += d;
                r.s2 += d * d;
            }
        } else {
            for (var j = first; j < seg_end; j += WG) {
                let d = load_unit(x[run + j]) - k;
                r.s1 += d;
                r.s2 += d * d;
            }
        }
        // Units this invocation took from the segment (counted here, not per unit).
        if (first < seg_end) {
            r.cnt += (seg_end - first + WG - 1u) / WG;
        }
        seg = seg_end;
        o += 1u;
    }
    return r;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, at: Lanes) {
    let lid = at.lid;
    let g = group_index(wid);
    if (g >= p.groups) {
        return;
    }
    let c = g / p.tiles;
    let u0 = (g - c * p.tiles) * p.tile_len;
    let u1 = min(u0 + p.tile_len, p.outer * p.inner);

    var k = V(0.0);
    if (u0 < u1) {
        // Shift: the tile's first value (finite).
        k = finite_shift(load_unit(x[p.base + ((u0 / p.inner) * (p.channels - 1u) + c) * p.inner + u0]));
    }
    var r = tile_sums(c, u0, u1, lid, k, false);
    var s2_scale = 1.0;
    if (!finite_v(r.s2) && finite_v(r.s1)) {
        // Finite data whose squared differences overflow: sum them scaled by 2^-64.
        let scaled = tile_sums(c, u0, u1, lid, k, true);
        r.s2 = scaled.s2;
        s2_scale = HUGE;
    }

    var part = vec4<f32>(0.0);
    if (r.cnt > 0u) {
        let fc = f32(r.cnt);
        for (var l = 0u; l < VW; l++) {
            part = chan_merge(part, scaled_summary(fc, get_lane(k, l), get_lane(r.s1, l), get_lane(r.s2, l), s2_scale));
        }
    }
    let merged = merge_summaries(part, at);
    if (lid == 0u) {
        partials[c * p.tile_stride + p.tile_offset + (g - c * p.tiles)] = merged;
    }
}
