//! The subgroup reductions (shaders/reduce_subgroup.wgsl; `DeviceTuning::subgroups`)
//! against the workgroup-memory tree (shaders/reduce_tree.wgsl) on the same adapter, and
//! both against the CPU path: the same y, saved statistics, running statistics, dx, dγ and
//! dβ within f32 rounding (the merge order differs), under partitionings that give each
//! channel one, a few and hundreds of tiles (the finalize passes' workgroup-per-channel
//! merge included), with tiles holding fewer values than a workgroup has invocations,
//! two values per channel, large offsets, huge and infinite values.

mod common;

use common::{assert_close, normal, widen};
use std::sync::OnceLock;

use wgpu_batchnorm::{
    ops, Context, ContextOptions, DeviceTuning, GradMask, Layout, Partitioning, Tensor,
};

/// The partitionings compared: the adapter's own, a real GPU's, and one with a tile per
/// 64 units (hundreds of tiles per channel, mostly partial workgroups).
fn partitionings() -> [Partitioning; 3] {
    [
        Partitioning::Auto,
        Partitioning::DiscreteGpu,
        Partitioning::Explicit {
            target_groups: 1 << 16,
            max_units_per_thread: 1,
        },
    ]
}

/// (subgroup context, tree twin) per adapter whose default context reduces with subgroups
/// and per partitioning, built once; loud when there is none. CI's Vulkan adapter
/// (lavapipe) has subgroups: when `WGPU_BATCHNORM_REQUIRE_BACKENDS` names vulkan, a Vulkan
/// context must use them.
fn pairs() -> &'static [(Context, Context)] {
    static PAIRS: OnceLock<Vec<(Context, Context)>> = OnceLock::new();
    PAIRS.get_or_init(|| {
        let opts = ContextOptions::default();
        let mut out = Vec::new();
        for partitioning in partitionings() {
            let base = DeviceTuning::default().partitioning(partitioning);
            let with = Context::all_gpus_tuned(opts, base);
            let without = Context::all_gpus_tuned(opts, base.subgroups(false));
            for (a, b) in with.into_iter().zip(without) {
                match (a, b) {
                    (Ok(a), Ok(b)) => {
                        assert_eq!(
                            b.tuning().and_then(|t| t.subgroups),
                            Some(false),
                            "{}: subgroups(false) is not honoured",
                            b.name()
                        );
                        if a.tuning().and_then(|t| t.subgroups) == Some(true) {
                            out.push((a, b));
                        }
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        eprintln!("!!! subgroup tests: an adapter is unusable: {e}")
                    }
                }
            }
        }
        if out.is_empty() {
            eprintln!("!!! subgroup tests: NO ADAPTER WITH SUBGROUPS FOUND: nothing compared");
        }
        if let Ok(required) = std::env::var("WGPU_BATCHNORM_REQUIRE_BACKENDS") {
            if required.split(',').any(|s| s.trim() == "vulkan") {
                assert!(
                    out.iter().any(|(c, _)| c.backend_kind() == "vulkan"),
                    "WGPU_BATCHNORM_REQUIRE_BACKENDS names vulkan, but no Vulkan context \
                     reduces with subgroups"
                );
            }
        }
        out
    })
}

/// Named host copies of a training step's outputs and an inference backward's.
type Outputs = Vec<(&'static str, Vec<f32>)>;

fn step(ctx: &Context, dims: &[usize], layout: Layout, xs: &[f32], dys: &[f32]) -> Outputs {
    let c = dims[1];
    let t = |v: &[f32], d: &[usize]| ctx.tensor_with_layout(v, d, layout).unwrap();
    let p = |v: Vec<f32>| ctx.tensor_from_slice(&v, &[c]).unwrap();
    let (x, dy) = (t(xs, dims), t(dys, dims));
    let (w, b) = (p(normal(c, 7, 1.0, 0.5)), p(normal(c, 8, 0.0, 0.5)));
    let (mut rm, mut rv) = (p(normal(c, 9, 0.0, 1.0)), p(vec![2.0; c]));
    let f = ops::batch_norm(
        &x,
        Some(&mut rm),
        Some(&mut rv),
        Some(&w),
        Some(&b),
        true,
        0.1,
        1e-5,
    )
    .unwrap();
    let g = ops::batch_norm_backward(&dy, &x, &f.saved, Some(&w), GradMask::ALL).unwrap();
    let host = |t: &Option<Tensor>| t.as_ref().unwrap().to_vec().unwrap();
    vec![
        ("y", f.y.to_vec().unwrap()),
        ("saved mean", f.saved.mean().unwrap()),
        ("saved invstd", f.saved.invstd().unwrap()),
        ("running mean", rm.to_vec().unwrap()),
        ("running var", rv.to_vec().unwrap()),
        ("dx", host(&g.dx)),
        ("dweight", host(&g.dweight)),
        ("dbias", host(&g.dbias)),
    ]
}

/// One shape on every pair: subgroup and tree results each against the CPU path, and
/// against each other, within `rtol` (plus 1e-5 absolute).
fn compare(dims: &[usize], layout: Layout, xs: &[f32], rtol: f64) {
    let dys = normal(xs.len(), 77, 0.0, 1.0);
    let cpu = step(&Context::cpu(), dims, layout, xs, &dys);
    for (sub, tree) in pairs() {
        let a = step(sub, dims, layout, xs, &dys);
        let b = step(tree, dims, layout, xs, &dys);
        let part = sub.tuning().map(|t| t.partitioning);
        let what = |k: &str| format!("{dims:?} {layout:?} on {} ({part:?}): {k}", sub.name());
        for (((name, got), (_, t)), (_, reference)) in a.iter().zip(&b).zip(&cpu) {
            let want = widen(reference);
            assert_close(&what(&format!("{name} (tree)")), t, &want, 1e-5, rtol);
            assert_close(
                &what(&format!("{name} (subgroups)")),
                got,
                &want,
                1e-5,
                rtol,
            );
            assert_close(&what(name), got, &widen(t), 1e-5, rtol);
        }
    }
}

#[test]
fn subgroup_and_tree_reductions_agree() {
    let cases: &[(&[usize], Layout)] = &[
        (&[4, 3, 40, 40], Layout::ChannelsFirst),  // vec4 runs
        (&[2, 5, 33, 31], Layout::ChannelsFirst),  // scalar runs
        (&[1, 2, 3000, 1], Layout::ChannelsFirst), // one long run per channel
        (&[3, 4, 17, 1], Layout::ChannelsFirst),   // runs shorter than a workgroup
        (&[256, 96], Layout::ChannelsFirst),       // (N, C): the column kernels' finalize
        (&[8, 6, 9, 9], Layout::ChannelsLast),
    ];
    for &(dims, layout) in cases {
        let n: usize = dims.iter().product();
        compare(dims, layout, &normal(n, 5, 3.0, 2.0), 1e-4);
    }
}

#[test]
fn subgroup_reductions_keep_the_shifted_precision() {
    // Offset 1e4, spread 0.5: E[x²] − E[x]² in f32 would lose every digit of the variance;
    // the Chan merges keep it, in either reduction.
    let dims = [4, 3, 64, 64];
    let n: usize = dims.iter().product();
    compare(&dims, Layout::ChannelsFirst, &normal(n, 11, 1e4, 0.5), 1e-3);
}

#[test]
fn subgroup_reductions_of_infinite_and_huge_values() {
    // Channel 0 holds one +Inf (mean +Inf, variance NaN), channel 1 values ±1e19 whose
    // squared differences overflow f32 (the scaled fallback), channel 2 ordinary values.
    let dims = [2, 3, 32, 32];
    let per = 32 * 32;
    let mut xs = normal(2 * 3 * per, 13, 0.0, 1.0);
    xs[5] = f32::INFINITY;
    for o in 0..2 {
        for (s, v) in xs[(o * 3 + 1) * per..(o * 3 + 2) * per]
            .iter_mut()
            .enumerate()
        {
            *v = if s % 2 == 0 { 1e19 } else { -1e19 } + (s as f32) * 1e15;
        }
    }
    compare(&dims, Layout::ChannelsFirst, &xs, 1e-4);
}

#[test]
fn subgroup_reductions_of_two_values_per_channel() {
    // One invocation of 256 holds a value, another a second one (or the same invocation
    // both): every other summary in the merges is empty. (An empty batch dispatches
    // nothing, and training on one value per channel is an error, as in PyTorch.)
    compare(
        &[2, 2, 1, 1],
        Layout::ChannelsFirst,
        &[1.0, -1.0, 4.0, 5.0],
        1e-5,
    );
    compare(
        &[1, 3, 2, 1],
        Layout::ChannelsFirst,
        &[1.0, 2.0, 3.0, 5.0, -2.0, 0.5],
        1e-5,
    );
}

#[test]
fn the_cpu_path_and_gl_report_no_subgroups() {
    assert_eq!(Context::cpu().tuning(), None);
    for ctx in Context::all_gpus().into_iter().flatten() {
        let t = ctx.tuning().expect("a GPU context has a tuning");
        let (device, _) = ctx.wgpu().expect("a GPU context has a device");
        if !device.features().contains(wgpu::Features::SUBGROUP) {
            assert_eq!(t.subgroups, Some(false), "{}", ctx.name());
        }
        if ctx.backend_kind() == "gl" {
            assert_eq!(
                t.subgroups,
                Some(false),
                "{}: GL has no subgroups",
                ctx.name()
            );
        }
    }
}

#[test]
fn a_callers_device_reduces_with_subgroups_only_if_it_enabled_them() {
    let desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    let backends = desc.backends;
    let instance = wgpu::Instance::new(desc);
    let mut checked = 0;
    for adapter in pollster::block_on(instance.enumerate_adapters(backends)) {
        if !adapter.features().contains(wgpu::Features::SUBGROUP) {
            continue;
        }
        for features in [wgpu::Features::empty(), wgpu::Features::SUBGROUP] {
            let (device, queue) =
                pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
                    label: Some("caller's device"),
                    required_features: features,
                    required_limits: adapter.limits(),
                    ..Default::default()
                }))
                .expect("a device on an adapter that listed the feature");
            let ctx = Context::from_device(device, queue).unwrap();
            let on = features.contains(wgpu::Features::SUBGROUP);
            assert_eq!(
                ctx.tuning().and_then(|t| t.subgroups),
                Some(on),
                "{} with {features:?}",
                ctx.name()
            );
            // Either way the kernels build and agree with the CPU path.
            let dims = [4, 3, 40, 40];
            let xs = normal(4 * 3 * 1600, 21, 1.0, 2.0);
            let dys = normal(xs.len(), 22, 0.0, 1.0);
            let want = step(&Context::cpu(), &dims, Layout::ChannelsFirst, &xs, &dys);
            let got = step(&ctx, &dims, Layout::ChannelsFirst, &xs, &dys);
            for ((name, g), (_, w)) in got.iter().zip(&want) {
                let what = format!("{} with {features:?}: {name}", ctx.name());
                assert_close(&what, g, &widen(w), 1e-5, 1e-4);
            }
            checked += 1;
        }
    }
    if checked == 0 {
        eprintln!(
            "!!! subgroup tests: NO ADAPTER WITH SUBGROUPS FOUND: caller's devices unchecked"
        );
    }
}
