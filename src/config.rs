//! Module configuration with PyTorch's defaults.

use crate::error::{Error, Result};
use crate::shape::Shape;

/// How the running statistics are averaged, as PyTorch's `momentum` argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Momentum {
    /// `running = (1 − m)·running + m·batch` (PyTorch `momentum=m`, default 0.1).
    Exponential(f32),
    /// Cumulative moving average: the factor is `1/num_batches_tracked` after the
    /// increment (PyTorch `momentum=None`).
    Cumulative,
}

impl Momentum {
    /// The averaging factor of a training step whose `num_batches_tracked` (after the
    /// increment) is `num_batches_tracked`.
    pub fn factor(self, num_batches_tracked: u64) -> f32 {
        match self {
            Momentum::Exponential(m) => m,
            // PyTorch computes 1.0 / float(num_batches_tracked) in f64 and passes it down.
            Momentum::Cumulative => (1.0 / num_batches_tracked.max(1) as f64) as f32,
        }
    }
}

/// Configuration of a [`BatchNorm`](crate::BatchNorm) layer. [`BatchNormConfig::new`] gives
/// PyTorch's defaults: `eps = 1e-5`, `momentum = 0.1`, `affine = true`,
/// `track_running_stats = true`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNormConfig {
    /// C, the number of channels (dim 1 of the input).
    pub num_features: usize,
    /// Added to the variance before the square root. Finite and > 0.
    pub eps: f32,
    /// Running-statistics averaging.
    pub momentum: Momentum,
    /// Learnable per-channel γ (init 1) and β (init 0). Without it γ = 1, β = 0 and the
    /// backward returns no dγ/dβ.
    pub affine: bool,
    /// Keep running mean (init 0), running variance (init 1) and `num_batches_tracked`.
    /// Without them both modes normalize with batch statistics and nothing is updated.
    pub track_running_stats: bool,
}

impl BatchNormConfig {
    /// PyTorch's defaults for `num_features` channels.
    pub fn new(num_features: usize) -> Self {
        Self {
            num_features,
            eps: 1e-5,
            momentum: Momentum::Exponential(0.1),
            affine: true,
            track_running_stats: true,
        }
    }

    /// Sets `eps`.
    pub fn eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }

    /// Sets an exponential momentum (PyTorch `momentum=m`).
    pub fn momentum(mut self, momentum: f32) -> Self {
        self.momentum = Momentum::Exponential(momentum);
        self
    }

    /// Cumulative moving average (PyTorch `momentum=None`).
    pub fn cumulative_average(mut self) -> Self {
        self.momentum = Momentum::Cumulative;
        self
    }

    /// Sets `affine`.
    pub fn affine(mut self, affine: bool) -> Self {
        self.affine = affine;
        self
    }

    /// Sets `track_running_stats`.
    pub fn track_running_stats(mut self, track: bool) -> Self {
        self.track_running_stats = track;
        self
    }

    /// Checks every field; the constructors of modules call it.
    pub fn validate(&self) -> Result<()> {
        if self.num_features == 0 {
            return Err(Error::InvalidNumFeatures(self.num_features));
        }
        validate_eps(self.eps)?;
        if let Momentum::Exponential(m) = self.momentum {
            validate_momentum(m)?;
        }
        Ok(())
    }
}

impl BatchNormConfig {
    /// Checks an input shape against this configuration, as PyTorch does before a forward:
    /// rank 2 to 5, C = `num_features`, and more than one value per channel whenever batch
    /// statistics are computed.
    pub fn check_input(&self, shape: &Shape, batch_stats: bool) -> Result<()> {
        shape.check_rank()?;
        if shape.channels() != self.num_features {
            return Err(Error::ChannelMismatch {
                expected: self.num_features,
                got: shape.channels(),
                shape: shape.dims().to_vec(),
            });
        }
        if batch_stats && shape.batch() * shape.spatial() == 1 {
            return Err(Error::TooFewValuesPerChannel {
                shape: shape.dims().to_vec(),
            });
        }
        Ok(())
    }

    /// Whether a forward in the given mode normalizes with batch statistics (training, or no
    /// running statistics to use).
    pub fn uses_batch_stats(&self, training: bool) -> bool {
        training || !self.track_running_stats
    }
}

pub(crate) fn validate_eps(eps: f32) -> Result<()> {
    if eps.is_finite() && eps > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidEps(eps))
    }
}

pub(crate) fn validate_momentum(m: f32) -> Result<()> {
    if (0.0..=1.0).contains(&m) {
        Ok(())
    } else {
        Err(Error::InvalidMomentum(m))
    }
}
