// Backward, pass 1: one workgroup reduces one tile of one channel to
// (Σ dy, Σ dy·(x − μ)), μ being the mean the forward normalized with. The same tiling and
// walk as the statistics pass; x and dy are each read once. With FLAG_RELU, dy is masked
// by the fused forward's y > 0 as it is read (y is read once too), and with FLAG_DZ the
// masked dy is written out as dz.

@group(0) @binding(1) var<storage, read> x: array<S>;
@group(0) @binding(2) var<storage, read> dy: array<S>;
@group(0) @binding(3) var<storage, read> stats: array<vec2<f32>>; // (mean, invstd)
@group(0) @binding(4) var<storage, read_write> partials: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> y: array<S>; // the fused forward's output, read with FLAG_RELU
@group(0) @binding(6) var<storage, read_write> dz: array<S>; // the masked dy, written with FLAG_DZ

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
    let mu = V(stats[c].x);

    // Run segment by run segment, as in stats_partials.wgsl.
    var o = u0 / p.inner;
    var sdy = V(0.0);
    var sdyx = V(0.0);
    var seg = u0;
    loop {
        if (seg >= u1) {
            break;
        }
        let seg_end = min((o + 1u) * p.inner, u1);
        let base = p.base + (o * (p.channels - 1u) + c) * p.inner;
        if (FUSED && has(FLAG_DZ)) {
            // The masked dy is the residual's gradient: written here, where dy and y are
            // read anyway, so that the dx pass reads it instead of both (28 bytes per value
            // in all instead of 32).
            for (var j = seg + lid; j < seg_end; j += WG) {
                let g_out = relu_grad(load_unit(dy[base + j]), load_unit(y[base + j]));
                dz[base + j] = store_unit(g_out);
                sdy += g_out;
                sdyx += g_out * (load_unit(x[base + j]) - mu);
            }
        } else if (FUSED) {
            for (var j = seg + lid; j < seg_end; j += WG) {
                let g_out = relu_grad(load_unit(dy[base + j]), load_unit(y[base + j]));
                sdy += g_out;
                sdyx += g_out * (load_unit(x[base + j]) - mu);
            }
        } else {
            for (var j = seg + lid; j < seg_end; j += WG) {
                let g_out = load_unit(dy[base + j]);
                sdy += g_out;
                sdyx += g_out * (load_unit(x[base + j]) - mu);
            }
        }
        seg = seg_end;
        o += 1u;
    }
    let sums = add_sums(vec2<f32>(hsum(sdy), hsum(sdyx)), at);
    if (lid == 0u) {
        partials[c * p.tile_stride + p.tile_offset + (g - c * p.tiles)] = vec4<f32>(sums, 0.0, 0.0);
    }
}
