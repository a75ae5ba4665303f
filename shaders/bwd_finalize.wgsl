// Backward, pass 2: per channel, adds `tiles` partials (Σ dy, Σ dy·(x − μ)) (summary t of
// channel c at c·part_cstride + t·part_tstride, as in stats_finalize.wgsl) and writes, as
// the flags ask:
//   dγ = Σ dy·(x − μ)·invstd (FLAG_DWEIGHT),  dβ = Σ dy (FLAG_DBIAS),
// and either the sums themselves (FLAG_SUMS: a GradSums) or the per-channel coefficients of
// dx = a·dy + b·(x − μ) − a·mean(dy):
//   training: a = γ·invstd, b = −γ·invstd³·Σ dy·(x − μ)/n
//   eval (statistics are constants): a = γ·invstd, b = 0, no mean(dy) term.

@group(0) @binding(1) var<storage, read> partials: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> stats: array<vec2<f32>>; // (mean, invstd)
@group(0) @binding(3) var<storage, read> weight: array<f32>; // γ, read with FLAG_WEIGHT
@group(0) @binding(4) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(5) var<storage, read_write> dbeta: array<f32>;
// FLAG_SUMS: (Σ dy, Σ dy·(x − μ), 0, 0); otherwise the coefficients (μ, a, b, a·mean(dy)).
@group(0) @binding(6) var<storage, read_write> out: array<vec4<f32>>;

fn partial_at(c: u32, t: u32) -> vec2<f32> {
    return partials[c * p.part_cstride + t * p.part_tstride].xy;
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
            var acc = vec2<f32>(0.0);
            for (var t = 0u; t < p.tiles; t++) {
                acc += partial_at(c, t);
            }
            finish(c, acc);
        }
        return;
    }
    let c = g;
    var acc = vec2<f32>(0.0);
    for (var t = lid; t < p.tiles; t += WG) {
        acc += partial_at(c, t);
    }
    let sums = add_sums(acc, at);
    if (lid == 0u) {
        finish(c, sums);
    }
}

// Writes channel c's outputs from its (Σ dy, Σ dy·(x − μ)).
fn finish(c: u32, sums: vec2<f32>) {
    let sum_dy = sums.x;
    let sum_dyx = sums.y;
    let st = stats[c];
    if (has(FLAG_DWEIGHT)) {
        dgamma[c] = sum_dyx * st.y;
    }
    if (has(FLAG_DBIAS)) {
        dbeta[c] = sum_dy;
    }
    if (has(FLAG_SUMS)) {
        out[c] = vec4<f32>(sum_dy, sum_dyx, 0.0, 0.0);
        return;
    }
    var gamma = 1.0;
    if (has(FLAG_WEIGHT)) {
        gamma = weight[c];
    }
    let a = gamma * st.y;
    if (has(FLAG_TRAINING)) {
        // Associated so that invstd³ is never formed: it overflows for tiny var + eps
        // while the product stays finite.
        out[c] = vec4<f32>(st.x, a, -a * (st.y * (st.y * (sum_dyx * p.inv_count))), a * sum_dy * p.inv_count);
    } else {
        out[c] = vec4<f32>(st.x, a, 0.0, 0.0);
    }
}
