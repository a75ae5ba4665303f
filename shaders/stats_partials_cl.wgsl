// Statistics, pass 1, channels-contiguous mapping (see common.wgsl): each invocation
// accumulates shifted sums of its 4 channels over its rows of the tile, then the row lanes
// of each quad are merged with Chan's formula; one (count, mean, M2) partial per channel.

@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> partials: array<vec4<f32>>;

struct Moments4 {
    n: f32,
    mean: vec4<f32>,
    m2: vec4<f32>,
}

var<workgroup> sh: array<Moments4, WG>;

fn merge4(a: Moments4, b: Moments4) -> Moments4 {
    let n = a.n + b.n;
    if (n == 0.0) {
        return a;
    }
    let d = b.mean - a.mean;
    let wb = b.n / n;
    return Moments4(n, a.mean + d * wb, a.m2 + b.m2 + d * d * (a.n * wb));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wid);
    if (g >= p.groups) {
        return;
    }
    let pos = column_pos(g, lid);
    let quads = p.channels / 4u;
    let row0 = pos.tile * p.tile_len;
    let row1 = min(row0 + p.tile_len, p.outer);

    var cnt = 0u;
    var k = vec4<f32>(0.0);
    var s1 = vec4<f32>(0.0);
    var s2 = vec4<f32>(0.0);
    var o = row0 + pos.lane;
    if (pos.q < quads && o < row1) {
        k = x[o * quads + pos.q];
        loop {
            let d = x[o * quads + pos.q] - k;
            s1 += d;
            s2 += d * d;
            cnt += 1u;
            o += pos.lanes;
            if (o >= row1) {
                break;
            }
        }
    }
    var m = Moments4(0.0, vec4<f32>(0.0), vec4<f32>(0.0));
    if (cnt > 0u) {
        let n = f32(cnt);
        m = Moments4(n, k + s1 / n, s2 - s1 * s1 / n);
    }
    sh[lid] = m;
    workgroupBarrier();
    for (var stride = pos.lanes / 2u; stride > 0u; stride >>= 1u) {
        if (pos.lane < stride) {
            sh[lid] = merge4(sh[lid], sh[lid + stride * p.col_block]);
        }
        workgroupBarrier();
    }
    if (pos.lane == 0u && pos.q < quads) {
        let r = sh[lid];
        let slot = p.tile_offset + (g / p.col_blocks);
        for (var l = 0u; l < 4u; l++) {
            partials[(4u * pos.q + l) * p.tile_stride + slot] = vec4<f32>(r.n, r.mean[l], r.m2[l], 0.0);
        }
    }
}
