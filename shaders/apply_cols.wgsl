// Normalize, scale, shift for short runs: (N, C), channels-last, and NCHW with a small
// spatial size. The tensor is rows of `total` units (one outer index: C·spatial values);
// each invocation owns one unit column, works out the channel of each of its lanes once,
// keeps their (mean, γ·invstd, β) in registers, and streams its rows. Neighbouring
// invocations touch neighbouring addresses.

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
    let pos = column_pos(g, lid);
    if (pos.q >= p.total) {
        return;
    }
    var mean = V(0.0);
    var scale = V(0.0);
    var shift = V(0.0);
    for (var l = 0u; l < VW; l++) {
        let c = column_channel(pos.q * VW + l);
        let st = stats[c];
        var gamma = 1.0;
        if (has(FLAG_WEIGHT)) {
            gamma = weight[c];
        }
        set_lane(&mean, l, st.x);
        set_lane(&scale, l, gamma * st.y);
        if (has(FLAG_BIAS)) {
            set_lane(&shift, l, bias[c]);
        }
    }
    let row0 = pos.tile * p.tile_len;
    // Paired rows: the unit straddling the tensor's end writes the last word's unused half.
    let row1 = column_end(pos.q, min(row0 + p.tile_len, p.outer));
    if (FUSED) {
        for (var o = row0 + pos.lane; o < row1; o += pos.lanes) {
            let i = p.base + o * p.total + pos.q;
            y[i] = store_unit(finish((load_unit(x[i]) - mean) * scale + shift, i));
        }
    } else {
        for (var o = row0 + pos.lane; o < row1; o += pos.lanes) {
            let i = p.base + o * p.total + pos.q;
            y[i] = store_unit((load_unit(x[i]) - mean) * scale + shift);
        }
    }
}
