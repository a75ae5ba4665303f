// Statistics, pass 2: one workgroup per channel merges that channel's tile partials
// (Chan's formula, common.wgsl), writes the saved (mean, invstd) and, when asked, updates the running
// statistics in place: running = (1 − m)·running + m·batch, with the unbiased variance.

@group(0) @binding(1) var<storage, read> partials: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> state: array<vec4<f32>>; // (γ, β, running_mean, running_var)
@group(0) @binding(3) var<storage, read_write> saved: array<vec2<f32>>; // (mean, invstd)

var<workgroup> sh: array<vec4<f32>, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wid);
    if (g >= p.groups) {
        return;
    }
    if ((p.flags & FLAG_THREAD_PER_CHANNEL) != 0u) {
        let c = g * WG + lid;
        if (c < p.channels) {
            var acc = vec4<f32>(0.0);
            for (var t = 0u; t < p.tiles; t++) {
                acc = chan_merge(acc, partials[c * p.tiles + t]);
            }
            finish(c, acc);
        }
        return;
    }
    let c = g;
    var acc = vec4<f32>(0.0);
    for (var t = lid; t < p.tiles; t += WG) {
        acc = chan_merge(acc, partials[c * p.tiles + t]);
    }
    sh[lid] = acc;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lid < stride) {
            sh[lid] = chan_merge(sh[lid], sh[lid + stride]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        finish(c, sh[0]);
    }
}

// Writes channel c's saved statistics and updates its running statistics.
fn finish(c: u32, r: vec4<f32>) {
    {
        let mean = r.y + r.z;
        let m2 = r.w;
        // The exact count comes from the host: f32 sums of counts drift past 2^24.
        let n = f32(p.count);
        let invstd = 1.0 / sqrt(m2 / n + p.eps);
        saved[c] = vec2<f32>(mean, invstd);
        if ((p.flags & FLAG_UPDATE_RUNNING) != 0u) {
            var st = state[c];
            let unbiased = m2 / f32(p.count - 1u);
            st.z = p.momentum * mean + (1.0 - p.momentum) * st.z;
            st.w = p.momentum * unbiased + (1.0 - p.momentum) * st.w;
            state[c] = st;
        }
    }
}
