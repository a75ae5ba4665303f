//! The network of Ioffe & Szegedy (2015), §4.1: 784-100-100-100-10, fully connected,
//! sigmoid hidden units, softmax output, trained by plain SGD on the mean cross-entropy of
//! a mini-batch. [`Kind::BatchNorm`] puts the library's [`BatchNorm`] (PyTorch's
//! `BatchNorm1d`: eps 1e-5, momentum 0.1, learned γ and β) between each hidden layer's
//! product and its sigmoid, and drops that layer's bias (β takes its place).
//!
//! Besides the training step, the network computes what the measurements need:
//! gradients at other parameters on the same batch, in training mode but without touching
//! the running statistics ([`Mode::Probe`], through the library's functional API), and
//! inference with the running statistics ([`Mode::Eval`], the layer's `eval()`).

use wgpu_batchnorm::{ops, BatchNorm, BatchNormConfig, GradMask, SavedStats, Tensor};

use crate::data::{CLASSES, PIXELS};
use crate::engine::{Act, Engine, Gemm, Result};
use crate::rng::Rng;

/// Units per layer, input first.
pub const SIZES: [usize; 5] = [PIXELS, 100, 100, 100, CLASSES];
/// Dense layers (weight matrices).
pub const LAYERS: usize = 4;
/// Hidden (sigmoid) layers: the first three dense layers.
pub const HIDDEN: usize = 3;
/// The batch-norm layers' eps and momentum: PyTorch's defaults.
pub const BN_EPS: f32 = 1e-5;
/// See [`BN_EPS`].
pub const BN_MOMENTUM: f32 = 0.1;

/// Which of the two networks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Dense → sigmoid, biases everywhere.
    Plain,
    /// Dense (no bias) → BatchNorm1d → sigmoid; the output layer keeps its bias.
    BatchNorm,
}

impl Kind {
    /// Both, in the order they are trained.
    pub const BOTH: [Kind; 2] = [Kind::Plain, Kind::BatchNorm];

    /// Short name for files and CSV rows.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Plain => "plain",
            Kind::BatchNorm => "batchnorm",
        }
    }

    /// Name for plot legends.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Plain => "without batch norm",
            Kind::BatchNorm => "with batch norm",
        }
    }
}

/// How a forward treats batch norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The training step: the layer's `forward_train` (batch statistics; running
    /// statistics updated) and `backward`.
    Train,
    /// Training-mode arithmetic (batch statistics) for a measurement at other
    /// parameters: the functional API with the given γ and β, no running update.
    Probe,
    /// Inference: the layer in `eval()` mode, normalizing with the running statistics.
    Eval,
}

/// All trainable parameters. Weights are stored in × out, row-major.
pub struct Params<B> {
    /// One per dense layer.
    pub w: Vec<B>,
    /// Per dense layer: a bias, except where batch norm follows.
    pub b: Vec<Option<B>>,
    /// γ per hidden layer, on the host (empty without batch norm).
    pub gamma: Vec<Vec<f32>>,
    /// β per hidden layer, on the host (empty without batch norm).
    pub beta: Vec<Vec<f32>>,
}

/// Gradients of the mean batch loss, in the shape of [`Params`]; `None` where not computed.
pub struct Grads<B> {
    /// d/dW per dense layer.
    pub dw: Vec<Option<B>>,
    /// d/db per dense layer that has a bias.
    pub db: Vec<Option<B>>,
    /// d/dγ per hidden layer (batch norm only).
    pub dgamma: Vec<Option<Vec<f32>>>,
    /// d/dβ per hidden layer (batch norm only).
    pub dbeta: Vec<Option<Vec<f32>>>,
}

/// What a forward keeps for its backward.
struct Tape<'a, B> {
    x: &'a B,
    /// Sigmoid outputs of the hidden layers.
    h: Vec<B>,
    /// Per hidden layer with batch norm: its input, statistics, and (probe) γ.
    bn: Vec<Option<(Tensor, SavedStats, Option<Tensor>)>>,
    logits: B,
    /// The last hidden layer's sigmoid inputs, when asked for.
    sigmoid_input: Option<B>,
}

/// Per batch-norm layer and training step: the mean and unbiased variance of the layer's
/// input batch per channel (f64, computed here from the host copy, independently of the
/// library).
pub type BatchMoments = (Vec<f64>, Vec<f64>);

/// The outcome of one training step.
pub struct Step {
    /// Mean cross-entropy of the batch before the update.
    pub loss: f32,
    /// Internal covariate shift per dense layer 2..=4, when measured: (layer number,
    /// ‖G − G′‖, cos(G, G′), ‖G‖).
    pub ics: Vec<(usize, f64, f64, f64)>,
    /// Batch loss after a step of each size η along −∇L (all parameters), when measured.
    pub landscape: Vec<(f32, f64)>,
}

/// One network: parameters and, with batch norm, the library's layers.
pub struct Net<E: Engine> {
    /// Which network.
    pub kind: Kind,
    /// The parameters (γ and β also live in `bn`, kept equal).
    pub params: Params<E::Buf>,
    /// The library's batch-norm layers, one per hidden layer (empty without batch norm).
    pub bn: Vec<BatchNorm>,
    /// When `Some`, every training forward appends its batch moments per layer.
    pub bn_input_log: Option<Vec<Vec<BatchMoments>>>,
}

fn column_moments(z: &[f32], rows: usize, cols: usize) -> BatchMoments {
    let mut mean = vec![0.0f64; cols];
    for r in 0..rows {
        for c in 0..cols {
            mean[c] += z[r * cols + c] as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= rows as f64);
    let mut var = vec![0.0f64; cols];
    for r in 0..rows {
        for c in 0..cols {
            let d = z[r * cols + c] as f64 - mean[c];
            var[c] += d * d;
        }
    }
    var.iter_mut().for_each(|v| *v /= (rows - 1) as f64);
    (mean, var)
}

impl<E: Engine> Net<E> {
    /// A network with weights from N(0, init_std²) drawn by `seed` (the same weights for
    /// both kinds, so the networks differ only in batch norm), biases 0, γ = 1, β = 0.
    pub fn new(e: &E, kind: Kind, seed: u64, init_std: f32) -> Result<Self> {
        let mut rng = Rng::new(seed);
        let mut w = Vec::new();
        let mut b = Vec::new();
        for l in 0..LAYERS {
            let (fan_in, fan_out) = (SIZES[l], SIZES[l + 1]);
            let values: Vec<f32> = (0..fan_in * fan_out)
                .map(|_| (rng.normal() * init_std as f64) as f32)
                .collect();
            w.push(e.upload(&values)?);
            let has_bias = kind == Kind::Plain || l == LAYERS - 1;
            b.push(if has_bias {
                Some(e.upload(&vec![0.0; fan_out])?)
            } else {
                None
            });
        }
        let (mut bn, mut gamma, mut beta) = (Vec::new(), Vec::new(), Vec::new());
        if kind == Kind::BatchNorm {
            for &width in &SIZES[1..=HIDDEN] {
                let config = BatchNormConfig::new(width)
                    .eps(BN_EPS)
                    .momentum(BN_MOMENTUM);
                bn.push(BatchNorm::new(e.context(), config)?);
                gamma.push(vec![1.0; width]);
                beta.push(vec![0.0; width]);
            }
        }
        Ok(Self {
            kind,
            params: Params { w, b, gamma, beta },
            bn,
            bn_input_log: None,
        })
    }

    /// One SGD step with learning rate `lr` on the batch `x` (rows × 784) with `labels`.
    /// With `measure`, first also measures the internal covariate shift of layers 2–4 and
    /// the loss at steps of each size η in `etas` along the gradient (nothing of that
    /// changes the training).
    pub fn train_step(
        &mut self,
        e: &E,
        x: &E::Buf,
        labels: &E::Buf,
        rows: usize,
        lr: f32,
        measure: Option<&[f32]>,
    ) -> Result<Step> {
        let tape = forward(
            e,
            self.kind,
            &mut self.bn,
            &mut self.bn_input_log,
            &self.params,
            x,
            rows,
            Mode::Train,
            false,
        )?;
        let (dlogits, stats) = e.softmax_xent(&tape.logits, labels, rows)?;
        let loss = mean_loss(&e.download(&stats)?).0 as f32;
        let grads = backward(
            e,
            &mut self.bn,
            &self.params,
            &tape,
            dlogits,
            rows,
            0,
            Mode::Train,
        )?;
        drop(tape);
        let mut step = Step {
            loss,
            ics: Vec::new(),
            landscape: Vec::new(),
        };
        if let Some(etas) = measure {
            step.ics = self.ics(e, x, labels, rows, lr, &grads)?;
            for &eta in etas {
                let moved = stepped(e, &self.params, &grads, eta, LAYERS)?;
                let loss = self.probe_loss(e, &moved, x, labels, rows)?;
                step.landscape.push((eta, loss));
            }
        }
        sgd(e, &mut self.params, &grads, lr, LAYERS)?;
        for (l, bn) in self.bn.iter_mut().enumerate() {
            bn.set_weight(&self.params.gamma[l])?;
            bn.set_bias(&self.params.beta[l])?;
        }
        Ok(step)
    }

    /// Santurkar et al. (2018), Definition 2.1: for dense layer i (2..=4), G = ∇_{W_i} L
    /// at the current parameters (`grads`) and G′ = ∇_{W_i} L on the same batch after the
    /// layers below i (weights, biases, γ, β) have taken this step's SGD update.
    fn ics(
        &mut self,
        e: &E,
        x: &E::Buf,
        labels: &E::Buf,
        rows: usize,
        lr: f32,
        grads: &Grads<E::Buf>,
    ) -> Result<Vec<(usize, f64, f64, f64)>> {
        let mut out = Vec::new();
        for i in 1..LAYERS {
            let moved = stepped(e, &self.params, grads, lr, i)?;
            let tape = forward(
                e,
                self.kind,
                &mut self.bn,
                &mut None,
                &moved,
                x,
                rows,
                Mode::Probe,
                false,
            )?;
            let (dlogits, _) = e.softmax_xent(&tape.logits, labels, rows)?;
            let shifted = backward(
                e,
                &mut self.bn,
                &moved,
                &tape,
                dlogits,
                rows,
                i,
                Mode::Probe,
            )?;
            let g = e.download(grads.dw[i].as_ref().ok_or("no gradient")?)?;
            let g2 = e.download(shifted.dw[i].as_ref().ok_or("no gradient")?)?;
            let (mut diff, mut dot, mut n1, mut n2) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
            for (&a, &b) in g.iter().zip(&g2) {
                let (a, b) = (a as f64, b as f64);
                diff += (a - b) * (a - b);
                dot += a * b;
                n1 += a * a;
                n2 += b * b;
            }
            let cos = dot / (n1.sqrt() * n2.sqrt()).max(f64::MIN_POSITIVE);
            out.push((i + 1, diff.sqrt(), cos, n1.sqrt()));
        }
        Ok(out)
    }

    /// The mean batch loss at `params`, batch statistics, running statistics untouched.
    fn probe_loss(
        &mut self,
        e: &E,
        params: &Params<E::Buf>,
        x: &E::Buf,
        labels: &E::Buf,
        rows: usize,
    ) -> Result<f64> {
        let tape = forward(
            e,
            self.kind,
            &mut self.bn,
            &mut None,
            params,
            x,
            rows,
            Mode::Probe,
            false,
        )?;
        let (_, stats) = e.softmax_xent(&tape.logits, labels, rows)?;
        Ok(mean_loss(&e.download(&stats)?).0)
    }

    /// Inference on `rows` examples (batch norm with its running statistics): accuracy,
    /// mean loss, and the input of sigmoid `unit` of the last hidden layer per example.
    pub fn evaluate(
        &mut self,
        e: &E,
        x: &E::Buf,
        labels: &E::Buf,
        rows: usize,
        unit: usize,
    ) -> Result<(f64, f64, Vec<f32>)> {
        let tape = forward(
            e,
            self.kind,
            &mut self.bn,
            &mut None,
            &self.params,
            x,
            rows,
            Mode::Eval,
            true,
        )?;
        let (_, stats) = e.softmax_xent(&tape.logits, labels, rows)?;
        let (loss, accuracy) = mean_loss(&e.download(&stats)?);
        let width = SIZES[HIDDEN];
        let s = e.download(tape.sigmoid_input.as_ref().ok_or("no capture")?)?;
        let column = s.iter().skip(unit).step_by(width).copied().collect();
        Ok((accuracy, loss, column))
    }
}

/// (mean loss, accuracy) from per-row [loss, correct] pairs.
fn mean_loss(stats: &[f32]) -> (f64, f64) {
    let rows = (stats.len() / 2).max(1) as f64;
    let loss: f64 = stats.iter().step_by(2).map(|&v| v as f64).sum();
    let correct: f64 = stats.iter().skip(1).step_by(2).map(|&v| v as f64).sum();
    (loss / rows, correct / rows)
}

/// The forward pass at `p`. In [`Mode::Train`] and [`Mode::Eval`], `p` must be the
/// parameters the layers in `bn` hold.
#[allow(clippy::too_many_arguments)]
fn forward<'a, E: Engine>(
    e: &E,
    kind: Kind,
    bn: &mut [BatchNorm],
    log: &mut Option<Vec<Vec<BatchMoments>>>,
    p: &Params<E::Buf>,
    x: &'a E::Buf,
    rows: usize,
    mode: Mode,
    capture: bool,
) -> Result<Tape<'a, E::Buf>> {
    let mut h: Vec<E::Buf> = Vec::with_capacity(HIDDEN);
    let mut tape_bn = Vec::with_capacity(HIDDEN);
    let mut sigmoid_input = None;
    for l in 0..HIDDEN {
        let width = SIZES[l + 1];
        let input = if l == 0 { x } else { &h[l - 1] };
        let g = Gemm {
            m: rows,
            n: width,
            k: SIZES[l],
            a_t: false,
            b_t: false,
        };
        let keep = capture && l == HIDDEN - 1;
        match kind {
            Kind::Plain => {
                if keep {
                    let z = e.gemm(g, input, &p.w[l], p.b[l].as_ref(), Act::None, None)?;
                    h.push(e.sigmoid(&z)?);
                    sigmoid_input = Some(z);
                } else {
                    h.push(e.gemm(g, input, &p.w[l], p.b[l].as_ref(), Act::Sigmoid, None)?);
                }
                tape_bn.push(None);
            }
            Kind::BatchNorm => {
                let z = e.gemm(g, input, &p.w[l], None, Act::None, None)?;
                // The batch crosses to the library as a host copy (a few KB per step).
                let z_host = e.download(&z)?;
                if let (Mode::Train, Some(log)) = (mode, log.as_mut()) {
                    log.resize_with(HIDDEN, Vec::new);
                    log[l].push(column_moments(&z_host, rows, width));
                }
                let zt = e.context().tensor_from_slice(&z_host, &[rows, width])?;
                let (out, gamma) = match mode {
                    Mode::Train => (bn[l].forward_train(&zt)?, None),
                    Mode::Eval => {
                        bn[l].eval();
                        let out = bn[l].forward(&zt);
                        bn[l].train();
                        (out?, None)
                    }
                    Mode::Probe => {
                        let ctx = e.context();
                        let gamma = ctx.tensor_from_slice(&p.gamma[l], &[width])?;
                        let beta = ctx.tensor_from_slice(&p.beta[l], &[width])?;
                        let out = ops::batch_norm(
                            &zt,
                            None,
                            None,
                            Some(&gamma),
                            Some(&beta),
                            true,
                            BN_MOMENTUM,
                            BN_EPS,
                        )?;
                        (out, Some(gamma))
                    }
                };
                let y = e.wrap_tensor(out.y)?;
                h.push(e.sigmoid(&y)?);
                if keep {
                    sigmoid_input = Some(y);
                }
                tape_bn.push(Some((zt, out.saved, gamma)));
            }
        }
    }
    let g = Gemm {
        m: rows,
        n: CLASSES,
        k: SIZES[HIDDEN],
        a_t: false,
        b_t: false,
    };
    let logits = e.gemm(
        g,
        &h[HIDDEN - 1],
        &p.w[HIDDEN],
        p.b[HIDDEN].as_ref(),
        Act::None,
        None,
    )?;
    Ok(Tape {
        x,
        h,
        bn: tape_bn,
        logits,
        sigmoid_input,
    })
}

/// The backward from d(loss)/d(logits) down to dense layer `stop` (its gradients are the
/// last computed).
#[allow(clippy::too_many_arguments)]
fn backward<E: Engine>(
    e: &E,
    bn: &mut [BatchNorm],
    p: &Params<E::Buf>,
    tape: &Tape<'_, E::Buf>,
    dlogits: E::Buf,
    rows: usize,
    stop: usize,
    mode: Mode,
) -> Result<Grads<E::Buf>> {
    let mut grads = Grads {
        dw: (0..LAYERS).map(|_| None).collect(),
        db: (0..LAYERS).map(|_| None).collect(),
        dgamma: vec![None; HIDDEN],
        dbeta: vec![None; HIDDEN],
    };
    let ones = e.upload(&vec![1.0; rows])?;
    // d: the loss's gradient with respect to layer l's output before its nonlinearity
    // (the sigmoid input, which with batch norm is the batch-norm output).
    let mut d = dlogits;
    for l in (stop..LAYERS).rev() {
        let (fan_in, fan_out) = (SIZES[l], SIZES[l + 1]);
        let input = if l == 0 { tape.x } else { &tape.h[l - 1] };
        let dz = match tape.bn.get(l) {
            Some(Some((zt, saved, gamma))) => {
                let dy = e.download(&d)?;
                let dyt = e.context().tensor_from_slice(&dy, &[rows, fan_out])?;
                let g = match mode {
                    Mode::Train => bn[l].backward(&dyt, zt, saved)?,
                    Mode::Probe => {
                        ops::batch_norm_backward(&dyt, zt, saved, gamma.as_ref(), GradMask::ALL)?
                    }
                    Mode::Eval => return Err("no backward in inference".into()),
                };
                grads.dgamma[l] = g.dweight.map(|t| t.to_vec()).transpose()?;
                grads.dbeta[l] = g.dbias.map(|t| t.to_vec()).transpose()?;
                e.wrap_tensor(g.dx.ok_or("batch norm returned no dx")?)?
            }
            _ => d,
        };
        let dw = Gemm {
            m: fan_in,
            n: fan_out,
            k: rows,
            a_t: true,
            b_t: false,
        };
        grads.dw[l] = Some(e.gemm(dw, input, &dz, None, Act::None, None)?);
        if p.b[l].is_some() {
            let db = Gemm {
                m: 1,
                n: fan_out,
                k: rows,
                a_t: false,
                b_t: false,
            };
            grads.db[l] = Some(e.gemm(db, &ones, &dz, None, Act::None, None)?);
        }
        if l == stop {
            break;
        }
        let dh = Gemm {
            m: rows,
            n: fan_in,
            k: fan_out,
            a_t: false,
            b_t: true,
        };
        d = e.gemm(
            dh,
            &dz,
            &p.w[l],
            None,
            Act::SigmoidGrad,
            Some(&tape.h[l - 1]),
        )?;
    }
    Ok(grads)
}

/// SGD on the layers below `upto`: θ ← θ − lr·∇θ.
fn sgd<E: Engine>(
    e: &E,
    p: &mut Params<E::Buf>,
    g: &Grads<E::Buf>,
    lr: f32,
    upto: usize,
) -> Result<()> {
    for l in 0..upto {
        if let (Some(w), Some(dw)) = (p.w.get_mut(l), g.dw[l].as_ref()) {
            e.axpy(w, -lr, dw)?;
        }
        if let (Some(b), Some(db)) = (p.b[l].as_mut(), g.db[l].as_ref()) {
            e.axpy(b, -lr, db)?;
        }
        if l < p.gamma.len() {
            for (v, d) in [
                (&mut p.gamma[l], g.dgamma[l].as_ref()),
                (&mut p.beta[l], g.dbeta[l].as_ref()),
            ] {
                if let Some(d) = d {
                    v.iter_mut().zip(d).for_each(|(v, &d)| *v -= lr * d);
                }
            }
        }
    }
    Ok(())
}

/// A copy of `p` with the layers below `upto` moved by one SGD step of size `lr`.
fn stepped<E: Engine>(
    e: &E,
    p: &Params<E::Buf>,
    g: &Grads<E::Buf>,
    lr: f32,
    upto: usize,
) -> Result<Params<E::Buf>> {
    let mut q = Params {
        w: p.w.iter().map(|w| e.copy(w)).collect::<Result<_>>()?,
        b: p.b
            .iter()
            .map(|b| b.as_ref().map(|b| e.copy(b)).transpose())
            .collect::<Result<_>>()?,
        gamma: p.gamma.clone(),
        beta: p.beta.clone(),
    };
    sgd(e, &mut q, g, lr, upto)?;
    Ok(q)
}
