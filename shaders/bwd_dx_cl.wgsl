// Backward dx in the channels-contiguous mapping (see common.wgsl and bwd_dx.wgsl):
// each invocation loads its 4 channels' coefficients once and streams its rows.

@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> dy: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> coef: array<vec4<f32>>; // (μ, a, b, a·mean(dy))
@group(0) @binding(4) var<storage, read_write> dx: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wid);
    if (g >= p.groups) {
        return;
    }
    let pos = column_pos(g, lid);
    let quads = p.channels / 4u;
    if (pos.q >= quads) {
        return;
    }
    var mu = vec4<f32>(0.0);
    var a = vec4<f32>(0.0);
    var b = vec4<f32>(0.0);
    var d = vec4<f32>(0.0);
    for (var l = 0u; l < 4u; l++) {
        let k = coef[4u * pos.q + l];
        mu[l] = k.x;
        a[l] = k.y;
        b[l] = k.z;
        d[l] = k.w;
    }
    let row0 = pos.tile * p.tile_len;
    let row1 = min(row0 + p.tile_len, p.outer);
    if ((p.flags & FLAG_TRAINING) != 0u) {
        for (var o = row0 + pos.lane; o < row1; o += pos.lanes) {
            let i = o * quads + pos.q;
            dx[i] = a * dy[i] + b * (x[i] - mu) - d;
        }
    } else {
        for (var o = row0 + pos.lane; o < row1; o += pos.lanes) {
            let i = o * quads + pos.q;
            dx[i] = a * dy[i];
        }
    }
}
