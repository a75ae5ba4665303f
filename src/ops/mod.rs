//! The functional API: PyTorch's batch-norm pieces, on every backend.
//!
//! - [`batch_norm`] / [`batch_norm_backward`]: one call each way, with
//!   `torch.nn.functional.batch_norm`'s semantics (and `native_batch_norm_backward`'s).
//! - The pieces `nn.SyncBatchNorm` is made of, so that a communicator can stand between them:
//!   [`batch_norm_stats`] → (exchange [`Moments`]) → [`batch_norm_gather_stats`] →
//!   [`batch_norm_elemt`]; backward [`batch_norm_backward_reduce`] → (sum [`GradSums`]) →
//!   [`batch_norm_backward_elemt`].
//!
//! The defining property, tested on every backend: a batch split into parts of any sizes
//! (empty parts included), run through the pieces, gives the y, running statistics, dx, dγ
//! and dβ of one call on the whole batch, within f32 rounding.
//!
//! Every op validates its inputs first and returns a typed [`Error`] without changing
//! anything the caller owns. Only the running statistics are written in place (as PyTorch
//! does); a running-statistics tensor whose values are shared with a clone gets fresh
//! storage first, so the clone keeps the old values (tensors are values).
//!
//! ```no_run
//! use wgpu_batchnorm::{ops, Context, GradMask};
//!
//! # fn main() -> Result<(), wgpu_batchnorm::Error> {
//! let ctx = Context::new().unwrap_or_else(|_| Context::cpu());
//! let x = ctx.tensor_from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2])?;
//! let (mut mean, mut var) = (ctx.tensor_from_slice(&[0.0; 2], &[2])?, ctx.tensor_from_slice(&[1.0; 2], &[2])?);
//! let out = ops::batch_norm(&x, Some(&mut mean), Some(&mut var), None, None, true, 0.1, 1e-5)?;
//! let dy = ctx.tensor_from_slice(&[1.0; 6], &[3, 2])?;
//! let grads = ops::batch_norm_backward(&dy, &x, &out.saved, None, GradMask::ALL)?;
//! # let _ = grads;
//! # Ok(())
//! # }
//! ```

mod types;

pub use types::{
    ForwardOutput, GradMask, GradSums, GradSumsHost, Gradients, Moments, MomentsHost,
    ReluGradients, RunningStats, SavedStats,
};

use crate::backend::{Epilogue, EpilogueGrad, Summaries};
use crate::config::{validate_eps, validate_momentum};
use crate::context::{Context, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shape::Shape;

/// Checks an optional per-channel tensor: same context, shape (C), float32 (parameters and
/// running statistics stay f32 under a half input, as in PyTorch's mixed type).
fn check_param(ctx: &Context, t: Option<&Tensor>, name: &'static str, c: usize) -> Result<()> {
    let Some(t) = t else { return Ok(()) };
    ctx.check_same(name, t.context().id())?;
    if t.dtype() != DType::F32 {
        return Err(Error::DTypeMismatch {
            what: "per-channel tensors (weight, bias, running statistics) are float32",
            expected: DType::F32,
            got: t.dtype(),
        });
    }
    if t.numel() != c {
        return Err(Error::ParameterLength {
            name,
            expected: c,
            got: t.numel(),
        });
    }
    if t.dims().len() != 1 {
        return Err(Error::ShapeMismatch {
            what: "per-channel tensors are 1-D",
            expected: vec![c],
            got: t.dims().to_vec(),
        });
    }
    Ok(())
}

/// Checks x: rank 2 to 5; and, with `batch_stats`, more than one value per channel.
fn check_input(x: &Tensor, batch_stats: bool) -> Result<()> {
    x.shape().check_rank()?;
    if batch_stats && x.shape().batch() * x.shape().spatial() == 1 {
        return Err(Error::TooFewValuesPerChannel {
            shape: x.dims().to_vec(),
        });
    }
    Ok(())
}

/// Checks dy against x: same context, same shape and layout.
fn check_dy(x: &Tensor, dy: &Tensor) -> Result<()> {
    check_like(x, dy, "dy", "dy must have the shape and layout of x")
}

/// Checks a tensor that pairs with x value for value (dy, a residual, a fused output):
/// same context, same shape and layout, same dtype.
fn check_like(x: &Tensor, t: &Tensor, name: &'static str, what: &'static str) -> Result<()> {
    x.context().check_same(name, t.context().id())?;
    if t.shape() != x.shape() {
        return Err(Error::ShapeMismatch {
            what,
            expected: x.dims().to_vec(),
            got: t.dims().to_vec(),
        });
    }
    if t.dtype() != x.dtype() {
        return Err(Error::DTypeMismatch {
            what: match name {
                "dy" => "dy must have the dtype of x",
                "residual" => "the residual must have the dtype of x",
                _ => "y (the fused forward's output) must have the dtype of x",
            },
            expected: x.dtype(),
            got: t.dtype(),
        });
    }
    Ok(())
}

fn check_running(ctx: &Context, running: &Option<RunningStats<'_>>, c: usize) -> Result<()> {
    if let Some(r) = running {
        validate_momentum(r.momentum)?;
        check_param(ctx, Some(r.mean), "running_mean", c)?;
        check_param(ctx, Some(r.var), "running_var", c)?;
    }
    Ok(())
}

/// Pairs up PyTorch's two optional running-statistics arguments.
fn running_pair<'a>(
    op: &'static str,
    mean: Option<&'a mut Tensor>,
    var: Option<&'a mut Tensor>,
    momentum: f32,
) -> Result<Option<RunningStats<'a>>> {
    match (mean, var) {
        (Some(mean), Some(var)) => Ok(Some(RunningStats {
            mean,
            var,
            momentum,
        })),
        (None, None) => Ok(None),
        _ => Err(Error::InvalidArgument {
            op,
            reason: "running_mean and running_var must be given together".into(),
        }),
    }
}

/// `torch.nn.functional.batch_norm`: normalizes x per channel (dim 1) and scales and
/// shifts by `weight` (γ) and `bias` (β) where given.
///
/// - `training = true`: batch statistics (mean, biased variance); when running statistics
///   are given they are updated in place: `running = (1 − momentum)·running +
///   momentum·batch`, with the unbiased variance. An empty batch updates nothing.
/// - `training = false`: the running statistics, which must then be given
///   ([`Error::NoRunningStats`] otherwise; PyTorch's layers pass `training = true` when they
///   track none, and so does [`BatchNorm`](crate::BatchNorm)).
///
/// Returns y and the statistics the backward needs.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm(
    x: &Tensor,
    running_mean: Option<&mut Tensor>,
    running_var: Option<&mut Tensor>,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    training: bool,
    momentum: f32,
    eps: f32,
) -> Result<ForwardOutput> {
    let running = running_pair("batch_norm", running_mean, running_var, momentum)?;
    let (y, saved) = forward(x, running, weight, bias, training, eps, true)?;
    Ok(ForwardOutput {
        y: y.expect("y was asked for"),
        saved,
    })
}

/// Batch norm fused with a ReLU, and with the add of a residual before it:
/// y = relu(batch_norm(x, …) + z), z = `residual` of x's shape and layout, or
/// y = relu(batch_norm(x, …)) without one ([`batch_norm`]). cuDNN's `CUDNN_BATCHNORM_OPS_BN_ACTIVATION` and
/// `…_BN_ADD_ACTIVATION`, as in a ResNet block's `relu(bn(conv(x)) + identity)`.
///
/// The arguments and the statistics are [`batch_norm`]'s; the add and the ReLU happen in
/// the pass that writes y (no more passes over the tensor than plain batch norm, plus the
/// read of z). The ReLU keeps NaN, as `torch.relu` does. Backward:
/// [`batch_norm_relu_backward`] with this y.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_relu(
    x: &Tensor,
    residual: Option<&Tensor>,
    running_mean: Option<&mut Tensor>,
    running_var: Option<&mut Tensor>,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    training: bool,
    momentum: f32,
    eps: f32,
) -> Result<ForwardOutput> {
    let running = running_pair("batch_norm_relu", running_mean, running_var, momentum)?;
    let epi = Epilogue {
        residual,
        relu: true,
    };
    let (y, saved) = forward_fused(x, running, weight, bias, training, eps, Some(epi))?;
    Ok(ForwardOutput {
        y: y.expect("y was asked for"),
        saved,
    })
}

/// A forward; `with_y = false` computes only the saved statistics (no pass writing y).
pub(crate) fn forward(
    x: &Tensor,
    running: Option<RunningStats<'_>>,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    training: bool,
    eps: f32,
    with_y: bool,
) -> Result<(Option<Tensor>, SavedStats)> {
    let epi = with_y.then_some(Epilogue::NONE);
    forward_fused(x, running, weight, bias, training, eps, epi)
}

/// [`forward`] with y and its epilogue when `epi` is given, only the statistics without.
pub(crate) fn forward_fused(
    x: &Tensor,
    running: Option<RunningStats<'_>>,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    training: bool,
    eps: f32,
    epi: Option<Epilogue<'_>>,
) -> Result<(Option<Tensor>, SavedStats)> {
    let ctx = x.context();
    let with_y = epi.is_some();
    let epi = epi.unwrap_or_default();
    validate_eps(eps)?;
    check_input(x, training)?;
    if let Some(z) = epi.residual {
        check_like(
            x,
            z,
            "residual",
            "the residual must have the shape and layout of x",
        )?;
    }
    let c = x.shape().channels();
    check_param(ctx, weight, "weight", c)?;
    check_param(ctx, bias, "bias", c)?;
    check_running(ctx, &running, c)?;
    let k = ctx.kernels();
    let mut batch = k.begin()?;
    let (saved, y) = if training && with_y {
        let (saved, y) = k.train_forward(&mut batch, x, eps, running, weight, bias, epi)?;
        (saved, Some(y))
    } else {
        let saved = if training {
            k.batch_stats(&mut batch, x, eps, running)?
        } else {
            let Some(r) = running else {
                return Err(Error::NoRunningStats {
                    op: "batch_norm with training = false",
                });
            };
            k.running_stats(&mut batch, r.mean, r.var, eps)?
        };
        let y = if with_y {
            Some(k.elemt(&mut batch, x, &saved, weight, bias, epi)?)
        } else {
            None
        };
        (saved, y)
    };
    k.submit(batch)?;
    Ok((
        y.map(|y| Tensor::typed(ctx, x.shape().clone(), y, x.dtype())),
        SavedStats::new(ctx, c, Some(x.shape().clone()), training, saved),
    ))
}

/// Backward of [`batch_norm`] (PyTorch's `native_batch_norm_backward`): the gradients of
/// Σ y·dy with respect to x, γ and β that `mask` asks for. `saved` selects the formula:
/// batch statistics (training) differentiate through the mean and variance; running
/// statistics are constants (dx = dy·γ·invstd).
pub fn batch_norm_backward(
    dy: &Tensor,
    x: &Tensor,
    saved: &SavedStats,
    weight: Option<&Tensor>,
    mask: GradMask,
) -> Result<Gradients> {
    let g = backward_fused(dy, x, saved, weight, mask, EpilogueGrad::NONE)?;
    Ok(Gradients {
        dx: g.dx,
        dweight: g.dweight,
        dbias: g.dbias,
    })
}

/// Backward of [`batch_norm_relu`], as PyTorch's autograd computes it for
/// `relu(batch_norm(x, …) + z)`: the ReLU passes dy where the fused output `y` is > 0
/// (threshold_backward on the result), g = dy·\[y > 0\]; then dx, dγ, dβ are
/// [`batch_norm_backward`]'s of g (as `mask` asks), and with `residual` (the forward added
/// one) dz = g. The mask is read from y as dy is, in the same passes.
pub fn batch_norm_relu_backward(
    dy: &Tensor,
    y: &Tensor,
    x: &Tensor,
    saved: &SavedStats,
    weight: Option<&Tensor>,
    residual: bool,
    mask: GradMask,
) -> Result<ReluGradients> {
    check_like(
        x,
        y,
        "y",
        "y (the fused forward's output) must have the shape and layout of x",
    )?;
    let epi = EpilogueGrad {
        relu_y: Some(y),
        dz: residual,
    };
    backward_fused(dy, x, saved, weight, mask, epi)
}

/// [`batch_norm_backward`] with the backward of an epilogue.
fn backward_fused(
    dy: &Tensor,
    x: &Tensor,
    saved: &SavedStats,
    weight: Option<&Tensor>,
    mask: GradMask,
    epi: EpilogueGrad<'_>,
) -> Result<ReluGradients> {
    let ctx = x.context();
    check_input(x, false)?;
    check_dy(x, dy)?;
    saved.check_for(x, true)?;
    let c = x.shape().channels();
    check_param(ctx, weight, "weight", c)?;
    let k = ctx.kernels();
    let mut batch = k.begin()?;
    let g = k.backward(
        &mut batch,
        dy,
        x,
        &saved.data,
        weight,
        saved.is_batch_stats(),
        (mask.input, mask.weight, mask.bias),
        epi,
    )?;
    k.submit(batch)?;
    let per_channel = |d| Tensor::new(ctx, Shape::new(&[c]).expect("rank 1"), d);
    let like_x = |d| Tensor::typed(ctx, x.shape().clone(), d, x.dtype());
    Ok(ReluGradients {
        dx: g.dx.map(like_x),
        dweight: g.dweight.map(per_channel),
        dbias: g.dbias.map(per_channel),
        dz: g.dz.map(like_x),
    })
}

/// Per-channel moments (count, mean, M2) of x, in a form that merges exactly with other
/// parts' ([`batch_norm_gather_stats`]). PyTorch's `batch_norm_stats`, which returns
/// (mean, invstd) instead: that loses precision and cannot merge unequal counts exactly.
pub fn batch_norm_stats(x: &Tensor) -> Result<Moments> {
    check_input(x, false)?;
    let ctx = x.context();
    let k = ctx.kernels();
    let mut batch = k.begin()?;
    let data = k.moments(&mut batch, x)?;
    k.submit(batch)?;
    Ok(Moments::new(
        ctx,
        x.shape().channels(),
        x.shape().view().per_channel() as u64,
        data,
    ))
}

/// Merges the moments of the parts of a batch, in the order given (so the result is
/// deterministic), into the statistics [`batch_norm_elemt`] normalizes with, and updates
/// `running` (when given) with the unbiased variance of the merged count: PyTorch's
/// `batch_norm_gather_stats_with_counts`, with counts as u64. An empty merged batch saves
/// zeros and updates nothing; one value per channel in all is
/// [`Error::TooFewValuesPerChannel`].
pub fn batch_norm_gather_stats(
    parts: &[Moments],
    eps: f32,
    running: Option<RunningStats<'_>>,
) -> Result<SavedStats> {
    let Some(first) = parts.first() else {
        return Err(Error::InvalidArgument {
            op: "batch_norm_gather_stats",
            reason: "no moments to gather".into(),
        });
    };
    let ctx = first.context();
    let c = first.channels();
    validate_eps(eps)?;
    for m in parts {
        ctx.check_same("moments", m.context().id())?;
        if m.channels() != c {
            return Err(Error::ChannelMismatch {
                expected: c,
                got: m.channels(),
                shape: vec![m.count() as usize, m.channels()],
            });
        }
    }
    let total: u64 = parts.iter().map(Moments::count).sum();
    if total == 1 {
        return Err(Error::TooFewValuesPerChannel { shape: vec![1, c] });
    }
    check_running(ctx, &running, c)?;
    let k = ctx.kernels();
    let mut batch = k.begin()?;
    let list: Vec<(&Summaries, u64)> = parts.iter().map(|m| (&m.data, m.count())).collect();
    let saved = k.gather(&mut batch, &list, c, eps, running)?;
    k.submit(batch)?;
    Ok(SavedStats::new(ctx, c, None, true, saved))
}

/// y = (x − mean)·γ·invstd + β with the given statistics (γ = 1, β = 0 where absent):
/// PyTorch's `batch_norm_elemt`.
pub fn batch_norm_elemt(
    x: &Tensor,
    saved: &SavedStats,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let ctx = x.context();
    check_input(x, false)?;
    saved.check_for(x, false)?;
    let c = x.shape().channels();
    check_param(ctx, weight, "weight", c)?;
    check_param(ctx, bias, "bias", c)?;
    let k = ctx.kernels();
    let mut batch = k.begin()?;
    let y = k.elemt(&mut batch, x, &saved.data, weight, bias, Epilogue::NONE)?;
    k.submit(batch)?;
    Ok(Tensor::typed(ctx, x.shape().clone(), y, x.dtype()))
}

/// Per channel Σ dy and Σ dy·(x − μ) over this part of the batch, and dγ = Σ dy·(x − μ)·invstd
/// and dβ = Σ dy where `mask` asks for them: PyTorch's `batch_norm_backward_reduce`. Sum the
/// parts' [`GradSums`] (all-reduce) before [`batch_norm_backward_elemt`].
pub fn batch_norm_backward_reduce(
    dy: &Tensor,
    x: &Tensor,
    saved: &SavedStats,
    mask: GradMask,
) -> Result<GradSums> {
    let ctx = x.context();
    check_input(x, false)?;
    check_dy(x, dy)?;
    saved.check_for(x, false)?;
    let k = ctx.kernels();
    let mut batch = k.begin()?;
    let r = k.backward_reduce(&mut batch, dy, x, &saved.data, mask.weight, mask.bias)?;
    k.submit(batch)?;
    let c = x.shape().channels();
    let per_channel = |d| Tensor::new(ctx, Shape::new(&[c]).expect("rank 1"), d);
    Ok(GradSums::new(
        ctx,
        c,
        r.sums,
        r.dweight.map(per_channel),
        r.dbias.map(per_channel),
    ))
}

/// dx of this part from the sums over the whole batch of `total_count` values per channel:
/// PyTorch's `batch_norm_backward_elemt`. With running statistics in `saved` (inference),
/// dx = dy·γ·invstd and the sums are not used.
pub fn batch_norm_backward_elemt(
    dy: &Tensor,
    x: &Tensor,
    saved: &SavedStats,
    weight: Option<&Tensor>,
    sums: &GradSums,
    total_count: u64,
) -> Result<Tensor> {
    let ctx = x.context();
    check_input(x, false)?;
    check_dy(x, dy)?;
    saved.check_for(x, false)?;
    let c = x.shape().channels();
    check_param(ctx, weight, "weight", c)?;
    ctx.check_same("gradient sums", sums.context().id())?;
    if sums.channels() != c {
        return Err(Error::ChannelMismatch {
            expected: sums.channels(),
            got: c,
            shape: x.dims().to_vec(),
        });
    }
    let local = x.shape().view().per_channel() as u64;
    if total_count < local || (total_count == 0 && saved.is_batch_stats()) && local > 0 {
        return Err(Error::InvalidArgument {
            op: "batch_norm_backward_elemt",
            reason: format!(
                "total_count = {total_count} is less than this part's {local} values per channel"
            ),
        });
    }
    let k = ctx.kernels();
    let mut batch = k.begin()?;
    let with_sums = saved.is_batch_stats().then_some((&sums.data, total_count));
    let dx = k.backward_elemt(&mut batch, dy, x, &saved.data, weight, with_sums)?;
    k.submit(batch)?;
    Ok(Tensor::typed(ctx, x.shape().clone(), dx, x.dtype()))
}
