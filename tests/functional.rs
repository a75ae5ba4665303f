//! The functional API (`wgpu_batchnorm::ops`) on the CPU path and every wgpu adapter found:
//!
//! 1. each op alone against the f64 oracle, on awkward shapes;
//! 2. the defining property: a batch split along N into parts of any sizes (empty parts
//!    included), run as `batch_norm_stats` per part → one `batch_norm_gather_stats` →
//!    `batch_norm_elemt` per part, and backward `batch_norm_backward_reduce` per part →
//!    summed `GradSums` → `batch_norm_backward_elemt` per part, gives the y, running
//!    statistics, dx, dγ and dβ of one `batch_norm` + `batch_norm_backward` on the whole
//!    batch; with the moments exchanged in device form, through the host form, and from
//!    another backend;
//! 3. bad input: a typed [`Error`] variant, and the running statistics passed in unchanged.
//!
//! Tolerances (f32 ε ≈ 6e-8) are those of tests/forward.rs and tests/backward.rs; data are
//! O(1) (|x − μ|·invstd ≲ 6, γ ≈ 1 ± 0.5):
//! - y: Y_ATOL + Y_RTOL·|y|: a handful of f32 roundings on values ≲ 10, plus the f32
//!   statistics' own errors times |x̂|;
//! - means: MEAN_ATOL + MEAN_RTOL·|μ|; invstd, variances and M2: VAR_RTOL relative (a Chan
//!   merge of shifted sums is good to ~1e-6 relative);
//! - dx: DX_TOL·max_c(|γ_c|·invstd_c)·max|dy|: dx is a combination of O(max|dy|) terms that
//!   may cancel, each f32 rounding costs ε of the terms' scale, not of the result;
//! - dγ, dβ: PARAM_TOL·Σ|terms|: the worst-case error of an f32 sum of those terms.
//!
//! Pieces against one call: both are f32 results of the same arithmetic in different
//! reduction orders, so the same tolerances apply, plus what a one-ulp difference of the
//! two saved f32 means moves (zero unless they round differently; see
//! [`assert_split_matches`]).

mod common;

use std::fmt::Debug;
use std::ops::Range;

use common::{assert_close, channel_of, normal, on_every_backend, ulp, widen};
use wgpu_batchnorm::cpu::reference::{batch_stats, RefForward, ReferenceBatchNorm};
use wgpu_batchnorm::ops;
use wgpu_batchnorm::{
    BatchNormConfig, Context, Error, GradMask, GradSums, GradSumsHost, Layout, Moments,
    MomentsHost, RunningStats, SavedStats, Shape, Tensor,
};

/// PyTorch's defaults, which the oracle's `BatchNormConfig::new` has too.
const EPS: f32 = 1e-5;
const MOMENTUM: f32 = 0.1;

const Y_ATOL: f64 = 2e-5;
const Y_RTOL: f64 = 2e-5;
const MEAN_ATOL: f64 = 1e-6;
const MEAN_RTOL: f64 = 1e-5;
const VAR_RTOL: f64 = 1e-5;
const DX_TOL: f64 = 1e-5;
const PARAM_TOL: f64 = 1e-5;

// ---- helpers ----

/// SplitMix64, for the random split sizes and shapes.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in lo..=hi (the modulo bias does not matter here).
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

/// A tensor holding `data` (in `shape`'s layout order).
fn tensor(ctx: &Context, data: &[f32], shape: &Shape) -> Tensor {
    ctx.tensor_with_layout(data, shape.dims(), shape.layout())
        .unwrap()
}

/// A per-channel (1-D) tensor.
fn vector(ctx: &Context, v: &[f32]) -> Tensor {
    ctx.tensor_from_slice(v, &[v.len()]).unwrap()
}

/// Channels-first unit normal data of shape `dims`.
fn random_tensor(ctx: &Context, dims: &[usize], seed: u64) -> Tensor {
    let n = dims.iter().product();
    ctx.tensor_from_slice(&normal(n, seed, 0.0, 1.0), dims)
        .unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_vec().unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    values(t).iter().map(|v| v.to_bits()).collect()
}

fn max_of(v: impl IntoIterator<Item = f64>) -> f64 {
    v.into_iter().fold(0.0, f64::max)
}

/// assert_close for values that are f64 on both sides (the host forms).
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

/// The dx tolerance: DX_TOL·max_c(|γ_c|·invstd_c)·max|dy| (see the file's head).
fn dx_atol(gamma: &[f64], invstd: &[f64], max_dy: f64) -> f64 {
    DX_TOL * max_of(gamma.iter().zip(invstd).map(|(g, s)| g.abs() * s)) * max_dy
}

/// One input with everything an op takes: x and dy in memory (layout) order, and non-trivial
/// γ, β and initial running statistics.
struct Case {
    shape: Shape,
    x: Vec<f32>,
    dy: Vec<f32>,
    weight: Vec<f32>,
    bias: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
}

impl Case {
    /// x ~ mean + std·N(0, 1), dy ~ N(0, 1), generated channels-first and permuted to
    /// channels-last for that layout.
    fn new(dims: &[usize], layout: Layout, seed: u64, mean: f64, std: f64) -> Self {
        let (numel, c) = (dims.iter().product(), dims[1]);
        let in_layout = |v: Vec<f32>| match layout {
            Layout::ChannelsFirst => v,
            Layout::ChannelsLast => common::to_channels_last(&v, dims),
        };
        Self {
            shape: Shape::with_layout(dims, layout).unwrap(),
            x: in_layout(normal(numel, seed, mean, std)),
            dy: in_layout(normal(numel, seed ^ 0xD1, 0.0, 1.0)),
            weight: normal(c, seed ^ 0xA11CE, 1.0, 0.25),
            bias: normal(c, seed ^ 0xB0B, 0.0, 0.5),
            running_mean: normal(c, seed ^ 0x3EA, 0.0, 0.5),
            running_var: normal(c, seed ^ 0x7A2, 1.0, 0.25)
                .iter()
                .map(|v| v.abs() + 0.25)
                .collect(),
        }
    }

    fn name(&self) -> String {
        format!("{:?} {:?}", self.shape.dims(), self.shape.layout())
    }

    fn channels(&self) -> usize {
        self.shape.channels()
    }

    /// Values per channel.
    fn count(&self) -> u64 {
        (self.shape.numel() / self.channels()) as u64
    }

    fn x(&self, ctx: &Context) -> Tensor {
        tensor(ctx, &self.x, &self.shape)
    }

    fn dy(&self, ctx: &Context) -> Tensor {
        tensor(ctx, &self.dy, &self.shape)
    }

    /// γ and β, or None for both (γ = 1, β = 0).
    fn params(&self, ctx: &Context, affine: bool) -> (Option<Tensor>, Option<Tensor>) {
        if affine {
            (
                Some(vector(ctx, &self.weight)),
                Some(vector(ctx, &self.bias)),
            )
        } else {
            (None, None)
        }
    }

    /// Fresh running mean and variance tensors with the initial values.
    fn running(&self, ctx: &Context) -> (Tensor, Tensor) {
        (
            vector(ctx, &self.running_mean),
            vector(ctx, &self.running_var),
        )
    }

    /// γ as the oracle sees it.
    fn gamma(&self, affine: bool) -> Vec<f64> {
        if affine {
            widen(&self.weight)
        } else {
            vec![1.0; self.channels()]
        }
    }

    /// The oracle with this case's running statistics and (when `affine`) γ and β.
    fn reference(&self, affine: bool) -> ReferenceBatchNorm {
        let mut r = ReferenceBatchNorm::new(BatchNormConfig::new(self.channels()));
        assert_eq!(r.config.eps, EPS);
        if affine {
            r.weight = widen(&self.weight);
            r.bias = widen(&self.bias);
        }
        r.running_mean = widen(&self.running_mean);
        r.running_var = widen(&self.running_var);
        r
    }

    fn max_abs_dy(&self) -> f64 {
        max_of(self.dy.iter().map(|v| v.abs() as f64))
    }

    /// max |x − μ_c|·invstd_c.
    fn max_xhat(&self, mean: &[f64], invstd: &[f64]) -> f64 {
        max_of(self.x.iter().enumerate().map(|(i, &v)| {
            let c = channel_of(&self.shape, i);
            (v as f64 - mean[c]).abs() * invstd[c]
        }))
    }

    /// Per channel Σ dy and Σ dy·(x − μ) in f64.
    fn grad_sums(&self, mean: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let c = self.channels();
        let (mut sdy, mut sdyx) = (vec![0.0; c], vec![0.0; c]);
        for (i, (&x, &dy)) in self.x.iter().zip(&self.dy).enumerate() {
            let ch = channel_of(&self.shape, i);
            sdy[ch] += dy as f64;
            sdyx[ch] += dy as f64 * (x as f64 - mean[ch]);
        }
        (sdy, sdyx)
    }

    /// Per channel Σ|dy·(x − μ)| and Σ|dy|: the scales of the terms of Σ dy·(x − μ) and
    /// Σ dy (times invstd_c for dγ, see `param_atols`).
    fn term_scales(&self, mean: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let c = self.channels();
        let (mut sdyx, mut sdy) = (vec![0.0; c], vec![0.0; c]);
        for (i, (&x, &dy)) in self.x.iter().zip(&self.dy).enumerate() {
            let ch = channel_of(&self.shape, i);
            sdyx[ch] += (dy as f64 * (x as f64 - mean[ch])).abs();
            sdy[ch] += (dy as f64).abs();
        }
        (sdyx, sdy)
    }

    /// PARAM_TOL·max_c Σ|dy·(x − μ)|·invstd_c and PARAM_TOL·max_c Σ|dy|.
    fn param_atols(&self, mean: &[f64], invstd: &[f64]) -> (f64, f64) {
        let (sdyx, sdy) = self.term_scales(mean);
        (
            PARAM_TOL * max_of(sdyx.iter().zip(invstd).map(|(s, i)| s * i)),
            PARAM_TOL * max_of(sdy),
        )
    }
}

/// The single-op tests' shapes: primes, rank 2, rank 5, channels-last.
fn awkward_cases() -> Vec<Case> {
    [
        (&[7, 13, 11, 3][..], Layout::ChannelsFirst),
        (&[16, 8][..], Layout::ChannelsFirst),
        (&[2, 3, 4, 5, 6][..], Layout::ChannelsFirst),
        (&[4, 6, 5, 5][..], Layout::ChannelsLast),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (dims, layout))| Case::new(dims, layout, 10 + i as u64, 0.3, 1.5))
    .collect()
}

/// Checks y (in memory order, as the oracle's) against the oracle's.
#[track_caller]
fn assert_y(what: &str, y: &Tensor, want: &RefForward) {
    assert_close(&format!("{what}: y"), &values(y), &want.y, Y_ATOL, Y_RTOL);
}

/// Checks saved statistics against the oracle's.
#[track_caller]
fn assert_saved(what: &str, saved: &SavedStats, mean: &[f64], invstd: &[f64]) {
    assert_eq!(saved.channels(), mean.len(), "{what}: saved channels");
    assert_close(
        &format!("{what}: saved mean"),
        &saved.mean().unwrap(),
        mean,
        MEAN_ATOL,
        MEAN_RTOL,
    );
    assert_close(
        &format!("{what}: saved invstd"),
        &saved.invstd().unwrap(),
        invstd,
        0.0,
        VAR_RTOL,
    );
}

/// Checks updated running statistics against the oracle's.
#[track_caller]
fn assert_running(what: &str, mean: &Tensor, var: &Tensor, reference: &ReferenceBatchNorm) {
    assert_close(
        &format!("{what}: running_mean"),
        &values(mean),
        &reference.running_mean,
        MEAN_ATOL,
        MEAN_RTOL,
    );
    assert_close(
        &format!("{what}: running_var"),
        &values(var),
        &reference.running_var,
        0.0,
        VAR_RTOL,
    );
}

// ---- each op alone against the oracle ----

#[test]
fn batch_norm_training_matches_oracle() {
    on_every_backend("batch_norm_training_matches_oracle", |ctx| {
        for case in awkward_cases() {
            for affine in [true, false] {
                let what = format!("{} affine {affine}", case.name());
                let (w, b) = case.params(ctx, affine);
                let (mut rm, mut rv) = case.running(ctx);
                let rm_clone = rm.clone();
                let out = ops::batch_norm(
                    &case.x(ctx),
                    Some(&mut rm),
                    Some(&mut rv),
                    w.as_ref(),
                    b.as_ref(),
                    true,
                    MOMENTUM,
                    EPS,
                )
                .unwrap();
                let mut reference = case.reference(affine);
                let want = reference.forward_train(&case.x, &case.shape).unwrap();
                assert_eq!(out.y.shape(), &case.shape, "{what}: y shape");
                assert_y(&what, &out.y, &want);
                assert_saved(&what, &out.saved, &want.mean, &want.invstd);
                assert!(out.saved.is_batch_stats(), "{what}: saved kind");
                assert_running(&what, &rm, &rv, &reference);
                // Tensors are values: a clone taken before keeps the old running mean.
                assert_eq!(values(&rm_clone), case.running_mean, "{what}: clone");
            }
        }
    });
}

#[test]
fn batch_norm_training_without_running_stats_matches_oracle() {
    on_every_backend(
        "batch_norm_training_without_running_stats_matches_oracle",
        |ctx| {
            for case in awkward_cases() {
                let (w, b) = case.params(ctx, true);
                let out = ops::batch_norm(
                    &case.x(ctx),
                    None,
                    None,
                    w.as_ref(),
                    b.as_ref(),
                    true,
                    MOMENTUM,
                    EPS,
                )
                .unwrap();
                let want = case
                    .reference(true)
                    .forward_train(&case.x, &case.shape)
                    .unwrap();
                assert_y(&case.name(), &out.y, &want);
                assert_saved(&case.name(), &out.saved, &want.mean, &want.invstd);
            }
        },
    );
}

#[test]
fn batch_norm_inference_uses_running_stats() {
    on_every_backend("batch_norm_inference_uses_running_stats", |ctx| {
        for case in awkward_cases() {
            for affine in [true, false] {
                let what = format!("{} affine {affine}", case.name());
                let (w, b) = case.params(ctx, affine);
                let (mut rm, mut rv) = case.running(ctx);
                let before = (bits(&rm), bits(&rv));
                let out = ops::batch_norm(
                    &case.x(ctx),
                    Some(&mut rm),
                    Some(&mut rv),
                    w.as_ref(),
                    b.as_ref(),
                    false,
                    MOMENTUM,
                    EPS,
                )
                .unwrap();
                let reference = case.reference(affine);
                let want = reference.forward_eval(&case.x, &case.shape).unwrap();
                assert!(!want.batch_stats);
                assert_y(&what, &out.y, &want);
                assert_saved(&what, &out.saved, &want.mean, &want.invstd);
                assert!(!out.saved.is_batch_stats(), "{what}: saved kind");
                assert_eq!((bits(&rm), bits(&rv)), before, "{what}: running stats");
            }
        }
    });
}

#[test]
fn batch_norm_inference_without_running_stats_is_an_error() {
    on_every_backend(
        "batch_norm_inference_without_running_stats_is_an_error",
        |ctx| {
            let case = &awkward_cases()[0];
            let (w, b) = case.params(ctx, true);
            let e = error_of(ops::batch_norm(
                &case.x(ctx),
                None,
                None,
                w.as_ref(),
                b.as_ref(),
                false,
                MOMENTUM,
                EPS,
            ));
            assert_eq!(
                e,
                Error::NoRunningStats {
                    op: "batch_norm with training = false"
                }
            );
        },
    );
}

#[test]
fn batch_norm_stats_matches_two_pass_f64() {
    on_every_backend("batch_norm_stats_matches_two_pass_f64", |ctx| {
        for case in awkward_cases() {
            let what = case.name();
            let m = ops::batch_norm_stats(&case.x(ctx)).unwrap();
            assert_eq!(m.count(), case.count(), "{what}: count");
            assert_eq!(m.channels(), case.channels(), "{what}: channels");
            assert_eq!(m.context().id(), ctx.id(), "{what}: context");
            let h = m.to_host().unwrap();
            let (mean, var) = batch_stats(&case.x, &case.shape);
            let m2: Vec<f64> = var.iter().map(|v| v * case.count() as f64).collect();
            assert_eq!(h.count, case.count(), "{what}: host count");
            assert_close_f64(
                &format!("{what}: mean"),
                &h.mean,
                &mean,
                MEAN_ATOL,
                MEAN_RTOL,
            );
            assert_close_f64(&format!("{what}: m2"), &h.m2, &m2, 0.0, VAR_RTOL);
        }
    });
}

#[test]
fn gather_of_one_part_equals_batch_norm() {
    on_every_backend("gather_of_one_part_equals_batch_norm", |ctx| {
        for case in awkward_cases() {
            let what = case.name();
            let x = case.x(ctx);
            let (mut rm_a, mut rv_a) = case.running(ctx);
            let (mut rm_b, mut rv_b) = case.running(ctx);
            let rv_clone = rv_b.clone();
            let out = ops::batch_norm(
                &x,
                Some(&mut rm_a),
                Some(&mut rv_a),
                None,
                None,
                true,
                MOMENTUM,
                EPS,
            )
            .unwrap();
            let saved = ops::batch_norm_gather_stats(
                &[ops::batch_norm_stats(&x).unwrap()],
                EPS,
                Some(RunningStats {
                    mean: &mut rm_b,
                    var: &mut rv_b,
                    momentum: MOMENTUM,
                }),
            )
            .unwrap();
            assert!(saved.is_batch_stats(), "{what}: saved kind");
            // Two f32 computations of the same statistics: within the oracle tolerances.
            let (mean, invstd) = (
                widen(&out.saved.mean().unwrap()),
                widen(&out.saved.invstd().unwrap()),
            );
            assert_saved(&format!("{what}: gather"), &saved, &mean, &invstd);
            assert_close(
                &format!("{what}: running_mean"),
                &values(&rm_b),
                &widen(&values(&rm_a)),
                MEAN_ATOL,
                MEAN_RTOL,
            );
            assert_close(
                &format!("{what}: running_var"),
                &values(&rv_b),
                &widen(&values(&rv_a)),
                0.0,
                VAR_RTOL,
            );
            // The gather writes in place too: a clone taken before keeps the old values.
            assert_eq!(values(&rv_clone), case.running_var, "{what}: clone");
        }
    });
}

/// An empty batch (N = 0) is valid: batch_norm and a gather of empty parts only save zeros
/// and update nothing.
#[test]
fn empty_batches_save_zeros_and_update_nothing() {
    on_every_backend("empty_batches_save_zeros_and_update_nothing", |ctx| {
        let c = 3;
        let case = Case::new(&[2, c, 4], Layout::ChannelsFirst, 5, 0.3, 1.5);
        let empty = ctx.tensor_from_slice(&[], &[0, c, 4]).unwrap();
        let (mut rm, mut rv) = case.running(ctx);
        let before = (bits(&rm), bits(&rv));
        let out = ops::batch_norm(
            &empty,
            Some(&mut rm),
            Some(&mut rv),
            None,
            None,
            true,
            MOMENTUM,
            EPS,
        )
        .unwrap();
        assert_eq!(out.y.dims(), &[0, c, 4]);
        assert_eq!(values(&out.y), Vec::<f32>::new());
        assert_eq!((bits(&rm), bits(&rv)), before, "batch_norm: running stats");
        let parts = [
            ops::batch_norm_stats(&empty).unwrap(),
            ops::batch_norm_stats(&empty).unwrap(),
        ];
        assert_eq!(parts[0].count(), 0);
        let saved = ops::batch_norm_gather_stats(
            &parts,
            EPS,
            Some(RunningStats {
                mean: &mut rm,
                var: &mut rv,
                momentum: MOMENTUM,
            }),
        )
        .unwrap();
        assert_eq!(saved.mean().unwrap(), vec![0.0; c], "gather: saved mean");
        assert_eq!(
            saved.invstd().unwrap(),
            vec![0.0; c],
            "gather: saved invstd"
        );
        assert_eq!((bits(&rm), bits(&rv)), before, "gather: running stats");
    });
}

#[test]
fn batch_norm_elemt_matches_oracle() {
    on_every_backend("batch_norm_elemt_matches_oracle", |ctx| {
        for case in awkward_cases() {
            let x = case.x(ctx);
            let saved = ops::batch_norm(&x, None, None, None, None, true, MOMENTUM, EPS)
                .unwrap()
                .saved;
            for affine in [true, false] {
                let what = format!("{} affine {affine}", case.name());
                let (w, b) = case.params(ctx, affine);
                let y = ops::batch_norm_elemt(&x, &saved, w.as_ref(), b.as_ref()).unwrap();
                assert_eq!(y.shape(), &case.shape, "{what}: y shape");
                let want = case
                    .reference(affine)
                    .forward_train(&case.x, &case.shape)
                    .unwrap();
                assert_y(&what, &y, &want);
            }
            // With running statistics saved: the inference formula.
            let (mut rm, mut rv) = case.running(ctx);
            let saved = ops::batch_norm(
                &x,
                Some(&mut rm),
                Some(&mut rv),
                None,
                None,
                false,
                MOMENTUM,
                EPS,
            )
            .unwrap()
            .saved;
            let (w, b) = case.params(ctx, true);
            let y = ops::batch_norm_elemt(&x, &saved, w.as_ref(), b.as_ref()).unwrap();
            let want = case
                .reference(true)
                .forward_eval(&case.x, &case.shape)
                .unwrap();
            assert_y(&format!("{} eval", case.name()), &y, &want);
        }
    });
}

#[test]
fn batch_norm_backward_reduce_matches_f64_sums() {
    on_every_backend("batch_norm_backward_reduce_matches_f64_sums", |ctx| {
        for case in awkward_cases() {
            let what = case.name();
            let (x, dy) = (case.x(ctx), case.dy(ctx));
            let saved = ops::batch_norm(&x, None, None, None, None, true, MOMENTUM, EPS)
                .unwrap()
                .saved;
            // The sums are about the mean the backend saved: the oracle uses it too.
            let (mean, invstd) = (
                widen(&saved.mean().unwrap()),
                widen(&saved.invstd().unwrap()),
            );
            let (sdy, sdyx) = case.grad_sums(&mean);
            let (sdyx_scale, sdy_scale) = case.term_scales(&mean);
            let sums = ops::batch_norm_backward_reduce(&dy, &x, &saved, GradMask::ALL).unwrap();
            assert_eq!(sums.channels(), case.channels(), "{what}: channels");
            let h = sums.to_host().unwrap();
            assert_close_f64(
                &format!("{what}: sum_dy"),
                &h.sum_dy,
                &sdy,
                PARAM_TOL * max_of(sdy_scale),
                0.0,
            );
            assert_close_f64(
                &format!("{what}: sum_dy_xmu"),
                &h.sum_dy_xmu,
                &sdyx,
                PARAM_TOL * max_of(sdyx_scale),
                0.0,
            );
            let dweight: Vec<f64> = sdyx.iter().zip(&invstd).map(|(s, i)| s * i).collect();
            let (dw_atol, db_atol) = case.param_atols(&mean, &invstd);
            assert_close(
                &format!("{what}: dweight"),
                &values(sums.dweight().unwrap()),
                &dweight,
                dw_atol,
                0.0,
            );
            assert_close(
                &format!("{what}: dbias"),
                &values(sums.dbias().unwrap()),
                &sdy,
                db_atol,
                0.0,
            );
            // Without dγ, dβ in the mask: none returned.
            let sums = ops::batch_norm_backward_reduce(&dy, &x, &saved, GradMask::INPUT).unwrap();
            assert!(
                sums.dweight().is_none() && sums.dbias().is_none(),
                "{what}: mask"
            );
        }
    });
}

#[test]
fn batch_norm_backward_elemt_matches_oracle() {
    on_every_backend("batch_norm_backward_elemt_matches_oracle", |ctx| {
        for case in awkward_cases() {
            let (x, dy) = (case.x(ctx), case.dy(ctx));
            let (w, _) = case.params(ctx, true);
            let max_dy = case.max_abs_dy();
            // Training: the whole batch's own sums.
            let what = format!("{} train", case.name());
            let saved = ops::batch_norm(&x, None, None, w.as_ref(), None, true, MOMENTUM, EPS)
                .unwrap()
                .saved;
            let sums = ops::batch_norm_backward_reduce(&dy, &x, &saved, GradMask::INPUT).unwrap();
            let dx =
                ops::batch_norm_backward_elemt(&dy, &x, &saved, w.as_ref(), &sums, case.count())
                    .unwrap();
            // A fresh oracle for the training forward (which updates its running
            // statistics); `reference` keeps the initial ones for the inference below.
            let reference = case.reference(true);
            let fwd = case
                .reference(true)
                .forward_train(&case.x, &case.shape)
                .unwrap();
            let want = reference.backward(&case.dy, &case.x, &case.shape, &fwd);
            assert_eq!(dx.shape(), &case.shape, "{what}: dx shape");
            assert_close(
                &format!("{what}: dx"),
                &values(&dx),
                &want.dx,
                dx_atol(&reference.weight, &fwd.invstd, max_dy),
                DX_TOL,
            );
            // Inference: dx = dy·γ·invstd, whatever the sums say.
            let what = format!("{} eval", case.name());
            let (mut rm, mut rv) = case.running(ctx);
            let saved = ops::batch_norm(
                &x,
                Some(&mut rm),
                Some(&mut rv),
                w.as_ref(),
                None,
                false,
                MOMENTUM,
                EPS,
            )
            .unwrap()
            .saved;
            let c = case.channels();
            let nonsense = GradSums::from_host(
                ctx,
                &GradSumsHost {
                    sum_dy: vec![1e3; c],
                    sum_dy_xmu: vec![-1e3; c],
                },
            )
            .unwrap();
            let dx = ops::batch_norm_backward_elemt(
                &dy,
                &x,
                &saved,
                w.as_ref(),
                &nonsense,
                case.count(),
            )
            .unwrap();
            let fwd = reference.forward_eval(&case.x, &case.shape).unwrap();
            let want = reference.backward(&case.dy, &case.x, &case.shape, &fwd);
            assert_close(
                &format!("{what}: dx"),
                &values(&dx),
                &want.dx,
                dx_atol(&reference.weight, &fwd.invstd, max_dy),
                DX_TOL,
            );
        }
    });
}

#[test]
fn batch_norm_backward_matches_oracle() {
    on_every_backend("batch_norm_backward_matches_oracle", |ctx| {
        for case in awkward_cases() {
            let (x, dy) = (case.x(ctx), case.dy(ctx));
            for (training, affine) in [(true, true), (true, false), (false, true), (false, false)] {
                let what = format!("{} training {training} affine {affine}", case.name());
                let (w, b) = case.params(ctx, affine);
                let (mut rm, mut rv) = case.running(ctx);
                let saved = ops::batch_norm(
                    &x,
                    Some(&mut rm),
                    Some(&mut rv),
                    w.as_ref(),
                    b.as_ref(),
                    training,
                    MOMENTUM,
                    EPS,
                )
                .unwrap()
                .saved;
                let g =
                    ops::batch_norm_backward(&dy, &x, &saved, w.as_ref(), GradMask::ALL).unwrap();
                let mut reference = case.reference(affine);
                let fwd = if training {
                    reference.forward_train(&case.x, &case.shape).unwrap()
                } else {
                    reference.forward_eval(&case.x, &case.shape).unwrap()
                };
                let want = reference.backward(&case.dy, &case.x, &case.shape, &fwd);
                let dx = g.dx.as_ref().expect("dx was asked for");
                assert_eq!(dx.shape(), &case.shape, "{what}: dx shape");
                assert_close(
                    &format!("{what}: dx"),
                    &values(dx),
                    &want.dx,
                    dx_atol(&case.gamma(affine), &fwd.invstd, case.max_abs_dy()),
                    DX_TOL,
                );
                let (dw_atol, db_atol) = case.param_atols(&fwd.mean, &fwd.invstd);
                assert_close(
                    &format!("{what}: dweight"),
                    &values(g.dweight.as_ref().expect("dweight was asked for")),
                    &want.dweight,
                    dw_atol,
                    0.0,
                );
                assert_close(
                    &format!("{what}: dbias"),
                    &values(g.dbias.as_ref().expect("dbias was asked for")),
                    &want.dbias,
                    db_atol,
                    0.0,
                );
            }
            // The mask: skipped outputs are None.
            let saved = ops::batch_norm(&x, None, None, None, None, true, MOMENTUM, EPS)
                .unwrap()
                .saved;
            let g = ops::batch_norm_backward(&dy, &x, &saved, None, GradMask::INPUT).unwrap();
            assert!(g.dx.is_some() && g.dweight.is_none() && g.dbias.is_none());
            let g = ops::batch_norm_backward(&dy, &x, &saved, None, GradMask::PARAMS).unwrap();
            assert!(g.dx.is_none() && g.dweight.is_some() && g.dbias.is_some());
        }
    });
}

// ---- the defining property: parts of a batch through the pieces = one call ----

/// How the parts' moments reach the gather.
#[derive(Clone, Copy)]
enum Exchange<'a> {
    /// The device form, as `batch_norm_stats` returned it.
    Device,
    /// Through the host form on the same context (`to_host`, then `from_host`).
    Host,
    /// Computed on another context, moved through the host form.
    From(&'a Context),
}

/// What a training forward + backward gives, read back.
struct Results {
    y: Vec<f32>,
    dx: Vec<f32>,
    dweight: Vec<f32>,
    dbias: Vec<f32>,
    mean: Vec<f32>,
    invstd: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
}

/// The dims and memory range of each part of `case` split along N into `sizes` (for both
/// layouts a part is a contiguous slice: N is outermost).
fn split(case: &Case, sizes: &[usize]) -> Vec<(Vec<usize>, Range<usize>)> {
    let dims = case.shape.dims();
    assert_eq!(sizes.iter().sum::<usize>(), dims[0], "split sizes");
    let row = case.shape.numel() / dims[0];
    let mut start = 0;
    sizes
        .iter()
        .map(|&n| {
            let mut d = dims.to_vec();
            d[0] = n;
            let r = start * row..(start + n) * row;
            start += n;
            (d, r)
        })
        .collect()
}

/// The parts through the pieces: per part stats, one gather over all parts (updating the
/// running statistics), per part elemt; per part backward_reduce, the host forms summed,
/// per part backward_elemt. γ and β are the case's.
fn run_pieces(ctx: &Context, case: &Case, sizes: &[usize], exchange: Exchange<'_>) -> Results {
    let layout = case.shape.layout();
    let parts = split(case, sizes);
    let on = |ctx: &Context, data: &[f32], (dims, r): &(Vec<usize>, Range<usize>)| {
        ctx.tensor_with_layout(&data[r.clone()], dims, layout)
            .unwrap()
    };
    let xs: Vec<Tensor> = parts.iter().map(|p| on(ctx, &case.x, p)).collect();
    let dys: Vec<Tensor> = parts.iter().map(|p| on(ctx, &case.dy, p)).collect();
    let via_host = |m: Moments| Moments::from_host(ctx, &m.to_host().unwrap()).unwrap();
    let moments: Vec<Moments> = match exchange {
        Exchange::Device => xs
            .iter()
            .map(|x| ops::batch_norm_stats(x).unwrap())
            .collect(),
        Exchange::Host => xs
            .iter()
            .map(|x| via_host(ops::batch_norm_stats(x).unwrap()))
            .collect(),
        Exchange::From(src) => parts
            .iter()
            .map(|p| via_host(ops::batch_norm_stats(&on(src, &case.x, p)).unwrap()))
            .collect(),
    };
    for (m, (dims, _)) in moments.iter().zip(&parts) {
        assert_eq!(
            m.count() as usize,
            dims[0] * case.shape.spatial(),
            "part count"
        );
        assert_eq!(m.context().id(), ctx.id(), "moments' context");
    }
    let (w, b) = case.params(ctx, true);
    let (mut rm, mut rv) = case.running(ctx);
    let saved = ops::batch_norm_gather_stats(
        &moments,
        EPS,
        Some(RunningStats {
            mean: &mut rm,
            var: &mut rv,
            momentum: MOMENTUM,
        }),
    )
    .unwrap();
    assert!(
        saved.is_batch_stats(),
        "gathered statistics are batch statistics"
    );
    let y = xs
        .iter()
        .flat_map(|x| values(&ops::batch_norm_elemt(x, &saved, w.as_ref(), b.as_ref()).unwrap()))
        .collect();
    let sums: Vec<GradSums> = xs
        .iter()
        .zip(&dys)
        .map(|(x, dy)| ops::batch_norm_backward_reduce(dy, x, &saved, GradMask::ALL).unwrap())
        .collect();
    let mut total = sums[0].to_host().unwrap();
    for s in &sums[1..] {
        total.add(&s.to_host().unwrap()).unwrap();
    }
    let summed = GradSums::from_host(ctx, &total).unwrap();
    let dx = xs
        .iter()
        .zip(&dys)
        .flat_map(|(x, dy)| {
            let dx =
                ops::batch_norm_backward_elemt(dy, x, &saved, w.as_ref(), &summed, case.count())
                    .unwrap();
            values(&dx)
        })
        .collect();
    // The parts' dγ and dβ summed in f64 (an all-reduce), then held as f32.
    let sum_of = |get: fn(&GradSums) -> Option<&Tensor>| {
        let mut acc = vec![0.0f64; case.channels()];
        for s in &sums {
            for (a, v) in acc.iter_mut().zip(values(get(s).expect("asked for"))) {
                *a += v as f64;
            }
        }
        acc.iter().map(|&v| v as f32).collect()
    };
    Results {
        y,
        dx,
        dweight: sum_of(GradSums::dweight),
        dbias: sum_of(GradSums::dbias),
        mean: saved.mean().unwrap(),
        invstd: saved.invstd().unwrap(),
        running_mean: values(&rm),
        running_var: values(&rv),
    }
}

/// One `batch_norm` (training) and one `batch_norm_backward` on the whole batch.
fn run_whole(ctx: &Context, case: &Case) -> Results {
    let (x, dy) = (case.x(ctx), case.dy(ctx));
    let (w, b) = case.params(ctx, true);
    let (mut rm, mut rv) = case.running(ctx);
    let out = ops::batch_norm(
        &x,
        Some(&mut rm),
        Some(&mut rv),
        w.as_ref(),
        b.as_ref(),
        true,
        MOMENTUM,
        EPS,
    )
    .unwrap();
    let g = ops::batch_norm_backward(&dy, &x, &out.saved, w.as_ref(), GradMask::ALL).unwrap();
    Results {
        y: values(&out.y),
        dx: values(g.dx.as_ref().unwrap()),
        dweight: values(g.dweight.as_ref().unwrap()),
        dbias: values(g.dbias.as_ref().unwrap()),
        mean: out.saved.mean().unwrap(),
        invstd: out.saved.invstd().unwrap(),
        running_mean: values(&rm),
        running_var: values(&rv),
    }
}

/// The pieces' results against one call's, within f32 rounding (see the file's head).
///
/// Both saved means are f32 roundings of means that agree far below one ulp: equal, or one
/// ulp apart where they straddle a rounding boundary. Where they differ by δ_c, y moves by
/// δ·|γ|·invstd; dx by δ·|γ|·invstd²·2·max|x̂|·max|dy| (x̂ moves by δ·invstd and
/// mean(dy·x̂) by δ·invstd·mean(dy)); dγ by δ·invstd·Σ|dy|. Those terms are added to the
/// tolerances; they are zero where the means agree, and matter only for large offsets.
#[track_caller]
fn assert_split_matches(what: &str, case: &Case, pieces: &Results, whole: &Results) {
    let c = case.channels();
    let gamma = widen(&case.weight);
    let (mean, invstd) = (widen(&whole.mean), widen(&whole.invstd));
    let delta: Vec<f64> = pieces
        .mean
        .iter()
        .zip(&whole.mean)
        .map(|(&a, &b)| (a as f64 - b as f64).abs())
        .collect();
    assert_close(
        &format!("{what}: saved mean"),
        &pieces.mean,
        &mean,
        MEAN_ATOL + max_of(mean.iter().map(|&m| ulp(m))),
        0.0,
    );
    assert_close(
        &format!("{what}: saved invstd"),
        &pieces.invstd,
        &invstd,
        0.0,
        VAR_RTOL,
    );
    assert_close(
        &format!("{what}: running_mean"),
        &pieces.running_mean,
        &widen(&whole.running_mean),
        MEAN_ATOL,
        MEAN_RTOL,
    );
    assert_close(
        &format!("{what}: running_var"),
        &pieces.running_var,
        &widen(&whole.running_var),
        0.0,
        VAR_RTOL,
    );
    let y_shift = max_of((0..c).map(|k| delta[k] * gamma[k].abs() * invstd[k]));
    assert_close(
        &format!("{what}: y"),
        &pieces.y,
        &widen(&whole.y),
        Y_ATOL + y_shift,
        Y_RTOL,
    );
    let max_dy = case.max_abs_dy();
    let max_xhat = case.max_xhat(&mean, &invstd);
    let dx_shift = max_of(
        (0..c).map(|k| delta[k] * gamma[k].abs() * invstd[k].powi(2) * 2.0 * max_xhat * max_dy),
    );
    assert_close(
        &format!("{what}: dx"),
        &pieces.dx,
        &widen(&whole.dx),
        dx_atol(&gamma, &invstd, max_dy) + dx_shift,
        DX_TOL,
    );
    let (dw_atol, db_atol) = case.param_atols(&mean, &invstd);
    let (_, sdy_abs) = case.term_scales(&mean);
    let dw_shift = max_of((0..c).map(|k| delta[k] * invstd[k] * sdy_abs[k]));
    assert_close(
        &format!("{what}: dweight"),
        &pieces.dweight,
        &widen(&whole.dweight),
        dw_atol + dw_shift,
        0.0,
    );
    assert_close(
        &format!("{what}: dbias"),
        &pieces.dbias,
        &widen(&whole.dbias),
        db_atol,
        0.0,
    );
}

/// A random shape of kind `i % 4`: rank 2; rank 4 channels-first; rank 4 channels-last;
/// rank 3 or 5 channels-first. At least two values per channel.
fn random_dims(rng: &mut SplitMix64, i: usize) -> (Vec<usize>, Layout) {
    let c = rng.range(1, 9);
    let (mut dims, layout) = match i % 4 {
        0 => (vec![rng.range(2, 40), c], Layout::ChannelsFirst),
        1 | 2 => {
            let dims = vec![rng.range(1, 9), c, rng.range(1, 6), rng.range(1, 6)];
            let layout = if i % 4 == 1 {
                Layout::ChannelsFirst
            } else {
                Layout::ChannelsLast
            };
            (dims, layout)
        }
        _ => {
            let n = rng.range(1, 9);
            let dims = if rng.range(0, 1) == 0 {
                vec![n, c, rng.range(1, 12)]
            } else {
                vec![n, c, rng.range(1, 4), rng.range(1, 4), rng.range(1, 4)]
            };
            (dims, Layout::ChannelsFirst)
        }
    };
    if dims[0] * dims[2..].iter().product::<usize>() < 2 {
        dims[0] = 2;
    }
    (dims, layout)
}

/// Sizes of k parts (k from 1 to 5) summing to n, empty parts included: the first cases
/// fixed (one part; the whole batch between empty parts; empty parts around a part of one
/// row), then k − 1 uniform cut points in 0..=n.
fn split_sizes(rng: &mut SplitMix64, n: usize, i: usize) -> Vec<usize> {
    match i {
        0 => vec![n],
        1 => vec![0, n, 0],
        2 => vec![0, 1, 0, n - 1],
        _ => {
            let k = rng.range(1, 5);
            let mut cuts: Vec<usize> = (1..k).map(|_| rng.range(0, n)).collect();
            cuts.sort_unstable();
            cuts.push(n);
            let mut prev = 0;
            cuts.into_iter()
                .map(|cut| {
                    let size = cut - prev;
                    prev = cut;
                    size
                })
                .collect()
        }
    }
}

/// `cases` random cases of data mean + std·N(0, 1) split at random, through the pieces
/// with `exchange` against one call; asserts that empty parts were among them.
fn check_random_splits(
    ctx: &Context,
    seed: u64,
    cases: usize,
    mean: f64,
    std: f64,
    exchange: Exchange<'_>,
) {
    let mut rng = SplitMix64(seed);
    let mut with_empty_part = 0;
    for i in 0..cases {
        let (dims, layout) = random_dims(&mut rng, i);
        let case = Case::new(&dims, layout, seed + i as u64, mean, std);
        let sizes = split_sizes(&mut rng, dims[0], i);
        with_empty_part += sizes.contains(&0) as usize;
        let what = format!("case {i}: {} split {sizes:?}", case.name());
        let pieces = run_pieces(ctx, &case, &sizes, exchange);
        let whole = run_whole(ctx, &case);
        assert_split_matches(&what, &case, &pieces, &whole);
    }
    assert!(
        with_empty_part >= 3,
        "only {with_empty_part} of {cases} cases had an empty part"
    );
}

#[test]
fn split_batch_through_the_pieces_matches_one_call() {
    on_every_backend("split_batch_through_the_pieces_matches_one_call", |ctx| {
        check_random_splits(ctx, 0x5EED, 16, 0.3, 1.5, Exchange::Device)
    });
}

/// Beyond the usual k ≤ 5: many parts (dozens, many empty) and channel counts past one
/// workgroup (256) in the gather and the per-part kernels.
#[test]
fn split_into_many_parts_with_many_channels_matches_one_call() {
    on_every_backend(
        "split_into_many_parts_with_many_channels_matches_one_call",
        |ctx| {
            let mut rng = SplitMix64(0x3A27);
            for (i, (dims, layout, parts)) in [
                (vec![40, 300], Layout::ChannelsFirst, 40),
                (vec![12, 257, 3, 1], Layout::ChannelsLast, 20),
                (vec![9, 260, 2], Layout::ChannelsFirst, 33),
            ]
            .into_iter()
            .enumerate()
            {
                let case = Case::new(&dims, layout, 500 + i as u64, 0.3, 1.5);
                let mut cuts: Vec<usize> = (1..parts).map(|_| rng.range(0, dims[0])).collect();
                cuts.sort_unstable();
                cuts.push(dims[0]);
                let sizes: Vec<usize> = std::iter::once(cuts[0])
                    .chain(cuts.windows(2).map(|w| w[1] - w[0]))
                    .collect();
                assert!(sizes.contains(&0), "{sizes:?}: no empty part");
                let what = format!("{} in {} parts", case.name(), sizes.len());
                let pieces = run_pieces(ctx, &case, &sizes, Exchange::Device);
                let whole = run_whole(ctx, &case);
                assert_split_matches(&what, &case, &pieces, &whole);
            }
        },
    );
}

/// Values 1e4 ± a few: the merge of the parts' moments keeps the variance (naive f32 sums
/// of squares would lose it: ε·1e8 ≈ 6 > σ² = 1); checked against one call and against
/// the f64 oracle.
#[test]
fn split_batch_with_large_offset_matches_one_call() {
    on_every_backend("split_batch_with_large_offset_matches_one_call", |ctx| {
        check_random_splits(ctx, 0x0FF5E7, 8, 1e4, 1.0, Exchange::Device);
        let mut rng = SplitMix64(0xB16);
        for (i, (dims, layout)) in [
            (vec![64, 5], Layout::ChannelsFirst),
            (vec![6, 4, 5, 3], Layout::ChannelsFirst),
            (vec![5, 3, 4, 4], Layout::ChannelsLast),
        ]
        .into_iter()
        .enumerate()
        {
            let case = Case::new(&dims, layout, 300 + i as u64, 1e4, 1.0);
            let sizes = split_sizes(&mut rng, dims[0], 3 + i);
            let what = format!("{} split {sizes:?}", case.name());
            let pieces = run_pieces(ctx, &case, &sizes, Exchange::Device);
            let mut reference = case.reference(true);
            let want = reference.forward_train(&case.x, &case.shape).unwrap();
            assert_close(
                &format!("{what}: saved invstd vs oracle"),
                &pieces.invstd,
                &want.invstd,
                0.0,
                VAR_RTOL,
            );
            assert_close(
                &format!("{what}: running_var vs oracle"),
                &pieces.running_var,
                &reference.running_var,
                0.0,
                VAR_RTOL,
            );
            assert_close(
                &format!("{what}: running_mean vs oracle"),
                &pieces.running_mean,
                &reference.running_mean,
                MEAN_ATOL,
                MEAN_RTOL,
            );
        }
    });
}

#[test]
fn split_batch_through_host_moments_matches_one_call() {
    on_every_backend("split_batch_through_host_moments_matches_one_call", |ctx| {
        check_random_splits(ctx, 0x4057, 12, 0.3, 1.5, Exchange::Host);
        check_random_splits(ctx, 0x4058, 6, 1e4, 1.0, Exchange::Host);
    });
}

/// `MomentsHost::merge` of the parts' host forms = the whole batch's moments: count
/// exactly; mean to 1e-5 absolute whatever the offset (the mean is held as a shift plus a
/// residual); M2 to VAR_RTOL; both also against the f64 two-pass statistics.
#[test]
fn host_moments_merge_matches_whole_batch() {
    on_every_backend("host_moments_merge_matches_whole_batch", |ctx| {
        let mut rng = SplitMix64(0x3E46E);
        for i in 0..12 {
            let (dims, layout) = random_dims(&mut rng, i);
            let offset = if i % 2 == 0 { 0.3 } else { 1e4 };
            let case = Case::new(&dims, layout, 400 + i as u64, offset, 1.5);
            let sizes = split_sizes(&mut rng, dims[0], i);
            let what = format!("case {i}: {} offset {offset} split {sizes:?}", case.name());
            let hosts: Vec<MomentsHost> = split(&case, &sizes)
                .iter()
                .map(|(d, r)| {
                    let x = ctx
                        .tensor_with_layout(&case.x[r.clone()], d, layout)
                        .unwrap();
                    ops::batch_norm_stats(&x).unwrap().to_host().unwrap()
                })
                .collect();
            let merged = MomentsHost::merge(&hosts).unwrap();
            let whole = ops::batch_norm_stats(&case.x(ctx))
                .unwrap()
                .to_host()
                .unwrap();
            let (mean, var) = batch_stats(&case.x, &case.shape);
            let m2: Vec<f64> = var.iter().map(|v| v * case.count() as f64).collect();
            assert_eq!(merged.count, case.count(), "{what}: merged count");
            assert_eq!(whole.count, case.count(), "{what}: whole count");
            for (name, h) in [("merged", &merged), ("whole", &whole)] {
                assert_close_f64(&format!("{what}: {name} mean"), &h.mean, &mean, 1e-5, 0.0);
                assert_close_f64(&format!("{what}: {name} m2"), &h.m2, &m2, 0.0, VAR_RTOL);
            }
        }
    });
}

/// Moments computed on another backend (the CPU for a GPU context; a GPU, else a second CPU
/// context, for the CPU context), moved through the host form into this context's gather.
#[test]
fn moments_from_another_backend_gather_like_local_ones() {
    on_every_backend(
        "moments_from_another_backend_gather_like_local_ones",
        |ctx| {
            let source = if ctx.backend_kind() == "cpu" {
                // GL only under the GL lock, which this body does not hold: another GPU.
                common::backends()
                    .iter()
                    .find(|c| !matches!(c.backend_kind(), "cpu" | "gl"))
                    .cloned()
                    .unwrap_or_else(Context::cpu)
            } else {
                Context::cpu()
            };
            assert_ne!(source.id(), ctx.id());
            check_random_splits(ctx, 0xC4055, 8, 0.3, 1.5, Exchange::From(&source));
        },
    );
}

// ---- bad input: a typed error, and nothing the caller owns changed ----

/// The error of a call that must fail (its message must render).
#[track_caller]
fn error_of<T: Debug>(r: wgpu_batchnorm::Result<T>) -> Error {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => {
            assert!(!e.to_string().is_empty());
            e
        }
    }
}

/// Running statistics to hand to calls that must fail, and their bits before.
struct Owned {
    mean: Tensor,
    var: Tensor,
    before: (Vec<u32>, Vec<u32>),
}

impl Owned {
    fn new(ctx: &Context, c: usize) -> Self {
        let mean = vector(ctx, &normal(c, 91, 0.0, 1.0));
        let var = vector(ctx, &normal(c, 92, 2.0, 0.1));
        let before = (bits(&mean), bits(&var));
        Self { mean, var, before }
    }

    fn stats(&mut self, momentum: f32) -> RunningStats<'_> {
        RunningStats {
            mean: &mut self.mean,
            var: &mut self.var,
            momentum,
        }
    }

    #[track_caller]
    fn assert_unchanged(&self, what: &str) {
        assert_eq!(
            (bits(&self.mean), bits(&self.var)),
            self.before,
            "{what}: a failing call changed the running statistics"
        );
    }
}

/// x (4, 3, 5), its dy, and training statistics for it.
fn valid_input(ctx: &Context) -> (Tensor, Tensor, SavedStats) {
    let x = random_tensor(ctx, &[4, 3, 5], 1);
    let dy = random_tensor(ctx, &[4, 3, 5], 2);
    let saved = ops::batch_norm(&x, None, None, None, None, true, MOMENTUM, EPS)
        .unwrap()
        .saved;
    (x, dy, saved)
}

#[test]
fn per_channel_tensors_of_wrong_length_fail() {
    on_every_backend("per_channel_tensors_of_wrong_length_fail", |ctx| {
        let (x, dy, saved) = valid_input(ctx);
        let good = vector(ctx, &[1.0; 3]);
        let long = vector(ctx, &[1.0; 4]);
        let column = ctx.tensor_from_slice(&[1.0; 3], &[3, 1]).unwrap();
        let length = |name| Error::ParameterLength {
            name,
            expected: 3,
            got: 4,
        };
        let mut run = Owned::new(ctx, 3);
        for training in [true, false] {
            let bn = |run: &mut Owned, w: &Tensor, b: &Tensor| {
                error_of(ops::batch_norm(
                    &x,
                    Some(&mut run.mean),
                    Some(&mut run.var),
                    Some(w),
                    Some(b),
                    training,
                    MOMENTUM,
                    EPS,
                ))
            };
            assert_eq!(bn(&mut run, &long, &good), length("weight"));
            assert_eq!(bn(&mut run, &good, &long), length("bias"));
            assert!(
                matches!(bn(&mut run, &column, &good), Error::ShapeMismatch { .. }),
                "a (3, 1) weight"
            );
            let mut long_stat = long.clone();
            let e = error_of(ops::batch_norm(
                &x,
                Some(&mut long_stat),
                Some(&mut run.var),
                None,
                None,
                training,
                MOMENTUM,
                EPS,
            ));
            assert_eq!(e, length("running_mean"));
            let e = error_of(ops::batch_norm(
                &x,
                Some(&mut run.mean),
                Some(&mut long_stat),
                None,
                None,
                training,
                MOMENTUM,
                EPS,
            ));
            assert_eq!(e, length("running_var"));
            assert_eq!(values(&long_stat), vec![1.0; 4]);
            run.assert_unchanged(&format!("batch_norm training {training}"));
        }
        let e = error_of(ops::batch_norm_elemt(&x, &saved, Some(&long), None));
        assert_eq!(e, length("weight"));
        let e = error_of(ops::batch_norm_elemt(&x, &saved, None, Some(&long)));
        assert_eq!(e, length("bias"));
        let e = error_of(ops::batch_norm_backward(
            &dy,
            &x,
            &saved,
            Some(&long),
            GradMask::ALL,
        ));
        assert_eq!(e, length("weight"));
        let sums = ops::batch_norm_backward_reduce(&dy, &x, &saved, GradMask::ALL).unwrap();
        let e = error_of(ops::batch_norm_backward_elemt(
            &dy,
            &x,
            &saved,
            Some(&long),
            &sums,
            20,
        ));
        assert_eq!(e, length("weight"));
        let moments = [ops::batch_norm_stats(&x).unwrap()];
        let mut long_stat = long.clone();
        let e = error_of(ops::batch_norm_gather_stats(
            &moments,
            EPS,
            Some(RunningStats {
                mean: &mut run.mean,
                var: &mut long_stat,
                momentum: MOMENTUM,
            }),
        ));
        assert_eq!(e, length("running_var"));
        run.assert_unchanged("gather");
    });
}

/// Context::cpu() makes a new context each call: tensors, statistics and sums of another
/// context are refused (on the CPU context: a second CPU context; on a GPU: the CPU).
#[test]
fn tensors_from_another_context_fail() {
    on_every_backend("tensors_from_another_context_fail", |ctx| {
        let other = Context::cpu();
        assert_ne!(other.id(), ctx.id());
        let mismatch = |what| Error::ContextMismatch {
            what,
            expected: ctx.id(),
            got: other.id(),
        };
        let (x, dy, saved) = valid_input(ctx);
        let (_, other_dy, other_saved) = valid_input(&other);
        let foreign = vector(&other, &[1.0; 3]);
        let mut run = Owned::new(ctx, 3);
        for training in [true, false] {
            let bn = |run: &mut Owned, w: Option<&Tensor>, b: Option<&Tensor>| {
                error_of(ops::batch_norm(
                    &x,
                    Some(&mut run.mean),
                    Some(&mut run.var),
                    w,
                    b,
                    training,
                    MOMENTUM,
                    EPS,
                ))
            };
            assert_eq!(bn(&mut run, Some(&foreign), None), mismatch("weight"));
            assert_eq!(bn(&mut run, None, Some(&foreign)), mismatch("bias"));
            let mut foreign_stat = foreign.clone();
            let e = error_of(ops::batch_norm(
                &x,
                Some(&mut run.mean),
                Some(&mut foreign_stat),
                None,
                None,
                training,
                MOMENTUM,
                EPS,
            ));
            assert_eq!(e, mismatch("running_var"));
            run.assert_unchanged(&format!("batch_norm training {training}"));
        }
        let e = error_of(ops::batch_norm_backward(
            &other_dy,
            &x,
            &saved,
            None,
            GradMask::ALL,
        ));
        assert_eq!(e, mismatch("dy"));
        let e = error_of(ops::batch_norm_backward_reduce(
            &other_dy,
            &x,
            &saved,
            GradMask::ALL,
        ));
        assert_eq!(e, mismatch("dy"));
        let e = error_of(ops::batch_norm_elemt(&x, &other_saved, None, None));
        assert_eq!(e, mismatch("saved statistics"));
        let e = error_of(ops::batch_norm_backward(
            &dy,
            &x,
            &other_saved,
            None,
            GradMask::ALL,
        ));
        assert_eq!(e, mismatch("saved statistics"));
        let other_sums = GradSums::from_host(
            &other,
            &GradSumsHost {
                sum_dy: vec![0.0; 3],
                sum_dy_xmu: vec![0.0; 3],
            },
        )
        .unwrap();
        let e = error_of(ops::batch_norm_backward_elemt(
            &dy,
            &x,
            &saved,
            None,
            &other_sums,
            20,
        ));
        assert_eq!(e, mismatch("gradient sums"));
        let mine = ops::batch_norm_stats(&x).unwrap();
        let theirs = ops::batch_norm_stats(&random_tensor(&other, &[4, 3, 5], 3)).unwrap();
        let e = error_of(ops::batch_norm_gather_stats(
            &[mine.clone(), theirs],
            EPS,
            Some(run.stats(MOMENTUM)),
        ));
        assert_eq!(e, mismatch("moments"));
        let mut foreign_stat = foreign.clone();
        let e = error_of(ops::batch_norm_gather_stats(
            &[mine],
            EPS,
            Some(RunningStats {
                mean: &mut foreign_stat,
                var: &mut run.var,
                momentum: MOMENTUM,
            }),
        ));
        assert_eq!(e, mismatch("running_mean"));
        assert_eq!(values(&foreign_stat), vec![1.0; 3]);
        run.assert_unchanged("gather");
    });
}

#[test]
fn running_mean_without_running_var_fails() {
    on_every_backend("running_mean_without_running_var_fails", |ctx| {
        let (x, _, _) = valid_input(ctx);
        let mut run = Owned::new(ctx, 3);
        for training in [true, false] {
            for mean_only in [true, false] {
                let (m, v) = if mean_only {
                    (Some(&mut run.mean), None)
                } else {
                    (None, Some(&mut run.var))
                };
                let e = error_of(ops::batch_norm(
                    &x, m, v, None, None, training, MOMENTUM, EPS,
                ));
                assert!(
                    matches!(
                        e,
                        Error::InvalidArgument {
                            op: "batch_norm",
                            ..
                        }
                    ),
                    "training {training} mean only {mean_only}: {e:?}"
                );
            }
        }
        run.assert_unchanged("batch_norm");
    });
}

#[test]
fn invalid_eps_fails() {
    on_every_backend("invalid_eps_fails", |ctx| {
        let (x, _, _) = valid_input(ctx);
        let moments = [ops::batch_norm_stats(&x).unwrap()];
        let mut run = Owned::new(ctx, 3);
        for eps in [0.0, -1e-5, f32::NAN, f32::INFINITY] {
            let same =
                |e: &Error| matches!(e, Error::InvalidEps(v) if v.to_bits() == eps.to_bits());
            for training in [true, false] {
                let e = error_of(ops::batch_norm(
                    &x,
                    Some(&mut run.mean),
                    Some(&mut run.var),
                    None,
                    None,
                    training,
                    MOMENTUM,
                    eps,
                ));
                assert!(same(&e), "batch_norm eps {eps}: {e:?}");
            }
            let e = error_of(ops::batch_norm_gather_stats(
                &moments,
                eps,
                Some(run.stats(MOMENTUM)),
            ));
            assert!(same(&e), "gather eps {eps}: {e:?}");
        }
        run.assert_unchanged("eps");
    });
}

#[test]
fn invalid_momentum_fails() {
    on_every_backend("invalid_momentum_fails", |ctx| {
        let (x, _, _) = valid_input(ctx);
        let moments = [ops::batch_norm_stats(&x).unwrap()];
        let mut run = Owned::new(ctx, 3);
        for momentum in [-0.1, 1.5, f32::NAN, f32::INFINITY] {
            let same = |e: &Error| matches!(e, Error::InvalidMomentum(v) if v.to_bits() == momentum.to_bits());
            let e = error_of(ops::batch_norm(
                &x,
                Some(&mut run.mean),
                Some(&mut run.var),
                None,
                None,
                true,
                momentum,
                EPS,
            ));
            assert!(same(&e), "batch_norm momentum {momentum}: {e:?}");
            let e = error_of(ops::batch_norm_gather_stats(
                &moments,
                EPS,
                Some(run.stats(momentum)),
            ));
            assert!(same(&e), "gather momentum {momentum}: {e:?}");
        }
        run.assert_unchanged("momentum");
    });
}

#[test]
fn rank_outside_two_to_five_fails() {
    on_every_backend("rank_outside_two_to_five_fails", |ctx| {
        let (_, _, saved) = valid_input(ctx);
        let mut run = Owned::new(ctx, 3);
        let sums = GradSums::from_host(
            ctx,
            &GradSumsHost {
                sum_dy: vec![0.0; 3],
                sum_dy_xmu: vec![0.0; 3],
            },
        )
        .unwrap();
        for dims in [vec![3], vec![2, 3, 1, 1, 1, 2]] {
            let x = random_tensor(ctx, &dims, 4);
            let rank = Error::InvalidRank {
                shape: dims.clone(),
            };
            for training in [true, false] {
                let e = error_of(ops::batch_norm(
                    &x,
                    Some(&mut run.mean),
                    Some(&mut run.var),
                    None,
                    None,
                    training,
                    MOMENTUM,
                    EPS,
                ));
                assert_eq!(e, rank, "batch_norm training {training}");
            }
            assert_eq!(error_of(ops::batch_norm_stats(&x)), rank, "stats");
            assert_eq!(
                error_of(ops::batch_norm_elemt(&x, &saved, None, None)),
                rank,
                "elemt"
            );
            let e = error_of(ops::batch_norm_backward_reduce(
                &x,
                &x,
                &saved,
                GradMask::ALL,
            ));
            assert_eq!(e, rank, "backward_reduce");
            let e = error_of(ops::batch_norm_backward_elemt(
                &x, &x, &saved, None, &sums, 20,
            ));
            assert_eq!(e, rank, "backward_elemt");
            let e = error_of(ops::batch_norm_backward(
                &x,
                &x,
                &saved,
                None,
                GradMask::ALL,
            ));
            assert_eq!(e, rank, "backward");
        }
        run.assert_unchanged("rank");
    });
}

#[test]
fn one_value_per_channel_in_training_fails() {
    on_every_backend("one_value_per_channel_in_training_fails", |ctx| {
        let mut run = Owned::new(ctx, 3);
        for dims in [vec![1, 3], vec![1, 3, 1, 1]] {
            let x = random_tensor(ctx, &dims, 5);
            let e = error_of(ops::batch_norm(
                &x,
                Some(&mut run.mean),
                Some(&mut run.var),
                None,
                None,
                true,
                MOMENTUM,
                EPS,
            ));
            assert_eq!(
                e,
                Error::TooFewValuesPerChannel {
                    shape: dims.clone()
                }
            );
            run.assert_unchanged(&format!("{dims:?}"));
            // Inference and the moments of such a part are fine.
            let y = ops::batch_norm(
                &x,
                Some(&mut run.mean),
                Some(&mut run.var),
                None,
                None,
                false,
                MOMENTUM,
                EPS,
            )
            .unwrap()
            .y;
            assert_eq!(y.dims(), &dims[..]);
            assert_eq!(ops::batch_norm_stats(&x).unwrap().count(), 1);
        }
        run.assert_unchanged("after inference");
    });
}

#[test]
fn gather_rejects_bad_parts() {
    on_every_backend("gather_rejects_bad_parts", |ctx| {
        let mut run = Owned::new(ctx, 3);
        let e = error_of(ops::batch_norm_gather_stats(
            &[],
            EPS,
            Some(run.stats(MOMENTUM)),
        ));
        assert!(
            matches!(
                e,
                Error::InvalidArgument {
                    op: "batch_norm_gather_stats",
                    ..
                }
            ),
            "no parts: {e:?}"
        );
        let three = ops::batch_norm_stats(&random_tensor(ctx, &[4, 3], 6)).unwrap();
        let four = ops::batch_norm_stats(&random_tensor(ctx, &[4, 4], 7)).unwrap();
        let e = error_of(ops::batch_norm_gather_stats(
            &[three.clone(), four],
            EPS,
            Some(run.stats(MOMENTUM)),
        ));
        assert_eq!(
            e,
            Error::ChannelMismatch {
                expected: 3,
                got: 4,
                shape: vec![4, 4]
            }
        );
        let one = ops::batch_norm_stats(&random_tensor(ctx, &[1, 3], 8)).unwrap();
        let none = ops::batch_norm_stats(&ctx.tensor_from_slice(&[], &[0, 3]).unwrap()).unwrap();
        for parts in [vec![one.clone()], vec![none.clone(), one, none]] {
            let e = error_of(ops::batch_norm_gather_stats(
                &parts,
                EPS,
                Some(run.stats(MOMENTUM)),
            ));
            assert_eq!(e, Error::TooFewValuesPerChannel { shape: vec![1, 3] });
        }
        run.assert_unchanged("gather");
        // Without running statistics too.
        let e = error_of(ops::batch_norm_gather_stats(&[], EPS, None));
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
        assert!(ops::batch_norm_gather_stats(&[three], EPS, None).is_ok());
    });
}

#[test]
fn saved_stats_of_other_channels_fail() {
    on_every_backend("saved_stats_of_other_channels_fail", |ctx| {
        let (x3, _, saved_forward) = valid_input(ctx);
        let gathered =
            ops::batch_norm_gather_stats(&[ops::batch_norm_stats(&x3).unwrap()], EPS, None)
                .unwrap();
        let x4 = random_tensor(ctx, &[4, 4, 5], 9);
        let dy4 = random_tensor(ctx, &[4, 4, 5], 10);
        let sums4 = GradSums::from_host(
            ctx,
            &GradSumsHost {
                sum_dy: vec![0.0; 4],
                sum_dy_xmu: vec![0.0; 4],
            },
        )
        .unwrap();
        for (kind, saved, expected_shape) in [
            ("forward", &saved_forward, vec![4, 3, 5]),
            ("gathered", &gathered, vec![0, 3]),
        ] {
            let mismatch = Error::SavedStatsMismatch {
                expected_channels: 3,
                expected_shape,
                got: vec![4, 4, 5],
            };
            let e = error_of(ops::batch_norm_elemt(&x4, saved, None, None));
            assert_eq!(e, mismatch, "{kind}: elemt");
            let e = error_of(ops::batch_norm_backward_reduce(
                &dy4,
                &x4,
                saved,
                GradMask::ALL,
            ));
            assert_eq!(e, mismatch, "{kind}: backward_reduce");
            let e = error_of(ops::batch_norm_backward_elemt(
                &dy4, &x4, saved, None, &sums4, 20,
            ));
            assert_eq!(e, mismatch, "{kind}: backward_elemt");
            let e = error_of(ops::batch_norm_backward(
                &dy4,
                &x4,
                saved,
                None,
                GradMask::ALL,
            ));
            assert_eq!(e, mismatch, "{kind}: backward");
        }
        // The one-call backward insists on the forward's own input; the pieces take any
        // part with the same channels.
        let x_other = random_tensor(ctx, &[6, 3, 5], 11);
        let e = error_of(ops::batch_norm_backward(
            &x_other,
            &x_other,
            &saved_forward,
            None,
            GradMask::ALL,
        ));
        assert_eq!(
            e,
            Error::SavedStatsMismatch {
                expected_channels: 3,
                expected_shape: vec![4, 3, 5],
                got: vec![6, 3, 5]
            }
        );
        assert!(ops::batch_norm_elemt(&x_other, &saved_forward, None, None).is_ok());
    });
}

#[test]
fn dy_of_another_shape_fails() {
    on_every_backend("dy_of_another_shape_fails", |ctx| {
        let (x, _, saved) = valid_input(ctx);
        let sums = ops::batch_norm_backward_reduce(&x, &x, &saved, GradMask::ALL).unwrap();
        let longer = random_tensor(ctx, &[4, 3, 6], 12);
        let other_layout = ctx
            .tensor_with_layout(&normal(60, 13, 0.0, 1.0), &[4, 3, 5], Layout::ChannelsLast)
            .unwrap();
        for (kind, dy) in [("longer", &longer), ("channels-last", &other_layout)] {
            let mismatch = |e: &Error| {
                matches!(e, Error::ShapeMismatch { expected, got, .. }
                    if expected == &[4, 3, 5] && got == dy.dims())
            };
            let e = error_of(ops::batch_norm_backward_reduce(
                dy,
                &x,
                &saved,
                GradMask::ALL,
            ));
            assert!(mismatch(&e), "{kind}: backward_reduce: {e:?}");
            let e = error_of(ops::batch_norm_backward_elemt(
                dy, &x, &saved, None, &sums, 20,
            ));
            assert!(mismatch(&e), "{kind}: backward_elemt: {e:?}");
            let e = error_of(ops::batch_norm_backward(
                dy,
                &x,
                &saved,
                None,
                GradMask::ALL,
            ));
            assert!(mismatch(&e), "{kind}: backward: {e:?}");
        }
    });
}

#[test]
fn grad_sums_of_other_channels_fail() {
    on_every_backend("grad_sums_of_other_channels_fail", |ctx| {
        let (x, dy, saved) = valid_input(ctx);
        let x4 = random_tensor(ctx, &[4, 4, 5], 14);
        let saved4 = ops::batch_norm(&x4, None, None, None, None, true, MOMENTUM, EPS)
            .unwrap()
            .saved;
        let reduced4 = ops::batch_norm_backward_reduce(&x4, &x4, &saved4, GradMask::ALL).unwrap();
        let host4 = GradSums::from_host(
            ctx,
            &GradSumsHost {
                sum_dy: vec![0.0; 4],
                sum_dy_xmu: vec![0.0; 4],
            },
        )
        .unwrap();
        for sums in [&reduced4, &host4] {
            let e = error_of(ops::batch_norm_backward_elemt(
                &dy, &x, &saved, None, sums, 20,
            ));
            assert_eq!(
                e,
                Error::ChannelMismatch {
                    expected: 4,
                    got: 3,
                    shape: vec![4, 3, 5]
                }
            );
        }
    });
}

#[test]
fn total_count_below_part_count_fails() {
    on_every_backend("total_count_below_part_count_fails", |ctx| {
        let (x, dy, saved) = valid_input(ctx);
        let sums = ops::batch_norm_backward_reduce(&dy, &x, &saved, GradMask::ALL).unwrap();
        for total in [0, 1, 19] {
            let e = error_of(ops::batch_norm_backward_elemt(
                &dy, &x, &saved, None, &sums, total,
            ));
            assert!(
                matches!(
                    e,
                    Error::InvalidArgument {
                        op: "batch_norm_backward_elemt",
                        ..
                    }
                ),
                "total_count {total}: {e:?}"
            );
        }
        // This part's own count (4·5 = 20 per channel) and more are fine.
        for total in [20, 21, 1000] {
            assert!(ops::batch_norm_backward_elemt(&dy, &x, &saved, None, &sums, total).is_ok());
        }
    });
}

#[test]
fn host_forms_of_different_lengths_fail() {
    on_every_backend("host_forms_of_different_lengths_fail", |ctx| {
        let moments = |mean: usize, m2: usize| MomentsHost {
            count: 4,
            mean: vec![0.5; mean],
            m2: vec![1.0; m2],
        };
        let e = error_of(Moments::from_host(ctx, &moments(3, 2)));
        assert_eq!(
            e,
            Error::ParameterLength {
                name: "m2",
                expected: 3,
                got: 2
            }
        );
        let e = error_of(Moments::from_host(ctx, &moments(2, 3)));
        assert!(matches!(e, Error::ParameterLength { .. }), "{e:?}");
        let e = error_of(Moments::from_host(ctx, &moments(0, 0)));
        assert_eq!(e, Error::InvalidNumFeatures(0));
        let e = error_of(MomentsHost::merge(&[moments(3, 3), moments(2, 2)]));
        assert!(matches!(e, Error::ParameterLength { .. }), "merge: {e:?}");

        let e = error_of(GradSums::from_host(
            ctx,
            &GradSumsHost {
                sum_dy: vec![0.0; 3],
                sum_dy_xmu: vec![0.0; 2],
            },
        ));
        assert_eq!(
            e,
            Error::ParameterLength {
                name: "sum_dy_xmu",
                expected: 3,
                got: 2
            }
        );
        let mut total = GradSumsHost {
            sum_dy: vec![1.0; 3],
            sum_dy_xmu: vec![2.0; 3],
        };
        let before = total.clone();
        let e = error_of(total.add(&GradSumsHost {
            sum_dy: vec![1.0; 2],
            sum_dy_xmu: vec![2.0; 2],
        }));
        assert!(matches!(e, Error::ParameterLength { .. }), "add: {e:?}");
        assert_eq!(total, before, "a failing add changed the sums");
    });
}
