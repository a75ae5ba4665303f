//! [`LayerState`]: what [`BatchNorm`](super::BatchNorm) and
//! [`SyncBatchNorm`](super::SyncBatchNorm) hold alike — context, configuration, mode, γ, β,
//! the running statistics and `num_batches_tracked` — with the state access and the local
//! forward and backward both layers run.

use super::batch_norm::BatchNormState;
use crate::backend::Epilogue;
use crate::config::BatchNormConfig;
use crate::context::{Context, Tensor};
use crate::error::{Error, Result};
use crate::ops::{
    self, ForwardOutput, GradMask, Gradients, ReluGradients, RunningStats, SavedStats,
};

/// A layer's state and mode. The layers' public state methods delegate here.
pub(crate) struct LayerState {
    pub(crate) ctx: Context,
    pub(crate) config: BatchNormConfig,
    pub(crate) training: bool,
    pub(crate) num_batches_tracked: u64,
    pub(crate) weight: Option<Tensor>,
    pub(crate) bias: Option<Tensor>,
    pub(crate) running_mean: Option<Tensor>,
    pub(crate) running_var: Option<Tensor>,
}

/// A per-channel tensor holding `values`.
pub(crate) fn channel_tensor(ctx: &Context, values: &[f32]) -> Result<Tensor> {
    ctx.tensor_from_slice(values, &[values.len()])
}

/// The running statistics to update in place, when tracked.
fn running<'a>(
    mean: &'a mut Option<Tensor>,
    var: &'a mut Option<Tensor>,
    momentum: f32,
) -> Option<RunningStats<'a>> {
    match (mean, var) {
        (Some(mean), Some(var)) => Some(RunningStats {
            mean,
            var,
            momentum,
        }),
        _ => None,
    }
}

fn read(t: &Option<Tensor>) -> Result<Option<Vec<f32>>> {
    t.as_ref().map(Tensor::to_vec).transpose()
}

impl LayerState {
    /// PyTorch's initial state: γ = 1, β = 0, running mean 0, running var 1,
    /// `num_batches_tracked` 0, training mode. Validates `config` first.
    pub(crate) fn new(ctx: &Context, config: BatchNormConfig) -> Result<Self> {
        config.validate()?;
        let c = config.num_features;
        let filled = |on: bool, v: f32| on.then(|| channel_tensor(ctx, &vec![v; c])).transpose();
        Ok(Self {
            ctx: ctx.clone(),
            config,
            training: true,
            num_batches_tracked: 0,
            weight: filled(config.affine, 1.0)?,
            bias: filled(config.affine, 0.0)?,
            running_mean: filled(config.track_running_stats, 0.0)?,
            running_var: filled(config.track_running_stats, 1.0)?,
        })
    }

    // ---- forward and backward, local ----

    /// `num_batches_tracked` after one more training forward.
    pub(crate) fn next_num_batches_tracked(&self) -> u64 {
        self.num_batches_tracked
            .saturating_add(self.config.track_running_stats as u64)
    }

    /// The running statistics to update in place with `momentum`, when tracked.
    pub(crate) fn running_mut(&mut self, momentum: f32) -> Option<RunningStats<'_>> {
        running(&mut self.running_mean, &mut self.running_var, momentum)
    }

    pub(crate) fn check_input(&self, x: &Tensor, batch_stats: bool) -> Result<()> {
        self.ctx.check_same("input tensor", x.context().id())?;
        self.config.check_input(x.shape(), batch_stats)
    }

    /// The training-mode forward of a single process ([`BatchNorm::forward_train`](
    /// super::BatchNorm::forward_train)).
    pub(crate) fn forward_train(&mut self, x: &Tensor) -> Result<ForwardOutput> {
        self.forward_train_fused(x, Epilogue::NONE)
    }

    /// [`forward_train`](Self::forward_train) with an epilogue.
    pub(crate) fn forward_train_fused(
        &mut self,
        x: &Tensor,
        epi: Epilogue<'_>,
    ) -> Result<ForwardOutput> {
        self.check_input(x, true)?;
        let nbt = self.next_num_batches_tracked();
        let momentum = self.config.momentum.factor(nbt);
        let running = running(&mut self.running_mean, &mut self.running_var, momentum);
        let (w, b) = (self.weight.as_ref(), self.bias.as_ref());
        let eps = self.config.eps;
        let (y, saved) = ops::forward_fused(x, running, w, b, true, eps, Some(epi))?;
        self.num_batches_tracked = nbt;
        Ok(ForwardOutput {
            y: y.expect("y was asked for"),
            saved,
        })
    }

    /// The inference-mode forward (y, with its epilogue, only when `epi` is given). Changes
    /// no state.
    pub(crate) fn eval_impl(
        &self,
        x: &Tensor,
        epi: Option<Epilogue<'_>>,
    ) -> Result<(Option<Tensor>, SavedStats)> {
        let batch_stats = self.config.uses_batch_stats(false);
        self.check_input(x, batch_stats)?;
        let mut running = (self.running_mean.clone(), self.running_var.clone());
        let running = match (&mut running.0, &mut running.1) {
            (Some(mean), Some(var)) if !batch_stats => Some(RunningStats {
                mean,
                var,
                momentum: 0.0,
            }),
            _ => None,
        };
        let (w, b) = (self.weight.as_ref(), self.bias.as_ref());
        ops::forward_fused(x, running, w, b, batch_stats, self.config.eps, epi)
    }

    /// [`eval_impl`](Self::eval_impl) with y, as a [`ForwardOutput`].
    pub(crate) fn forward_eval(&self, x: &Tensor) -> Result<ForwardOutput> {
        self.forward_eval_fused(x, Epilogue::NONE)
    }

    /// [`forward_eval`](Self::forward_eval) with an epilogue.
    pub(crate) fn forward_eval_fused(
        &self,
        x: &Tensor,
        epi: Epilogue<'_>,
    ) -> Result<ForwardOutput> {
        let (y, saved) = self.eval_impl(x, Some(epi))?;
        Ok(ForwardOutput {
            y: y.expect("y was asked for"),
            saved,
        })
    }

    pub(crate) fn check_backward_args(
        &self,
        dy: &Tensor,
        x: &Tensor,
        saved: &SavedStats,
    ) -> Result<()> {
        self.ctx.check_same("x", x.context().id())?;
        self.ctx.check_same("dy", dy.context().id())?;
        self.ctx
            .check_same("saved statistics", saved.context().id())?;
        self.config.check_input(x.shape(), false)
    }

    /// `mask` without dγ and dβ when the layer has no `affine`.
    pub(crate) fn affine_mask(&self, mask: GradMask) -> GradMask {
        let affine = self.config.affine;
        GradMask {
            input: mask.input,
            weight: affine && mask.weight,
            bias: affine && mask.bias,
        }
    }

    /// The backward of a single process ([`BatchNorm::backward_with_mask`](
    /// super::BatchNorm::backward_with_mask)).
    pub(crate) fn local_backward(
        &self,
        dy: &Tensor,
        x: &Tensor,
        saved: &SavedStats,
        mask: GradMask,
    ) -> Result<Gradients> {
        self.check_backward_args(dy, x, saved)?;
        let mask = self.affine_mask(mask);
        ops::batch_norm_backward(dy, x, saved, self.weight.as_ref(), mask)
    }

    /// The backward of a fused forward of a single process
    /// ([`BatchNorm::backward_relu`](super::BatchNorm::backward_relu)).
    pub(crate) fn local_backward_relu(
        &self,
        dy: &Tensor,
        y: &Tensor,
        x: &Tensor,
        saved: &SavedStats,
        residual: bool,
    ) -> Result<ReluGradients> {
        self.check_backward_args(dy, x, saved)?;
        self.ctx.check_same("y", y.context().id())?;
        let mask = self.affine_mask(GradMask::ALL);
        ops::batch_norm_relu_backward(dy, y, x, saved, self.weight.as_ref(), residual, mask)
    }

    /// The inference-mode backward with the running statistics as constants.
    pub(crate) fn backward_eval(&self, dy: &Tensor, x: &Tensor) -> Result<Gradients> {
        if !self.config.track_running_stats {
            return Err(Error::NoRunningStats {
                op: "backward_eval",
            });
        }
        // The frozen statistics, in the form an inference forward saves them (no y pass).
        let (_, saved) = self.eval_impl(x, None)?;
        self.local_backward(dy, x, &saved, GradMask::ALL)
    }

    // ---- state access (load a PyTorch state dict, inspect training) ----

    fn require(&self, has: bool, name: &'static str) -> Result<()> {
        if has {
            Ok(())
        } else {
            Err(Error::NoSuchParameter {
                name,
                because: if matches!(name, "weight" | "bias") {
                    "affine = false"
                } else {
                    "track_running_stats = false"
                },
            })
        }
    }

    fn check_len(&self, name: &'static str, values: &[f32]) -> Result<()> {
        let c = self.config.num_features;
        if values.len() != c {
            return Err(Error::ParameterLength {
                name,
                expected: c,
                got: values.len(),
            });
        }
        Ok(())
    }

    pub(crate) fn weight(&self) -> Result<Option<Vec<f32>>> {
        read(&self.weight)
    }

    pub(crate) fn bias(&self) -> Result<Option<Vec<f32>>> {
        read(&self.bias)
    }

    pub(crate) fn running_mean(&self) -> Result<Option<Vec<f32>>> {
        read(&self.running_mean)
    }

    pub(crate) fn running_var(&self) -> Result<Option<Vec<f32>>> {
        read(&self.running_var)
    }

    pub(crate) fn num_batches_tracked(&self) -> Option<u64> {
        self.config
            .track_running_stats
            .then_some(self.num_batches_tracked)
    }

    fn set(&mut self, slot: usize, name: &'static str, values: &[f32]) -> Result<()> {
        let has = if slot < 2 {
            self.config.affine
        } else {
            self.config.track_running_stats
        };
        self.require(has, name)?;
        self.check_len(name, values)?;
        let t = channel_tensor(&self.ctx, values)?;
        *[
            &mut self.weight,
            &mut self.bias,
            &mut self.running_mean,
            &mut self.running_var,
        ][slot] = Some(t);
        Ok(())
    }

    pub(crate) fn set_weight(&mut self, weight: &[f32]) -> Result<()> {
        self.set(0, "weight", weight)
    }

    pub(crate) fn set_bias(&mut self, bias: &[f32]) -> Result<()> {
        self.set(1, "bias", bias)
    }

    pub(crate) fn set_running_mean(&mut self, mean: &[f32]) -> Result<()> {
        self.set(2, "running_mean", mean)
    }

    pub(crate) fn set_running_var(&mut self, var: &[f32]) -> Result<()> {
        self.set(3, "running_var", var)
    }

    pub(crate) fn set_num_batches_tracked(&mut self, n: u64) -> Result<()> {
        self.require(self.config.track_running_stats, "num_batches_tracked")?;
        self.num_batches_tracked = n;
        Ok(())
    }

    pub(crate) fn set_weight_tensor(&mut self, weight: Tensor) -> Result<()> {
        self.set_tensor(0, "weight", weight)
    }

    pub(crate) fn set_bias_tensor(&mut self, bias: Tensor) -> Result<()> {
        self.set_tensor(1, "bias", bias)
    }

    fn set_tensor(&mut self, slot: usize, name: &'static str, t: Tensor) -> Result<()> {
        self.require(self.config.affine, name)?;
        self.ctx.check_same(name, t.context().id())?;
        let c = self.config.num_features;
        if t.dims() != [c] {
            return Err(Error::ShapeMismatch {
                what: "per-channel tensors are 1-D with num_features values",
                expected: vec![c],
                got: t.dims().to_vec(),
            });
        }
        *[&mut self.weight, &mut self.bias][slot] = Some(t);
        Ok(())
    }

    pub(crate) fn state(&self) -> Result<BatchNormState> {
        Ok(BatchNormState {
            weight: self.weight()?,
            bias: self.bias()?,
            running_mean: self.running_mean()?,
            running_var: self.running_var()?,
            num_batches_tracked: self.num_batches_tracked(),
        })
    }

    pub(crate) fn load_state(&mut self, state: &BatchNormState) -> Result<()> {
        let entries = [
            ("weight", &state.weight, self.config.affine),
            ("bias", &state.bias, self.config.affine),
            (
                "running_mean",
                &state.running_mean,
                self.config.track_running_stats,
            ),
            (
                "running_var",
                &state.running_var,
                self.config.track_running_stats,
            ),
        ];
        for (name, values, has) in entries {
            match values {
                Some(v) => {
                    self.require(has, name)?;
                    self.check_len(name, v)?;
                }
                None if has => {
                    return Err(Error::InvalidArgument {
                        op: "load_state",
                        reason: format!("the state has no {name}, which this layer has"),
                    })
                }
                None => {}
            }
        }
        match state.num_batches_tracked {
            Some(_) => self.require(self.config.track_running_stats, "num_batches_tracked")?,
            None if self.config.track_running_stats => {
                return Err(Error::InvalidArgument {
                    op: "load_state",
                    reason: "the state has no num_batches_tracked, which this layer tracks".into(),
                })
            }
            None => {}
        }
        let upload =
            |v: &Option<Vec<f32>>| v.as_ref().map(|v| channel_tensor(&self.ctx, v)).transpose();
        let tensors = (
            upload(&state.weight)?,
            upload(&state.bias)?,
            upload(&state.running_mean)?,
            upload(&state.running_var)?,
        );
        (self.weight, self.bias, self.running_mean, self.running_var) = tensors;
        self.num_batches_tracked = state.num_batches_tracked.unwrap_or(0);
        Ok(())
    }
}

/// The state accessors of a layer whose `LayerState` is its field `state` (weight, bias,
/// running statistics as host vectors or device tensors, their setters, `state` and
/// `load_state`): written once for [`BatchNorm`](crate::BatchNorm) and
/// [`SyncBatchNorm`](crate::SyncBatchNorm), inside their `impl` blocks.
macro_rules! state_accessors {
    () => {
        /// γ (`weight`), or `None` without `affine`.
        pub fn weight(&self) -> Result<Option<Vec<f32>>> {
            self.state.weight()
        }

        /// β (`bias`), or `None` without `affine`.
        pub fn bias(&self) -> Result<Option<Vec<f32>>> {
            self.state.bias()
        }

        /// Running mean, or `None` without `track_running_stats`.
        pub fn running_mean(&self) -> Result<Option<Vec<f32>>> {
            self.state.running_mean()
        }

        /// Running (unbiased) variance, or `None` without `track_running_stats`.
        pub fn running_var(&self) -> Result<Option<Vec<f32>>> {
            self.state.running_var()
        }

        /// γ as a tensor on the device, or `None` without `affine`.
        pub fn weight_tensor(&self) -> Option<&Tensor> {
            self.state.weight.as_ref()
        }

        /// β as a tensor on the device, or `None` without `affine`.
        pub fn bias_tensor(&self) -> Option<&Tensor> {
            self.state.bias.as_ref()
        }

        /// The running mean as a tensor on the device, or `None` without `track_running_stats`.
        /// A clone keeps its values: the next training forward gives the layer fresh storage.
        pub fn running_mean_tensor(&self) -> Option<&Tensor> {
            self.state.running_mean.as_ref()
        }

        /// The running variance as a tensor on the device, or `None` without
        /// `track_running_stats`.
        pub fn running_var_tensor(&self) -> Option<&Tensor> {
            self.state.running_var.as_ref()
        }

        /// Training forwards seen, or `None` without `track_running_stats`.
        pub fn num_batches_tracked(&self) -> Option<u64> {
            self.state.num_batches_tracked()
        }

        /// Sets γ. Fails without `affine` or with a length ≠ `num_features`.
        pub fn set_weight(&mut self, weight: &[f32]) -> Result<()> {
            self.state.set_weight(weight)
        }

        /// Sets β. Fails without `affine` or with a length ≠ `num_features`.
        pub fn set_bias(&mut self, bias: &[f32]) -> Result<()> {
            self.state.set_bias(bias)
        }

        /// Sets the running mean. Fails without `track_running_stats` or with a wrong length.
        pub fn set_running_mean(&mut self, mean: &[f32]) -> Result<()> {
            self.state.set_running_mean(mean)
        }

        /// Sets the running variance. Fails without `track_running_stats` or with a wrong length.
        pub fn set_running_var(&mut self, var: &[f32]) -> Result<()> {
            self.state.set_running_var(var)
        }

        /// Sets `num_batches_tracked` (it drives `momentum = None`).
        pub fn set_num_batches_tracked(&mut self, n: u64) -> Result<()> {
            self.state.set_num_batches_tracked(n)
        }

        /// Replaces γ with a tensor already on the device (e.g. after an optimizer step), shape
        /// (C), same context. Fails without `affine`.
        pub fn set_weight_tensor(&mut self, weight: Tensor) -> Result<()> {
            self.state.set_weight_tensor(weight)
        }

        /// Replaces β with a tensor already on the device, shape (C), same context.
        pub fn set_bias_tensor(&mut self, bias: Tensor) -> Result<()> {
            self.state.set_bias_tensor(bias)
        }

        /// The whole state in host memory (one readback per tensor).
        pub fn state(&self) -> Result<BatchNormState> {
            self.state.state()
        }

        /// Sets the whole state at once (loading a PyTorch checkpoint): every entry is checked
        /// first — present exactly where the configuration has it, `num_features` values — and
        /// nothing changes unless all are right. No readback.
        pub fn load_state(&mut self, state: &BatchNormState) -> Result<()> {
            self.state.load_state(state)
        }
    };
}
pub(crate) use state_accessors;
