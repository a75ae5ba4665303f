// Backward, pass 1, column mapping (see common.wgsl and stats_partials_cols.wgsl): per
// value column (Σ dy, Σ dy·(x − μ)) over the tile's rows, row lanes added in workgroup
// memory, one partial per value column.

@group(0) @binding(1) var<storage, read> x: array<S>;
@group(0) @binding(2) var<storage, read> dy: array<S>;
@group(0) @binding(3) var<storage, read> stats: array<vec2<f32>>; // (mean, invstd)
@group(0) @binding(4) var<storage, read_write> partials: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> y: array<S>; // the fused forward's output, read with FLAG_RELU
@group(0) @binding(6) var<storage, read_write> dz: array<S>; // the masked dy, written with FLAG_DZ

var<workgroup> sh_dy: array<V, WG>;
var<workgroup> sh_dyx: array<V, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wid);
    if (g >= p.groups) {
        return;
    }
    let pos = column_pos(g, lid);
    let row0 = pos.tile * p.tile_len;
    let row1 = min(row0 + p.tile_len, p.outer);

    var sdy = V(0.0);
    var sdyx = V(0.0);
    // A unit straddling the tensor's end (paired rows, common.wgsl) takes its last row's
    // first lane alone, after the loop.
    let end = column_end(pos.q, row1);
    let full_end = column_full_end(pos.q, row1);
    if (pos.q < p.total) {
        var mu = V(0.0);
        for (var l = 0u; l < VW; l++) {
            set_lane(&mu, l, stats[column_channel(pos.q * VW + l)].x);
        }
        if (FUSED && has(FLAG_DZ)) {
            // The residual's gradient, written where dy and y are read (bwd_partials.wgsl).
            for (var o = row0 + pos.lane; o < full_end; o += pos.lanes) {
                let i = p.base + o * p.total + pos.q;
                let gv = relu_grad(load_unit(dy[i]), load_unit(y[i]));
                dz[i] = store_unit(gv);
                sdy += gv;
                sdyx += gv * (load_unit(x[i]) - mu);
            }
        } else if (FUSED) {
            for (var o = row0 + pos.lane; o < full_end; o += pos.lanes) {
                let i = p.base + o * p.total + pos.q;
                let gv = relu_grad(load_unit(dy[i]), load_unit(y[i]));
                sdy += gv;
                sdyx += gv * (load_unit(x[i]) - mu);
            }
        } else {
            for (var o = row0 + pos.lane; o < full_end; o += pos.lanes) {
                let i = p.base + o * p.total + pos.q;
                let gv = load_unit(dy[i]);
                sdy += gv;
                sdyx += gv * (load_unit(x[i]) - mu);
            }
        }
        if (full_end != end && visits(row0 + pos.lane, pos.lanes, end - 1u)) {
            let i = p.base + (end - 1u) * p.total + pos.q;
            var gv = load_unit(dy[i]);
            if (FUSED) {
                gv = relu_grad(gv, load_unit(y[i]));
                if (has(FLAG_DZ)) {
                    dz[i] = store_unit(gv);
                }
            }
            sdy += first_lane(gv);
            sdyx += first_lane(gv * (load_unit(x[i]) - mu));
        }
    }
    sh_dy[lid] = sdy;
    sh_dyx[lid] = sdyx;
    workgroupBarrier();
    for (var stride = pos.lanes / 2u; stride > 0u; stride >>= 1u) {
        if (pos.lane < stride) {
            sh_dy[lid] += sh_dy[lid + stride * p.col_block];
            sh_dyx[lid] += sh_dyx[lid + stride * p.col_block];
        }
        workgroupBarrier();
    }
    if (pos.lane == 0u && pos.q < p.total) {
        let slot = p.tile_offset + pos.tile;
        let a = sh_dy[lid];
        let b = sh_dyx[lid];
        for (var l = 0u; l < VW; l++) {
            let j = pos.q * VW + l;
            partials[column_partial(j) + slot] = vec4<f32>(get_lane(a, l), get_lane(b, l), 0.0, 0.0);
        }
    }
}
