// Backward, pass 2: one workgroup per channel adds that channel's tile partials and writes
//   dγ = Σ dy·(x − μ)·invstd,  dβ = Σ dy,
// and the per-channel coefficients of dx = a·dy + b·(x − μ) − a·mean(dy):
//   training: a = γ·invstd, b = −γ·invstd³·Σ dy·(x − μ)/n
//   eval (statistics are constants): a = γ·invstd, b = 0, no mean(dy) term.

@group(0) @binding(1) var<storage, read> partials: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> stats: array<vec2<f32>>; // (mean, invstd)
@group(0) @binding(3) var<storage, read> state: array<vec4<f32>>; // (γ, β, running_mean, running_var)
@group(0) @binding(4) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(5) var<storage, read_write> dbeta: array<f32>;
@group(0) @binding(6) var<storage, read_write> coef: array<vec4<f32>>; // (μ, a, b, a·mean(dy))

var<workgroup> sh: array<vec2<f32>, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wid);
    if (g >= p.groups) {
        return;
    }
    if ((p.flags & FLAG_THREAD_PER_CHANNEL) != 0u) {
        let c = g * WG + lid;
        if (c < p.channels) {
            var acc = vec2<f32>(0.0);
            for (var t = 0u; t < p.tiles; t++) {
                acc += partials[c * p.tiles + t].xy;
            }
            finish(c, acc);
        }
        return;
    }
    let c = g;
    var acc = vec2<f32>(0.0);
    for (var t = lid; t < p.tiles; t += WG) {
        acc += partials[c * p.tiles + t].xy;
    }
    sh[lid] = acc;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lid < stride) {
            sh[lid] += sh[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        finish(c, sh[0]);
    }
}

// Writes channel c's dγ, dβ and dx coefficients from its (Σ dy, Σ dy·(x − μ)).
fn finish(c: u32, sums: vec2<f32>) {
    {
        let sum_dy = sums.x;
        let sum_dyx = sums.y;
        let st = stats[c];
        let gamma = state[c].x;
        let n = f32(p.count);
        let a = gamma * st.y;
        dgamma[c] = sum_dyx * st.y;
        dbeta[c] = sum_dy;
        if ((p.flags & FLAG_TRAINING) != 0u) {
            // Associated so that invstd³ is never formed: it overflows for tiny var + eps
            // while the product stays finite.
            coef[c] = vec4<f32>(st.x, a, -a * (st.y * (st.y * (sum_dyx / n))), a * sum_dy / n);
        } else {
            coef[c] = vec4<f32>(st.x, a, 0.0, 0.0);
        }
    }
}
