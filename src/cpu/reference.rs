//! The oracle: batch norm in f64, two passes, plain loops, no cleverness. Every other path
//! (the CPU fast path, every GPU adapter) is tested against it, and its backward is itself
//! checked against finite differences of its forward.
//!
//! Semantics are PyTorch's `nn.BatchNorm{1,2,3}d`: training normalizes with the batch mean
//! and biased variance and updates running statistics with the unbiased variance; inference
//! uses the running statistics; `track_running_stats = false` uses batch statistics always.

use crate::config::BatchNormConfig;
use crate::error::Result;
use crate::shape::{Shape, View};

/// A forward's results in f64.
#[derive(Debug, Clone)]
pub struct RefForward {
    /// The output, in the input's shape and layout.
    pub y: Vec<f64>,
    /// The mean normalized with (batch or running).
    pub mean: Vec<f64>,
    /// 1/sqrt(var + eps) normalized with (batch biased, or running).
    pub invstd: Vec<f64>,
    /// Whether batch statistics were used (selects the backward formula).
    pub batch_stats: bool,
}

/// A backward's results in f64.
#[derive(Debug, Clone)]
pub struct RefGrads {
    /// The input gradient, in the input's shape and layout.
    pub dx: Vec<f64>,
    /// The gradient of γ, one per channel.
    pub dweight: Vec<f64>,
    /// The gradient of β (Σ dy), one per channel.
    pub dbias: Vec<f64>,
}

/// The module state, in f64, and the same forward/backward as [`crate::BatchNorm`].
#[derive(Debug, Clone)]
pub struct ReferenceBatchNorm {
    /// The layer's configuration.
    pub config: BatchNormConfig,
    /// γ, one per channel (stays 1 with `affine = false`).
    pub weight: Vec<f64>,
    /// β, one per channel (stays 0 with `affine = false`).
    pub bias: Vec<f64>,
    /// The running mean, one per channel.
    pub running_mean: Vec<f64>,
    /// The running (unbiased) variance, one per channel.
    pub running_var: Vec<f64>,
    /// Training forwards seen while running statistics are tracked.
    pub num_batches_tracked: u64,
}

/// Calls `f(index, channel)` for every value, in memory order.
fn for_each(v: View, mut f: impl FnMut(usize, usize)) {
    for o in 0..v.outer {
        for c in 0..v.channels {
            for s in 0..v.inner {
                f((o * v.channels + c) * v.inner + s, c);
            }
        }
    }
}

/// Per-channel mean and biased variance, two passes.
pub fn batch_stats(x: &[f32], shape: &Shape) -> (Vec<f64>, Vec<f64>) {
    let v = shape.view();
    let n = v.per_channel() as f64;
    let mut mean = vec![0.0; v.channels];
    for_each(v, |i, c| mean[c] += x[i] as f64);
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = vec![0.0; v.channels];
    for_each(v, |i, c| var[c] += (x[i] as f64 - mean[c]).powi(2));
    var.iter_mut().for_each(|m| *m /= n);
    (mean, var)
}

impl ReferenceBatchNorm {
    /// Fresh state with PyTorch's initial values.
    pub fn new(config: BatchNormConfig) -> Self {
        let c = config.num_features;
        Self {
            config,
            weight: vec![1.0; c],
            bias: vec![0.0; c],
            running_mean: vec![0.0; c],
            running_var: vec![1.0; c],
            num_batches_tracked: 0,
        }
    }

    /// Training-mode forward; updates the running statistics when they are tracked.
    pub fn forward_train(&mut self, x: &[f32], shape: &Shape) -> Result<RefForward> {
        self.config.check_input(shape, true)?;
        let (mean, var) = batch_stats(x, shape);
        let n = shape.view().per_channel();
        if self.config.track_running_stats {
            self.num_batches_tracked += 1;
            if n > 0 {
                let m = self.config.momentum.factor(self.num_batches_tracked) as f64;
                for c in 0..mean.len() {
                    let unbiased = var[c] * n as f64 / (n as f64 - 1.0);
                    self.running_mean[c] = (1.0 - m) * self.running_mean[c] + m * mean[c];
                    self.running_var[c] = (1.0 - m) * self.running_var[c] + m * unbiased;
                }
            }
        }
        Ok(self.normalize(x, shape, mean, &var, true))
    }

    /// Inference-mode forward: running statistics, or batch statistics when untracked.
    pub fn forward_eval(&self, x: &[f32], shape: &Shape) -> Result<RefForward> {
        let batch = self.config.uses_batch_stats(false);
        self.config.check_input(shape, batch)?;
        if batch {
            let (mean, var) = batch_stats(x, shape);
            Ok(self.normalize(x, shape, mean, &var, true))
        } else {
            Ok(self.normalize(
                x,
                shape,
                self.running_mean.clone(),
                &self.running_var,
                false,
            ))
        }
    }

    fn normalize(
        &self,
        x: &[f32],
        shape: &Shape,
        mean: Vec<f64>,
        var: &[f64],
        batch_stats: bool,
    ) -> RefForward {
        let eps = self.config.eps as f64;
        let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        let mut y = vec![0.0; x.len()];
        for_each(shape.view(), |i, c| {
            y[i] = (x[i] as f64 - mean[c]) * invstd[c] * self.weight[c] + self.bias[c];
        });
        RefForward {
            y,
            mean,
            invstd,
            batch_stats,
        }
    }

    /// Gradients of Σ y·dy for the forward `fwd` (PyTorch's `batch_norm_backward`).
    pub fn backward(&self, dy: &[f32], x: &[f32], shape: &Shape, fwd: &RefForward) -> RefGrads {
        let v = shape.view();
        let n = v.per_channel() as f64;
        let mut sum_dy = vec![0.0; v.channels];
        let mut sum_dy_xmu = vec![0.0; v.channels];
        for_each(v, |i, c| {
            sum_dy[c] += dy[i] as f64;
            sum_dy_xmu[c] += dy[i] as f64 * (x[i] as f64 - fwd.mean[c]);
        });
        let mut dx = vec![0.0; x.len()];
        for_each(v, |i, c| {
            let (mu, is, g) = (fwd.mean[c], fwd.invstd[c], self.weight[c]);
            dx[i] = if fwd.batch_stats {
                (dy[i] as f64 - sum_dy[c] / n - (x[i] as f64 - mu) * is * is * sum_dy_xmu[c] / n)
                    * is
                    * g
            } else {
                dy[i] as f64 * is * g
            };
        });
        let dweight = (0..v.channels)
            .map(|c| sum_dy_xmu[c] * fwd.invstd[c])
            .collect();
        RefGrads {
            dx,
            dweight,
            dbias: sum_dy,
        }
    }
}
