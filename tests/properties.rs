//! Property tests: random small problems (rank 2–5, dims down to 1, both layouts, eps,
//! momentum or cumulative averaging, affine and tracking flags, training or inference),
//! each run on the CPU path and every wgpu adapter, against the f64 oracle: y, saved and
//! running statistics, and the backward. Inputs that are errors by design (one value per
//! channel where batch statistics are needed) must fail with exactly that error and change
//! nothing.
//!
//! Case counts are low because every case runs on software GPUs too; failures are kept in
//! proptest-regressions/properties.txt and replayed first.
//!
//! Tolerances (f32 ε ≈ 6e-8), the same reasoning as forward.rs and backward.rs:
//! - y: 2e-5 + 2e-5·|y| + ulp(μ)·|γ|·invstd (μ is held as an f32; with n = 2 and close
//!   values invstd reaches 1/sqrt(eps)).
//! - saved/running mean: 1e-6 + 1e-5·|μ|; invstd and running var: 1e-5 relative (a Chan
//!   merge of shifted sums, O(1) data, ≤ 5000 values).
//! - dx: 1e-5·|γ|·invstd·max|dy| (+ the μ-rounding term against the oracle's own
//!   statistics); dγ, dβ: 1e-5·Σ|terms| (worst-case f32 summation error).

mod common;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use wgpu_batchnorm::cpu::reference::{RefForward, ReferenceBatchNorm};
use wgpu_batchnorm::{BatchNorm, BatchNormConfig, Context, Error, Layout, Shape};

use common::{assert_close, channel_of, normal, on_every_backend, ulp, widen};

/// One random problem.
#[derive(Debug, Clone)]
struct Problem {
    dims: Vec<usize>,
    layout: Layout,
    eps: f32,
    /// None: cumulative moving average (PyTorch momentum=None).
    momentum: Option<f32>,
    affine: bool,
    track: bool,
    training: bool,
    /// num_batches_tracked before the step (drives the cumulative factor).
    batches_before: u64,
    /// x = offset + spread·N(0, 1).
    offset: f64,
    spread: f64,
    seed: u64,
}

impl Problem {
    fn config(&self) -> BatchNormConfig {
        let config = BatchNormConfig::new(self.dims[1])
            .eps(self.eps)
            .affine(self.affine)
            .track_running_stats(self.track);
        match self.momentum {
            Some(m) => config.momentum(m),
            None => config.cumulative_average(),
        }
    }
}

/// Shapes of at most ~4400 values: N ≤ 6, C ≤ 9, and spatial dims bounded by rank (or
/// N, C ≤ 2 with one long spatial dim).
fn problem() -> impl Strategy<Value = Problem> {
    (2usize..=5)
        .prop_flat_map(|rank| {
            let spatial_max = match rank {
                2 => 1,
                3 => 40,
                4 => 9,
                _ => 4,
            };
            // Rank 3 sometimes gets a long spatial size (the kernels' along-runs mapping
            // starts at 1024); N and C are then cut to 2 below.
            let spatial = if rank == 3 {
                prop_oneof![
                    1 => Just(1usize),
                    6 => 1usize..=spatial_max,
                    1 => 1000usize..=1100
                ]
                .boxed()
            } else {
                prop_oneof![1 => Just(1usize), 3 => 1usize..=spatial_max].boxed()
            };
            (
                // N = 1 and unit spatial dims often: one value per channel is the error case.
                (prop_oneof![1 => Just(1usize), 3 => 1usize..=6], 1usize..=9),
                proptest::collection::vec(spatial, rank - 2),
                prop_oneof![Just(Layout::ChannelsFirst), Just(Layout::ChannelsLast)],
                prop_oneof![Just(1e-5f32), Just(1e-3f32), 1e-6f32..0.5],
                prop_oneof![
                    Just(None),
                    Just(Some(0.1f32)),
                    Just(Some(0.0f32)),
                    Just(Some(1.0f32)),
                    (0.0f32..=1.0).prop_map(Some),
                ],
                (any::<bool>(), any::<bool>(), any::<bool>()),
                (0u64..4, -3.0f64..3.0, 0.05f64..3.0, any::<u64>()),
            )
        })
        .prop_map(
            |(
                (n, c),
                spatial,
                layout,
                eps,
                momentum,
                (affine, track, training),
                (batches_before, offset, spread, seed),
            )| {
                let long = spatial.iter().any(|&s| s >= 1000);
                let mut dims = if long {
                    vec![n.min(2), c.min(2)]
                } else {
                    vec![n, c]
                };
                dims.extend(spatial);
                Problem {
                    dims,
                    layout,
                    eps,
                    momentum,
                    affine,
                    track,
                    training,
                    batches_before,
                    offset,
                    spread,
                    seed,
                }
            },
        )
}

/// A layer and its oracle in the same random state: γ, β, running statistics, counter.
fn layer_pair(ctx: &Context, p: &Problem) -> (BatchNorm, ReferenceBatchNorm) {
    let config = p.config();
    let c = p.dims[1];
    let mut bn = BatchNorm::new(ctx, config).unwrap();
    let mut reference = ReferenceBatchNorm::new(config);
    if p.affine {
        let w = normal(c, p.seed ^ 1, 1.0, 0.5);
        let b = normal(c, p.seed ^ 2, 0.0, 1.0);
        bn.set_weight(&w).unwrap();
        bn.set_bias(&b).unwrap();
        reference.weight = widen(&w);
        reference.bias = widen(&b);
    }
    if p.track {
        let rm = normal(c, p.seed ^ 3, p.offset, 1.0);
        let rv: Vec<f32> = normal(c, p.seed ^ 4, 0.0, p.spread)
            .iter()
            .map(|v| 0.1 + v * v)
            .collect();
        bn.set_running_mean(&rm).unwrap();
        bn.set_running_var(&rv).unwrap();
        bn.set_num_batches_tracked(p.batches_before).unwrap();
        reference.running_mean = widen(&rm);
        reference.running_var = widen(&rv);
        reference.num_batches_tracked = p.batches_before;
    }
    if !p.training {
        bn.eval();
    }
    (bn, reference)
}

/// The state a layer exposes, for "an error changed nothing".
type State = (
    Option<Vec<f32>>,
    Option<Vec<f32>>,
    Option<Vec<f32>>,
    Option<Vec<f32>>,
    Option<u64>,
);

fn state(bn: &BatchNorm) -> State {
    (
        bn.weight().unwrap(),
        bn.bias().unwrap(),
        bn.running_mean().unwrap(),
        bn.running_var().unwrap(),
        bn.num_batches_tracked(),
    )
}

/// Forward in the problem's mode and backward, against the oracle.
fn check_problem(ctx: &Context, p: &Problem) {
    let shape = Shape::with_layout(&p.dims, p.layout).unwrap();
    let (mut bn, mut reference) = layer_pair(ctx, p);
    let x = normal(shape.numel(), p.seed, p.offset, p.spread);
    let xt = ctx.tensor_with_layout(&x, &p.dims, p.layout).unwrap();
    let before = state(&bn);
    let got = bn.forward(&xt);
    let want = if p.training {
        reference.forward_train(&x, &shape)
    } else {
        reference.forward_eval(&x, &shape)
    };
    let batch_stats = p.config().uses_batch_stats(p.training);
    let (out, want) = match (got, want) {
        (Ok(out), Ok(want)) => (out, want),
        (Err(e), Err(want_e)) => {
            // The only error by design here: batch statistics of one value per channel.
            assert!(
                matches!(e, Error::TooFewValuesPerChannel { .. }),
                "unexpected error {e:?}"
            );
            assert_eq!(e, want_e);
            assert!(batch_stats && shape.batch() * shape.spatial() == 1, "{e}");
            assert_eq!(state(&bn), before, "a failed forward changed the state");
            return;
        }
        (got, want) => panic!(
            "backend and oracle disagree on success: got {:?}, oracle {:?}",
            got.map(|_| ()),
            want.map(|_| ())
        ),
    };
    assert_eq!(out.saved.is_batch_stats(), batch_stats);

    // y
    let y = out.y.to_vec().unwrap();
    for (i, (&g, &w)) in y.iter().zip(&want.y).enumerate() {
        let c = channel_of(&shape, i);
        let tol =
            2e-5 + 2e-5 * w.abs() + ulp(want.mean[c]) * reference.weight[c].abs() * want.invstd[c];
        assert!(
            (g as f64 - w).abs() <= tol,
            "y[{i}] (channel {c}): got {g} want {w} (tol {tol:e})"
        );
    }

    // statistics: saved, running, counter
    assert_close(
        "saved mean",
        &out.saved.mean().unwrap(),
        &want.mean,
        1e-6,
        1e-5,
    );
    assert_close(
        "saved invstd",
        &out.saved.invstd().unwrap(),
        &want.invstd,
        0.0,
        1e-5,
    );
    if p.track {
        assert_close(
            "running_mean",
            &bn.running_mean().unwrap().unwrap(),
            &reference.running_mean,
            1e-6,
            1e-5,
        );
        assert_close(
            "running_var",
            &bn.running_var().unwrap().unwrap(),
            &reference.running_var,
            0.0,
            1e-5,
        );
        assert_eq!(
            bn.num_batches_tracked(),
            Some(reference.num_batches_tracked)
        );
    } else {
        assert_eq!(bn.running_mean().unwrap(), None);
        assert_eq!(bn.num_batches_tracked(), None);
    }

    // backward, given the backend's saved statistics and given the oracle's
    let dy = normal(x.len(), p.seed ^ 5, 0.0, 1.0);
    let dyt = ctx.tensor_with_layout(&dy, &p.dims, p.layout).unwrap();
    let grads = bn.backward(&dyt, &xt, &out.saved).unwrap();
    assert_eq!(grads.dweight.is_some(), p.affine);
    assert_eq!(grads.dbias.is_some(), p.affine);
    let dx = grads.dx.as_ref().unwrap().to_vec().unwrap();
    let dw = grads.dweight.as_ref().map(|t| t.to_vec().unwrap());
    let db = grads.dbias.as_ref().map(|t| t.to_vec().unwrap());
    let saved = RefForward {
        y: Vec::new(),
        mean: widen(&out.saved.mean().unwrap()),
        invstd: widen(&out.saved.invstd().unwrap()),
        batch_stats,
    };
    for (what, stats, mean_ulps) in [("saved stats", &saved, 0.0), ("oracle stats", &want, 1.0)] {
        let rg = reference.backward(&dy, &x, &shape, stats);
        let c_n = shape.channels();
        let (mut max_dy, mut max_xhat, mut sum_dy, mut sum_dyx) = (
            vec![0.0f64; c_n],
            vec![0.0f64; c_n],
            vec![0.0; c_n],
            vec![0.0; c_n],
        );
        for i in 0..x.len() {
            let c = channel_of(&shape, i);
            let d = (dy[i] as f64).abs();
            let xhat = (x[i] as f64 - stats.mean[c]).abs() * stats.invstd[c];
            max_dy[c] = max_dy[c].max(d);
            max_xhat[c] = max_xhat[c].max(xhat);
            sum_dy[c] += d;
            sum_dyx[c] += d * xhat;
        }
        for (i, (&g, &w)) in dx.iter().zip(&rg.dx).enumerate() {
            let c = channel_of(&shape, i);
            let (is, ga) = (stats.invstd[c], reference.weight[c].abs());
            let xhat = (x[i] as f64 - stats.mean[c]).abs() * is;
            let shift = mean_ulps * ulp(stats.mean[c]);
            let tol = 1e-5 * ga * is * max_dy[c]
                + shift * ga * is * is * max_dy[c] * (max_xhat[c] + xhat);
            assert!(
                (g as f64 - w).abs() <= tol,
                "{what}: dx[{i}] (channel {c}): got {g} want {w} (tol {tol:e})"
            );
        }
        if let (Some(dw), Some(db)) = (&dw, &db) {
            for c in 0..c_n {
                let shift = mean_ulps * ulp(stats.mean[c]);
                let tol_w = 1e-5 * sum_dyx[c] + shift * stats.invstd[c] * sum_dy[c] + 1e-7;
                let tol_b = 1e-5 * sum_dy[c] + 1e-7;
                assert!(
                    (dw[c] as f64 - rg.dweight[c]).abs() <= tol_w,
                    "{what}: dweight[{c}]: got {} want {} (tol {tol_w:e})",
                    dw[c],
                    rg.dweight[c]
                );
                assert!(
                    (db[c] as f64 - rg.dbias[c]).abs() <= tol_b,
                    "{what}: dbias[{c}]: got {} want {} (tol {tol_b:e})",
                    db[c],
                    rg.dbias[c]
                );
            }
        }
    }
}

/// Three training steps on different data, then inference: the running statistics (and the
/// cumulative factor 1/num_batches_tracked) compound correctly.
fn check_three_steps_then_eval(ctx: &Context, p: &Problem) {
    let shape = Shape::with_layout(&p.dims, p.layout).unwrap();
    let p = Problem {
        training: true,
        ..p.clone()
    };
    let (mut bn, mut reference) = layer_pair(ctx, &p);
    for step in 0..3u64 {
        let x = normal(
            shape.numel(),
            p.seed + step,
            p.offset + step as f64,
            p.spread,
        );
        let xt = ctx.tensor_with_layout(&x, &p.dims, p.layout).unwrap();
        match (bn.forward_train(&xt), reference.forward_train(&x, &shape)) {
            (Ok(_), Ok(_)) => {}
            (Err(Error::TooFewValuesPerChannel { .. }), Err(_)) => {
                assert_eq!(shape.batch() * shape.spatial(), 1);
                assert_eq!(
                    bn.num_batches_tracked(),
                    p.track.then_some(p.batches_before)
                );
                return;
            }
            (got, want) => panic!(
                "step {step}: backend {:?}, oracle {:?}",
                got.map(|_| ()),
                want.map(|_| ())
            ),
        }
    }
    if p.track {
        let what = "after 3 steps";
        assert_close(
            &format!("{what}: running_mean"),
            &bn.running_mean().unwrap().unwrap(),
            &reference.running_mean,
            1e-6,
            1e-5,
        );
        assert_close(
            &format!("{what}: running_var"),
            &bn.running_var().unwrap().unwrap(),
            &reference.running_var,
            0.0,
            1e-5,
        );
        assert_eq!(bn.num_batches_tracked(), Some(p.batches_before + 3));
    }
    bn.eval();
    let x = normal(shape.numel(), p.seed ^ 9, p.offset, p.spread);
    let xt = ctx.tensor_with_layout(&x, &p.dims, p.layout).unwrap();
    let out = bn.forward(&xt).unwrap();
    let want = reference.forward_eval(&x, &shape).unwrap();
    let y = out.y.to_vec().unwrap();
    for (i, (&g, &w)) in y.iter().zip(&want.y).enumerate() {
        let c = channel_of(&shape, i);
        let tol =
            2e-5 + 2e-5 * w.abs() + ulp(want.mean[c]) * reference.weight[c].abs() * want.invstd[c];
        assert!(
            (g as f64 - w).abs() <= tol,
            "eval y[{i}] (channel {c}): got {g} want {w} (tol {tol:e})"
        );
    }
}

proptest! {
    // Failures are kept in proptest-regressions/ (for a file under tests/, proptest's
    // default would put them next to the source) and replayed before new cases.
    #![proptest_config(ProptestConfig {
        cases: 24,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/properties.txt",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn forward_and_backward_match_oracle(p in problem()) {
        on_every_backend("forward_and_backward_match_oracle", |ctx| check_problem(ctx, &p));
    }

    #[test]
    fn running_stats_over_three_steps_match_oracle(p in problem()) {
        on_every_backend("running_stats_over_three_steps_match_oracle", |ctx| {
            check_three_steps_then_eval(ctx, &p)
        });
    }
}
