//! The values the functional API passes between its pieces: saved statistics, moments,
//! gradient sums (each in a device form and, for exchange between devices and processes, a
//! documented host form), and the outputs of the one-call ops.

use crate::backend::Summaries;
use crate::context::{Context, Data, Tensor};
use crate::error::{Error, Result};
use crate::shape::Shape;

/// Running statistics for an op to update in place: `running = (1 − momentum)·running +
/// momentum·batch` (PyTorch's `momentum`; resolve `momentum=None` to
/// 1/num_batches_tracked before the call, as PyTorch's layers do).
#[derive(Debug)]
pub struct RunningStats<'a> {
    /// Running mean, shape (C).
    pub mean: &'a mut Tensor,
    /// Running (unbiased) variance, shape (C).
    pub var: &'a mut Tensor,
    /// The averaging factor, in [0, 1].
    pub momentum: f32,
}

/// What a forward saves for the backward: the per-channel mean it normalized with and
/// invstd = 1/sqrt(var + eps), plus whether they were batch statistics (training formula)
/// or running statistics (inference formula).
#[derive(Clone, Debug)]
pub struct SavedStats {
    channels: usize,
    /// The input the statistics were computed for, when one forward computed them (the
    /// layer's backward insists on the same input); None after a gather of several parts.
    shape: Option<Shape>,
    batch_stats: bool,
    /// (mean, invstd) interleaved per channel.
    pub(crate) data: Data,
    ctx: Context,
}

impl SavedStats {
    pub(crate) fn new(
        ctx: &Context,
        channels: usize,
        shape: Option<Shape>,
        batch_stats: bool,
        data: Data,
    ) -> Self {
        Self {
            channels,
            shape,
            batch_stats,
            data,
            ctx: ctx.clone(),
        }
    }

    fn interleaved(&self) -> Result<Vec<f32>> {
        Tensor::new(
            &self.ctx,
            Shape::new(&[self.channels, 2])?,
            self.data.clone(),
        )
        .to_vec()
    }

    /// The mean used to normalize, per channel (PyTorch's `save_mean` in training).
    pub fn mean(&self) -> Result<Vec<f32>> {
        Ok(self.interleaved()?.chunks(2).map(|p| p[0]).collect())
    }

    /// 1/sqrt(var + eps) used to normalize, per channel (PyTorch's `save_invstd`).
    pub fn invstd(&self) -> Result<Vec<f32>> {
        Ok(self.interleaved()?.chunks(2).map(|p| p[1]).collect())
    }

    /// Whether these are batch statistics (training-mode forward, or no running statistics).
    pub fn is_batch_stats(&self) -> bool {
        self.batch_stats
    }

    /// C, the number of channels.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The context the statistics live in.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Fails unless these statistics can serve x: same context, same channels and, with
    /// `same_input` and statistics of one forward, x's own shape.
    pub(crate) fn check_for(&self, x: &Tensor, same_input: bool) -> Result<()> {
        x.context().check_same("saved statistics", self.ctx.id())?;
        let shape_differs = match (&self.shape, same_input) {
            (Some(s), true) => s != x.shape(),
            _ => false,
        };
        if shape_differs || self.channels != x.shape().channels() {
            return Err(Error::SavedStatsMismatch {
                expected_channels: self.channels,
                expected_shape: self
                    .shape
                    .as_ref()
                    .map_or(vec![0, self.channels], |s| s.dims().to_vec()),
                got: x.dims().to_vec(),
            });
        }
        Ok(())
    }
}

/// Per-channel moments of one part of a batch: its count and, per channel, the mean and
/// M2 = Σ (x − mean)², in a form that merges exactly (Chan et al.) with other parts'. The
/// device form stays on the device; [`to_host`](Self::to_host) gives the host form.
#[derive(Clone)]
pub struct Moments {
    ctx: Context,
    channels: usize,
    count: u64,
    pub(crate) data: Summaries,
}

impl std::fmt::Debug for Moments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Moments")
            .field("channels", &self.channels)
            .field("count", &self.count)
            .field("context", &self.ctx)
            .finish()
    }
}

/// The host form of [`Moments`]: `count` values per channel (u64, exact), and per channel
/// the mean and M2 = Σ (x − mean)² in f64. An empty part has count 0 (its means and M2s are
/// then ignored).
#[derive(Clone, Debug, PartialEq)]
pub struct MomentsHost {
    /// The values per channel.
    pub count: u64,
    /// The mean, one per channel.
    pub mean: Vec<f64>,
    /// M2 = Σ (x − mean)², one per channel.
    pub m2: Vec<f64>,
}

impl MomentsHost {
    /// Chan et al.'s merge of several parts in the given order, in f64.
    pub fn merge(parts: &[MomentsHost]) -> Result<MomentsHost> {
        let c = parts.first().map_or(0, |p| p.mean.len());
        let mut out = MomentsHost {
            count: 0,
            mean: vec![0.0; c],
            m2: vec![0.0; c],
        };
        for p in parts {
            p.check(c)?;
            if p.count == 0 {
                continue;
            }
            if out.count == 0 {
                out = p.clone();
                continue;
            }
            let n = out.count + p.count;
            let wb = p.count as f64 / n as f64;
            for ch in 0..c {
                let d = p.mean[ch] - out.mean[ch];
                out.mean[ch] += d * wb;
                out.m2[ch] += p.m2[ch] + d * d * out.count as f64 * wb;
            }
            out.count = n;
        }
        Ok(out)
    }

    fn check(&self, channels: usize) -> Result<()> {
        for (name, v) in [("mean", &self.mean), ("m2", &self.m2)] {
            if v.len() != channels {
                return Err(Error::ParameterLength {
                    name,
                    expected: channels,
                    got: v.len(),
                });
            }
        }
        Ok(())
    }
}

impl Moments {
    pub(crate) fn new(ctx: &Context, channels: usize, count: u64, data: Summaries) -> Self {
        Self {
            ctx: ctx.clone(),
            channels,
            count,
            data,
        }
    }

    /// Values per channel in this part.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// C, the number of channels.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The context the moments live in.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// The host form (reads back from a GPU).
    pub fn to_host(&self) -> Result<MomentsHost> {
        let pairs =
            self.ctx
                .kernels()
                .download_summaries(&self.data, self.channels, self.count, true)?;
        Ok(MomentsHost {
            count: self.count,
            mean: pairs.iter().map(|p| p[0]).collect(),
            m2: pairs.iter().map(|p| p[1]).collect(),
        })
    }

    /// Moments on `ctx` from their host form (e.g. another process's part).
    pub fn from_host(ctx: &Context, host: &MomentsHost) -> Result<Self> {
        let c = host.mean.len();
        if c == 0 {
            return Err(Error::InvalidNumFeatures(0));
        }
        host.check(c)?;
        let pairs: Vec<[f64; 2]> = host
            .mean
            .iter()
            .zip(&host.m2)
            .map(|(&m, &q)| [m, q])
            .collect();
        let data = ctx.kernels().upload_summaries(&pairs, host.count, true)?;
        Ok(Self::new(ctx, c, host.count, data))
    }
}

/// Per-channel sums of one part's backward, Σ dy and Σ dy·(x − μ), plus the part's dγ and
/// dβ where asked. Sum the parts' (e.g. an all-reduce of the host forms) before
/// [`batch_norm_backward_elemt`](crate::ops::batch_norm_backward_elemt).
#[derive(Clone)]
pub struct GradSums {
    ctx: Context,
    channels: usize,
    pub(crate) data: Summaries,
    dweight: Option<Tensor>,
    dbias: Option<Tensor>,
}

impl std::fmt::Debug for GradSums {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradSums")
            .field("channels", &self.channels)
            .field("context", &self.ctx)
            .finish()
    }
}

/// The host form of [`GradSums`]: per channel Σ dy and Σ dy·(x − μ), in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct GradSumsHost {
    /// Σ dy, one per channel.
    pub sum_dy: Vec<f64>,
    /// Σ dy·(x − μ), one per channel.
    pub sum_dy_xmu: Vec<f64>,
}

impl GradSumsHost {
    /// Adds another part's sums.
    pub fn add(&mut self, other: &GradSumsHost) -> Result<()> {
        let c = self.sum_dy.len();
        for (name, v) in [("sum_dy", &other.sum_dy), ("sum_dy_xmu", &other.sum_dy_xmu)] {
            if v.len() != c {
                return Err(Error::ParameterLength {
                    name,
                    expected: c,
                    got: v.len(),
                });
            }
        }
        for ch in 0..c {
            self.sum_dy[ch] += other.sum_dy[ch];
            self.sum_dy_xmu[ch] += other.sum_dy_xmu[ch];
        }
        Ok(())
    }
}

impl GradSums {
    pub(crate) fn new(
        ctx: &Context,
        channels: usize,
        data: Summaries,
        dweight: Option<Tensor>,
        dbias: Option<Tensor>,
    ) -> Self {
        Self {
            ctx: ctx.clone(),
            channels,
            data,
            dweight,
            dbias,
        }
    }

    /// C, the number of channels.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The context the sums live in.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// This part's dγ = Σ dy·(x − μ)·invstd, when it was asked for.
    pub fn dweight(&self) -> Option<&Tensor> {
        self.dweight.as_ref()
    }

    /// This part's dβ = Σ dy, when it was asked for.
    pub fn dbias(&self) -> Option<&Tensor> {
        self.dbias.as_ref()
    }

    /// The host form of the sums (reads back from a GPU).
    pub fn to_host(&self) -> Result<GradSumsHost> {
        let pairs = self
            .ctx
            .kernels()
            .download_summaries(&self.data, self.channels, 0, false)?;
        Ok(GradSumsHost {
            sum_dy: pairs.iter().map(|p| p[0]).collect(),
            sum_dy_xmu: pairs.iter().map(|p| p[1]).collect(),
        })
    }

    /// Sums on `ctx` from their host form (e.g. after an all-reduce); no dγ, dβ.
    pub fn from_host(ctx: &Context, host: &GradSumsHost) -> Result<Self> {
        let c = host.sum_dy.len();
        if c == 0 {
            return Err(Error::InvalidNumFeatures(0));
        }
        if host.sum_dy_xmu.len() != c {
            return Err(Error::ParameterLength {
                name: "sum_dy_xmu",
                expected: c,
                got: host.sum_dy_xmu.len(),
            });
        }
        let pairs: Vec<[f64; 2]> = host
            .sum_dy
            .iter()
            .zip(&host.sum_dy_xmu)
            .map(|(&a, &b)| [a, b])
            .collect();
        let data = ctx.kernels().upload_summaries(&pairs, 0, false)?;
        Ok(Self::new(ctx, c, data, None, None))
    }
}

/// The output of a forward.
#[derive(Clone, Debug)]
pub struct ForwardOutput {
    /// The normalized, scaled and shifted output, same shape and layout as the input.
    pub y: Tensor,
    /// What the backward needs.
    pub saved: SavedStats,
}

/// Which gradients to compute (PyTorch's `output_mask`). Skipped outputs cost nothing:
/// with only `input` in inference mode, no reduction runs; without `input`, no dx pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GradMask {
    /// Compute dx.
    pub input: bool,
    /// Compute dγ.
    pub weight: bool,
    /// Compute dβ.
    pub bias: bool,
}

impl GradMask {
    /// dx, dγ and dβ.
    pub const ALL: Self = Self {
        input: true,
        weight: true,
        bias: true,
    };
    /// Only dx.
    pub const INPUT: Self = Self {
        input: true,
        weight: false,
        bias: false,
    };
    /// Only dγ and dβ.
    pub const PARAMS: Self = Self {
        input: false,
        weight: true,
        bias: true,
    };
}

/// Gradients of a backward; `None` where not requested or not applicable (no dγ/dβ without
/// `affine`).
#[derive(Clone, Debug)]
pub struct Gradients {
    /// The input gradient, same shape and layout as the input.
    pub dx: Option<Tensor>,
    /// The gradient of γ, one per channel.
    pub dweight: Option<Tensor>,
    /// The gradient of β, one per channel.
    pub dbias: Option<Tensor>,
}

/// Gradients of [`batch_norm_relu_backward`](crate::ops::batch_norm_relu_backward): those of
/// [`Gradients`] and, when the forward added a residual, its gradient dz.
#[derive(Clone, Debug)]
pub struct ReluGradients {
    /// The input gradient, same shape and layout as the input.
    pub dx: Option<Tensor>,
    /// The gradient of γ, one per channel.
    pub dweight: Option<Tensor>,
    /// The gradient of β, one per channel.
    pub dbias: Option<Tensor>,
    /// The residual's gradient dz = dy·\[y > 0\], same shape and layout as the input.
    pub dz: Option<Tensor>,
}
