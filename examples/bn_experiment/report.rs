//! `series.csv` (every recorded series, one value per row) and the summary text.

use std::fmt::Write as _;
use std::path::Path;

use crate::engine::Result;
use crate::experiment::{Config, Run};

/// Writes every series in long form: `network,series,step,param,value`, where `param` is
/// the percentile, the layer or the step size η that the series has per step (empty if
/// none).
pub fn write_csv(path: &Path, runs: &[Run]) -> Result<()> {
    let mut s = String::from("network,series,step,param,value\n");
    for run in runs {
        let net = run.kind.name();
        for (step, loss) in run.train_loss.iter().enumerate() {
            writeln!(s, "{net},train_loss,{step},,{loss}")?;
        }
        for p in &run.evals {
            writeln!(s, "{net},test_accuracy,{},,{}", p.step, p.accuracy)?;
            writeln!(s, "{net},test_loss,{},,{}", p.step, p.loss)?;
            for (q, v) in [15, 50, 85].iter().zip(p.percentiles) {
                writeln!(s, "{net},sigmoid_input_percentile,{},{q},{v}", p.step)?;
            }
        }
        for p in &run.ics {
            writeln!(s, "{net},ics_l2,{},{},{}", p.step, p.layer, p.l2)?;
            writeln!(s, "{net},ics_cos,{},{},{}", p.step, p.layer, p.cos)?;
            writeln!(s, "{net},grad_norm,{},{},{}", p.step, p.layer, p.grad_norm)?;
        }
        if let Some((accuracy, loss)) = run.final_test {
            let step = run.train_loss.len();
            writeln!(s, "{net},final_test_accuracy,{step},,{accuracy}")?;
            writeln!(s, "{net},final_test_loss,{step},,{loss}")?;
        }
        for p in &run.landscape {
            writeln!(s, "{net},landscape_base_loss,{},,{}", p.step, p.base)?;
            for (eta, loss) in &p.losses {
                writeln!(s, "{net},landscape_loss,{},{eta},{loss}", p.step)?;
            }
        }
    }
    std::fs::write(path, s).map_err(|e| format!("cannot write {}: {e}", path.display()).into())
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The summary: final test accuracy, the steps to `target`, and medians of the
/// measurements, per network.
pub fn summary(
    runs: &[Run],
    c: &Config,
    target: f64,
    backend: &str,
    target_note: &str,
    curve_examples: usize,
    test_examples: usize,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "summary ({backend}; {} steps, batch {}, lr {}, init N(0, {}²), seed {})",
        c.steps, c.batch, c.lr, c.init_std, c.seed
    );
    let _ = writeln!(
        s,
        "final test accuracy: on all {test_examples} test examples; steps to {:.1}% ({target_note}): \
         the first point of the accuracy curve (the first {curve_examples} test examples, every {} \
         steps) at or above it",
        target * 100.0,
        c.steps.div_ceil(c.evals)
    );
    let _ = writeln!(
        s,
        "{:<20} {:>14} {:>18} {:>9}",
        "network",
        "final test acc",
        format!("steps to {:.1}%", target * 100.0),
        "wall (s)"
    );
    for run in runs {
        let reached = run
            .steps_to(target)
            .map_or(format!("not in {}", c.steps), |s| s.to_string());
        let _ = writeln!(
            s,
            "{:<20} {:>14.4} {:>18} {:>9.1}",
            run.kind.label(),
            run.final_accuracy(),
            reached,
            run.seconds
        );
    }
    let _ = writeln!(
        s,
        "internal covariate shift (Santurkar et al.), median over {} measurements:",
        runs.first().map_or(0, |r| r.landscape.len())
    );
    let _ = writeln!(
        s,
        "{:<20} {:>6} {:>12} {:>12} {:>14}",
        "network", "layer", "‖G−G′‖", "‖G−G′‖/‖G‖", "cos(G, G′)"
    );
    for run in runs {
        let mut layers: Vec<usize> = run.ics.iter().map(|p| p.layer).collect();
        layers.dedup();
        layers.sort_unstable();
        layers.dedup();
        for layer in layers {
            let pts: Vec<_> = run.ics.iter().filter(|p| p.layer == layer).collect();
            let l2 = median(pts.iter().map(|p| p.l2).collect());
            let rel = median(
                pts.iter()
                    .map(|p| p.l2 / p.grad_norm.max(f64::MIN_POSITIVE))
                    .collect(),
            );
            let cos = median(pts.iter().map(|p| p.cos).collect());
            let _ = writeln!(
                s,
                "{:<20} {:>6} {:>12.3e} {:>12.4} {:>14.4}",
                run.kind.label(),
                layer,
                l2,
                rel,
                cos
            );
        }
    }
    let factors = c
        .eta_factors
        .iter()
        .map(|f| format!("{f}"))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        s,
        "loss landscape: batch loss after a step of η = ({factors})·lr along the gradient, \
         median over measurements:"
    );
    let _ = writeln!(
        s,
        "{:<20} {:>16} {:>22} {:>22}",
        "network", "loss before", "range (max − min)", "worst change"
    );
    for run in runs {
        let base = median(run.landscape.iter().map(|p| p.base).collect());
        let range = median(
            run.landscape
                .iter()
                .map(|p| {
                    let (lo, hi) = p
                        .losses
                        .iter()
                        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, l)| {
                            (lo.min(l), hi.max(l))
                        });
                    hi - lo
                })
                .collect(),
        );
        let worst = median(
            run.landscape
                .iter()
                .map(|p| {
                    p.losses
                        .iter()
                        .map(|&(_, l)| l - p.base)
                        .fold(f64::NEG_INFINITY, f64::max)
                })
                .collect(),
        );
        let _ = writeln!(
            s,
            "{:<20} {:>16.4} {:>22.4} {:>+22.4}",
            run.kind.label(),
            base,
            range,
            worst
        );
    }
    s
}
