//! Backward pass: first the oracle's own backward against central finite differences of an
//! independent f64 forward, then the CPU path and every wgpu adapter against the oracle —
//! training and inference, the module flags, gradient masks, large offsets, layouts.
//!
//! How the comparisons are made. PyTorch's backward takes (dy, x, save_mean, save_invstd),
//! and so does ours; each backend is compared with the oracle's backward fed the statistics
//! that backend saved (widened to f64), which isolates the backward's own arithmetic. Where
//! the data are well conditioned, the whole forward + backward is also compared with the
//! oracle's own statistics.
//!
//! Tolerances (f32 ε ≈ 6e-8):
//! - dx, per channel c: DX_TOL·|γ_c|·invstd_c·max|dy|. dx = γ·invstd·(dy − mean(dy) −
//!   x̂·mean(dy·x̂)), a combination of O(max|dy|) terms that may cancel: each f32 rounding
//!   costs ε of the terms' scale, not of the (possibly tiny) result.
//! - dγ, dβ, per channel: PARAM_TOL·Σ|terms| (Σ|dy·(x − μ)|·invstd, Σ|dy|): the worst-case
//!   error of an f32 sum accumulated sequentially over ≤ 128 terms per thread then in a
//!   tree is ≈ (128 + log2 n)·ε·Σ|terms| ≈ 1e-5·Σ|terms|.

mod common;

use common::{assert_close, channel_of, normal, on_every_backend, ulp, widen};
use wgpu_batchnorm::cpu::reference::{RefForward, RefGrads, ReferenceBatchNorm};
use wgpu_batchnorm::{
    BatchNorm, BatchNormConfig, Context, GradMask, Gradients, Layout, SavedStats, Shape,
};

const DX_TOL: f64 = 1e-5;
const PARAM_TOL: f64 = 1e-5;

// ---- the oracle's backward, proven against finite differences ----

/// A second, independent f64 forward for the finite differences: loss = Σ y·dy with
/// y = (x − μ)/sqrt(σ² + eps)·γ + β, μ and σ² the biased batch statistics (when
/// `running` is None) or the given running (mean, var). Channels-first or channels-last.
#[allow(clippy::too_many_arguments)]
fn loss_f64(
    x: &[f64],
    dy: &[f64],
    dims: &[usize],
    layout: Layout,
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
    running: Option<(&[f64], &[f64])>,
) -> f64 {
    let (n, c) = (dims[0], dims[1]);
    let s: usize = dims[2..].iter().product();
    let index = |b: usize, ch: usize, p: usize| match layout {
        Layout::ChannelsFirst => (b * c + ch) * s + p,
        Layout::ChannelsLast => (b * s + p) * c + ch,
    };
    let count = (n * s) as f64;
    let mut loss = 0.0;
    for ch in 0..c {
        let values = || (0..n).flat_map(move |b| (0..s).map(move |p| index(b, ch, p)));
        let (mean, var) = match running {
            Some((rm, rv)) => (rm[ch], rv[ch]),
            None => {
                let mean = values().map(|i| x[i]).sum::<f64>() / count;
                let var = values().map(|i| (x[i] - mean).powi(2)).sum::<f64>() / count;
                (mean, var)
            }
        };
        for i in values() {
            let y = (x[i] - mean) / (var + eps).sqrt() * gamma[ch] + beta[ch];
            loss += y * dy[i];
        }
    }
    loss
}

/// Central differences of `f` at `v` (each coordinate in turn), step h.
fn numeric_grad(v: &[f64], h: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut p = v.to_vec();
    (0..v.len())
        .map(|i| {
            p[i] = v[i] + h;
            let up = f(&p);
            p[i] = v[i] - h;
            let down = f(&p);
            p[i] = v[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// The oracle's dx, dγ, dβ against finite differences of `loss_f64`, for one configuration.
/// The inputs are f32 values (what the oracle takes) widened exactly to f64; the
/// differences run in f64 with h = 1e-6: truncation O(h²) ≈ 1e-12, rounding
/// ≈ 1e-16·|loss|/h ≈ 1e-9, so 1e-6 absolute + 1e-6 relative is a wide margin.
fn oracle_gradcheck(dims: &[usize], layout: Layout, affine: bool, training: bool, seed: u64) {
    let shape = Shape::with_layout(dims, layout).unwrap();
    let c = dims[1];
    let config = BatchNormConfig::new(c).affine(affine).eps(1e-3);
    let x = normal(shape.numel(), seed, 0.5, 1.3);
    let dy = normal(shape.numel(), seed + 1, 0.0, 1.0);
    let mut reference = ReferenceBatchNorm::new(config);
    if affine {
        reference.weight = widen(&normal(c, seed + 2, 1.0, 0.3));
        reference.bias = widen(&normal(c, seed + 3, 0.0, 0.5));
    }
    let rm = widen(&normal(c, seed + 4, 0.2, 0.5));
    let rv: Vec<f64> = widen(&normal(c, seed + 5, 0.0, 1.0))
        .iter()
        .map(|v| 0.3 + v * v)
        .collect();
    let fwd = if training {
        reference.forward_train(&x, &shape).unwrap()
    } else {
        reference.running_mean = rm.clone();
        reference.running_var = rv.clone();
        reference.forward_eval(&x, &shape).unwrap()
    };
    let grads = reference.backward(&dy, &x, &shape, &fwd);

    let (xd, dyd) = (widen(&x), widen(&dy));
    let eps = config.eps as f64;
    let running = (!training).then_some((rm.as_slice(), rv.as_slice()));
    let (gamma, beta) = (reference.weight.clone(), reference.bias.clone());
    let what = format!("oracle {dims:?} {layout:?} affine={affine} training={training}");

    // The two forwards agree (same function differentiated): Σ y·dy.
    let oracle_loss: f64 = fwd.y.iter().zip(&dyd).map(|(y, d)| y * d).sum();
    let loss = loss_f64(&xd, &dyd, dims, layout, &gamma, &beta, eps, running);
    assert!(
        (oracle_loss - loss).abs() <= 1e-12 * (1.0 + loss.abs()),
        "{what}: forwards disagree: {oracle_loss} vs {loss}"
    );

    let h = 1e-6;
    let num_dx = numeric_grad(&xd, h, |v| {
        loss_f64(v, &dyd, dims, layout, &gamma, &beta, eps, running)
    });
    let num_dw = numeric_grad(&gamma, h, |g| {
        loss_f64(&xd, &dyd, dims, layout, g, &beta, eps, running)
    });
    let num_db = numeric_grad(&beta, h, |b| {
        loss_f64(&xd, &dyd, dims, layout, &gamma, b, eps, running)
    });
    assert_close_f64(&format!("{what}: dx"), &grads.dx, &num_dx, 1e-6, 1e-6);
    assert_close_f64(
        &format!("{what}: dweight"),
        &grads.dweight,
        &num_dw,
        1e-6,
        1e-6,
    );
    assert_close_f64(&format!("{what}: dbias"), &grads.dbias, &num_db, 1e-6, 1e-6);
}

/// assert_close for two f64 vectors.
#[track_caller]
fn assert_close_f64(what: &str, got: &[f64], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{what}: index {i}: got {g} want {w} (atol {atol:e}, rtol {rtol:e})"
        );
    }
}

#[test]
fn oracle_backward_matches_finite_differences() {
    for (i, (dims, layout)) in [
        (vec![5, 3], Layout::ChannelsFirst),
        (vec![4, 3, 5], Layout::ChannelsFirst),
        (vec![2, 2, 3, 2], Layout::ChannelsFirst),
        (vec![3, 2, 2, 2], Layout::ChannelsLast),
        (vec![1, 2, 2, 3, 2], Layout::ChannelsFirst),
    ]
    .into_iter()
    .enumerate()
    {
        for affine in [true, false] {
            for training in [true, false] {
                oracle_gradcheck(&dims, layout, affine, training, 10 * i as u64);
            }
        }
    }
}

// ---- every backend against the oracle ----

/// How the forward that the backward differentiates ran.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// Training forward (batch statistics), then `backward`.
    Train,
    /// Inference with loaded running statistics, via `backward_eval`.
    Eval,
    /// Inference without running statistics: batch statistics, training formula.
    EvalUntracked,
}

/// Per-channel tolerance inputs: max |dy|, max |x̂|, Σ|dy| and Σ|dy·(x − μ)|·invstd.
struct Scales {
    max_dy: Vec<f64>,
    max_xhat: Vec<f64>,
    sum_abs_dy: Vec<f64>,
    sum_abs_dyx: Vec<f64>,
}

fn scales(x: &[f32], dy: &[f32], shape: &Shape, stats: &RefForward) -> Scales {
    let c = shape.channels();
    let mut s = Scales {
        max_dy: vec![0.0; c],
        max_xhat: vec![0.0; c],
        sum_abs_dy: vec![0.0; c],
        sum_abs_dyx: vec![0.0; c],
    };
    for i in 0..x.len() {
        let ch = channel_of(shape, i);
        let d = (dy[i] as f64).abs();
        let xhat = (x[i] as f64 - stats.mean[ch]).abs() * stats.invstd[ch];
        s.max_dy[ch] = s.max_dy[ch].max(d);
        s.max_xhat[ch] = s.max_xhat[ch].max(xhat);
        s.sum_abs_dy[ch] += d;
        s.sum_abs_dyx[ch] += d * (x[i] as f64 - stats.mean[ch]).abs() * stats.invstd[ch];
    }
    s
}

/// The statistics a backend saved, as the oracle's backward takes them.
fn as_ref_forward(saved: &SavedStats) -> RefForward {
    RefForward {
        y: Vec::new(),
        mean: widen(&saved.mean().unwrap()),
        invstd: widen(&saved.invstd().unwrap()),
        batch_stats: saved.is_batch_stats(),
    }
}

/// What a backward differentiates at: x, dy and their shape.
struct Inputs<'a> {
    x: &'a [f32],
    dy: &'a [f32],
    shape: &'a Shape,
}

/// Checks a backend's gradients against the oracle's `want`, computed with statistics
/// `stats`; tolerances as in the module docs. `mean_ulps`: how far (in ulps of μ) the
/// backend's mean may be from `stats.mean` — 0 when `stats` are the backend's own saved
/// statistics; 1 against the oracle's f64 mean, which the backend holds rounded to f32
/// (as PyTorch's save_mean). A shift δ of μ moves dx_i by up to
/// δ·|γ|·invstd²·max|dy|·(max|x̂| + |x̂_i|) and dγ by δ·invstd·Σ|dy|: negligible for
/// O(1) data, large when invstd is (n = 2 with close values: invstd up to 1/sqrt(eps)).
#[track_caller]
fn check_grads(
    what: &str,
    got: &Gradients,
    want: &RefGrads,
    inputs: &Inputs<'_>,
    stats: &RefForward,
    reference: &ReferenceBatchNorm,
    mean_ulps: f64,
) {
    let Inputs { x, dy, shape } = *inputs;
    let sc = scales(x, dy, shape, stats);
    let shift: Vec<f64> = stats.mean.iter().map(|&m| mean_ulps * ulp(m)).collect();
    if let Some(dx) = &got.dx {
        let dx = dx.to_vec().unwrap();
        assert_eq!(dx.len(), want.dx.len(), "{what}: dx length");
        for (i, (&g, &w)) in dx.iter().zip(&want.dx).enumerate() {
            let c = channel_of(shape, i);
            let (is, g_abs) = (stats.invstd[c], reference.weight[c].abs());
            let xhat = (x[i] as f64 - stats.mean[c]).abs() * is;
            let tol = DX_TOL * g_abs * is * sc.max_dy[c]
                + shift[c] * g_abs * is * is * sc.max_dy[c] * (sc.max_xhat[c] + xhat);
            assert!(
                (g as f64 - w).abs() <= tol,
                "{what}: dx[{i}] (channel {c}): got {g} want {w} (tol {tol:e})"
            );
        }
    }
    if reference.config.affine {
        let dw_shift: Vec<f64> = (0..shape.channels())
            .map(|c| shift[c] * stats.invstd[c] * sc.sum_abs_dy[c])
            .collect();
        let no_shift = vec![0.0; shape.channels()];
        for (name, grad, want, sums, extra) in [
            (
                "dweight",
                &got.dweight,
                &want.dweight,
                &sc.sum_abs_dyx,
                &dw_shift,
            ),
            ("dbias", &got.dbias, &want.dbias, &sc.sum_abs_dy, &no_shift),
        ] {
            let Some(grad) = grad else { continue };
            let grad = grad.to_vec().unwrap();
            assert_eq!(grad.len(), want.len(), "{what}: {name} length");
            for (c, (&g, &w)) in grad.iter().zip(want).enumerate() {
                let tol = PARAM_TOL * sums[c] + extra[c] + 1e-7;
                assert!(
                    (g as f64 - w).abs() <= tol,
                    "{what}: {name}[{c}]: got {g} want {w} (tol {tol:e})"
                );
            }
        }
    } else {
        assert!(got.dweight.is_none(), "{what}: dweight without affine");
        assert!(got.dbias.is_none(), "{what}: dbias without affine");
    }
}

/// A layer and its oracle with the same γ, β (when affine) and running statistics (when
/// tracked), in the given mode.
fn layer_pair(
    ctx: &Context,
    config: BatchNormConfig,
    seed: u64,
) -> (BatchNorm, ReferenceBatchNorm) {
    let c = config.num_features;
    let mut bn = BatchNorm::new(ctx, config).unwrap();
    let mut reference = ReferenceBatchNorm::new(config);
    if config.affine {
        let w = normal(c, seed ^ 0xA11CE, 1.0, 0.25);
        let b = normal(c, seed ^ 0xB0B, 0.0, 0.5);
        bn.set_weight(&w).unwrap();
        bn.set_bias(&b).unwrap();
        reference.weight = widen(&w);
        reference.bias = widen(&b);
    }
    if config.track_running_stats {
        let rm = normal(c, seed ^ 0x3EA4, 0.3, 0.5);
        let rv: Vec<f32> = normal(c, seed ^ 0x7A4, 0.0, 1.0)
            .iter()
            .map(|v| 0.5 + v * v)
            .collect();
        bn.set_running_mean(&rm).unwrap();
        bn.set_running_var(&rv).unwrap();
        reference.running_mean = widen(&rm);
        reference.running_var = widen(&rv);
    }
    (bn, reference)
}

/// Forward in `mode`, backward with all gradients; checks against the oracle given the
/// backend's saved statistics and, when `end_to_end`, given the oracle's own.
fn check_backward(
    ctx: &Context,
    shape: &Shape,
    config: BatchNormConfig,
    mode: Mode,
    x: &[f32],
    end_to_end: bool,
    seed: u64,
) {
    let (dims, layout) = (shape.dims(), shape.layout());
    let (mut bn, mut reference) = layer_pair(ctx, config, seed);
    let dy = normal(x.len(), seed + 1, 0.0, 1.0);
    let xt = ctx.tensor_with_layout(x, dims, layout).unwrap();
    let dyt = ctx.tensor_with_layout(&dy, dims, layout).unwrap();
    let (grads, saved, want_fwd) = match mode {
        Mode::Train => {
            let out = bn.forward_train(&xt).unwrap();
            let grads = bn.backward(&dyt, &xt, &out.saved).unwrap();
            (grads, out.saved, reference.forward_train(x, shape).unwrap())
        }
        Mode::Eval => {
            bn.eval();
            let grads = bn.backward_eval(&dyt, &xt).unwrap();
            let saved = bn.forward(&xt).unwrap().saved;
            (grads, saved, reference.forward_eval(x, shape).unwrap())
        }
        Mode::EvalUntracked => {
            bn.eval();
            let out = bn.forward(&xt).unwrap();
            let grads = bn.backward(&dyt, &xt, &out.saved).unwrap();
            (grads, out.saved, reference.forward_eval(x, shape).unwrap())
        }
    };
    assert_eq!(
        saved.is_batch_stats(),
        mode != Mode::Eval,
        "{dims:?} {mode:?}: which formula"
    );
    let what = format!("{dims:?} {layout:?} {mode:?} affine={}", config.affine);
    let stats = as_ref_forward(&saved);
    let want = reference.backward(&dy, x, shape, &stats);
    check_grads(
        &format!("{what} (saved stats)"),
        &grads,
        &want,
        &Inputs { x, dy: &dy, shape },
        &stats,
        &reference,
        0.0,
    );
    if end_to_end {
        let want = reference.backward(&dy, x, shape, &want_fwd);
        check_grads(
            &format!("{what} (oracle stats)"),
            &grads,
            &want,
            &Inputs { x, dy: &dy, shape },
            &want_fwd,
            &reference,
            1.0,
        );
    }
}

/// Training and inference backward, with and without affine, on one shape.
fn check_shape(ctx: &Context, dims: &[usize], seed: u64) {
    let x = normal(dims.iter().product(), seed, 0.3, 1.5);
    for affine in [true, false] {
        let config = BatchNormConfig::new(dims[1]).affine(affine);
        for mode in [Mode::Train, Mode::Eval] {
            check_backward(
                ctx,
                &Shape::new(dims).unwrap(),
                config,
                mode,
                &x,
                true,
                seed,
            );
        }
    }
}

#[test]
fn primes_7x13x11x3() {
    on_every_backend("primes_7x13x11x3", |ctx| {
        check_shape(ctx, &[7, 13, 11, 3], 1)
    });
}

#[test]
fn batch_one_with_spatial_1x5x9x7() {
    on_every_backend("batch_one_with_spatial_1x5x9x7", |ctx| {
        check_shape(ctx, &[1, 5, 9, 7], 2)
    });
}

#[test]
fn single_channel_6x1x10x10() {
    on_every_backend("single_channel_6x1x10x10", |ctx| {
        check_shape(ctx, &[6, 1, 10, 10], 3)
    });
}

#[test]
fn spatial_one_rank2_4096x3() {
    on_every_backend("spatial_one_rank2_4096x3", |ctx| {
        check_shape(ctx, &[4096, 3], 4)
    });
}

#[test]
fn spatial_one_rank4_8x300x1x1() {
    on_every_backend("spatial_one_rank4_8x300x1x1", |ctx| {
        check_shape(ctx, &[8, 300, 1, 1], 5)
    });
}

#[test]
fn unit_height_2x300x1x3() {
    on_every_backend("unit_height_2x300x1x3", |ctx| {
        check_shape(ctx, &[2, 300, 1, 3], 6)
    });
}

#[test]
fn ranks_2_3_4_5() {
    on_every_backend("ranks_2_3_4_5", |ctx| {
        check_shape(ctx, &[16, 8], 7);
        check_shape(ctx, &[4, 6, 33], 8);
        check_shape(ctx, &[3, 5, 7, 9], 9);
        check_shape(ctx, &[2, 3, 4, 5, 6], 10);
    });
}

/// Spatial sizes that are and are not multiples of 4, each side of the lines between the
/// kernel variants (vec4 or scalar; along runs or along columns): see forward.rs.
#[test]
fn spatial_multiples_of_4_or_not_4_6_7_63_64_65_1020_1024_1030() {
    on_every_backend(
        "spatial_multiples_of_4_or_not_4_6_7_63_64_65_1020_1024_1030",
        |ctx| {
            for (i, dims) in [
                [5, 3, 4],
                [5, 3, 6],
                [3, 4, 7],
                [3, 5, 63],
                [3, 5, 64],
                [3, 5, 65],
                [2, 3, 1020],
                [2, 3, 1024],
                [2, 3, 1030],
            ]
            .iter()
            .enumerate()
            {
                check_shape(ctx, dims, 20 + i as u64);
            }
        },
    );
}

/// 70000 channels of two values (rank 2): the widest-C case (see forward.rs for why the
/// next test, not this one, is the one past 65535 workgroups under the current plan).
#[test]
fn huge_channels_rank2_2x70000() {
    on_every_backend("huge_channels_rank2_2x70000", |ctx| {
        let shape = Shape::new(&[2, 70000]).unwrap();
        let x = normal(shape.numel(), 30, 0.3, 1.5);
        let config = BatchNormConfig::new(70000);
        check_backward(ctx, &shape, config, Mode::Train, &x, true, 30);
    });
}

/// 70000 channels of 65 values: the backward's finalize runs one workgroup per channel,
/// 70000 > 65535 in one dimension, so its grid must go 2-D. Training only (the costly one).
#[test]
fn workgroups_past_65535_1x70000x65() {
    on_every_backend("workgroups_past_65535_1x70000x65", |ctx| {
        let shape = Shape::new(&[1, 70000, 65]).unwrap();
        let x = normal(shape.numel(), 32, 0.3, 1.5);
        let config = BatchNormConfig::new(70000);
        check_backward(ctx, &shape, config, Mode::Train, &x, true, 32);
    });
}

/// Every backward pass on a device limited to 7 workgroups per dimension (prime: the last
/// row of each 2-D grid is part-filled), training and inference.
#[test]
fn two_d_grids_on_a_device_limited_to_7_workgroups_per_dimension() {
    let _gl = common::gl_lock();
    let gpus = common::gpus_with_grid_limit(7);
    if gpus.is_empty() {
        eprintln!("SKIPPED two_d_grids_on_a_device_limited_to_7_workgroups_per_dimension: no GPU");
    }
    for ctx in &gpus {
        for (i, (dims, layout)) in [
            (vec![2, 300], Layout::ChannelsFirst),
            (vec![3, 5, 7, 9], Layout::ChannelsFirst),
            (vec![2, 3, 32, 40], Layout::ChannelsFirst),
            (vec![4, 9, 3, 3], Layout::ChannelsLast),
        ]
        .into_iter()
        .enumerate()
        {
            let shape = Shape::with_layout(&dims, layout).unwrap();
            let x = normal(shape.numel(), 33 + i as u64, 0.3, 1.5);
            for mode in [Mode::Train, Mode::Eval] {
                let config = BatchNormConfig::new(dims[1]);
                check_backward(ctx, &shape, config, mode, &x, true, 33 + i as u64);
            }
        }
    }
}

/// ResNet-sized activations, training backward, once.
#[test]
fn large_32x64x56x56() {
    on_every_backend("large_32x64x56x56", |ctx| {
        let dims = [32, 64, 56, 56];
        let x = normal(dims.iter().product(), 31, 0.3, 1.5);
        let config = BatchNormConfig::new(64);
        check_backward(
            ctx,
            &Shape::new(&dims).unwrap(),
            config,
            Mode::Train,
            &x,
            true,
            31,
        );
    });
}

/// track_running_stats = false in inference: the forward used batch statistics, so the
/// backward must use the training formula (statistics depend on x).
#[test]
fn no_running_stats_eval_uses_training_formula() {
    on_every_backend("no_running_stats_eval_uses_training_formula", |ctx| {
        for affine in [true, false] {
            let dims = [4, 3, 5, 6];
            let x = normal(360, 40, 0.3, 1.5);
            let config = BatchNormConfig::new(3)
                .track_running_stats(false)
                .affine(affine);
            check_backward(
                ctx,
                &Shape::new(&dims).unwrap(),
                config,
                Mode::EvalUntracked,
                &x,
                true,
                40,
            );
        }
    });
}

/// x = 1e4 + N(0, 1) and 1e5 + 0.5·N(0, 1). The backward centres x with the saved f32
/// mean; x − μ is exact there (Sterbenz), so the backward itself loses nothing. Compared
/// given the saved statistics: the forward's accuracy on these data is forward.rs's test.
#[test]
fn large_offset_1e4_and_1e5() {
    on_every_backend("large_offset_1e4_and_1e5", |ctx| {
        for (dims, offset, std, seed) in [
            ([8usize, 3, 32, 32], 1e4, 1.0, 50u64),
            ([64, 4, 16, 16], 1e5, 0.5, 51),
        ] {
            let x = normal(dims.iter().product(), seed, offset, std);
            let config = BatchNormConfig::new(dims[1]);
            for mode in [Mode::Train, Mode::Eval] {
                check_backward(
                    ctx,
                    &Shape::new(&dims).unwrap(),
                    config,
                    mode,
                    &x,
                    false,
                    seed,
                );
            }
        }
    });
}

// ---- gradient masks ----

fn values(t: &Option<wgpu_batchnorm::Tensor>) -> Option<Vec<f32>> {
    t.as_ref().map(|t| t.to_vec().unwrap())
}

/// Each mask returns exactly what it asks for, and what it returns equals the ALL result.
#[test]
fn grad_mask_variants_match_all() {
    on_every_backend("grad_mask_variants_match_all", |ctx| {
        let dims = [4, 3, 5, 4];
        let x = normal(240, 60, 0.3, 1.5);
        let dy = normal(240, 61, 0.0, 1.0);
        for training in [true, false] {
            let (mut bn, _) = layer_pair(ctx, BatchNormConfig::new(3), 60);
            if !training {
                bn.eval();
            }
            let xt = ctx.tensor_from_slice(&x, &dims).unwrap();
            let dyt = ctx.tensor_from_slice(&dy, &dims).unwrap();
            let saved = bn.forward(&xt).unwrap().saved;
            let all = bn
                .backward_with_mask(&dyt, &xt, &saved, GradMask::ALL)
                .unwrap();
            let (dx, dw, db) = (values(&all.dx), values(&all.dweight), values(&all.dbias));
            assert!(dx.is_some() && dw.is_some() && db.is_some());
            for mask in [
                GradMask::INPUT,
                GradMask::PARAMS,
                GradMask {
                    input: false,
                    weight: true,
                    bias: false,
                },
                GradMask {
                    input: true,
                    weight: false,
                    bias: true,
                },
            ] {
                let g = bn.backward_with_mask(&dyt, &xt, &saved, mask).unwrap();
                let what = format!("training={training} {mask:?}");
                // Same kernels, same order: the same bits.
                assert_eq!(
                    values(&g.dx),
                    dx.clone().filter(|_| mask.input),
                    "{what}: dx"
                );
                assert_eq!(
                    values(&g.dweight),
                    dw.clone().filter(|_| mask.weight),
                    "{what}: dweight"
                );
                assert_eq!(
                    values(&g.dbias),
                    db.clone().filter(|_| mask.bias),
                    "{what}: dbias"
                );
            }
        }
    });
}

/// Without affine there is no dγ/dβ whatever the mask; dx is unaffected.
#[test]
fn grad_mask_without_affine() {
    on_every_backend("grad_mask_without_affine", |ctx| {
        let dims = [4, 3, 7];
        let x = normal(84, 62, 0.3, 1.5);
        let dy = normal(84, 63, 0.0, 1.0);
        let (mut bn, _) = layer_pair(ctx, BatchNormConfig::new(3).affine(false), 62);
        let xt = ctx.tensor_from_slice(&x, &dims).unwrap();
        let dyt = ctx.tensor_from_slice(&dy, &dims).unwrap();
        let saved = bn.forward_train(&xt).unwrap().saved;
        let all = bn.backward(&dyt, &xt, &saved).unwrap();
        let params = bn
            .backward_with_mask(&dyt, &xt, &saved, GradMask::PARAMS)
            .unwrap();
        assert!(params.dx.is_none() && params.dweight.is_none() && params.dbias.is_none());
        let input = bn
            .backward_with_mask(&dyt, &xt, &saved, GradMask::INPUT)
            .unwrap();
        assert_eq!(values(&input.dx), values(&all.dx));
    });
}

// ---- layout ----

/// Channels-last gradients equal channels-first gradients on the same logical data (and
/// match the oracle).
#[test]
fn channels_last_equals_channels_first() {
    on_every_backend("channels_last_equals_channels_first", |ctx| {
        for (i, dims) in [
            vec![2, 1, 3, 5],
            vec![4, 3, 5, 5],
            vec![2, 4096, 1, 1],
            vec![2, 4096, 2, 3],
            vec![3, 4, 2, 3, 2],
        ]
        .into_iter()
        .enumerate()
        {
            let seed = 70 + i as u64;
            let x = normal(dims.iter().product(), seed, 0.3, 1.5);
            let dy = normal(x.len(), seed + 1, 0.0, 1.0);
            let (xl, dyl) = (
                common::to_channels_last(&x, &dims),
                common::to_channels_last(&dy, &dims),
            );
            for mode in [Mode::Train, Mode::Eval] {
                check_backward(
                    ctx,
                    &Shape::with_layout(&dims, Layout::ChannelsLast).unwrap(),
                    BatchNormConfig::new(dims[1]),
                    mode,
                    &xl,
                    true,
                    seed,
                );
                let config = BatchNormConfig::new(dims[1]);
                let (mut first, _) = layer_pair(ctx, config, seed);
                let (mut last, _) = layer_pair(ctx, config, seed);
                if mode == Mode::Eval {
                    first.eval();
                    last.eval();
                }
                let grads = |bn: &mut BatchNorm, x: &[f32], dy: &[f32], layout| {
                    let xt = ctx.tensor_with_layout(x, &dims, layout).unwrap();
                    let dyt = ctx.tensor_with_layout(dy, &dims, layout).unwrap();
                    let saved = bn.forward(&xt).unwrap().saved;
                    bn.backward(&dyt, &xt, &saved).unwrap()
                };
                let gf = grads(&mut first, &x, &dy, Layout::ChannelsFirst);
                let gl = grads(&mut last, &xl, &dyl, Layout::ChannelsLast);
                let what = format!("{dims:?} {mode:?}");
                // Different reduction orders: equal to f32 rounding, not bits. dx is O(1)
                // here (γ·invstd ≈ 0.7, |dy| ≲ 4); the parameter gradients are sums of
                // ≲ 100 O(1) terms.
                assert_close(
                    &format!("{what}: dx channels-last vs channels-first"),
                    &common::to_channels_first(&values(&gl.dx).unwrap(), &dims),
                    &widen(&values(&gf.dx).unwrap()),
                    1e-5,
                    1e-5,
                );
                for (name, l, f) in [
                    ("dweight", &gl.dweight, &gf.dweight),
                    ("dbias", &gl.dbias, &gf.dbias),
                ] {
                    assert_close(
                        &format!("{what}: {name} channels-last vs channels-first"),
                        &values(l).unwrap(),
                        &widen(&values(f).unwrap()),
                        1e-4,
                        1e-5,
                    );
                }
            }
        }
    });
}
