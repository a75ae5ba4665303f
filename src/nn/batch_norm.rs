//! [`BatchNorm`]: the layer. It holds state and mode only — γ, β, the running statistics and
//! `num_batches_tracked`, as tensors on its context's device — and runs every forward and
//! backward through the functional API ([`crate::ops`]), as PyTorch's `nn.BatchNorm{1,2,3}d`
//! runs through `F.batch_norm`.

use crate::config::BatchNormConfig;
use crate::context::{Context, Tensor};
use crate::error::{Error, Result};
use crate::ops::{self, ForwardOutput, GradMask, Gradients, RunningStats, SavedStats};

/// The whole state of a layer in host memory, as in a PyTorch state dict: `Some` exactly for
/// what the configuration has (γ and β with `affine`; the running statistics and
/// `num_batches_tracked` with `track_running_stats`).
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormState {
    pub weight: Option<Vec<f32>>,
    pub bias: Option<Vec<f32>>,
    pub running_mean: Option<Vec<f32>>,
    pub running_var: Option<Vec<f32>>,
    pub num_batches_tracked: Option<u64>,
}

/// A batch-normalization layer with PyTorch's `nn.BatchNorm{1,2,3}d` semantics.
///
/// Create it in training mode (as PyTorch does); [`eval`](Self::eval) switches to inference.
/// A training step (forward_train + backward) reads nothing back and uploads no parameters.
pub struct BatchNorm {
    ctx: Context,
    config: BatchNormConfig,
    training: bool,
    num_batches_tracked: u64,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    running_mean: Option<Tensor>,
    running_var: Option<Tensor>,
}

impl std::fmt::Debug for BatchNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchNorm")
            .field("context", &self.ctx)
            .field("config", &self.config)
            .field("training", &self.training)
            .field("num_batches_tracked", &self.num_batches_tracked)
            .finish()
    }
}

/// A per-channel tensor holding `values`.
fn channel_tensor(ctx: &Context, values: &[f32]) -> Result<Tensor> {
    ctx.tensor_from_slice(values, &[values.len()])
}

impl BatchNorm {
    /// A layer with PyTorch's initial state: γ = 1, β = 0, running mean 0, running var 1,
    /// `num_batches_tracked` 0, training mode.
    pub fn new(ctx: &Context, config: BatchNormConfig) -> Result<Self> {
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

    /// The configuration.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    /// The context the layer lives in.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Switches to training mode (batch statistics, running statistics updated).
    pub fn train(&mut self) {
        self.training = true;
    }

    /// Switches to inference mode (running statistics, when tracked).
    pub fn eval(&mut self) {
        self.training = false;
    }

    /// Whether the layer is in training mode.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Forward in the current mode ([`forward_train`](Self::forward_train) or
    /// [`forward_eval`](Self::forward_eval)).
    pub fn forward(&mut self, x: &Tensor) -> Result<ForwardOutput> {
        if self.training {
            self.forward_train(x)
        } else {
            self.forward_eval(x)
        }
    }

    /// Training-mode forward: normalize with the batch mean and biased variance; when
    /// running statistics are tracked, increment `num_batches_tracked` and update them with
    /// the unbiased variance. Runs entirely on the device; nothing is read back.
    pub fn forward_train(&mut self, x: &Tensor) -> Result<ForwardOutput> {
        self.check_input(x, true)?;
        let nbt = self
            .num_batches_tracked
            .saturating_add(self.config.track_running_stats as u64);
        let momentum = self.config.momentum.factor(nbt);
        let running = match (&mut self.running_mean, &mut self.running_var) {
            (Some(mean), Some(var)) => Some(RunningStats {
                mean,
                var,
                momentum,
            }),
            _ => None,
        };
        let (y, saved) = ops::forward(
            x,
            running,
            self.weight.as_ref(),
            self.bias.as_ref(),
            true,
            self.config.eps,
            true,
        )?;
        self.num_batches_tracked = nbt;
        Ok(ForwardOutput {
            y: y.expect("y was asked for"),
            saved,
        })
    }

    /// Inference-mode forward: normalize with the running statistics (batch statistics when
    /// they are not tracked). Changes no state.
    pub fn forward_eval(&self, x: &Tensor) -> Result<ForwardOutput> {
        let (y, saved) = self.eval_impl(x, true)?;
        Ok(ForwardOutput {
            y: y.expect("y was asked for"),
            saved,
        })
    }

    fn eval_impl(&self, x: &Tensor, with_y: bool) -> Result<(Option<Tensor>, SavedStats)> {
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
        ops::forward(x, running, w, b, batch_stats, self.config.eps, with_y)
    }

    fn check_input(&self, x: &Tensor, batch_stats: bool) -> Result<()> {
        self.ctx.check_same("input tensor", x.context().id())?;
        self.config.check_input(x.shape(), batch_stats)
    }

    /// Backward of the forward that produced `saved` from `x`: dx, dγ, dβ of Σ y·dy.
    pub fn backward(&mut self, dy: &Tensor, x: &Tensor, saved: &SavedStats) -> Result<Gradients> {
        self.backward_with_mask(dy, x, saved, GradMask::ALL)
    }

    /// Inference-mode backward with the current running statistics as constants
    /// (fine-tuning with frozen statistics): dx = dy·γ·invstd_running.
    pub fn backward_eval(&mut self, dy: &Tensor, x: &Tensor) -> Result<Gradients> {
        if !self.config.track_running_stats {
            return Err(Error::NoRunningStats {
                op: "backward_eval",
            });
        }
        // The frozen statistics, in the form an inference forward saves them (no y pass).
        let (_, saved) = self.eval_impl(x, false)?;
        self.backward_with_mask(dy, x, &saved, GradMask::ALL)
    }

    /// [`backward`](Self::backward) computing only what `mask` asks for.
    pub fn backward_with_mask(
        &mut self,
        dy: &Tensor,
        x: &Tensor,
        saved: &SavedStats,
        mask: GradMask,
    ) -> Result<Gradients> {
        self.ctx.check_same("x", x.context().id())?;
        self.ctx.check_same("dy", dy.context().id())?;
        self.ctx
            .check_same("saved statistics", saved.context().id())?;
        self.config.check_input(x.shape(), false)?;
        let affine = self.config.affine;
        let mask = GradMask {
            input: mask.input,
            weight: affine && mask.weight,
            bias: affine && mask.bias,
        };
        ops::batch_norm_backward(dy, x, saved, self.weight.as_ref(), mask)
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

    fn read(t: &Option<Tensor>) -> Result<Option<Vec<f32>>> {
        t.as_ref().map(Tensor::to_vec).transpose()
    }

    /// γ (`weight`), or `None` without `affine`.
    pub fn weight(&self) -> Result<Option<Vec<f32>>> {
        Self::read(&self.weight)
    }

    /// β (`bias`), or `None` without `affine`.
    pub fn bias(&self) -> Result<Option<Vec<f32>>> {
        Self::read(&self.bias)
    }

    /// Running mean, or `None` without `track_running_stats`.
    pub fn running_mean(&self) -> Result<Option<Vec<f32>>> {
        Self::read(&self.running_mean)
    }

    /// Running (unbiased) variance, or `None` without `track_running_stats`.
    pub fn running_var(&self) -> Result<Option<Vec<f32>>> {
        Self::read(&self.running_var)
    }

    /// γ as a tensor on the device, or `None` without `affine`.
    pub fn weight_tensor(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }

    /// β as a tensor on the device, or `None` without `affine`.
    pub fn bias_tensor(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The running mean as a tensor on the device, or `None` without `track_running_stats`.
    /// A clone keeps its values: the next training forward gives the layer fresh storage.
    pub fn running_mean_tensor(&self) -> Option<&Tensor> {
        self.running_mean.as_ref()
    }

    /// The running variance as a tensor on the device, or `None` without
    /// `track_running_stats`.
    pub fn running_var_tensor(&self) -> Option<&Tensor> {
        self.running_var.as_ref()
    }

    /// Training forwards seen, or `None` without `track_running_stats`.
    pub fn num_batches_tracked(&self) -> Option<u64> {
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

    /// Sets γ. Fails without `affine` or with a length ≠ `num_features`.
    pub fn set_weight(&mut self, weight: &[f32]) -> Result<()> {
        self.set(0, "weight", weight)
    }

    /// Sets β. Fails without `affine` or with a length ≠ `num_features`.
    pub fn set_bias(&mut self, bias: &[f32]) -> Result<()> {
        self.set(1, "bias", bias)
    }

    /// Sets the running mean. Fails without `track_running_stats` or with a wrong length.
    pub fn set_running_mean(&mut self, mean: &[f32]) -> Result<()> {
        self.set(2, "running_mean", mean)
    }

    /// Sets the running variance. Fails without `track_running_stats` or with a wrong length.
    pub fn set_running_var(&mut self, var: &[f32]) -> Result<()> {
        self.set(3, "running_var", var)
    }

    /// Sets `num_batches_tracked` (it drives `momentum = None`).
    pub fn set_num_batches_tracked(&mut self, n: u64) -> Result<()> {
        self.require(self.config.track_running_stats, "num_batches_tracked")?;
        self.num_batches_tracked = n;
        Ok(())
    }

    /// Replaces γ with a tensor already on the device (e.g. after an optimizer step), shape
    /// (C), same context. Fails without `affine`.
    pub fn set_weight_tensor(&mut self, weight: Tensor) -> Result<()> {
        self.set_tensor(0, "weight", weight)
    }

    /// Replaces β with a tensor already on the device, shape (C), same context.
    pub fn set_bias_tensor(&mut self, bias: Tensor) -> Result<()> {
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

    /// The whole state in host memory (one readback per tensor).
    pub fn state(&self) -> Result<BatchNormState> {
        Ok(BatchNormState {
            weight: self.weight()?,
            bias: self.bias()?,
            running_mean: self.running_mean()?,
            running_var: self.running_var()?,
            num_batches_tracked: self.num_batches_tracked(),
        })
    }

    /// Sets the whole state at once (loading a PyTorch checkpoint): every entry is checked
    /// first — present exactly where the configuration has it, `num_features` values — and
    /// nothing changes unless all are right. No readback.
    pub fn load_state(&mut self, state: &BatchNormState) -> Result<()> {
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
