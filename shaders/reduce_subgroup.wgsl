// Workgroup reductions with subgroup operations, for adapters with them (the host checks
// the feature, and that subgroups are a power of two of at most WG invocations, so that
// subgroups are normally full; a partial one is handled by counting its lanes, which are
// taken to be its lowest): the same interface as reduce_tree.wgsl. Each subgroup
// merges its lanes through registers (shuffles: log2(subgroup size) steps, no barrier),
// writes one value per subgroup to workgroup memory, and after the one barrier the first
// subgroup merges those. Works for any subgroup size and any number of subgroups.

struct Lanes {
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) id: u32,
    @builtin(num_subgroups) count: u32,
}

var<workgroup> red_summaries: array<vec4<f32>, WG>;
var<workgroup> red_sums: array<vec2<f32>, WG>;
var<workgroup> red_summary: vec4<f32>;
var<workgroup> red_sum: vec2<f32>;

// Lanes of this subgroup that run (all of them but in a partial subgroup).
fn active_lanes() -> u32 {
    let b = countOneBits(subgroupBallot(true));
    return b.x + b.y + b.z + b.w;
}

// Chan merge of the subgroup's `live` summaries: a shuffle-down tree (lane i merges lane
// i + off, off = 1, 2, 4, …), which leaves the merge of every lane in lane 0, for any size.
fn subgroup_merge(v: vec4<f32>, at: Lanes, live: u32) -> vec4<f32> {
    var acc = v;
    for (var off = 1u; off < live; off <<= 1u) {
        let other = subgroupShuffleDown(acc, off);
        if (at.lane + off < live) {
            acc = chan_merge(acc, other);
        }
    }
    return acc;
}

// Every invocation's summary merged; every invocation gets the result. Call from uniform
// control flow.
fn merge_summaries(v: vec4<f32>, at: Lanes) -> vec4<f32> {
    let live = active_lanes();
    let mine = subgroup_merge(v, at, live);
    if (at.lane == 0u) {
        red_summaries[at.id] = mine;
    }
    workgroupBarrier();
    // The first subgroup merges the subgroups' summaries: lane l those at l, l + live, …
    // in order, then the lanes by shuffles.
    if (at.id == 0u) {
        var acc = vec4<f32>(0.0);
        for (var s = at.lane; s < at.count; s += live) {
            acc = chan_merge(acc, red_summaries[s]);
        }
        acc = subgroup_merge(acc, at, live);
        if (at.lane == 0u) {
            red_summary = acc;
        }
    }
    workgroupBarrier();
    return red_summary;
}

// The sum of every invocation's v; every invocation gets it. Call from uniform control flow.
fn add_sums(v: vec2<f32>, at: Lanes) -> vec2<f32> {
    let mine = subgroupAdd(v);
    if (at.lane == 0u) {
        red_sums[at.id] = mine;
    }
    workgroupBarrier();
    if (at.id == 0u) {
        let live = active_lanes();
        var acc = vec2<f32>(0.0);
        for (var s = at.lane; s < at.count; s += live) {
            acc += red_sums[s];
        }
        acc = subgroupAdd(acc);
        if (at.lane == 0u) {
            red_sum = acc;
        }
    }
    workgroupBarrier();
    return red_sum;
}
