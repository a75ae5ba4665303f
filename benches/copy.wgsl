// The bandwidth ceiling: a vec4 copy, in two mappings (grid-stride, and one contiguous
// chunk per workgroup); the faster of the two on an adapter is that adapter's ceiling.
struct Params {
    total: u32,
    gstep: u32,
    groups: u32,
    groups_x: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = wid.x + wid.y * p.groups_x;
    if (g >= p.groups) {
        return;
    }
    for (var i = g * 256u + lid; i < p.total; i += p.gstep) {
        dst[i] = src[i];
    }
}

@compute @workgroup_size(256)
fn chunked(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = wid.x + wid.y * p.groups_x;
    if (g >= p.groups) {
        return;
    }
    let end = min((g + 1u) * 2048u, p.total);
    for (var i = g * 2048u + lid; i < end; i += 256u) {
        dst[i] = src[i];
    }
}
