//! One training run of one network, with its measurements on a schedule: test accuracy and
//! the last hidden layer's sigmoid-input percentiles (inference, running statistics), and
//! the internal-covariate-shift and loss-landscape measurements on the training batch.

use std::time::Instant;

use crate::data::{FashionMnist, Split, PIXELS};
use crate::engine::{Engine, Result};
use crate::net::{Kind, Net};
use crate::rng::Batches;

/// What to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// SGD steps.
    pub steps: usize,
    /// Seeds the initial weights and the batch order (the same for both networks).
    pub seed: u64,
    /// Learning rate.
    pub lr: f32,
    /// Standard deviation of the initial weights.
    pub init_std: f32,
    /// Examples per batch.
    pub batch: usize,
    /// Test evaluations over the run (plus one before the first step).
    pub evals: usize,
    /// Internal-covariate-shift and landscape measurements over the run.
    pub measures: usize,
    /// Step sizes, as multiples of `lr`, of the landscape measurement.
    pub eta_factors: Vec<f32>,
    /// Which sigmoid of the last hidden layer the percentiles follow.
    pub unit: usize,
}

/// One test evaluation.
#[derive(Clone, Debug)]
pub struct EvalPoint {
    /// Steps taken before it.
    pub step: usize,
    /// Test accuracy.
    pub accuracy: f64,
    /// Mean test cross-entropy.
    pub loss: f64,
    /// 15th, 50th and 85th percentiles of the followed sigmoid's input over the test set.
    pub percentiles: [f64; 3],
}

/// One internal-covariate-shift measurement of one layer.
#[derive(Clone, Debug)]
pub struct IcsPoint {
    /// The step it was measured at.
    pub step: usize,
    /// Dense layer number (2..=4).
    pub layer: usize,
    /// ‖G − G′‖₂.
    pub l2: f64,
    /// cos(G, G′).
    pub cos: f64,
    /// ‖G‖₂, for scale.
    pub grad_norm: f64,
}

/// One loss-landscape measurement: the batch loss before the step, and after steps of
/// size η along the gradient.
#[derive(Clone, Debug)]
pub struct LandscapePoint {
    /// The step it was measured at.
    pub step: usize,
    /// Loss at the current parameters.
    pub base: f64,
    /// (η, loss at θ − η·∇L).
    pub losses: Vec<(f32, f64)>,
}

/// Everything recorded in one run.
#[derive(Clone, Debug)]
pub struct Run {
    /// Which network.
    pub kind: Kind,
    /// The training batch's loss at every step.
    pub train_loss: Vec<f32>,
    /// Test evaluations.
    pub evals: Vec<EvalPoint>,
    /// Internal covariate shift.
    pub ics: Vec<IcsPoint>,
    /// Loss landscape.
    pub landscape: Vec<LandscapePoint>,
    /// (accuracy, loss) on the whole test set after the last step, where the curve
    /// used part of it.
    pub final_test: Option<(f64, f64)>,
    /// Wall time of the run.
    pub seconds: f64,
}

impl Run {
    /// The first evaluated step whose test accuracy reached `target`.
    pub fn steps_to(&self, target: f64) -> Option<usize> {
        self.evals
            .iter()
            .find(|p| p.accuracy >= target)
            .map(|p| p.step)
    }

    /// The test accuracy after the last step: on the whole test set where it was
    /// evaluated apart from the curve, else the curve's last point.
    pub fn final_accuracy(&self) -> f64 {
        match self.final_test {
            Some((accuracy, _)) => accuracy,
            None => self.evals.last().map_or(f64::NAN, |p| p.accuracy),
        }
    }
}

/// The test set on the engine's device, uploaded once and shared by both runs.
pub struct TestSet<E: Engine> {
    x: E::Buf,
    y: E::Buf,
    rows: usize,
}

impl<E: Engine> TestSet<E> {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Uploads `split`.
    pub fn new(e: &E, split: &Split) -> Result<Self> {
        let labels: Vec<f32> = split.labels.iter().map(|&l| l as f32).collect();
        Ok(Self {
            x: e.upload(&split.images[..split.len() * PIXELS])?,
            y: e.upload(&labels)?,
            rows: split.len(),
        })
    }
}

/// Whether `step` (0-based, before it is taken) is one of `count` evenly spaced points of
/// a run of `steps`.
fn scheduled(step: usize, steps: usize, count: usize) -> bool {
    let every = steps.div_ceil(count.max(1)).max(1);
    step.is_multiple_of(every)
}

/// The q-quantile (0..=1) of sorted values, interpolated linearly.
fn quantile(sorted: &[f32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    let t = at - lo as f64;
    sorted[lo] as f64 * (1.0 - t) + sorted[hi] as f64 * t
}

/// Trains a `kind` network for `cfg.steps` steps on `data.train` and returns what was
/// recorded, and the trained network. The accuracy curve is measured on `test`, and the
/// final accuracy also on `final_test` where given. `progress` receives a line per
/// evaluation.
#[allow(clippy::too_many_arguments)]
pub fn train<E: Engine>(
    e: &E,
    kind: Kind,
    data: &FashionMnist,
    test: &TestSet<E>,
    final_test: Option<&TestSet<E>>,
    cfg: &Config,
    log_bn_inputs: bool,
    mut progress: impl FnMut(&str),
) -> Result<(Run, Net<E>)> {
    if data.train.len() < cfg.batch {
        return Err(format!(
            "{} training examples, fewer than one batch of {}",
            data.train.len(),
            cfg.batch
        )
        .into());
    }
    let start = Instant::now();
    let mut net = Net::new(e, kind, cfg.seed, cfg.init_std)?;
    if log_bn_inputs {
        net.bn_input_log = Some(Vec::new());
    }
    let mut batches = Batches::new(data.train.len(), cfg.seed.wrapping_add(1));
    let etas: Vec<f32> = cfg.eta_factors.iter().map(|f| f * cfg.lr).collect();
    let mut run = Run {
        kind,
        train_loss: Vec::with_capacity(cfg.steps),
        evals: Vec::new(),
        ics: Vec::new(),
        landscape: Vec::new(),
        final_test: None,
        seconds: 0.0,
    };
    let mut evaluate = |net: &mut Net<E>, step: usize, run: &mut Run| -> Result<()> {
        let (accuracy, loss, mut s) = net.evaluate(e, &test.x, &test.y, test.rows, cfg.unit)?;
        s.sort_by(f32::total_cmp);
        let percentiles = [0.15, 0.50, 0.85].map(|q| quantile(&s, q));
        run.evals.push(EvalPoint {
            step,
            accuracy,
            loss,
            percentiles,
        });
        progress(&format!(
            "{:>9} step {step:>6}/{}: test accuracy {accuracy:.4}, test loss {loss:.4} ({:.1} s)",
            kind.name(),
            cfg.steps,
            start.elapsed().as_secs_f64()
        ));
        Ok(())
    };
    evaluate(&mut net, 0, &mut run)?;
    for step in 0..cfg.steps {
        let (images, labels) = data.train.gather(batches.next_batch(cfg.batch));
        let x = e.upload(&images)?;
        let y = e.upload(&labels)?;
        let measure = scheduled(step, cfg.steps, cfg.measures).then_some(etas.as_slice());
        let out = net.train_step(e, &x, &y, cfg.batch, cfg.lr, measure)?;
        if !out.loss.is_finite() {
            return Err(format!(
                "{} network: the training loss is {} at step {step}; try a smaller --lr",
                kind.name(),
                out.loss
            )
            .into());
        }
        run.train_loss.push(out.loss);
        for (layer, l2, cos, grad_norm) in out.ics {
            run.ics.push(IcsPoint {
                step,
                layer,
                l2,
                cos,
                grad_norm,
            });
        }
        if measure.is_some() {
            run.landscape.push(LandscapePoint {
                step,
                base: out.loss as f64,
                losses: out.landscape,
            });
        }
        let done = step + 1;
        if done == cfg.steps || scheduled(done, cfg.steps, cfg.evals) {
            evaluate(&mut net, done, &mut run)?;
        }
    }
    if let Some(full) = final_test {
        let (accuracy, loss, _) = net.evaluate(e, &full.x, &full.y, full.rows, cfg.unit)?;
        run.final_test = Some((accuracy, loss));
        progress(&format!(
            "{:>9} after {} steps: accuracy {accuracy:.4} on all {} test examples",
            kind.name(),
            cfg.steps,
            full.rows
        ));
    }
    run.seconds = start.elapsed().as_secs_f64();
    Ok((run, net))
}
