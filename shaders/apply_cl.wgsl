// Normalize, scale, shift in the channels-contiguous mapping (see common.wgsl): each
// invocation loads its 4 channels' (mean, γ·invstd, β) once and streams its rows.

@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> stats: array<vec2<f32>>; // (mean, invstd)
@group(0) @binding(3) var<storage, read> state: array<vec4<f32>>; // (γ, β, running_mean, running_var)
@group(0) @binding(4) var<storage, read_write> y: array<vec4<f32>>;

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
    var mean = vec4<f32>(0.0);
    var scale = vec4<f32>(0.0);
    var shift = vec4<f32>(0.0);
    for (var l = 0u; l < 4u; l++) {
        let st = stats[4u * pos.q + l];
        let prm = state[4u * pos.q + l];
        mean[l] = st.x;
        scale[l] = prm.x * st.y;
        shift[l] = prm.y;
    }
    let row0 = pos.tile * p.tile_len;
    let row1 = min(row0 + p.tile_len, p.outer);
    for (var o = row0 + pos.lane; o < row1; o += pos.lanes) {
        let i = o * quads + pos.q;
        y[i] = (x[i] - mean) * scale + shift;
    }
}
