// Backward in one pass, for channels whose values fit in workgroup memory (see
// fwd_onepass.wgsl for the mapping): each workgroup loads its channels' x and dy once into
// workgroup memory while it sums Σ dy and Σ dy·(x − μ) (as bwd_partials does), writes dγ
// and dβ (as bwd_finalize does), and computes dx from workgroup memory with
// bwd_finalize's coefficients, dx = a·dy + b·(x − μ) − a·mean(dy) (training) or a·dy
// (eval): x and dy are read once, and one launch replaces three.
//
// The host prepends `const CAP: u32 = …;` and picks B so that 2 · count · B ≤ CAP (x in
// the first half of `vals`, dy in the second).

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read> stats: array<vec2<f32>>; // (mean, invstd)
@group(0) @binding(4) var<storage, read> weight: array<f32>; // γ, read with FLAG_WEIGHT
@group(0) @binding(5) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(6) var<storage, read_write> dbeta: array<f32>;
@group(0) @binding(7) var<storage, read_write> dx: array<f32>; // written with FLAG_DX

var<workgroup> vals: array<f32, CAP>;
var<workgroup> sh: array<vec2<f32>, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wid);
    if (g >= p.groups) {
        return;
    }
    let pos = block_pos(g, lid);
    let n = p.count;
    let live = pos.c < p.channels;
    let half = CAP / 2u;

    var st = vec2<f32>(0.0);
    var acc = vec2<f32>(0.0);
    if (live) {
        st = stats[pos.c];
        for (var e = pos.lane; e < n; e += pos.lanes) {
            let i = value_index(e, pos.c);
            let xv = x[i];
            let gv = dy[i];
            let at = e * p.col_block + pos.j;
            vals[at] = xv;
            vals[half + at] = gv;
            acc += vec2<f32>(gv, gv * (xv - st.x));
        }
    }
    sh[lid] = acc;
    workgroupBarrier();
    for (var stride = pos.lanes / 2u; stride > 0u; stride >>= 1u) {
        if (pos.lane < stride) {
            sh[lid] += sh[lid + stride * p.col_block];
        }
        workgroupBarrier();
    }
    if (!live) {
        return;
    }
    let sums = sh[pos.j];
    if (pos.lane == 0u) {
        if (has(FLAG_DWEIGHT)) {
            dgamma[pos.c] = sums.y * st.y;
        }
        if (has(FLAG_DBIAS)) {
            dbeta[pos.c] = sums.x;
        }
    }
    if (!has(FLAG_DX)) {
        return;
    }
    var gamma = 1.0;
    if (has(FLAG_WEIGHT)) {
        gamma = weight[pos.c];
    }
    let a = gamma * st.y;
    if (has(FLAG_TRAINING)) {
        // bwd_finalize's coefficients, associated the same way.
        let b = -a * (st.y * (st.y * (sums.y * p.inv_count)));
        let d = a * sums.x * p.inv_count;
        for (var e = pos.lane; e < n; e += pos.lanes) {
            let at = e * p.col_block + pos.j;
            dx[value_index(e, pos.c)] = a * vals[half + at] + b * (vals[at] - st.x) - d;
        }
    } else {
        for (var e = pos.lane; e < n; e += pos.lanes) {
            dx[value_index(e, pos.c)] = a * vals[half + e * p.col_block + pos.j];
        }
    }
}
