// Backward, pass 2 over the data, for long runs (see apply.wgsl):
//   dx = a·dy + b·(x − μ) − a·mean(dy), coefficients per channel from bwd_finalize.
// Reads x and dy once, writes dx once. In eval mode dx = a·dy exactly and x is not read (a
// non-finite x cannot leak into dx). Short runs use bwd_dx_cols.wgsl.

@group(0) @binding(1) var<storage, read> x: array<V>;
@group(0) @binding(2) var<storage, read> dy: array<V>;
@group(0) @binding(3) var<storage, read> coef: array<vec4<f32>>; // (μ, a, b, a·mean(dy))
@group(0) @binding(4) var<storage, read_write> dx: array<V>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wid);
    if (g >= p.groups) {
        return;
    }
    let run = g / p.tiles;
    let k = coef[run % p.channels];
    let begin = (g - run * p.tiles) * p.tile_len;
    let end = min(begin + p.tile_len, p.inner);
    let base = run * p.inner;
    if ((p.flags & FLAG_TRAINING) != 0u) {
        for (var j = begin + lid; j < end; j += WG) {
            dx[base + j] = k.y * dy[base + j] + k.z * (x[base + j] - V(k.x)) - V(k.w);
        }
    } else {
        for (var j = begin + lid; j < end; j += WG) {
            dx[base + j] = k.y * dy[base + j];
        }
    }
}
