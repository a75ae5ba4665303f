//! [`BatchNorm`]: the layer. It holds state and mode only — γ, β, the running statistics and
//! `num_batches_tracked`, as tensors on its context's device — and runs every forward and
//! backward through the functional API ([`crate::ops`]), as PyTorch's `nn.BatchNorm{1,2,3}d`
//! runs through `F.batch_norm`.

use super::state::{state_accessors, LayerState};
use crate::backend::Epilogue;
use crate::config::BatchNormConfig;
use crate::context::{Context, Tensor};
use crate::error::Result;
use crate::ops::{ForwardOutput, GradMask, Gradients, ReluGradients, SavedStats};

/// The whole state of a layer in host memory, as in a PyTorch state dict: `Some` exactly for
/// what the configuration has (γ and β with `affine`; the running statistics and
/// `num_batches_tracked` with `track_running_stats`).
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormState {
    /// γ, one per channel.
    pub weight: Option<Vec<f32>>,
    /// β, one per channel.
    pub bias: Option<Vec<f32>>,
    /// The running mean, one per channel.
    pub running_mean: Option<Vec<f32>>,
    /// The running (unbiased) variance, one per channel.
    pub running_var: Option<Vec<f32>>,
    /// Training forwards seen (it drives `momentum = None`).
    pub num_batches_tracked: Option<u64>,
}

/// A batch-normalization layer with PyTorch's `nn.BatchNorm{1,2,3}d` semantics.
///
/// Create it in training mode (as PyTorch does); [`eval`](Self::eval) switches to inference.
/// A training step (forward_train + backward) reads nothing back and uploads no parameters.
pub struct BatchNorm {
    state: LayerState,
}

impl std::fmt::Debug for BatchNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.state;
        f.debug_struct("BatchNorm")
            .field("context", &s.ctx)
            .field("config", &s.config)
            .field("training", &s.training)
            .field("num_batches_tracked", &s.num_batches_tracked)
            .finish()
    }
}

impl BatchNorm {
    /// A layer with PyTorch's initial state: γ = 1, β = 0, running mean 0, running var 1,
    /// `num_batches_tracked` 0, training mode.
    pub fn new(ctx: &Context, config: BatchNormConfig) -> Result<Self> {
        LayerState::new(ctx, config).map(|state| Self { state })
    }

    /// The configuration.
    pub fn config(&self) -> &BatchNormConfig {
        &self.state.config
    }

    /// The context the layer lives in.
    pub fn context(&self) -> &Context {
        &self.state.ctx
    }

    /// Switches to training mode (batch statistics, running statistics updated).
    pub fn train(&mut self) {
        self.state.training = true;
    }

    /// Switches to inference mode (running statistics, when tracked).
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

    /// Training-mode forward: normalize with the batch mean and biased variance; when
    /// running statistics are tracked, increment `num_batches_tracked` and update them with
    /// the unbiased variance. Runs entirely on the device; nothing is read back.
    pub fn forward_train(&mut self, x: &Tensor) -> Result<ForwardOutput> {
        self.state.forward_train(x)
    }

    /// Inference-mode forward: normalize with the running statistics (batch statistics when
    /// they are not tracked). Changes no state.
    pub fn forward_eval(&self, x: &Tensor) -> Result<ForwardOutput> {
        self.state.forward_eval(x)
    }

    /// Backward of the forward that produced `saved` from `x`: dx, dγ, dβ of Σ y·dy.
    pub fn backward(&mut self, dy: &Tensor, x: &Tensor, saved: &SavedStats) -> Result<Gradients> {
        self.backward_with_mask(dy, x, saved, GradMask::ALL)
    }

    /// Inference-mode backward with the current running statistics as constants
    /// (fine-tuning with frozen statistics): dx = dy·γ·invstd_running.
    pub fn backward_eval(&mut self, dy: &Tensor, x: &Tensor) -> Result<Gradients> {
        self.state.backward_eval(dy, x)
    }

    /// [`backward`](Self::backward) computing only what `mask` asks for.
    pub fn backward_with_mask(
        &mut self,
        dy: &Tensor,
        x: &Tensor,
        saved: &SavedStats,
        mask: GradMask,
    ) -> Result<Gradients> {
        self.state.local_backward(dy, x, saved, mask)
    }

    /// [`forward`](Self::forward) fused with a ReLU, and with the add of `residual` (x's
    /// shape and layout) before it: y = relu(bn(x) + z), as a ResNet block's
    /// `relu(bn(conv(x)) + identity)` ([`ops::batch_norm_relu`](crate::ops::batch_norm_relu)).
    /// The state changes as in [`forward`](Self::forward).
    pub fn forward_relu(&mut self, x: &Tensor, residual: Option<&Tensor>) -> Result<ForwardOutput> {
        let epi = Epilogue {
            residual,
            relu: true,
        };
        if self.state.training {
            self.state.forward_train_fused(x, epi)
        } else {
            self.state.forward_eval_fused(x, epi)
        }
    }

    /// Backward of [`forward_relu`](Self::forward_relu), from its output `y`: dx, dγ, dβ of
    /// the gradient the ReLU passes (dy where y > 0) and, with `residual` (the forward
    /// added one), dz ([`ops::batch_norm_relu_backward`](crate::ops::batch_norm_relu_backward)).
    pub fn backward_relu(
        &mut self,
        dy: &Tensor,
        y: &Tensor,
        x: &Tensor,
        saved: &SavedStats,
        residual: bool,
    ) -> Result<ReluGradients> {
        self.state.local_backward_relu(dy, y, x, saved, residual)
    }

    // ---- state access (load a PyTorch state dict, inspect training) ----

    state_accessors!();
}
