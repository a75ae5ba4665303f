// Inference statistics: (running_mean, 1/sqrt(running_var + eps)) per channel, in the same
// (mean, invstd) form the training pass saves, so one apply kernel and one backward serve both.

@group(0) @binding(1) var<storage, read> running_mean: array<f32>;
@group(0) @binding(2) var<storage, read> running_var: array<f32>;
@group(0) @binding(3) var<storage, read_write> saved: array<vec2<f32>>; // (mean, invstd)

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
    saved[c] = vec2<f32>(running_mean[c], 1.0 / sqrt(running_var[c] + p.eps));
}
