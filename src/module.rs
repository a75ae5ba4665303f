//! [`BatchNorm`]: the layer, its state, its forward and backward, on any [`Context`].

use std::sync::Arc;

use crate::config::BatchNormConfig;
use crate::context::{Backend, Context, Data, Tensor};
use crate::cpu::fast;
use crate::error::{Error, Result};
use crate::gpu::context::GpuContext;
use crate::gpu::ops::{self, BackwardBuffers, ForwardBuffers};
use crate::gpu::pool::GpuBuffer;
use crate::shape::Shape;

/// What a forward saves for the backward: the per-channel mean it normalized with and
/// invstd = 1/sqrt(var + eps), plus whether they were batch statistics (training formula)
/// or running statistics (inference formula).
#[derive(Clone, Debug)]
pub struct SavedStats {
    shape: Shape,
    batch_stats: bool,
    /// (mean, invstd) interleaved per channel.
    data: Data,
    ctx: Context,
}

impl std::fmt::Debug for Data {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Data::Gpu(_) => f.write_str("gpu"),
            Data::Cpu(_) => f.write_str("cpu"),
        }
    }
}

impl SavedStats {
    fn interleaved(&self) -> Result<Vec<f32>> {
        Tensor::new(
            &self.ctx,
            Shape::new(&[self.shape.channels(), 2])?,
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
    pub input: bool,
    pub weight: bool,
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
    pub dx: Option<Tensor>,
    pub dweight: Option<Tensor>,
    pub dbias: Option<Tensor>,
}

/// Per-channel state: γ, β, running mean, running variance.
enum State {
    /// (γ, β, running_mean, running_var) interleaved per channel; the kernels read and
    /// update it in place.
    Gpu(GpuBuffer),
    Cpu {
        weight: Vec<f32>,
        bias: Vec<f32>,
        running_mean: Vec<f32>,
        running_var: Vec<f32>,
    },
}

/// A batch-normalization layer with PyTorch's `nn.BatchNorm{1,2,3}d` semantics.
///
/// Create it in training mode (as PyTorch does); [`eval`](Self::eval) switches to inference.
pub struct BatchNorm {
    ctx: Context,
    config: BatchNormConfig,
    training: bool,
    num_batches_tracked: u64,
    state: State,
    /// Reduction partials, reused across calls (grown when a larger input needs more).
    scratch: Option<wgpu::Buffer>,
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

fn gpu(ctx: &Context) -> Option<&Arc<GpuContext>> {
    match ctx.backend() {
        Backend::Gpu(g) => Some(g),
        Backend::Cpu => None,
    }
}

impl BatchNorm {
    /// A layer with PyTorch's initial state: γ = 1, β = 0, running mean 0, running var 1,
    /// `num_batches_tracked` 0, training mode.
    pub fn new(ctx: &Context, config: BatchNormConfig) -> Result<Self> {
        config.validate()?;
        let c = config.num_features;
        let state = match ctx.backend() {
            Backend::Cpu => State::Cpu {
                weight: vec![1.0; c],
                bias: vec![0.0; c],
                running_mean: vec![0.0; c],
                running_var: vec![1.0; c],
            },
            Backend::Gpu(g) => {
                let init: Vec<f32> = (0..c).flat_map(|_| [1.0, 0.0, 0.0, 1.0]).collect();
                State::Gpu(g.upload(&init, "batchnorm state")?)
            }
        };
        Ok(Self {
            ctx: ctx.clone(),
            config,
            training: true,
            num_batches_tracked: 0,
            state,
            scratch: None,
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
        self.run_forward(x, true)
    }

    /// Inference-mode forward: normalize with the running statistics (batch statistics when
    /// they are not tracked). Changes no state.
    pub fn forward_eval(&mut self, x: &Tensor) -> Result<ForwardOutput> {
        self.run_forward(x, false)
    }

    fn run_forward(&mut self, x: &Tensor, training: bool) -> Result<ForwardOutput> {
        let (y, saved) = self.forward_impl(x, training, true)?;
        Ok(ForwardOutput {
            y: y.expect("y was asked for"),
            saved,
        })
    }

    /// A forward; `with_y = false` computes only the saved statistics (no pass writing y).
    fn forward_impl(
        &mut self,
        x: &Tensor,
        training: bool,
        with_y: bool,
    ) -> Result<(Option<Tensor>, SavedStats)> {
        self.ctx.check_same("input tensor", x.context().id())?;
        let batch_stats = self.config.uses_batch_stats(training);
        self.config.check_input(x.shape(), batch_stats)?;
        let update = training && self.config.track_running_stats;
        let nbt = self.num_batches_tracked.saturating_add(update as u64);
        let view = x.shape().view();
        // An empty batch updates nothing but the counter (as PyTorch does).
        let momentum = (update && view.per_channel() > 0).then(|| self.config.momentum.factor(nbt));
        let c = self.config.num_features;
        let (y, saved) = match (&mut self.state, &x.data) {
            (
                State::Cpu {
                    weight,
                    bias,
                    running_mean,
                    running_var,
                },
                Data::Cpu(xs),
            ) => {
                let eps = self.config.eps as f64;
                let (mean, invstd): (Vec<f32>, Vec<f32>) = if batch_stats {
                    let stats = fast::stats(xs, view);
                    let n = view.per_channel() as f64;
                    if let Some(m) = momentum {
                        let m = m as f64;
                        for (ch, &(mu, m2)) in stats.iter().enumerate() {
                            let rm = running_mean[ch] as f64;
                            let rv = running_var[ch] as f64;
                            running_mean[ch] = (m * mu + (1.0 - m) * rm) as f32;
                            running_var[ch] = (m * m2 / (n - 1.0) + (1.0 - m) * rv) as f32;
                        }
                    }
                    if n == 0.0 {
                        // An empty batch: nothing to normalize; saved as zeros (as the GPU does).
                        (vec![0.0; c], vec![0.0; c])
                    } else {
                        stats
                            .iter()
                            .map(|&(mu, m2)| (mu as f32, (1.0 / (m2 / n + eps).sqrt()) as f32))
                            .unzip()
                    }
                } else {
                    running_var
                        .iter()
                        .zip(running_mean.iter())
                        .map(|(&rv, &rm)| (rm, (1.0 / (rv as f64 + eps).sqrt()) as f32))
                        .unzip()
                };
                let scale: Vec<f32> = weight.iter().zip(&invstd).map(|(g, i)| g * i).collect();
                let y = with_y.then(|| fast::affine_centered(xs, &mean, &scale, bias, view));
                let saved: Vec<f32> = mean
                    .iter()
                    .zip(&invstd)
                    .flat_map(|(&m, &i)| [m, i])
                    .collect();
                (
                    y.map(|y| Data::Cpu(Arc::new(y))),
                    Data::Cpu(Arc::new(saved)),
                )
            }
            (State::Gpu(state), Data::Gpu(xb)) => {
                let g = gpu(&self.ctx).expect("GPU state lives in a GPU context");
                let plan = g.plan(view)?;
                let (y, saved, partials) = g.guarded(|| {
                    let partials = grow(g, &mut self.scratch, plan.partials_len());
                    (
                        with_y.then(|| g.alloc(view.numel(), "y")),
                        g.alloc(2 * c, "saved"),
                        partials,
                    )
                })?;
                if view.numel() == 0 {
                    // Nothing to launch; pooled buffers hold old data, so say zeros.
                    g.fill_zero(&saved, 2 * c);
                } else {
                    ops::forward(
                        g,
                        &plan,
                        &ForwardBuffers {
                            x: xb,
                            state,
                            partials: &partials,
                            saved: &saved,
                            y: y.as_deref(),
                        },
                        batch_stats,
                        momentum,
                        self.config.eps,
                    )?;
                }
                (
                    y.map(|y| Data::Gpu(Arc::new(y))),
                    Data::Gpu(Arc::new(saved)),
                )
            }
            _ => unreachable!("tensor and layer of one context share a backend"),
        };
        self.num_batches_tracked = nbt;
        Ok((
            y.map(|y| Tensor::new(&self.ctx, x.shape().clone(), y)),
            SavedStats {
                shape: x.shape().clone(),
                batch_stats,
                data: saved,
                ctx: self.ctx.clone(),
            },
        ))
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
        let (_, saved) = self.forward_impl(x, false, false)?;
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
        self.ctx.check_same("saved statistics", saved.ctx.id())?;
        self.config.check_input(x.shape(), false)?;
        if dy.shape() != x.shape() {
            return Err(Error::ShapeMismatch {
                what: "dy must have the shape and layout of x",
                expected: x.dims().to_vec(),
                got: dy.dims().to_vec(),
            });
        }
        if saved.shape != *x.shape() {
            return Err(Error::SavedStatsMismatch {
                expected_channels: saved.shape.channels(),
                expected_shape: saved.shape.dims().to_vec(),
                got: x.dims().to_vec(),
            });
        }
        let training = saved.batch_stats;
        let want_params = self.config.affine && (mask.weight || mask.bias);
        let view = x.shape().view();
        let c = self.config.num_features;
        let (dx, dw, db): (Option<Data>, Data, Data) =
            match (&self.state, &x.data, &dy.data, &saved.data) {
                (State::Cpu { weight, .. }, Data::Cpu(xs), Data::Cpu(dys), Data::Cpu(sv)) => {
                    let mean: Vec<f32> = sv.chunks(2).map(|p| p[0]).collect();
                    let sums = if want_params || (mask.input && training) {
                        fast::grad_sums(xs, dys, &mean, view)
                    } else {
                        vec![(0.0, 0.0); c]
                    };
                    let n = view.per_channel() as f64;
                    let coef: Vec<[f32; 4]> = (0..c)
                        .map(|ch| {
                            let (mu, is) = (sv[2 * ch] as f64, sv[2 * ch + 1] as f64);
                            let a = weight[ch] as f64 * is;
                            let (sdy, sdyx) = sums[ch];
                            [
                                mu as f32,
                                a as f32,
                                (-a * is * is * sdyx / n) as f32,
                                (a * sdy / n) as f32,
                            ]
                        })
                        .collect();
                    let dx = mask.input.then(|| {
                        Data::Cpu(Arc::new(fast::grad_input(xs, dys, &coef, training, view)))
                    });
                    // An empty batch has zero gradients, whatever the statistics (0·NaN).
                    let dw: Vec<f32> = (0..c)
                        .map(|ch| {
                            if n == 0.0 {
                                0.0
                            } else {
                                (sums[ch].1 * sv[2 * ch + 1] as f64) as f32
                            }
                        })
                        .collect();
                    let db: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
                    (dx, Data::Cpu(Arc::new(dw)), Data::Cpu(Arc::new(db)))
                }
                (State::Gpu(state), Data::Gpu(xb), Data::Gpu(dyb), Data::Gpu(sb)) => {
                    let g = gpu(&self.ctx).expect("GPU state lives in a GPU context");
                    let plan = g.plan(view)?;
                    let reduce = want_params || (mask.input && training);
                    let (dx, dw, db, coef, partials) = g.guarded(|| {
                        let partials = grow(g, &mut self.scratch, plan.partials_len());
                        (
                            mask.input.then(|| g.alloc(view.numel(), "dx")),
                            g.alloc(c, "dweight"),
                            g.alloc(c, "dbias"),
                            g.alloc(4 * c, "coef"),
                            partials,
                        )
                    })?;
                    if view.numel() == 0 {
                        // An empty batch has zero gradients; pooled buffers hold old data.
                        g.fill_zero(&dw, c);
                        g.fill_zero(&db, c);
                    } else {
                        ops::backward(
                            g,
                            &plan,
                            &BackwardBuffers {
                                x: xb,
                                dy: dyb,
                                saved: sb,
                                state,
                                partials: &partials,
                                dweight: &dw,
                                dbias: &db,
                                coef: &coef,
                                dx: dx.as_deref(),
                            },
                            training,
                            reduce,
                        )?;
                    }
                    (
                        dx.map(|b| Data::Gpu(Arc::new(b))),
                        Data::Gpu(Arc::new(dw)),
                        Data::Gpu(Arc::new(db)),
                    )
                }
                _ => unreachable!("tensors and layer of one context share a backend"),
            };
        let per_channel = |d: Data| Tensor::new(&self.ctx, Shape::new(&[c]).expect("rank 1"), d);
        Ok(Gradients {
            dx: dx.map(|d| Tensor::new(&self.ctx, x.shape().clone(), d)),
            dweight: (self.config.affine && mask.weight).then(|| per_channel(dw.clone())),
            dbias: (self.config.affine && mask.bias).then(|| per_channel(db)),
        })
    }

    // ---- state access (load a PyTorch state dict, inspect training) ----

    fn column(&self, k: usize) -> Result<Vec<f32>> {
        match &self.state {
            State::Cpu {
                weight,
                bias,
                running_mean,
                running_var,
            } => Ok([weight, bias, running_mean, running_var][k].clone()),
            State::Gpu(b) => {
                let g = gpu(&self.ctx).expect("GPU state lives in a GPU context");
                let all = g.read(b, 4 * self.config.num_features)?;
                Ok(all.chunks(4).map(|s| s[k]).collect())
            }
        }
    }

    fn set_column(&mut self, k: usize, name: &'static str, values: &[f32]) -> Result<()> {
        let c = self.config.num_features;
        if values.len() != c {
            return Err(Error::ParameterLength {
                name,
                expected: c,
                got: values.len(),
            });
        }
        match &mut self.state {
            State::Cpu {
                weight,
                bias,
                running_mean,
                running_var,
            } => {
                [weight, bias, running_mean, running_var][k].copy_from_slice(values);
                Ok(())
            }
            State::Gpu(b) => {
                let g = gpu(&self.ctx).expect("GPU state lives in a GPU context");
                let mut all = g.read(b, 4 * c)?;
                for (s, &v) in all.chunks_mut(4).zip(values) {
                    s[k] = v;
                }
                let fresh = g.upload(&all, "batchnorm state")?;
                *b = fresh;
                Ok(())
            }
        }
    }

    fn require_affine(&self, name: &'static str) -> Result<()> {
        if self.config.affine {
            Ok(())
        } else {
            Err(Error::NoSuchParameter {
                name,
                because: "affine = false",
            })
        }
    }

    fn require_tracking(&self, name: &'static str) -> Result<()> {
        if self.config.track_running_stats {
            Ok(())
        } else {
            Err(Error::NoSuchParameter {
                name,
                because: "track_running_stats = false",
            })
        }
    }

    /// γ (`weight`), or `None` without `affine`.
    pub fn weight(&self) -> Result<Option<Vec<f32>>> {
        if !self.config.affine {
            return Ok(None);
        }
        self.column(0).map(Some)
    }

    /// β (`bias`), or `None` without `affine`.
    pub fn bias(&self) -> Result<Option<Vec<f32>>> {
        if !self.config.affine {
            return Ok(None);
        }
        self.column(1).map(Some)
    }

    /// Running mean, or `None` without `track_running_stats`.
    pub fn running_mean(&self) -> Result<Option<Vec<f32>>> {
        if !self.config.track_running_stats {
            return Ok(None);
        }
        self.column(2).map(Some)
    }

    /// Running (unbiased) variance, or `None` without `track_running_stats`.
    pub fn running_var(&self) -> Result<Option<Vec<f32>>> {
        if !self.config.track_running_stats {
            return Ok(None);
        }
        self.column(3).map(Some)
    }

    /// Training forwards seen, or `None` without `track_running_stats`.
    pub fn num_batches_tracked(&self) -> Option<u64> {
        self.config
            .track_running_stats
            .then_some(self.num_batches_tracked)
    }

    /// Sets γ. Fails without `affine` or with a length ≠ `num_features`.
    pub fn set_weight(&mut self, weight: &[f32]) -> Result<()> {
        self.require_affine("weight")?;
        self.set_column(0, "weight", weight)
    }

    /// Sets β. Fails without `affine` or with a length ≠ `num_features`.
    pub fn set_bias(&mut self, bias: &[f32]) -> Result<()> {
        self.require_affine("bias")?;
        self.set_column(1, "bias", bias)
    }

    /// Sets the running mean. Fails without `track_running_stats` or with a wrong length.
    pub fn set_running_mean(&mut self, mean: &[f32]) -> Result<()> {
        self.require_tracking("running_mean")?;
        self.set_column(2, "running_mean", mean)
    }

    /// Sets the running variance. Fails without `track_running_stats` or with a wrong length.
    pub fn set_running_var(&mut self, var: &[f32]) -> Result<()> {
        self.require_tracking("running_var")?;
        self.set_column(3, "running_var", var)
    }

    /// Sets `num_batches_tracked` (it drives `momentum = None`).
    pub fn set_num_batches_tracked(&mut self, n: u64) -> Result<()> {
        self.require_tracking("num_batches_tracked")?;
        self.num_batches_tracked = n;
        Ok(())
    }
}

/// The scratch buffer, grown to at least `len` floats.
fn grow(g: &GpuContext, slot: &mut Option<wgpu::Buffer>, len: usize) -> wgpu::Buffer {
    let need = (len.max(4) * 4) as u64;
    match slot {
        Some(b) if b.size() >= need => b.clone(),
        _ => {
            let b = g.alloc_unpooled(len.max(4), "partials");
            *slot = Some(b.clone());
            b
        }
    }
}
