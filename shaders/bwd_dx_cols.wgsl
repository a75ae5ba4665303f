// Backward dx for short runs, in the column mapping of apply_cols.wgsl: each invocation
// loads its lanes' coefficients (μ, a, b, a·mean(dy)) once and streams its rows.

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
    let pos = column_pos(g, lid);
    if (pos.q >= p.total) {
        return;
    }
    var mu = V(0.0);
    var a = V(0.0);
    var b = V(0.0);
    var d = V(0.0);
    for (var l = 0u; l < VW; l++) {
        let k = coef[column_channel(pos.q * VW + l)];
        set_lane(&mu, l, k.x);
        set_lane(&a, l, k.y);
        set_lane(&b, l, k.z);
        set_lane(&d, l, k.w);
    }
    let row0 = pos.tile * p.tile_len;
    // Paired rows: the unit straddling the tensor's end writes the last word's unused half.
    let row1 = column_end(pos.q, min(row0 + p.tile_len, p.outer));
    if (FUSED && has(FLAG_TRAINING)) {
        for (var o = row0 + pos.lane; o < row1; o += pos.lanes) {
            let i = p.base + o * p.total + pos.q;
            dx[i] = store_unit(a * grad_at(i) + b * (load_unit(x[i]) - mu) - d);
        }
    } else if (FUSED) {
        for (var o = row0 + pos.lane; o < row1; o += pos.lanes) {
            let i = p.base + o * p.total + pos.q;
            dx[i] = store_unit(a * grad_at(i));
        }
    } else if (has(FLAG_TRAINING)) {
        for (var o = row0 + pos.lane; o < row1; o += pos.lanes) {
            let i = p.base + o * p.total + pos.q;
            dx[i] = store_unit(a * load_unit(dy[i]) + b * (load_unit(x[i]) - mu) - d);
        }
    } else {
        for (var o = row0 + pos.lane; o < row1; o += pos.lanes) {
            let i = p.base + o * p.total + pos.q;
            dx[i] = store_unit(a * load_unit(dy[i]));
        }
    }
}
