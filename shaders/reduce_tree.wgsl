// Workgroup reductions by a tree in workgroup memory (log2(WG) levels, a barrier each): the
// variant for adapters without subgroup operations (reduce_subgroup.wgsl is the other). The
// host prepends one of the two to the kernels that reduce a workgroup to one value
// (stats_partials, bwd_partials, stats_finalize, bwd_finalize). Their entry points take the
// invocation's position as `Lanes`.

struct Lanes {
    @builtin(local_invocation_index) lid: u32,
}

var<workgroup> red_summaries: array<vec4<f32>, WG>;
var<workgroup> red_sums: array<vec2<f32>, WG>;

// Every invocation's summary (count, k, mean − k, sd) merged with Chan's formula; every
// invocation gets the result. Call from uniform control flow.
fn merge_summaries(v: vec4<f32>, at: Lanes) -> vec4<f32> {
    red_summaries[at.lid] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (at.lid < stride) {
            red_summaries[at.lid] = chan_merge(red_summaries[at.lid], red_summaries[at.lid + stride]);
        }
        workgroupBarrier();
    }
    return red_summaries[0];
}

// The sum of every invocation's v; every invocation gets it. Call from uniform control flow.
fn add_sums(v: vec2<f32>, at: Lanes) -> vec2<f32> {
    red_sums[at.lid] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (at.lid < stride) {
            red_sums[at.lid] += red_sums[at.lid + stride];
        }
        workgroupBarrier();
    }
    return red_sums[0];
}
