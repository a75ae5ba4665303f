//! The one-pass kernels (a channel held in workgroup memory: one dispatch per training
//! forward or backward; `DeviceTuning::one_pass`) against the default two-pass kernels on
//! the same adapter, and both against the CPU path: the same y,
//! saved statistics, running statistics, dx, dγ and dβ within f32 rounding, on both sides
//! of the capacity where the plan switches, with one or two values per channel, channel
//! counts that do not fill a workgroup's block, large and infinite values, and empty
//! batches; and the dispatch counts that show which kernels ran.

mod common;

use common::{assert_close, normal, widen};
use std::sync::{Mutex, OnceLock};

use wgpu_batchnorm::{ops, Context, ContextOptions, DeviceTuning, GradMask, Layout, Tensor};

/// (one-pass context, two-pass twin) per GPU adapter, built once; loud when there is none.
fn pairs() -> &'static [(Context, Context)] {
    static PAIRS: OnceLock<Vec<(Context, Context)>> = OnceLock::new();
    PAIRS.get_or_init(|| {
        let opts = ContextOptions::default();
        let one = Context::all_gpus_tuned(opts, DeviceTuning::default().one_pass(true));
        let two = Context::all_gpus_tuned(opts, DeviceTuning::default());
        let mut out = Vec::new();
        for (a, b) in one.into_iter().zip(two) {
            match (a, b) {
                (Ok(a), Ok(b)) => out.push((a, b)),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("!!! one_pass tests: an adapter is unusable: {e}")
                }
            }
        }
        if out.is_empty() {
            eprintln!("!!! one_pass tests: NO GPU ADAPTER FOUND: nothing compared");
        }
        // As common::backends: CI names the adapters that must be there.
        if let Ok(required) = std::env::var("WGPU_BATCHNORM_REQUIRE_BACKENDS") {
            for want in required.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                assert!(
                    out.iter()
                        .any(|(c, _)| c.backend_kind().eq_ignore_ascii_case(want)),
                    "WGPU_BATCHNORM_REQUIRE_BACKENDS names {want:?} but no such adapter was found"
                );
            }
        }
        out
    })
}

/// Runs `body` on every pair, one test at a time (the dispatch counts are per context).
fn on_every_pair(body: impl Fn(&Context, &Context)) {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _lock = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for (one, two) in pairs() {
        body(one, two);
    }
}

/// Named host copies of a step's outputs.
type Outputs = Vec<(&'static str, Vec<f32>)>;

/// Everything a training step gives, as host vectors, and the dispatches it took
/// (forward, backward).
fn step(
    ctx: &Context,
    dims: &[usize],
    layout: Layout,
    xs: &[f32],
    dys: &[f32],
    mask: GradMask,
) -> (Outputs, (u64, u64)) {
    let c = dims[1];
    let t = |v: &[f32], d: &[usize]| ctx.tensor_with_layout(v, d, layout).unwrap();
    let p = |v: Vec<f32>| ctx.tensor_from_slice(&v, &[c]).unwrap();
    let (x, dy) = (t(xs, dims), t(dys, dims));
    let (w, b) = (p(normal(c, 7, 1.0, 0.5)), p(normal(c, 8, 0.0, 0.5)));
    let (mut rm, mut rv) = (p(normal(c, 9, 0.0, 1.0)), p(vec![2.0; c]));
    let d0 = ctx.dispatch_count();
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
    let d1 = ctx.dispatch_count();
    let g = ops::batch_norm_backward(&dy, &x, &f.saved, Some(&w), mask).unwrap();
    let d2 = ctx.dispatch_count();
    let mut out = vec![
        ("y", f.y.to_vec().unwrap()),
        ("saved mean", f.saved.mean().unwrap()),
        ("saved invstd", f.saved.invstd().unwrap()),
        ("running mean", rm.to_vec().unwrap()),
        ("running var", rv.to_vec().unwrap()),
    ];
    let mut add = |name, t: &Option<Tensor>| {
        if let Some(t) = t {
            out.push((name, t.to_vec().unwrap()));
        }
    };
    add("dx", &g.dx);
    add("dweight", &g.dweight);
    add("dbias", &g.dbias);
    // Inference backward (statistics are constants): dx = dy·γ·invstd.
    let e = ops::batch_norm(
        &x,
        Some(&mut rm),
        Some(&mut rv),
        Some(&w),
        None,
        false,
        0.1,
        1e-5,
    )
    .unwrap();
    let ge = ops::batch_norm_backward(&dy, &x, &e.saved, Some(&w), GradMask::ALL).unwrap();
    out.push(("eval dx", ge.dx.unwrap().to_vec().unwrap()));
    out.push(("eval dweight", ge.dweight.unwrap().to_vec().unwrap()));
    (out, (d1 - d0, d2 - d1))
}

/// Values per channel of a tensor of `dims` (N, C, …), in either layout.
fn per_channel(dims: &[usize]) -> usize {
    dims.iter().product::<usize>() / dims[1].max(1)
}

/// Compares one shape on every adapter, and checks from the dispatch counts that the
/// one-pass context ran one dispatch where the channel fits its capacity (forward) or
/// half of it (backward), and three elsewhere.
fn compare(dims: &[usize], layout: Layout, xs: &[f32], rtol: f64) {
    let n = xs.len();
    let dys = normal(n, 77, 0.0, 1.0);
    let (cpu, _) = step(&Context::cpu(), dims, layout, xs, &dys, GradMask::ALL);
    on_every_pair(|one, two| {
        let (a, (fa, ba)) = step(one, dims, layout, xs, &dys, GradMask::ALL);
        let (b, (fb, bb)) = step(two, dims, layout, xs, &dys, GradMask::ALL);
        let what = |k: &str| format!("{dims:?} {layout:?} on {}: {k}", one.name());
        assert_eq!((fb, bb), (3, 3), "{}", what("two-pass dispatches"));
        let cap = one
            .one_pass_capacity()
            .expect("software adapters run one-pass kernels");
        let count = per_channel(dims);
        let expect = |fits: bool| if fits { 1 } else { 3 };
        assert_eq!(
            (fa, ba),
            (expect(count <= cap), expect(2 * count <= cap)),
            "{}",
            what(&format!(
                "one-pass dispatches (forward, backward), capacity {cap}"
            ))
        );
        for (((name, got), (_, two_pass)), (_, reference)) in a.iter().zip(&b).zip(&cpu) {
            assert_close(
                &what(&format!("{name} (two-pass)")),
                two_pass,
                &widen(reference),
                1e-5,
                rtol,
            );
            assert_close(
                &what(&format!("{name} (one-pass)")),
                got,
                &widen(reference),
                1e-5,
                rtol,
            );
            assert_close(&what(name), got, &widen(two_pass), 1e-5, rtol);
        }
    });
}

#[test]
fn one_pass_equals_two_pass_on_the_shapes_it_takes() {
    let cases: &[(&[usize], Layout)] = &[
        (&[32, 64, 7, 7], Layout::ChannelsFirst), // 1568 values per channel
        (&[256, 96], Layout::ChannelsFirst),      // (N, C): channel blocks
        (&[64, 37], Layout::ChannelsFirst),       // C not a multiple of the block
        (&[4, 10, 3, 3], Layout::ChannelsLast),
        (&[3, 5, 2, 2, 2], Layout::ChannelsLast),
        (&[2, 3], Layout::ChannelsFirst), // two values per channel
        (&[1, 6, 1, 2], Layout::ChannelsFirst),
        (&[2, 300], Layout::ChannelsFirst), // many channels of two values
    ];
    for &(dims, layout) in cases {
        let n: usize = dims.iter().product();
        compare(dims, layout, &normal(n, 5, 3.0, 2.0), 1e-4);
    }
}

#[test]
fn the_default_tuning_keeps_the_two_pass_kernels() {
    for (one, two) in pairs() {
        assert!(one.one_pass_capacity().is_some(), "{}", one.name());
        assert_eq!(two.one_pass_capacity(), None, "{}", two.name());
    }
    assert_eq!(Context::cpu().one_pass_capacity(), None);
}

#[test]
fn the_plan_switches_at_the_capacity() {
    let caps: std::collections::BTreeSet<_> = pairs()
        .iter()
        .map(|(one, _)| one.one_pass_capacity())
        .collect();
    for cap in caps {
        let cap = cap.expect("software adapters run the one-pass kernels when asked");
        assert!(
            cap >= 3072,
            "capacity {cap}: WebGPU guarantees 16 KiB of workgroup memory"
        );
        // Both sides of the forward's capacity and of the backward's (half of it).
        for count in [cap, cap + 1, cap / 2, cap / 2 + 1] {
            for (dims, layout) in [
                (vec![count, 3], Layout::ChannelsFirst),
                (vec![count.div_ceil(4), 2, 2, 2], Layout::ChannelsFirst),
                (vec![count.div_ceil(4), 2, 2, 3], Layout::ChannelsLast),
            ] {
                let n: usize = dims.iter().product();
                let xs = normal(n, count as u64, -1.0, 0.5);
                compare(&dims, layout, &xs, 1e-4);
            }
        }
    }
}

#[test]
fn one_pass_keeps_the_numerics_of_two_pass() {
    // std 4e18: an invocation's ~12 squared differences overflow f32 (the overflow
    // fallback), the variance (1.6e37) does not.
    let xs: Vec<f32> = normal(6000, 3, 0.0, 1.0).iter().map(|v| v * 4e18).collect();
    compare(&[3000, 2], Layout::ChannelsFirst, &xs, 1e-4);
    // std 1e19: partial summaries of few values with variances past f32's range.
    let xs: Vec<f32> = normal(600, 3, 0.0, 1.0).iter().map(|v| v * 1e19).collect();
    compare(&[100, 6], Layout::ChannelsFirst, &xs, 1e-4);
    // A large common offset: the shifted sums keep the small spread.
    let xs: Vec<f32> = normal(600, 4, 0.0, 0.01).iter().map(|v| v + 1e5).collect();
    compare(&[100, 6], Layout::ChannelsFirst, &xs, 1e-3);
    // ±Inf in a channel: NaN statistics where two-pass has them, +Inf means kept.
    let mut xs = normal(600, 6, 0.0, 1.0);
    xs[0] = f32::INFINITY;
    xs[7] = f32::NEG_INFINITY;
    xs[13] = f32::INFINITY;
    xs[19] = f32::INFINITY;
    compare(&[100, 6], Layout::ChannelsFirst, &xs, 1e-4);
}

#[test]
fn empty_batches_and_partial_masks() {
    on_every_pair(|one, two| {
        // An empty batch: no dispatch, zero saved statistics and gradients, on both.
        for ctx in [one, two] {
            let x = ctx.tensor_from_slice(&[], &[0, 4]).unwrap();
            let d0 = ctx.dispatch_count();
            let f = ops::batch_norm(&x, None, None, None, None, true, 0.1, 1e-5).unwrap();
            let g = ops::batch_norm_backward(&x, &x, &f.saved, None, GradMask::ALL).unwrap();
            assert_eq!(
                ctx.dispatch_count(),
                d0,
                "{}: dispatches for nothing",
                ctx.name()
            );
            assert_eq!(f.y.to_vec().unwrap(), Vec::<f32>::new());
            assert_eq!(f.saved.mean().unwrap(), vec![0.0; 4]);
            assert_eq!(g.dbias.unwrap().to_vec().unwrap(), vec![0.0; 4]);
        }
        // Masks: dx only, dγ only, dβ only.
        let dims = [50, 8];
        let xs = normal(400, 1, 0.0, 1.0);
        let dys = normal(400, 2, 0.0, 1.0);
        for mask in [
            GradMask {
                input: true,
                weight: false,
                bias: false,
            },
            GradMask {
                input: false,
                weight: true,
                bias: false,
            },
            GradMask {
                input: false,
                weight: false,
                bias: true,
            },
        ] {
            let (a, _) = step(one, &dims, Layout::ChannelsFirst, &xs, &dys, mask);
            let (b, _) = step(two, &dims, Layout::ChannelsFirst, &xs, &dys, mask);
            assert_eq!(a.len(), b.len(), "{mask:?}");
            for ((name, got), (_, want)) in a.iter().zip(&b) {
                assert_close(&format!("{mask:?} {name}"), got, &widen(want), 1e-5, 1e-4);
            }
        }
    });
}
