// The example network's kernels that are not batch norm: matrix products with a
// bias / sigmoid / sigmoid-backward epilogue, the sigmoid, softmax cross-entropy, and
// y += alpha·x (SGD). Binding 0 holds the parameters, 1–4 and 7–8 read-only inputs, 5–6
// outputs; each entry point's bind group has the bindings it uses (layout from the shader).
// Every output is computed by one invocation summing in a fixed order: no atomics, so
// results are the same from run to run.
//
// Written for CPU-based adapters as much as for GPUs: on those, invocations run as SIMD
// lanes, each storage access is made lane by lane, a workgroup barrier splits the kernel,
// and dynamically indexed private arrays spill; so the products use no workgroup memory,
// no barriers and no private arrays, and as few loads per multiply-add as registers allow.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    flags: u32,
    // scalar gemm: op(A)[i][kk] = a[i * a_rs + kk * a_cs]; op(B)[kk][j] = b[kk * b_rs + j * b_cs]
    a_rs: u32,
    a_cs: u32,
    b_rs: u32,
    b_cs: u32,
    len: u32,
    alpha: f32,
    // workgroups per row of a 2-D grid (1-D kernels past 65535 workgroups)
    row_groups: u32,
    _pad: u32,
}

const FLAG_BIAS: u32 = 1u;
const FLAG_SIGMOID: u32 = 2u;
const FLAG_SIGMOID_GRAD: u32 = 4u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> aux: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read_write> out2: array<f32>;
// a and b seen as vec4s, for the blocked products (lengths padded to 16 bytes).
@group(0) @binding(7) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read> b4: array<vec4<f32>>;

fn sigmoid(v: f32) -> f32 {
    return 1.0 / (1.0 + exp(-v));
}

fn epilogue(v: f32, row: u32, col: u32) -> f32 {
    var r = v;
    if ((p.flags & FLAG_BIAS) != 0u) {
        r += bias[col];
    }
    if ((p.flags & FLAG_SIGMOID) != 0u) {
        r = sigmoid(r);
    }
    if ((p.flags & FLAG_SIGMOID_GRAD) != 0u) {
        let h = aux[row * p.n + col];
        r *= h * (1.0 - h);
    }
    return r;
}

// Row `row`, columns 4·cb .. 4·cb + 3 of C.
fn store4(row: u32, cb: u32, v: vec4<f32>) {
    let col = cb * 4u;
    let at = row * p.n + col;
    out[at] = epilogue(v.x, row, col);
    out[at + 1u] = epilogue(v.y, row, col + 1u);
    out[at + 2u] = epilogue(v.z, row, col + 2u);
    out[at + 3u] = epilogue(v.w, row, col + 3u);
}

// The products: C = op(A)·op(B) (+ bias), then the epilogue.

// Any shape and layout (strides in the parameters): one output per invocation. For the
// small products whose sizes are not multiples of 4 (the 10-class output layer).
@compute @workgroup_size(64)
fn gemm(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = gid.x + gid.y * p.row_groups * 64u;
    let row = idx / p.n;
    let col = idx % p.n;
    if (row >= p.m) {
        return;
    }
    var acc = 0.0;
    var ai = row * p.a_rs;
    var bi = col * p.b_cs;
    for (var kk = 0u; kk < p.k; kk++) {
        acc = fma(a[ai], b[bi], acc);
        ai += p.a_cs;
        bi += p.b_rs;
    }
    out[row * p.n + col] = epilogue(acc, row, col);
}

// The blocked products: invocation (x, y) of the grid computes rows 4y .. 4y + 3 and
// columns 4x .. 4x + 3 of C (x = workgroup.x · 32 + lane, y = workgroup.y), from vec4
// loads: 64 multiply-adds per 8 loads, which is what CPU-based adapters are bound by.

// A m × k row-major (k a multiple of 4), B k × n row-major (n a multiple of 4): a 4 × 4
// block of C per invocation, 64 multiply-adds per 8 vec4 loads.
@compute @workgroup_size(32)
fn gemm_nn4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let n4 = p.n / 4u;
    let k4 = p.k / 4u;
    let cb = wg.x * 32u + lane;
    let cbr = min(cb, n4 - 1u);
    let row0 = wg.y * 4u;
    let ra0 = min(row0, p.m - 1u) * k4;
    let ra1 = min(row0 + 1u, p.m - 1u) * k4;
    let ra2 = min(row0 + 2u, p.m - 1u) * k4;
    let ra3 = min(row0 + 3u, p.m - 1u) * k4;
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    var ib = cbr;
    for (var q = 0u; q < k4; q++) {
        let a0 = a4[ra0 + q];
        let a1 = a4[ra1 + q];
        let a2 = a4[ra2 + q];
        let a3 = a4[ra3 + q];
        let b0 = b4[ib];
        let b1 = b4[ib + n4];
        let b2 = b4[ib + 2u * n4];
        let b3 = b4[ib + 3u * n4];
        c0 = fma(vec4(a0.x), b0, fma(vec4(a0.y), b1, fma(vec4(a0.z), b2, fma(vec4(a0.w), b3, c0))));
        c1 = fma(vec4(a1.x), b0, fma(vec4(a1.y), b1, fma(vec4(a1.z), b2, fma(vec4(a1.w), b3, c1))));
        c2 = fma(vec4(a2.x), b0, fma(vec4(a2.y), b1, fma(vec4(a2.z), b2, fma(vec4(a2.w), b3, c2))));
        c3 = fma(vec4(a3.x), b0, fma(vec4(a3.y), b1, fma(vec4(a3.z), b2, fma(vec4(a3.w), b3, c3))));
        ib += 4u * n4;
    }
    store_rows(row0, cb, c0, c1, c2, c3);
}

// A stored k × m (op(A) = Aᵀ; m a multiple of 4), B k × n row-major (n a multiple of 4).
@compute @workgroup_size(32)
fn gemm_tn4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let n4 = p.n / 4u;
    let m4 = p.m / 4u;
    let cb = wg.x * 32u + lane;
    let cbr = min(cb, n4 - 1u);
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    var ia = wg.y;
    var ib = cbr;
    for (var kk = 0u; kk < p.k; kk++) {
        let av = a4[ia];
        let bv = b4[ib];
        c0 = fma(vec4(av.x), bv, c0);
        c1 = fma(vec4(av.y), bv, c1);
        c2 = fma(vec4(av.z), bv, c2);
        c3 = fma(vec4(av.w), bv, c3);
        ia += m4;
        ib += n4;
    }
    store_rows(wg.y * 4u, cb, c0, c1, c2, c3);
}

// A m × k row-major, B stored n × k (op(B) = Bᵀ); k and n multiples of 4: dot products of
// vec4s, a 4 × 4 block of C per invocation.
@compute @workgroup_size(32)
fn gemm_nt4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let n4 = p.n / 4u;
    let k4 = p.k / 4u;
    let cb = wg.x * 32u + lane;
    let cbr = min(cb, n4 - 1u);
    let row0 = wg.y * 4u;
    let ra0 = min(row0, p.m - 1u) * k4;
    let ra1 = min(row0 + 1u, p.m - 1u) * k4;
    let ra2 = min(row0 + 2u, p.m - 1u) * k4;
    let ra3 = min(row0 + 3u, p.m - 1u) * k4;
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    let ib = cbr * 4u * k4;
    for (var q = 0u; q < k4; q++) {
        let a0 = a4[ra0 + q];
        let a1 = a4[ra1 + q];
        let a2 = a4[ra2 + q];
        let a3 = a4[ra3 + q];
        let b0 = b4[ib + q];
        let b1 = b4[ib + k4 + q];
        let b2 = b4[ib + 2u * k4 + q];
        let b3 = b4[ib + 3u * k4 + q];
        c0 += vec4(dot(a0, b0), dot(a0, b1), dot(a0, b2), dot(a0, b3));
        c1 += vec4(dot(a1, b0), dot(a1, b1), dot(a1, b2), dot(a1, b3));
        c2 += vec4(dot(a2, b0), dot(a2, b1), dot(a2, b2), dot(a2, b3));
        c3 += vec4(dot(a3, b0), dot(a3, b1), dot(a3, b2), dot(a3, b3));
    }
    store_rows(row0, cb, c0, c1, c2, c3);
}

// Rows row0 .. row0 + 3 (those below m), columns 4·cb .. 4·cb + 3 (if cb is a block of C).
fn store_rows(row0: u32, cb: u32, c0: vec4<f32>, c1: vec4<f32>, c2: vec4<f32>, c3: vec4<f32>) {
    if (cb >= p.n / 4u) {
        return;
    }
    store4(row0, cb, c0);
    if (row0 + 1u < p.m) {
        store4(row0 + 1u, cb, c1);
    }
    if (row0 + 2u < p.m) {
        store4(row0 + 2u, cb, c2);
    }
    if (row0 + 3u < p.m) {
        store4(row0 + 3u, cb, c3);
    }
}

// out = σ(a), p.len values.
@compute @workgroup_size(256)
fn sigmoid_map(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * p.row_groups * 256u;
    if (i < p.len) {
        out[i] = sigmoid(a[i]);
    }
}

// out += alpha · a, p.len values.
@compute @workgroup_size(256)
fn axpy(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * p.row_groups * 256u;
    if (i < p.len) {
        out[i] += p.alpha * a[i];
    }
}

// One row of p.n logits (a) per invocation, label b[row]: out = (softmax − one-hot) · alpha
// (alpha = 1 / rows: the gradient of the mean loss), out2[2 row] = loss,
// out2[2 row + 1] = 1 if the first arg-max is the label.
@compute @workgroup_size(64)
fn softmax_xent(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row = gid.x + gid.y * p.row_groups * 64u;
    if (row >= p.m) {
        return;
    }
    let base = row * p.n;
    let label = u32(b[row]);
    var best = 0u;
    var top = a[base];
    for (var c = 1u; c < p.n; c++) {
        if (a[base + c] > top) {
            top = a[base + c];
            best = c;
        }
    }
    var sum = 0.0;
    for (var c = 0u; c < p.n; c++) {
        sum += exp(a[base + c] - top);
    }
    out2[2u * row] = log(sum) + top - a[base + label];
    out2[2u * row + 1u] = select(0.0, 1.0, best == label);
    for (var c = 0u; c < p.n; c++) {
        let prob = exp(a[base + c] - top) / sum;
        out[base + c] = (prob - select(0.0, 1.0, c == label)) * p.alpha;
    }
}
