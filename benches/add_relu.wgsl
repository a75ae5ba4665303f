// The unfused comparison for the fused epilogue: a separate pass out = max(y + z, 0) over
// vec4 units (grid-stride), after a plain batch-norm forward wrote y.
struct Params {
    total: u32,
    gstep: u32,
    groups: u32,
    groups_x: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> y: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> z: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = wid.x + wid.y * p.groups_x;
    if (g >= p.groups) {
        return;
    }
    for (var i = g * 256u + lid; i < p.total; i += p.gstep) {
        let v = y[i] + z[i];
        out[i] = select(v, vec4<f32>(0.0), v < vec4<f32>(0.0));
    }
}
