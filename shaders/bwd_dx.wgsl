// Backward, pass 2 over the data, for long runs (see apply.wgsl):
//   dx = a·dy + b·(x − μ) − a·mean(dy), coefficients per channel from bwd_finalize.
// Reads x and dy once, writes dx once. In eval mode dx = a·dy exactly and x is not read (a
// non-finite x cannot leak into dx). The FUSED variant (the fused epilogue's backward)
// masks dy by y > 0 (FLAG_RELU) and writes the masked dy as dz (FLAG_DZ) in the same pass.
// Short runs use bwd_dx_cols.wgsl.

@group(0) @binding(1) var<storage, read> x: array<S>;
@group(0) @binding(2) var<storage, read> dy: array<S>;
@group(0) @binding(3) var<storage, read> coef: array<vec4<f32>>; // (μ, a, b, a·mean(dy))
@group(0) @binding(4) var<storage, read_write> dx: array<S>;
@group(0) @binding(5) var<storage, read> y: array<S>;        // the fused forward's output, read with FLAG_RELU
@group(0) @binding(6) var<storage, read_write> dz: array<S>; // the residual's gradient, written with FLAG_DZ

// The gradient reaching the batch norm at unit i: dy, masked by y > 0 with FLAG_RELU; also
// dz with FLAG_DZ.
fn grad_at(i: u32) -> V {
    var g = load_unit(dy[i]);
    if (has(FLAG_RELU)) {
        g = relu_grad(g, load_unit(y[i]));
    }
    if (has(FLAG_DZ)) {
        dz[i] = store_unit(g);
    }
    return g;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wid);
    if (g >= p.groups) {
        return;
    }
    // tile_len = 0: one whole run per workgroup (see apply.wgsl).
    var run = g;
    var start = g * p.inner;
    var end = start + p.inner;
    if (p.tile_len != 0u) {
        run = g / p.tiles;
        start = run * p.inner + (g - run * p.tiles) * p.tile_len;
        end = min(start + p.tile_len, (run + 1u) * p.inner);
    }
    let k = coef[run % p.channels];
    if (FUSED && has(FLAG_TRAINING)) {
        for (var i = p.base + start + lid; i < p.base + end; i += WG) {
            dx[i] = store_unit(k.y * grad_at(i) + k.z * (load_unit(x[i]) - V(k.x)) - V(k.w));
        }
    } else if (FUSED) {
        for (var i = p.base + start + lid; i < p.base + end; i += WG) {
            dx[i] = store_unit(k.y * grad_at(i));
        }
    } else if (has(FLAG_TRAINING)) {
        for (var i = p.base + start + lid; i < p.base + end; i += WG) {
            dx[i] = store_unit(k.y * load_unit(dy[i]) + k.z * (load_unit(x[i]) - V(k.x)) - V(k.w));
        }
    } else {
        for (var i = p.base + start + lid; i < p.base + end; i += WG) {
            dx[i] = store_unit(k.y * load_unit(dy[i]));
        }
    }
}
