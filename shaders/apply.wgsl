// Normalize, scale, shift: y = (x − mean)·(γ·invstd) + β.
// Centring first keeps y accurate when |mean| ≫ std (x·a + b would cancel).
// Grid-stride loop; the channel of each unit is tracked incrementally, no division per unit.

@group(0) @binding(1) var<storage, read> x: array<V>;
@group(0) @binding(2) var<storage, read> stats: array<vec2<f32>>; // (mean, invstd)
@group(0) @binding(3) var<storage, read> state: array<vec4<f32>>; // (γ, β, running_mean, running_var)
@group(0) @binding(4) var<storage, read_write> y: array<V>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wid);
    if (g >= p.groups) {
        return;
    }
    var i = g * WG + lid;
    if (i >= p.total) {
        return;
    }
    let row = i / p.inner;
    var s = i - row * p.inner;
    var c = row % p.channels;
    loop {
        let st = stats[c];
        let prm = state[c];
        y[i] = (x[i] - V(st.x)) * (prm.x * st.y) + V(prm.y);
        i += p.gstep;
        if (i >= p.total) {
            break;
        }
        s += p.gstep_s;
        c += p.gstep_c;
        if (s >= p.inner) {
            s -= p.inner;
            c += 1u;
        }
        if (c >= p.channels) {
            c -= p.channels;
        }
    }
}
