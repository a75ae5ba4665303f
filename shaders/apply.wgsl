// Normalize, scale, shift: y = (x − mean)·(γ·invstd) + β.
// Centring first keeps y accurate when |mean| ≫ std (x·a + b would cancel).
// Long runs (FLAG_ROWS): a workgroup per chunk of one run. Otherwise a grid-stride loop
// that tracks the channel of each unit incrementally, with no division per unit.

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
    if ((p.flags & FLAG_ROWS) != 0u) {
        let run = g / p.tiles;
        let c = run % p.channels;
        let st = stats[c];
        let prm = state[c];
        let mean = V(st.x);
        let scale = prm.x * st.y;
        let shift = V(prm.y);
        let begin = (g - run * p.tiles) * p.tile_len;
        let end = min(begin + p.tile_len, p.inner);
        let base = run * p.inner;
        for (var j = begin + lid; j < end; j += WG) {
            y[base + j] = (x[base + j] - mean) * scale + shift;
        }
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
