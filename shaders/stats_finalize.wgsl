// Statistics, pass 2: per channel, merges `tiles` summaries (count, k, mean − k, sd) in
// order with Chan's formula (common.wgsl). Summary t of channel c is at
// c·part_cstride + t·part_tstride: the tile partials of stats_partials (channel-major), or
// the Moments of several parts of a batch laid side by side (part-major). Then, as the flags
// ask: writes the merged summary (FLAG_MOMENTS), the saved (mean, invstd) (FLAG_SAVED), and
// updates the running statistics in place (FLAG_UPDATE_RUNNING):
// running = (1 − m)·running + m·batch, with the unbiased variance var·n/(n − 1).

@group(0) @binding(1) var<storage, read> partials: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(3) var<storage, read_write> running_var: array<f32>;
@group(0) @binding(4) var<storage, read_write> saved: array<vec2<f32>>; // (mean, invstd)
@group(0) @binding(5) var<storage, read_write> moments: array<vec4<f32>>; // (n, k, mean − k, sd)

fn summary_at(c: u32, t: u32) -> vec4<f32> {
    return partials[c * p.part_cstride + t * p.part_tstride];
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, at: Lanes) {
    let lid = at.lid;
    let g = group_index(wid);
    if (g >= p.groups) {
        return;
    }
    if (has(FLAG_THREAD_PER_CHANNEL)) {
        let c = g * WG + lid;
        if (c < p.channels) {
            var acc = vec4<f32>(0.0);
            for (var t = 0u; t < p.tiles; t++) {
                acc = chan_merge(acc, summary_at(c, t));
            }
            finish(c, acc);
        }
        return;
    }
    let c = g;
    var acc = vec4<f32>(0.0);
    for (var t = lid; t < p.tiles; t += WG) {
        acc = chan_merge(acc, summary_at(c, t));
    }
    let merged = merge_summaries(acc, at);
    if (lid == 0u) {
        finish(c, merged);
    }
}

// Writes channel c's outputs from its merged summary r.
fn finish(c: u32, r: vec4<f32>) {
    if (has(FLAG_MOMENTS)) {
        moments[c] = r;
    }
    // An empty batch (r.x = 0) saves zeros and updates nothing.
    if (r.x == 0.0) {
        if (has(FLAG_SAVED)) {
            saved[c] = vec2<f32>(0.0);
        }
        return;
    }
    let mean = r.y + r.z;
    if (has(FLAG_SAVED)) {
        saved[c] = vec2<f32>(mean, invstd_of(r.w, p.eps));
    }
    if (has(FLAG_UPDATE_RUNNING)) {
        running_mean[c] = p.momentum * mean + (1.0 - p.momentum) * running_mean[c];
        running_var[c] = running_var_update(r.w, running_var[c]);
    }
}
