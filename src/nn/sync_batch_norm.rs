//! [`SyncBatchNorm`]: batch normalization over the global batch of a data-parallel group,
//! PyTorch's `nn.SyncBatchNorm`, on any [`Communicator`].

use super::batch_norm::{BatchNorm, BatchNormState};
use super::state::{channel_tensor, state_accessors, LayerState};
use crate::config::BatchNormConfig;
use crate::context::{Context, Tensor};
use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::ops::{
    self, ForwardOutput, GradMask, GradSums, GradSumsHost, Gradients, Moments, MomentsHost,
    SavedStats,
};

/// Values ahead of the statistics in each rank's part of the forward all-gather.
const HEADER: usize = 4;

/// A batch-normalization layer whose training statistics are those of the global batch of a
/// data-parallel group: PyTorch's `nn.SyncBatchNorm`, on any [`Communicator`].
///
/// A training step on each rank:
///
/// 1. forward: the local moments ([`ops::batch_norm_stats`]: count, and per channel mean
///    and M2 = Σ (x − mean)²) → one all-gather of every rank's (status, count, mean, M2) in
///    f64 → Chan's merge of the parts in rank order ([`MomentsHost::merge`]) → the running
///    statistics updated with the global unbiased variance ([`ops::batch_norm_gather_stats`];
///    the same merged values on every rank) → [`ops::batch_norm_elemt`];
/// 2. backward: [`ops::batch_norm_backward_reduce`] → one all-reduce of (status, count,
///    Σ dy, Σ dy·(x − μ)) → [`ops::batch_norm_backward_elemt`] with the global count. dγ and
///    dβ are this rank's own (PyTorch's: data-parallel training all-reduces parameter
///    gradients later, with the others), or, with
///    [`sync_affine_grads`](SyncBatchNorm::sync_affine_grads), summed over the group in the
///    same all-reduce.
///
/// Where PyTorch's `SyncBatchNorm` falls short, this one does not: ranks may hold batches of
/// different sizes, a rank with an empty batch still takes part (its part has count 0),
/// counts travel as u64 (split in two exact f64 halves), and the variance is merged from M2,
/// never rebuilt from invstd. As in PyTorch, only the global batch must hold more than one
/// value per channel; one rank may hold a single value.
///
/// **No rank is left waiting on bad input.** Each rank validates its own input first and
/// sends the result with its statistics (the status slots of the exchange), so a wrong
/// channel count or rank, a tensor of another context, a dy of another shape or a device
/// failure on one rank makes the step fail on every rank: the failing rank returns its own
/// error, the others [`Error::PeerFailed`] naming it, and nothing changes on any rank
/// (running statistics, `num_batches_tracked`). A globally too-small batch is
/// [`Error::TooFewValuesPerChannel`] on every rank. A failure of the communicator itself (a
/// rank gone, a timeout) is [`Error::Communication`], also with nothing changed. (There is
/// no dtype to mismatch: tensors are f32.) What cannot be made collective: a device that
/// fails *after* the exchange (between the all-gather and the update of the running
/// statistics) fails that rank's step alone, and that rank's state is then not the others'.
///
/// Every rank must make the same calls in the same order (training forwards and backwards,
/// with the same mask), on layers built with the same configuration and options: the
/// lengths of the exchanges follow from them. Inference ([`eval`](SyncBatchNorm::eval)) and a
/// group of one rank run the local batch norm of [`BatchNorm`](crate::BatchNorm) and
/// communicate nothing, as PyTorch's layer does.
///
/// The exchanges, per rank and training step (C = `num_features`, W = world size, f64
/// values; [`exchange_lengths`](SyncBatchNorm::exchange_lengths) returns the two lengths):
///
/// ```text
/// forward all-gather, sent by each rank:  [status, detail, count_hi, count_lo, mean[C], M2[C]]   4 + 2C
/// backward all-reduce:  [status[W], detail[W], count_hi, count_lo, Σdy[C], Σdy·(x−μ)[C]]        2W + 2 + 2C
///                        (+ dγ[C], dβ[C] with sync_affine_grads)
/// ```
///
/// The configuration, state and API are [`BatchNorm`]'s; the constructor adds the rank's
/// [`Communicator`] `C`, usually shared by every synchronized layer of the model: an
/// `Arc<LocalComm>` (`Send`, for ranks on threads), an `Rc<MpiComm>` or `&MpiComm`, or a
/// communicator by value.
///
/// ```
/// use std::sync::Arc;
/// use wgpu_batchnorm::{BatchNormConfig, Communicator, Context, LocalComm, SyncBatchNorm};
///
/// // Two ranks on threads: three samples on rank 0, one on rank 1, one channel.
/// let ranks: Vec<_> = (LocalComm::group(2).unwrap().into_iter())
///     .map(|comm| {
///         std::thread::spawn(move || -> wgpu_batchnorm::Result<Vec<f32>> {
///             let ctx = Context::cpu();
///             let x: &[f32] = if comm.rank() == 0 { &[1.0, 1.0, 1.0] } else { &[5.0] };
///             let x = ctx.tensor_from_slice(x, &[x.len(), 1])?;
///             let mut bn = SyncBatchNorm::new(&ctx, BatchNormConfig::new(1), Arc::new(comm))?;
///             bn.forward_train(&x)?.y.to_vec()
///         })
///     })
///     .collect(); // every rank started before any is joined
/// let y: Vec<Vec<f32>> = ranks.into_iter().map(|r| r.join().unwrap().unwrap()).collect();
/// // The global batch [1, 1, 1, 5]: mean 2, biased variance 3.
/// assert!((y[1][0] - 3.0 / 3f32.sqrt()).abs() < 1e-4);
/// assert!((y[0][0] + 1.0 / 3f32.sqrt()).abs() < 1e-4);
/// ```
pub struct SyncBatchNorm<C: Communicator> {
    state: LayerState,
    comm: C,
    sync_affine_grads: bool,
}

impl<C: Communicator> std::fmt::Debug for SyncBatchNorm<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.state;
        f.debug_struct("SyncBatchNorm")
            .field("context", &s.ctx)
            .field("config", &s.config)
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("sync_affine_grads", &self.sync_affine_grads)
            .field("training", &s.training)
            .field("num_batches_tracked", &s.num_batches_tracked)
            .finish()
    }
}

// ---- the status a rank sends with its part ----

/// What a rank reports in its status slot: 0 when its part is fine, else which check failed
/// (with a detail value where one helps the others' message).
mod status {
    pub const OK: u32 = 0;
    pub const OTHER_CONTEXT: u32 = 1;
    pub const BAD_RANK: u32 = 2;
    pub const CHANNELS: u32 = 3;
    pub const DY_SHAPE: u32 = 4;
    pub const SAVED_STATS: u32 = 5;
    pub const DEVICE: u32 = 6;
    pub const OTHER: u32 = 7;
}

/// The status code and detail value of a local error.
fn status_of(e: &Error) -> (f64, f64) {
    let (code, detail) = match e {
        Error::ContextMismatch { .. } => (status::OTHER_CONTEXT, 0),
        Error::InvalidRank { shape } => (status::BAD_RANK, shape.len()),
        Error::ChannelMismatch { got, .. } => (status::CHANNELS, *got),
        Error::ShapeMismatch { .. } => (status::DY_SHAPE, 0),
        Error::SavedStatsMismatch { .. } => (status::SAVED_STATS, 0),
        Error::DeviceLost(_)
        | Error::GpuOutOfMemory(_)
        | Error::GpuValidation(_)
        | Error::Readback(_)
        | Error::TooLarge { .. } => (status::DEVICE, 0),
        _ => (status::OTHER, 0),
    };
    (code as f64, detail as f64)
}

/// What a peer's status means, for [`Error::PeerFailed`]; `None` when it is no status a
/// rank sends.
fn describe_status(code: f64, detail: f64, channels: usize) -> Option<String> {
    if code.fract() != 0.0 || !(0.0..=status::OTHER as f64).contains(&code) {
        return None;
    }
    Some(match code as u32 {
        status::OTHER_CONTEXT => "its input belongs to another context than its layer".into(),
        status::BAD_RANK => format!("its input has rank {detail}, not 2 to 5"),
        status::CHANNELS => format!("its input has {detail} channels, the layer {channels}"),
        status::DY_SHAPE => "its dy differs from its x in shape or context".into(),
        status::SAVED_STATS => "its saved statistics do not fit its input".into(),
        status::DEVICE => "its device failed".into(),
        _ => "its input was rejected".into(),
    })
}

/// Fails unless every rank's status is OK: with this rank's own error when it failed, else
/// with [`Error::PeerFailed`] naming the lowest failing rank.
fn check_statuses(
    statuses: impl Iterator<Item = (f64, f64)>,
    own: Result<()>,
    channels: usize,
) -> Result<()> {
    own?;
    let mut failed = Vec::new();
    for (rank, (code, detail)) in statuses.enumerate() {
        let Some(reason) = describe_status(code, detail, channels) else {
            return Err(Error::Communication(format!(
                "rank {rank} sent status {code}, which no rank sends: the ranks' calls or \
                 layers do not match"
            )));
        };
        if code != status::OK as f64 {
            failed.push((rank, reason));
        }
    }
    match failed.as_slice() {
        [] => Ok(()),
        [(rank, reason), rest @ ..] => Err(Error::PeerFailed {
            rank: *rank,
            reason: if rest.is_empty() {
                reason.clone()
            } else {
                let others: Vec<usize> = rest.iter().map(|f| f.0).collect();
                format!("{reason} (ranks {others:?} failed too)")
            },
        }),
    }
}

/// A u64 as two f64 halves (high and low 32 bits), each exact; sums of up to 2^21 such
/// halves stay exact too.
fn split_count(n: u64) -> [f64; 2] {
    [(n >> 32) as f64, (n & 0xFFFF_FFFF) as f64]
}

/// The u64 of (summed) halves from [`split_count`], or an error when they cannot be that.
fn join_count(hi: f64, lo: f64) -> Result<u64> {
    let exact = |v: f64| v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 2f64.powi(53);
    if exact(hi) && exact(lo) {
        if let Some(n) = ((hi as u64).checked_shl(32))
            .filter(|_| hi < 2f64.powi(32))
            .and_then(|h| h.checked_add(lo as u64))
        {
            return Ok(n);
        }
    }
    Err(Error::Communication(format!(
        "a count arrived as ({hi}, {lo}), which no rank sends"
    )))
}

impl<C: Communicator> SyncBatchNorm<C> {
    /// A layer with PyTorch's initial state (γ = 1, β = 0, running mean 0, running var 1,
    /// `num_batches_tracked` 0, training mode) on this rank's `ctx`, synchronized through
    /// `comm`. Communicates nothing; every rank must build its layer with the same `config`.
    pub fn new(ctx: &Context, config: BatchNormConfig, comm: C) -> Result<Self> {
        config.validate()?;
        if comm.world_size() == 0 || comm.rank() >= comm.world_size() {
            return Err(Error::InvalidArgument {
                op: "SyncBatchNorm::new",
                reason: format!(
                    "rank {} is not in a group of {} ranks",
                    comm.rank(),
                    comm.world_size()
                ),
            });
        }
        Ok(Self {
            state: LayerState::new(ctx, config)?,
            comm,
            sync_affine_grads: false,
        })
    }

    /// A synchronized copy of `bn` (PyTorch's `convert_sync_batchnorm`): its configuration,
    /// mode and state, on its context (one readback per state tensor).
    pub fn from_batch_norm(bn: &BatchNorm, comm: C) -> Result<Self> {
        let mut out = Self::new(bn.context(), *bn.config(), comm)?;
        out.load_state(&bn.state()?)?;
        out.state.training = bn.is_training();
        Ok(out)
    }

    /// Sums dγ and dβ over the group in the backward's all-reduce (default off: each rank's
    /// own, as PyTorch's `SyncBatchNorm` returns them; data-parallel training then
    /// all-reduces them with the other parameters' gradients). Every rank must choose the
    /// same.
    pub fn sync_affine_grads(mut self, on: bool) -> Self {
        self.sync_affine_grads = on;
        self
    }

    /// Whether dγ and dβ are summed over the group.
    pub fn syncs_affine_grads(&self) -> bool {
        self.sync_affine_grads
    }

    /// The communicator.
    pub fn communicator(&self) -> &C {
        &self.comm
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// The number of ranks in the group.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The f64 values this rank contributes to a training step's two exchanges: the forward
    /// all-gather (each rank receives world size times as many) and the backward all-reduce
    /// of a [`backward`](Self::backward) with [`GradMask::ALL`]. (0, 0) when the layer does
    /// not communicate (a group of one rank).
    pub fn exchange_lengths(&self) -> (usize, usize) {
        if !self.synchronizes() {
            return (0, 0);
        }
        let c = self.state.config.num_features;
        let params = if self.sync_affine_grads && self.state.config.affine {
            2 * c
        } else {
            0
        };
        (HEADER + 2 * c, 2 * self.world_size() + 2 + 2 * c + params)
    }

    fn synchronizes(&self) -> bool {
        self.comm.world_size() > 1
    }

    /// The configuration.
    pub fn config(&self) -> &BatchNormConfig {
        &self.state.config
    }

    /// The context the layer lives in.
    pub fn context(&self) -> &Context {
        &self.state.ctx
    }

    /// Switches to training mode (global batch statistics, running statistics updated).
    pub fn train(&mut self) {
        self.state.training = true;
    }

    /// Switches to inference mode: local, no communication (running statistics, when
    /// tracked; else each rank's own batch statistics, as PyTorch).
    pub fn eval(&mut self) {
        self.state.training = false;
    }

    /// Whether the layer is in training mode.
    pub fn is_training(&self) -> bool {
        self.state.training
    }

    /// Forward in the current mode ([`forward_train`](Self::forward_train) or
    /// [`forward_eval`](Self::forward_eval)).
    pub fn forward(&mut self, x: &Tensor) -> Result<ForwardOutput> {
        if self.state.training {
            self.forward_train(x)
        } else {
            self.forward_eval(x)
        }
    }

    /// Training-mode forward, a collective: normalize this rank's x with the mean and
    /// biased variance of the global batch; when running statistics are tracked, increment
    /// `num_batches_tracked` and update them with the global unbiased variance, the same on
    /// every rank. In a group of one rank, [`BatchNorm::forward_train`].
    pub fn forward_train(&mut self, x: &Tensor) -> Result<ForwardOutput> {
        if !self.synchronizes() {
            return self.state.forward_train(x);
        }
        let nbt = self.state.next_num_batches_tracked();
        let momentum = self.state.config.momentum.factor(nbt);
        let c = self.state.config.num_features;
        let world = self.world_size();

        // This rank's part, or why it has none, in its row of the all-gather.
        let local = self.local_moments(x);
        let mut send = vec![0.0; HEADER + 2 * c];
        match &local {
            Ok(m) => {
                send[2..4].copy_from_slice(&split_count(m.count));
                send[HEADER..HEADER + c].copy_from_slice(&m.mean);
                send[HEADER + c..].copy_from_slice(&m.m2);
            }
            Err(e) => (send[0], send[1]) = status_of(e),
        }
        let all = self.comm.all_gather(&send)?;
        if all.len() != world * send.len() {
            return Err(Error::Communication(format!(
                "all_gather returned {} values for {world} ranks of {}",
                all.len(),
                send.len()
            )));
        }
        let rows: Vec<&[f64]> = all.chunks(send.len()).collect();
        check_statuses(
            rows.iter().map(|r| (r[0], r[1])),
            local.as_ref().map(|_| ()).map_err(Clone::clone),
            c,
        )?;

        // Every rank merges the same parts in the same order.
        let parts = rows
            .iter()
            .map(|r| {
                Ok(MomentsHost {
                    count: join_count(r[2], r[3])?,
                    mean: r[HEADER..HEADER + c].to_vec(),
                    m2: r[HEADER + c..].to_vec(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let merged = MomentsHost::merge(&parts)?;
        if merged.count == 1 {
            return Err(Error::TooFewValuesPerChannel { shape: vec![1, c] });
        }
        let moments = Moments::from_host(&self.state.ctx, &merged)?;
        let eps = self.state.config.eps;
        let running = self.state.running_mut(momentum);
        let saved = ops::batch_norm_gather_stats(&[moments], eps, running)?;
        let y = ops::batch_norm_elemt(
            x,
            &saved,
            self.state.weight.as_ref(),
            self.state.bias.as_ref(),
        )?;
        self.state.num_batches_tracked = nbt;
        Ok(ForwardOutput { y, saved })
    }

    /// This rank's moments, after the checks a forward makes (a single value is fine here:
    /// only the global batch must hold more).
    fn local_moments(&self, x: &Tensor) -> Result<MomentsHost> {
        self.state.check_input(x, false)?;
        ops::batch_norm_stats(x)?.to_host()
    }

    /// Inference-mode forward, local (no communication): normalize with the running
    /// statistics (this rank's batch statistics when they are not tracked). Changes no
    /// state.
    pub fn forward_eval(&self, x: &Tensor) -> Result<ForwardOutput> {
        self.state.forward_eval(x)
    }

    /// Backward of the forward that produced `saved` from `x`: dx, dγ, dβ of Σ y·dy. In
    /// training mode, with batch statistics and more than one rank, a collective: dx
    /// differentiates through the global statistics (one all-reduce); otherwise local, as
    /// [`BatchNorm::backward`]. Call it in the mode of its forward.
    pub fn backward(&mut self, dy: &Tensor, x: &Tensor, saved: &SavedStats) -> Result<Gradients> {
        self.backward_with_mask(dy, x, saved, GradMask::ALL)
    }

    /// Inference-mode backward with the current running statistics as constants
    /// (fine-tuning with frozen statistics): dx = dy·γ·invstd_running. Local.
    pub fn backward_eval(&mut self, dy: &Tensor, x: &Tensor) -> Result<Gradients> {
        self.state.backward_eval(dy, x)
    }

    /// [`backward`](Self::backward) computing only what `mask` asks for (the same mask on
    /// every rank). As in PyTorch, a synchronized backward communicates only when dx is asked
    /// for, or when dγ/dβ are asked for and summed over the group.
    pub fn backward_with_mask(
        &mut self,
        dy: &Tensor,
        x: &Tensor,
        saved: &SavedStats,
        mask: GradMask,
    ) -> Result<Gradients> {
        let mask = self.state.affine_mask(mask);
        let sync_params = self.sync_affine_grads && (mask.weight || mask.bias);
        if !(self.synchronizes() && self.state.training && saved.is_batch_stats())
            || !(mask.input || sync_params)
        {
            // Local: no rank waits on this one. (dγ and dβ of a synchronized forward need
            // only this rank's part.)
            return self.state.local_backward(dy, x, saved, mask);
        }
        let (c, world, rank) = (
            self.state.config.num_features,
            self.world_size(),
            self.rank(),
        );

        let local = self.local_grad_sums(dy, x, saved, mask, sync_params);
        let params = if sync_params { 2 * c } else { 0 };
        let at = 2 * world + 2;
        let mut send = vec![0.0; at + 2 * c + params];
        match &local {
            Ok(part) => {
                send[2 * world..at].copy_from_slice(&split_count(part.count));
                send[at..at + c].copy_from_slice(&part.host.sum_dy);
                send[at + c..at + 2 * c].copy_from_slice(&part.host.sum_dy_xmu);
                for (i, v) in part.params.iter().enumerate() {
                    if let Some(v) = v {
                        let dst = &mut send[at + (2 + i) * c..at + (3 + i) * c];
                        dst.iter_mut().zip(v).for_each(|(d, &s)| *d = s as f64);
                    }
                }
            }
            Err(e) => (send[rank], send[world + rank]) = status_of(e),
        }
        let sum = self.comm.all_reduce_sum(&send)?;
        if sum.len() != send.len() {
            return Err(Error::Communication(format!(
                "all_reduce_sum returned {} values for {}",
                sum.len(),
                send.len()
            )));
        }
        check_statuses(
            (0..world).map(|r| (sum[r], sum[world + r])),
            local.as_ref().map(|_| ()).map_err(Clone::clone),
            c,
        )?;
        let part = local?;

        let dx = if mask.input {
            let total = join_count(sum[2 * world], sum[2 * world + 1])?;
            let global = GradSumsHost {
                sum_dy: sum[at..at + c].to_vec(),
                sum_dy_xmu: sum[at + c..at + 2 * c].to_vec(),
            };
            let sums = GradSums::from_host(&self.state.ctx, &global)?;
            let w = self.state.weight.as_ref();
            Some(ops::batch_norm_backward_elemt(
                dy, x, saved, w, &sums, total,
            )?)
        } else {
            None
        };
        let (dweight, dbias) = if sync_params {
            let summed = |i: usize, want: bool| {
                want.then(|| {
                    let v: Vec<f32> = sum[at + (2 + i) * c..at + (3 + i) * c]
                        .iter()
                        .map(|&v| v as f32)
                        .collect();
                    channel_tensor(&self.state.ctx, &v)
                })
                .transpose()
            };
            (summed(0, mask.weight)?, summed(1, mask.bias)?)
        } else {
            (part.sums.dweight().cloned(), part.sums.dbias().cloned())
        };
        Ok(Gradients { dx, dweight, dbias })
    }

    /// This rank's part of a synchronized backward, after the checks a backward makes.
    fn local_grad_sums(
        &self,
        dy: &Tensor,
        x: &Tensor,
        saved: &SavedStats,
        mask: GradMask,
        sync_params: bool,
    ) -> Result<LocalGradSums> {
        self.state.check_backward_args(dy, x, saved)?;
        let sums = ops::batch_norm_backward_reduce(dy, x, saved, mask)?;
        let host = sums.to_host()?;
        let read = |t: Option<&Tensor>| match t {
            Some(t) if sync_params => t.to_vec().map(Some),
            _ => Ok(None),
        };
        let params = [read(sums.dweight())?, read(sums.dbias())?];
        Ok(LocalGradSums {
            count: (x.shape().batch() * x.shape().spatial()) as u64,
            host,
            params,
            sums,
        })
    }

    // ---- state access: as BatchNorm's ----

    state_accessors!();
}
/// This rank's part of a synchronized backward.
struct LocalGradSums {
    /// Values per channel in this rank's x.
    count: u64,
    host: GradSumsHost,
    /// This rank's dγ and dβ read back, when they are summed over the group.
    params: [Option<Vec<f32>>; 2],
    sums: GradSums,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_travel_exactly() {
        for n in [0, 1, 2, u32::MAX as u64, 1 << 32, (1 << 40) + 7, u64::MAX] {
            let [hi, lo] = split_count(n);
            assert_eq!(join_count(hi, lo).unwrap(), n, "{n}");
        }
        // Summed halves, as the backward's all-reduce gives them: 3·u32::MAX low halves.
        let n = 3 * u32::MAX as u64;
        let lo = 3.0 * u32::MAX as f64;
        assert_eq!(join_count(0.0, lo).unwrap(), n);
        for (hi, lo) in [
            (-1.0, 0.0),
            (0.5, 0.0),
            (f64::NAN, 0.0),
            (2f64.powi(32), 0.0),
        ] {
            assert!(join_count(hi, lo).is_err(), "({hi}, {lo})");
        }
    }

    #[test]
    fn every_local_error_maps_to_a_status_others_can_read() {
        let errors = [
            Error::ChannelMismatch {
                expected: 3,
                got: 5,
                shape: vec![2, 5],
            },
            Error::InvalidRank { shape: vec![4] },
            Error::DeviceLost("gone".into()),
            Error::InvalidEps(0.0),
        ];
        for e in errors {
            let (code, detail) = status_of(&e);
            assert_ne!(code, status::OK as f64, "{e}");
            let reason = describe_status(code, detail, 3).expect("a status a rank sends");
            assert!(!reason.is_empty());
        }
        let reason = describe_status(status::CHANNELS as f64, 5.0, 3).unwrap();
        assert!(reason.contains('5') && reason.contains('3'), "{reason}");
        assert!(describe_status(99.0, 0.0, 3).is_none());
        assert!(describe_status(1.5, 0.0, 3).is_none());
    }
}
