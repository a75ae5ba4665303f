//! Forward pass (training and inference) against the f64 oracle, on the CPU path and every
//! wgpu adapter found: named awkward shapes, running statistics over several steps,
//! large-offset data, the module flags, channels-last layout, NaN propagation.
//!
//! Tolerances, unless a test says otherwise (data are O(1): |x − μ|·invstd ≲ 6, γ ≲ 1.5):
//! - y: atol 2e-5 + rtol 2e-5 + ulp(μ)·|γ|·invstd. y = (x − μ)·(γ·invstd) + β is a handful
//!   of f32 roundings (≈ 6e-8 each) on values ≲ 10, plus the f32 statistics' own errors
//!   (invstd to ~1e-6 relative after a 1e5-value reduction) times |x̂| ≲ 6; the last term is
//!   μ held as an f32 (see `assert_y_close`).
//! - saved mean and running mean: atol 1e-6 + rtol 1e-5: an f32 mean of O(1) values is good
//!   to a few ulps of the largest partial, ~1e-7 here.
//! - saved invstd and running var: rtol 1e-5: the f32 variance is a Chan merge of shifted
//!   sums, good to ~1e-6 relative; the running update adds two f32 roundings.

mod common;

use common::{assert_close, channel_of, normal, on_every_backend, ulp, widen};
use wgpu_batchnorm::cpu::reference::{batch_stats, RefForward, ReferenceBatchNorm};
use wgpu_batchnorm::{BatchNorm, BatchNormConfig, Context, Layout, Shape};

const Y_ATOL: f64 = 2e-5;
const Y_RTOL: f64 = 2e-5;
const MEAN_ATOL: f64 = 1e-6;
const MEAN_RTOL: f64 = 1e-5;
const VAR_RTOL: f64 = 1e-5;

/// Test data: a modest offset and a non-unit spread, so that a kernel forgetting to centre
/// or to scale shows up.
fn data(len: usize, seed: u64) -> Vec<f32> {
    normal(len, seed, 0.3, 1.5)
}

/// A layer and its oracle with the same non-trivial γ and β (when affine).
fn layer_pair(
    ctx: &Context,
    config: BatchNormConfig,
    seed: u64,
) -> (BatchNorm, ReferenceBatchNorm) {
    let mut bn = BatchNorm::new(ctx, config).unwrap();
    let mut reference = ReferenceBatchNorm::new(config);
    if config.affine {
        let c = config.num_features;
        let w = normal(c, seed ^ 0xA11CE, 1.0, 0.25);
        let b = normal(c, seed ^ 0xB0B, 0.0, 0.5);
        bn.set_weight(&w).unwrap();
        bn.set_bias(&b).unwrap();
        reference.weight = widen(&w);
        reference.bias = widen(&b);
    }
    (bn, reference)
}

/// y against the oracle's, within Y_ATOL + Y_RTOL·|y| plus one ulp of the channel's mean
/// times |γ|·invstd: the mean every f32 implementation normalizes with (PyTorch's save_mean
/// included) is μ rounded to f32, which moves each y of the channel by up to that much. It
/// matters when the variance is tiny next to |μ| (n = 2 with close values: invstd reaches
/// 1/sqrt(eps) ≈ 316) or when |μ| is large.
#[track_caller]
fn assert_y_close(what: &str, got: &[f32], want: &RefForward, weight: &[f64], shape: &Shape) {
    assert_eq!(got.len(), want.y.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(&want.y).enumerate() {
        let c = channel_of(shape, i);
        let tol = Y_ATOL + Y_RTOL * w.abs() + ulp(want.mean[c]) * weight[c].abs() * want.invstd[c];
        let ok = if w.is_nan() {
            g.is_nan()
        } else {
            (g as f64 - w).abs() <= tol
        };
        assert!(
            ok,
            "{what}: index {i} (channel {c}): got {g} want {w} (tol {tol:e}; mean {}, invstd {})",
            want.mean[c], want.invstd[c]
        );
    }
}

/// Checks a forward's y and saved statistics against the oracle's.
#[track_caller]
fn check_output(
    what: &str,
    out: &wgpu_batchnorm::ForwardOutput,
    want: &RefForward,
    reference: &ReferenceBatchNorm,
) {
    assert_y_close(
        &format!("{what}: y"),
        &out.y.to_vec().unwrap(),
        want,
        &reference.weight,
        out.y.shape(),
    );
    assert_close(
        &format!("{what}: saved mean"),
        &out.saved.mean().unwrap(),
        &want.mean,
        MEAN_ATOL,
        MEAN_RTOL,
    );
    assert_close(
        &format!("{what}: saved invstd"),
        &out.saved.invstd().unwrap(),
        &want.invstd,
        0.0,
        VAR_RTOL,
    );
    assert_eq!(
        out.saved.is_batch_stats(),
        want.batch_stats,
        "{what}: saved kind"
    );
}

/// Checks the layer's running statistics and counter against the oracle's.
#[track_caller]
fn check_running(what: &str, bn: &BatchNorm, reference: &ReferenceBatchNorm) {
    if !reference.config.track_running_stats {
        assert_eq!(bn.running_mean().unwrap(), None, "{what}: running_mean");
        assert_eq!(bn.running_var().unwrap(), None, "{what}: running_var");
        assert_eq!(
            bn.num_batches_tracked(),
            None,
            "{what}: num_batches_tracked"
        );
        return;
    }
    assert_close(
        &format!("{what}: running_mean"),
        &bn.running_mean().unwrap().unwrap(),
        &reference.running_mean,
        MEAN_ATOL,
        MEAN_RTOL,
    );
    assert_close(
        &format!("{what}: running_var"),
        &bn.running_var().unwrap().unwrap(),
        &reference.running_var,
        0.0,
        VAR_RTOL,
    );
    assert_eq!(
        bn.num_batches_tracked(),
        Some(reference.num_batches_tracked),
        "{what}: num_batches_tracked"
    );
}

/// Two training steps (different data), then one inference forward, each checked against
/// the oracle: y, saved statistics, running statistics, counter.
fn check_shape(ctx: &Context, dims: &[usize], layout: Layout, seed: u64) {
    let shape = Shape::with_layout(dims, layout).unwrap();
    let config = BatchNormConfig::new(dims[1]);
    let (mut bn, mut reference) = layer_pair(ctx, config, seed);
    for step in 0..2u64 {
        let x = data(shape.numel(), seed + step);
        let xt = ctx.tensor_with_layout(&x, dims, layout).unwrap();
        let out = bn.forward_train(&xt).unwrap();
        let want = reference.forward_train(&x, &shape).unwrap();
        check_output(
            &format!("{dims:?} train step {step}"),
            &out,
            &want,
            &reference,
        );
        check_running(&format!("{dims:?} train step {step}"), &bn, &reference);
    }
    bn.eval();
    let x = data(shape.numel(), seed + 100);
    let xt = ctx.tensor_with_layout(&x, dims, layout).unwrap();
    let out = bn.forward(&xt).unwrap();
    let want = reference.forward_eval(&x, &shape).unwrap();
    check_output(&format!("{dims:?} eval"), &out, &want, &reference);
    // Inference changes no state.
    check_running(&format!("{dims:?} after eval"), &bn, &reference);
}

// ---- named awkward shapes ----

#[test]
fn primes_7x13x11x3() {
    on_every_backend("primes_7x13x11x3", |ctx| {
        check_shape(ctx, &[7, 13, 11, 3], Layout::ChannelsFirst, 1)
    });
}

#[test]
fn batch_one_with_spatial_1x5x9x7() {
    on_every_backend("batch_one_with_spatial_1x5x9x7", |ctx| {
        check_shape(ctx, &[1, 5, 9, 7], Layout::ChannelsFirst, 2)
    });
}

#[test]
fn single_channel_6x1x10x10() {
    on_every_backend("single_channel_6x1x10x10", |ctx| {
        check_shape(ctx, &[6, 1, 10, 10], Layout::ChannelsFirst, 3)
    });
}

#[test]
fn spatial_one_rank2_4096x3() {
    on_every_backend("spatial_one_rank2_4096x3", |ctx| {
        check_shape(ctx, &[4096, 3], Layout::ChannelsFirst, 4)
    });
}

#[test]
fn spatial_one_rank4_8x300x1x1() {
    on_every_backend("spatial_one_rank4_8x300x1x1", |ctx| {
        check_shape(ctx, &[8, 300, 1, 1], Layout::ChannelsFirst, 5)
    });
}

#[test]
fn unit_height_2x300x1x3() {
    on_every_backend("unit_height_2x300x1x3", |ctx| {
        check_shape(ctx, &[2, 300, 1, 3], Layout::ChannelsFirst, 6)
    });
}

#[test]
fn rank2_16x8() {
    on_every_backend("rank2_16x8", |ctx| {
        check_shape(ctx, &[16, 8], Layout::ChannelsFirst, 7)
    });
}

#[test]
fn rank3_4x6x33() {
    on_every_backend("rank3_4x6x33", |ctx| {
        check_shape(ctx, &[4, 6, 33], Layout::ChannelsFirst, 8)
    });
}

#[test]
fn rank4_3x5x7x9() {
    on_every_backend("rank4_3x5x7x9", |ctx| {
        check_shape(ctx, &[3, 5, 7, 9], Layout::ChannelsFirst, 9)
    });
}

#[test]
fn rank5_2x3x4x5x6() {
    on_every_backend("rank5_2x3x4x5x6", |ctx| {
        check_shape(ctx, &[2, 3, 4, 5, 6], Layout::ChannelsFirst, 10)
    });
}

/// Spatial sizes that are and are not multiples of 4, each side of the lines between the
/// kernel variants: vec4 or scalar loads, and mapping along each channel's runs (long
/// spatial sizes) or along columns of C·spatial rows (short ones). With C odd, vec4 goes
/// with a multiple-of-4 spatial size under either criterion (S % 4, or C·S % 4); the C = 4
/// case has vec4 units that straddle channel boundaries.
#[test]
fn spatial_multiples_of_4_or_not_4_6_7_63_64_65_1020_1024_1030() {
    on_every_backend(
        "spatial_multiples_of_4_or_not_4_6_7_63_64_65_1020_1024_1030",
        |ctx| {
            for (i, dims) in [
                [5, 3, 4],    // multiple of 4: one vec4 per run
                [5, 3, 6],    // even, not a multiple of 4
                [3, 4, 7],    // odd spatial, C·S = 28: vec4 units across channels
                [3, 5, 63],   // not a multiple of 4
                [3, 5, 64],   // multiple of 4
                [3, 5, 65],   // not a multiple of 4
                [2, 3, 1020], // multiple of 4, just short of 256 vec4 per run
                [2, 3, 1024], // multiple of 4, 256 vec4 per run: long-run mapping
                [2, 3, 1030], // long runs, not a multiple of 4
            ]
            .iter()
            .enumerate()
            {
                check_shape(ctx, dims, Layout::ChannelsFirst, 20 + i as u64);
            }
        },
    );
}

/// ResNet-sized activations: 100352 values per channel, many reduction tiles per channel.
/// Training forward only, once.
#[test]
fn large_32x64x56x56() {
    on_every_backend("large_32x64x56x56", |ctx| {
        let dims = [32, 64, 56, 56];
        let shape = Shape::new(&dims).unwrap();
        let x = data(shape.numel(), 30);
        let (mut bn, mut reference) = layer_pair(ctx, BatchNormConfig::new(64), 30);
        let out = bn
            .forward_train(&ctx.tensor_from_slice(&x, &dims).unwrap())
            .unwrap();
        let want = reference.forward_train(&x, &shape).unwrap();
        check_output("large", &out, &want, &reference);
        check_running("large", &bn, &reference);
    });
}

/// One training forward and one inference forward of `dims`, checked as `check_output`
/// does; the last channel is the one a truncated 1-D grid would leave unwritten.
fn check_wide(ctx: &Context, dims: &[usize], seed: u64) {
    let shape = Shape::new(dims).unwrap();
    let x = data(shape.numel(), seed);
    let (mut bn, mut reference) = layer_pair(ctx, BatchNormConfig::new(dims[1]), seed);
    let xt = ctx.tensor_from_slice(&x, dims).unwrap();
    let out = bn.forward_train(&xt).unwrap();
    let want = reference.forward_train(&x, &shape).unwrap();
    check_output(&format!("{dims:?} train"), &out, &want, &reference);
    check_running(&format!("{dims:?} train"), &bn, &reference);
    let y = out.y.to_vec().unwrap();
    assert!(y.iter().all(|v| v.is_finite()), "{dims:?}: non-finite y");
    bn.eval();
    let out = bn.forward(&xt).unwrap();
    let want = reference.forward_eval(&x, &shape).unwrap();
    check_output(&format!("{dims:?} eval"), &out, &want, &reference);
}

/// 70000 channels of two values (rank 2). A plan with a workgroup per channel launches
/// 70000 > 65535 of them in one dimension; the current plan reduces (N, C) input along
/// columns of C instead, so this is the widest-C case, and the next test is the one past
/// 65535.
#[test]
fn huge_channels_rank2_2x70000() {
    on_every_backend("huge_channels_rank2_2x70000", |ctx| {
        check_wide(ctx, &[2, 70000], 31)
    });
}

/// 70000 channels of 65 values: each channel's statistics merge 65 column partials (> 64),
/// so the finalize passes run one workgroup per channel: 70000 > 65535 (the most a dispatch
/// dimension may hold on these adapters), so the grid must go 2-D.
#[test]
fn workgroups_past_65535_1x70000x65() {
    on_every_backend("workgroups_past_65535_1x70000x65", |ctx| {
        if let Some((device, _)) = ctx.wgpu() {
            let max = device.limits().max_compute_workgroups_per_dimension;
            if max >= 70000 {
                eprintln!(
                    "note: {} allows {max} workgroups per dimension; 70000 do not exceed it",
                    ctx.name()
                );
            }
        }
        check_wide(ctx, &[1, 70000, 65], 32)
    });
}

/// Every pass on a device limited to 7 workgroups per dimension (7 is prime, so rows of the
/// 2-D grid end part-filled): channels-first runs and columns, vec4 and scalar, rank 2,
/// channels-last.
#[test]
fn two_d_grids_on_a_device_limited_to_7_workgroups_per_dimension() {
    let _gl = common::gl_lock();
    let gpus = common::gpus_with_grid_limit(7);
    if gpus.is_empty() {
        eprintln!("SKIPPED two_d_grids_on_a_device_limited_to_7_workgroups_per_dimension: no GPU");
    }
    for ctx in &gpus {
        eprintln!("two_d_grids: {}", ctx.name());
        for (i, (dims, layout)) in [
            (vec![2, 300], Layout::ChannelsFirst),
            (vec![3, 5, 7, 9], Layout::ChannelsFirst),
            (vec![2, 3, 32, 40], Layout::ChannelsFirst), // runs of 1280: one run per row
            (vec![4, 9, 3, 3], Layout::ChannelsLast),
        ]
        .into_iter()
        .enumerate()
        {
            check_shape(ctx, &dims, layout, 33 + i as u64);
        }
    }
}

// ---- training forward and running statistics ----

/// Three training steps with different data, for a momentum mode; then inference.
fn running_stats_over_three_steps(ctx: &Context, config: BatchNormConfig, seed: u64) {
    let dims = [6, 4, 5, 7];
    let shape = Shape::new(&dims).unwrap();
    let (mut bn, mut reference) = layer_pair(ctx, config, seed);
    for step in 0..3u64 {
        // Each step its own mean and spread, so that the running averages move visibly.
        let x = normal(
            shape.numel(),
            seed + step,
            step as f64 - 1.0,
            0.5 + step as f64,
        );
        let out = bn
            .forward_train(&ctx.tensor_from_slice(&x, &dims).unwrap())
            .unwrap();
        let want = reference.forward_train(&x, &shape).unwrap();
        check_output(&format!("step {step}"), &out, &want, &reference);
        check_running(&format!("step {step}"), &bn, &reference);
    }
    assert_eq!(bn.num_batches_tracked(), Some(3));
    bn.eval();
    let x = data(shape.numel(), seed + 10);
    let out = bn
        .forward(&ctx.tensor_from_slice(&x, &dims).unwrap())
        .unwrap();
    let want = reference.forward_eval(&x, &shape).unwrap();
    assert!(!want.batch_stats);
    check_output("eval after three steps", &out, &want, &reference);
    check_running("after eval", &bn, &reference);
}

#[test]
fn running_stats_three_steps_default_momentum() {
    on_every_backend("running_stats_three_steps_default_momentum", |ctx| {
        running_stats_over_three_steps(ctx, BatchNormConfig::new(4), 40)
    });
}

#[test]
fn running_stats_three_steps_custom_momentum() {
    on_every_backend("running_stats_three_steps_custom_momentum", |ctx| {
        running_stats_over_three_steps(ctx, BatchNormConfig::new(4).momentum(0.37).eps(1e-3), 41)
    });
}

#[test]
fn running_stats_three_steps_cumulative_average() {
    on_every_backend("running_stats_three_steps_cumulative_average", |ctx| {
        running_stats_over_three_steps(ctx, BatchNormConfig::new(4).cumulative_average(), 42)
    });
}

/// The saved invstd is 1/sqrt(biased var + eps) of the batch; the running variance takes
/// the unbiased one. With momentum 1 the running statistics are exactly the batch's, and
/// eps large enough to matter.
#[test]
fn saved_invstd_biased_running_var_unbiased() {
    on_every_backend("saved_invstd_biased_running_var_unbiased", |ctx| {
        let dims = [3, 2, 5];
        let shape = Shape::new(&dims).unwrap();
        let x = data(shape.numel(), 43);
        let config = BatchNormConfig::new(2).momentum(1.0).eps(0.1);
        let mut bn = BatchNorm::new(ctx, config).unwrap();
        let out = bn
            .forward_train(&ctx.tensor_from_slice(&x, &dims).unwrap())
            .unwrap();
        let (mean, var) = batch_stats(&x, &shape);
        let n = 15.0;
        let invstd: Vec<f64> = var
            .iter()
            .map(|v| 1.0 / (v + 0.1f32 as f64).sqrt())
            .collect();
        let unbiased: Vec<f64> = var.iter().map(|v| v * n / (n - 1.0)).collect();
        assert_close(
            "saved mean",
            &out.saved.mean().unwrap(),
            &mean,
            MEAN_ATOL,
            MEAN_RTOL,
        );
        assert_close(
            "saved invstd",
            &out.saved.invstd().unwrap(),
            &invstd,
            0.0,
            VAR_RTOL,
        );
        assert_close(
            "running mean",
            &bn.running_mean().unwrap().unwrap(),
            &mean,
            MEAN_ATOL,
            MEAN_RTOL,
        );
        assert_close(
            "running var",
            &bn.running_var().unwrap().unwrap(),
            &unbiased,
            0.0,
            VAR_RTOL,
        );
        assert_eq!(bn.num_batches_tracked(), Some(1));
    });
}

// ---- large offsets: the variance must not cancel ----

/// Relative error of an f32 statistic against the f64 one.
fn rel_err(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs()
}

/// The textbook single-pass formula a naive kernel would use: Σx and Σx² accumulated in
/// f32, one value at a time, then var = E[x²] − E[x]². Returns (mean, biased var) per channel.
fn naive_f32_stats(x: &[f32], dims: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let (n, c) = (dims[0], dims[1]);
    let s: usize = dims[2..].iter().product();
    let count = (n * s) as f32;
    (0..c)
        .map(|ch| {
            let (mut sum, mut sumsq) = (0.0f32, 0.0f32);
            for b in 0..n {
                for &v in &x[(b * c + ch) * s..(b * c + ch + 1) * s] {
                    sum += v;
                    sumsq += v * v;
                }
            }
            let mean = sum / count;
            (mean, sumsq / count - mean * mean)
        })
        .unzip()
}

/// x = offset + std·N(0, 1): mean and biased variance within 1e-5 relative of the f64
/// two-pass values, y within 1e-4 absolute.
fn check_large_offset(ctx: &Context, dims: &[usize], offset: f64, std: f64, seed: u64) {
    let shape = Shape::new(dims).unwrap();
    let x = normal(shape.numel(), seed, offset, std);
    // Momentum 1: the running statistics are the batch's mean and unbiased variance, so
    // the variance is read back directly, not through invstd.
    let config = BatchNormConfig::new(dims[1]).momentum(1.0);
    let (mut bn, mut reference) = layer_pair(ctx, config, seed);
    let out = bn
        .forward_train(&ctx.tensor_from_slice(&x, dims).unwrap())
        .unwrap();
    let want = reference.forward_train(&x, &shape).unwrap();
    let (mean, var) = batch_stats(&x, &shape);
    let n = shape.numel() as f64 / dims[1] as f64;
    let saved_mean = out.saved.mean().unwrap();
    let saved_invstd = out.saved.invstd().unwrap();
    let running_var = bn.running_var().unwrap().unwrap();
    let eps = config.eps as f64;
    for c in 0..dims[1] {
        let biased_from_running = running_var[c] as f64 * (n - 1.0) / n;
        let biased_from_invstd = 1.0 / (saved_invstd[c] as f64).powi(2) - eps;
        for (what, got, want) in [
            ("mean", saved_mean[c] as f64, mean[c]),
            ("var (running, unbiased)", biased_from_running, var[c]),
            ("var (from saved invstd)", biased_from_invstd, var[c]),
        ] {
            assert!(
                rel_err(got, want) <= 1e-5,
                "offset {offset}: channel {c}: {what}: got {got} want {want} (rel err {:e})",
                rel_err(got, want)
            );
        }
    }
    // y = (x − μ)·γ·invstd + β with μ an f32, like PyTorch's save_mean: rounding μ to the
    // nearest f32 alone moves every y of the channel by up to ½ulp(μ)·|γ|·invstd
    // (≈ 4.9e-4 at 1e4, 7.8e-3 at 1e5 with invstd 2), so no f32 implementation is within
    // 1e-4 of the pure f64 y. Hence: y within 1e-4 of the f64 formula evaluated with the
    // saved f32 μ (this catches x·a + b cancellation, which costs ulp(|μ|·a) ≫ 1e-4), and
    // within one ulp(μ)·|γ|·invstd of the pure f64 y (with μ's own error bounded above).
    let y = out.y.to_vec().unwrap();
    let mut y_with_saved_mean = vec![0.0; x.len()];
    for (i, v) in y_with_saved_mean.iter_mut().enumerate() {
        let c = channel_of(&shape, i);
        *v = (x[i] as f64 - saved_mean[c] as f64) * want.invstd[c] * reference.weight[c]
            + reference.bias[c];
    }
    assert_close("y (f64, saved f32 mean)", &y, &y_with_saved_mean, 1e-4, 0.0);
    assert_y_close("y", &y, &want, &reference.weight, &shape);
}

#[test]
fn large_offset_1e4_8x3x32x32() {
    on_every_backend("large_offset_1e4_8x3x32x32", |ctx| {
        check_large_offset(ctx, &[8, 3, 32, 32], 1e4, 1.0, 50)
    });
}

#[test]
fn large_offset_1e5_64x4x16x16() {
    on_every_backend("large_offset_1e5_64x4x16x16", |ctx| {
        check_large_offset(ctx, &[64, 4, 16, 16], 1e5, 0.5, 51)
    });
}

/// The point of the stable reduction: on the same data, the naive f32 E[x²] − E[x]² misses
/// the 1e-5 relative bound on the variance (by orders of magnitude), while ours meets it.
#[test]
fn naive_f32_variance_fails_where_ours_passes() {
    on_every_backend("naive_f32_variance_fails_where_ours_passes", |ctx| {
        for (dims, offset, std, seed) in [
            ([8usize, 3, 32, 32], 1e4, 1.0, 50u64),
            ([64, 4, 16, 16], 1e5, 0.5, 51),
        ] {
            let shape = Shape::new(&dims).unwrap();
            let x = normal(shape.numel(), seed, offset, std);
            let (_, var) = batch_stats(&x, &shape);
            let (_, naive_var) = naive_f32_stats(&x, &dims);
            let mut bn = BatchNorm::new(ctx, BatchNormConfig::new(dims[1]).momentum(1.0)).unwrap();
            bn.forward_train(&ctx.tensor_from_slice(&x, &dims).unwrap())
                .unwrap();
            let n = shape.numel() as f64 / dims[1] as f64;
            let ours = bn.running_var().unwrap().unwrap();
            for c in 0..dims[1] {
                let naive_err = rel_err(naive_var[c] as f64, var[c]);
                let our_err = rel_err(ours[c] as f64 * (n - 1.0) / n, var[c]);
                assert!(
                    naive_err > 1e-5,
                    "offset {offset}: channel {c}: the naive f32 variance {} is within 1e-5 \
                     of {}: this data does not show the cancellation",
                    naive_var[c],
                    var[c]
                );
                assert!(
                    our_err <= 1e-5,
                    "offset {offset}: channel {c}: our variance's rel err {our_err:e} > 1e-5"
                );
            }
        }
    });
}

// ---- module flags ----

/// affine = false: γ = 1, β = 0, no parameters to read or set; running statistics as usual.
#[test]
fn no_affine() {
    on_every_backend("no_affine", |ctx| {
        let dims = [4, 3, 5, 6];
        let shape = Shape::new(&dims).unwrap();
        let config = BatchNormConfig::new(3).affine(false);
        let (mut bn, mut reference) = layer_pair(ctx, config, 60);
        assert_eq!(bn.weight().unwrap(), None);
        assert_eq!(bn.bias().unwrap(), None);
        assert!(bn.set_weight(&[1.0; 3]).is_err());
        let x = data(shape.numel(), 60);
        let out = bn
            .forward_train(&ctx.tensor_from_slice(&x, &dims).unwrap())
            .unwrap();
        let want = reference.forward_train(&x, &shape).unwrap();
        check_output("train", &out, &want, &reference);
        check_running("train", &bn, &reference);
        bn.eval();
        let out = bn
            .forward(&ctx.tensor_from_slice(&x, &dims).unwrap())
            .unwrap();
        let want = reference.forward_eval(&x, &shape).unwrap();
        check_output("eval", &out, &want, &reference);
    });
}

/// track_running_stats = false: both modes normalize with batch statistics, there are no
/// running statistics to read, and nothing is counted.
#[test]
fn no_running_stats_both_modes_use_batch_stats() {
    on_every_backend("no_running_stats_both_modes_use_batch_stats", |ctx| {
        for affine in [true, false] {
            let dims = [4, 3, 5, 6];
            let shape = Shape::new(&dims).unwrap();
            let config = BatchNormConfig::new(3)
                .track_running_stats(false)
                .affine(affine);
            let (mut bn, mut reference) = layer_pair(ctx, config, 61);
            let x = data(shape.numel(), 61);
            let xt = ctx.tensor_from_slice(&x, &dims).unwrap();
            let train = bn.forward_train(&xt).unwrap();
            let want = reference.forward_train(&x, &shape).unwrap();
            check_output("train", &train, &want, &reference);
            check_running("train", &bn, &reference);
            bn.eval();
            let eval = bn.forward(&xt).unwrap();
            let want_eval = reference.forward_eval(&x, &shape).unwrap();
            assert!(want_eval.batch_stats);
            check_output("eval", &eval, &want_eval, &reference);
            check_running("eval", &bn, &reference);
            // Same statistics, same y.
            assert_eq!(train.y.to_vec().unwrap(), eval.y.to_vec().unwrap());
            assert_eq!(bn.weight().unwrap().is_some(), affine);
        }
    });
}

/// Inference with a loaded state dict: running statistics, γ and β set, then eval forward;
/// nothing changes.
#[test]
fn eval_with_loaded_running_stats() {
    on_every_backend("eval_with_loaded_running_stats", |ctx| {
        let dims = [5, 6, 3, 4];
        let shape = Shape::new(&dims).unwrap();
        let config = BatchNormConfig::new(6).eps(1e-3);
        let (mut bn, mut reference) = layer_pair(ctx, config, 62);
        let rm = normal(6, 620, 0.5, 1.0);
        let rv: Vec<f32> = normal(6, 621, 0.0, 1.0)
            .iter()
            .map(|v| 0.2 + v * v)
            .collect();
        bn.set_running_mean(&rm).unwrap();
        bn.set_running_var(&rv).unwrap();
        reference.running_mean = widen(&rm);
        reference.running_var = widen(&rv);
        bn.eval();
        let x = data(shape.numel(), 62);
        let out = bn
            .forward(&ctx.tensor_from_slice(&x, &dims).unwrap())
            .unwrap();
        let want = reference.forward_eval(&x, &shape).unwrap();
        check_output("eval", &out, &want, &reference);
        check_running("after eval", &bn, &reference);
        assert_eq!(bn.running_mean().unwrap().unwrap(), rm);
        assert_eq!(bn.running_var().unwrap().unwrap(), rv);
        assert_eq!(bn.num_batches_tracked(), Some(0));
        // One value per channel is fine in inference.
        let x1 = data(6, 63);
        let out = bn
            .forward(&ctx.tensor_from_slice(&x1, &[1, 6]).unwrap())
            .unwrap();
        let want = reference
            .forward_eval(&x1, &Shape::new(&[1, 6]).unwrap())
            .unwrap();
        check_output("eval 1x6", &out, &want, &reference);
    });
}

// ---- layout ----

/// Channels-last results equal channels-first results on the same logical data (and both
/// match the oracle, via check_shape's checks on the channels-last run).
#[test]
fn channels_last_equals_channels_first() {
    on_every_backend("channels_last_equals_channels_first", |ctx| {
        for (i, dims) in [
            vec![2, 1, 3, 5],    // C = 1
            vec![4, 3, 5, 5],    // C = 3
            vec![2, 4096, 1, 1], // huge C, spatial = 1
            vec![2, 4096, 2, 3], // huge C, small N
            vec![3, 4, 2, 3, 2], // rank 5 (channels_last_3d)
            vec![9, 5],          // rank 2: the same memory either way
        ]
        .into_iter()
        .enumerate()
        {
            let seed = 70 + i as u64;
            check_shape(ctx, &dims, Layout::ChannelsLast, seed);

            let x = data(dims.iter().product(), seed);
            let config = BatchNormConfig::new(dims[1]);
            let (mut first, _) = layer_pair(ctx, config, seed);
            let (mut last, _) = layer_pair(ctx, config, seed);
            let yf = first
                .forward_train(&ctx.tensor_from_slice(&x, &dims).unwrap())
                .unwrap();
            let xl = ctx
                .tensor_with_layout(
                    &common::to_channels_last(&x, &dims),
                    &dims,
                    Layout::ChannelsLast,
                )
                .unwrap();
            let yl = last.forward_train(&xl).unwrap();
            assert_eq!(yl.y.layout(), Layout::ChannelsLast);
            // The two layouts reduce in different orders: equal to f32 rounding, not bits.
            assert_close(
                &format!("{dims:?}: y channels-last vs channels-first"),
                &common::to_channels_first(&yl.y.to_vec().unwrap(), &dims),
                &widen(&yf.y.to_vec().unwrap()),
                Y_ATOL,
                Y_RTOL,
            );
            assert_close(
                &format!("{dims:?}: running_var channels-last vs channels-first"),
                &last.running_var().unwrap().unwrap(),
                &widen(&first.running_var().unwrap().unwrap()),
                0.0,
                VAR_RTOL,
            );
        }
    });
}

// ---- special values ----

/// A NaN in one channel's input makes that channel's statistics and output NaN (as in
/// PyTorch) and leaves every other channel finite and correct. Both kernel paths.
#[test]
fn nan_in_one_channel_stays_in_that_channel() {
    on_every_backend("nan_in_one_channel_stays_in_that_channel", |ctx| {
        for dims in [[4usize, 3, 4, 4], [4, 3, 5, 5]] {
            let shape = Shape::new(&dims).unwrap();
            let s = shape.spatial();
            let mut x = data(shape.numel(), 80);
            x[(2 * 3 + 1) * s + 3] = f32::NAN; // batch 2, channel 1
            let (mut bn, mut reference) = layer_pair(ctx, BatchNormConfig::new(3), 80);
            let out = bn
                .forward_train(&ctx.tensor_from_slice(&x, &dims).unwrap())
                .unwrap();
            let want = reference.forward_train(&x, &shape).unwrap();
            let y = out.y.to_vec().unwrap();
            for (i, v) in y.iter().enumerate() {
                let c = (i / s) % 3;
                assert_eq!(v.is_nan(), c == 1, "{dims:?}: y[{i}] = {v} (channel {c})");
            }
            // The channel's running statistics become NaN too (PyTorch's do).
            let rm = bn.running_mean().unwrap().unwrap();
            let rv = bn.running_var().unwrap().unwrap();
            for (name, v) in [("running_mean", &rm), ("running_var", &rv)] {
                assert!(
                    v[0].is_finite() && v[1].is_nan() && v[2].is_finite(),
                    "{dims:?}: {name} = {v:?}, want [finite, NaN, finite]"
                );
            }
            // assert_close requires NaN exactly where the oracle has NaN.
            check_output(&format!("{dims:?}"), &out, &want, &reference);
            check_running(&format!("{dims:?}"), &bn, &reference);
        }
    });
}

// ---- readback ----

#[test]
fn to_vec_async_matches_to_vec() {
    on_every_backend("to_vec_async_matches_to_vec", |ctx| {
        let dims = [3, 4, 5, 7];
        let x = data(dims.iter().product(), 90);
        let xt = ctx.tensor_from_slice(&x, &dims).unwrap();
        assert_eq!(pollster::block_on(xt.to_vec_async()).unwrap(), x);
        let mut bn = BatchNorm::new(ctx, BatchNormConfig::new(4)).unwrap();
        let y = bn.forward_train(&xt).unwrap().y;
        assert_eq!(
            pollster::block_on(y.to_vec_async()).unwrap(),
            y.to_vec().unwrap()
        );
    });
}

/// A training forward of N(mean, std²) data against the oracle, with tolerances relative
/// to the spread (the same relative accuracy as O(1) data), and finite running variances.
fn check_huge(ctx: &Context, dims: &[usize], layout: Layout, mean: f64, std: f64, seed: u64) {
    let shape = Shape::with_layout(dims, layout).unwrap();
    let x = normal(shape.numel(), seed, mean, std);
    let (mut bn, mut reference) = layer_pair(ctx, BatchNormConfig::new(dims[1]), seed);
    let out = bn
        .forward_train(&ctx.tensor_with_layout(&x, dims, layout).unwrap())
        .unwrap();
    let want = reference.forward_train(&x, &shape).unwrap();
    let what = |s: &str| format!("{s} {dims:?} {layout:?} std {std:e} on {}", ctx.name());
    let mean_atol = std * 1e-4;
    assert_close(
        &what("mean"),
        &out.saved.mean().unwrap(),
        &want.mean,
        mean_atol,
        1e-5,
    );
    assert_close(
        &what("invstd"),
        &out.saved.invstd().unwrap(),
        &want.invstd,
        0.0,
        1e-5,
    );
    let rv = bn.running_var().unwrap().unwrap();
    assert!(
        rv.iter().all(|v| v.is_finite()),
        "{}: {rv:?}",
        what("running_var")
    );
    assert_close(&what("running_var"), &rv, &reference.running_var, 0.0, 1e-5);
    // y is O(1) again.
    assert_close(&what("y"), &out.y.to_vec().unwrap(), &want.y, 1e-4, 1e-4);
}

/// |x| around 1e19: σ² fits in f32 but n·σ² and the sums of squared differences do not.
/// The partial kernels sum scaled squares where the plain ones overflow, so the statistics
/// are finite and right (PyTorch's CPU kernel is; our GPU kernels returned NaN and the CPU
/// path invstd = 0 before). Both kernel mappings (spatial 16: runs; rank 2: columns) and a
/// tile boundary. std 1e18: single squared differences reach 1e38 and their sums overflow.
#[test]
fn huge_values_1e19_keep_finite_statistics() {
    on_every_backend("huge_values_1e19_keep_finite_statistics", |ctx| {
        for (dims, mean) in [
            (vec![8usize, 3, 16, 16], 0.0),
            (vec![2000, 5], 1e19),
            (vec![4, 2, 33, 31], 1e19),
            (vec![4, 2, 1024], -1e19),
        ] {
            check_huge(ctx, &dims, Layout::ChannelsFirst, mean, 1e18, 95);
        }
    });
}

/// std 1e19: the channels' variances (about 1e38) fit in f32, but partial summaries of a
/// few values can have variances past f32's range (two values ±2e19: 4e38). The summaries
/// keep the standard deviation, so those partials stay finite and the merged statistics
/// are right; with the variance form the GPU saved invstd = 0 for most channels of (100, 6).
#[test]
fn spreads_near_the_f32_limit_keep_finite_statistics() {
    on_every_backend("spreads_near_the_f32_limit_keep_finite_statistics", |ctx| {
        for (dims, layout) in [
            (vec![100usize, 6], Layout::ChannelsFirst),
            (vec![2, 6, 5, 5], Layout::ChannelsFirst),
            (vec![8, 3, 16, 16], Layout::ChannelsFirst),
            (vec![25, 4, 2, 2], Layout::ChannelsLast),
        ] {
            check_huge(ctx, &dims, layout, 0.0, 1e19, 97);
        }
    });
}

/// std 3e19: the batch variance (about 9e38) is past f32's range, but the running variance
/// m·var·n/(n − 1) + (1 − m)·running (about 9e37) is not, and PyTorch's CPU kernel, which
/// updates in double, stores it. The GPU's finalize used to compute var first and store
/// +Inf; the saved invstd is 1/σ (tiny, finite) as before.
#[test]
fn a_batch_variance_past_f32_still_updates_the_running_variance() {
    on_every_backend("batch_variance_past_f32", |ctx| {
        for (dims, layout) in [
            (vec![64usize, 3], Layout::ChannelsFirst),
            (vec![4, 2, 16, 16], Layout::ChannelsFirst),
        ] {
            check_huge(ctx, &dims, layout, 0.0, 3e19, 99);
        }
    });
}

/// A +Inf in a channel: its mean and running mean are +Inf and its variance NaN, as in
/// PyTorch's CPU kernel (a sum); the other channels are untouched. With the +Inf as the
/// channel's first value (the shift of the shifted sums) and elsewhere, in one tile and in
/// several, in both kernel mappings.
#[test]
fn plus_inf_gives_plus_inf_mean_and_running_mean() {
    on_every_backend("plus_inf_gives_plus_inf_mean_and_running_mean", |ctx| {
        for dims in [&[4usize, 3, 4, 4][..], &[64, 3, 32, 32], &[3000, 3]] {
            let shape = Shape::new(dims).unwrap();
            let s = shape.spatial();
            let per_channel = dims[0] * s;
            for at in [0, 1, (2 * s + 3) % per_channel, per_channel - 1] {
                // Channel 1's k-th value (k = b·s + p) is at (b·3 + 1)·s + p; put +Inf at its
                // `at`-th value and a second one further on.
                let index = |k: usize| ((k / s) * 3 + 1) * s + k % s;
                let mut x = data(shape.numel(), 96);
                x[index(at)] = f32::INFINITY;
                x[index((at + 7) % per_channel)] = f32::INFINITY;
                let mut bn = BatchNorm::new(ctx, BatchNormConfig::new(3)).unwrap();
                let out = bn
                    .forward_train(&ctx.tensor_from_slice(&x, dims).unwrap())
                    .unwrap();
                let what = format!("{dims:?}, +Inf at {at}, on {}", ctx.name());
                let mean = out.saved.mean().unwrap();
                let rm = bn.running_mean().unwrap().unwrap();
                let rv = bn.running_var().unwrap().unwrap();
                assert!(
                    mean[1] == f32::INFINITY && rm[1] == f32::INFINITY,
                    "{what}: mean {mean:?}, running_mean {rm:?}"
                );
                assert!(rv[1].is_nan(), "{what}: running_var {rv:?}");
                for c in [0, 2] {
                    assert!(
                        mean[c].is_finite() && rm[c].is_finite() && rv[c].is_finite(),
                        "{what}: channel {c}: {mean:?} {rm:?} {rv:?}"
                    );
                }
            }
        }
    });
}
