// Normalize, scale, shift: y = (x − mean)·(γ·invstd) + β, for long runs (NCHW with a large
// spatial size): a workgroup per chunk of one (outer, channel) run, so the channel is uniform
// and its parameters are loaded once per workgroup. Short runs use apply_cols.wgsl.
// Centring first keeps y accurate when |mean| ≫ std (x·a + b would cancel). The fused
// epilogue (FLAG_RESIDUAL, FLAG_RELU) adds z and applies the ReLU in the same pass.

@group(0) @binding(1) var<storage, read> x: array<S>;
@group(0) @binding(2) var<storage, read> stats: array<vec2<f32>>; // (mean, invstd)
@group(0) @binding(3) var<storage, read> weight: array<f32>; // γ, read with FLAG_WEIGHT
@group(0) @binding(4) var<storage, read> bias: array<f32>;   // β, read with FLAG_BIAS
@group(0) @binding(5) var<storage, read_write> y: array<S>;
@group(0) @binding(6) var<storage, read> z: array<S>;        // the residual, read with FLAG_RESIDUAL

// The epilogue of the unit at i: + z, then the ReLU, as the flags ask. The normalized
// value is rounded to the storage type before the add (a no-op for f32), as PyTorch's
// relu(bn(x) + z) on half tensors rounds bn's output before adding.
fn finish(v: V, i: u32) -> V {
    var r = v;
    if (has(FLAG_RESIDUAL)) {
        r = round_unit(r) + load_unit(z[i]);
    }
    if (has(FLAG_RELU)) {
        r = relu_v(r);
    }
    return r;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wid);
    if (g >= p.groups) {
        return;
    }
    // tile_len = 0: one whole run per workgroup (runs up to a workgroup's share). The
    // fewest instructions per invocation: integer division, even once per invocation, is
    // costly on CPU implementations (scalarized, guarded against zero).
    let whole = p.tile_len == 0u;
    var run = g;
    var start = g * p.inner;
    var end = start + p.inner;
    if (!whole) {
        run = g / p.tiles;
        start = run * p.inner + (g - run * p.tiles) * p.tile_len;
        end = min(start + p.tile_len, (run + 1u) * p.inner);
    }
    let c = run % p.channels;
    let st = stats[c];
    var gamma = 1.0;
    if (has(FLAG_WEIGHT)) {
        gamma = weight[c];
    }
    var beta = 0.0;
    if (has(FLAG_BIAS)) {
        beta = bias[c];
    }
    let mean = V(st.x);
    let scale = gamma * st.y;
    let shift = V(beta);
    if (FUSED) {
        for (var i = p.base + start + lid; i < p.base + end; i += WG) {
            y[i] = store_unit(finish((load_unit(x[i]) - mean) * scale + shift, i));
        }
    } else {
        for (var i = p.base + start + lid; i < p.base + end; i += WG) {
            y[i] = store_unit((load_unit(x[i]) - mean) * scale + shift);
        }
    }
}
