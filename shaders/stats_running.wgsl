// Inference statistics: (running_mean, 1/sqrt(running_var + eps)) per channel, in the same
// (mean, invstd) form the training pass saves, so one apply kernel and one backward serve both.

@group(0) @binding(1) var<storage, read> state: array<vec4<f32>>; // (γ, β, running_mean, running_var)
@group(0) @binding(2) var<storage, read_write> saved: array<vec2<f32>>; // (mean, invstd)

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wid);
    if (g >= p.groups) {
        return;
    }
    let c = g * WG + lid;
    if (c >= p.channels) {
        return;
    }
    let st = state[c];
    saved[c] = vec2<f32>(st.z, 1.0 / sqrt(st.w + p.eps));
}
