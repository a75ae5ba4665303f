//! The PNG figures, drawn with plotters' bitmap backend into memory and written with the
//! `png` crate. Text uses DejaVu Sans from Debian's `fonts-dejavu-core`, read at start-up
//! (plotters' pure-Rust font path, so no system font library is linked).

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::engine::Result;
use crate::experiment::Run;
use crate::net::Kind;

/// The font file and the Debian package that installs it.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// See [`FONT`].
pub const FONT_PACKAGE: &str = "fonts-dejavu-core";

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Registers the plots' font once; fails, naming the package, if it is missing.
pub fn load_font() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = std::fs::read(FONT).map_err(|e| {
            format!(
                "{FONT}: {e}. The plots' font comes from Debian's package {FONT_PACKAGE} \
                 (apt-get install {FONT_PACKAGE})"
            )
        })?;
        // plotters keeps registered fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{FONT}: not a usable TrueType font; reinstall {FONT_PACKAGE}"))
    })
    .clone()
    .map_err(Into::into)
}

fn color(kind: Kind) -> RGBColor {
    match kind {
        Kind::Plain => RGBColor(214, 96, 39),
        Kind::BatchNorm => RGBColor(31, 100, 180),
    }
}

/// Draws `size` pixels with `draw` and writes them to `path` as PNG.
fn png(path: &Path, size: (u32, u32), draw: impl FnOnce(&Area) -> Result<()>) -> Result<()> {
    load_font()?;
    let mut pixels = vec![255u8; (size.0 * size.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, size).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
    }
    let file =
        std::fs::File::create(path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), size.0, size.1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::High);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&pixels)?;
    writer.finish()?;
    Ok(())
}

/// A step count on an axis: 400, 12k, 1.5k.
fn step_label(v: &f64) -> String {
    if *v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if *v >= 1000.0 && v % 1000.0 != 0.0 {
        format!("{:.1}k", v / 1000.0)
    } else if *v >= 1000.0 {
        format!("{:.0}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

fn steps(runs: &[Run]) -> f64 {
    runs.iter()
        .flat_map(|r| r.evals.last().map(|p| p.step))
        .max()
        .unwrap_or(1)
        .max(1) as f64
}

fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The paper's Figure 1: (a) test accuracy against step for both networks; (b, c) the
/// 15th, 50th and 85th percentiles of one last-hidden-layer sigmoid's input over
/// training, without and with batch norm (same y range in both).
pub fn figure1(path: &Path, runs: &[Run]) -> Result<()> {
    png(path, (1350, 400), |root| {
        let panels = root.split_evenly((1, 3));
        let x_max = steps(runs);
        let mut chart = ChartBuilder::on(&panels[0])
            .caption("(a) test accuracy", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..x_max, 0f64..1f64)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .label_style(("sans-serif", 12))
            .axis_desc_style(("sans-serif", 13))
            .x_labels(6)
            .x_label_formatter(&step_label)
            .draw()?;
        for run in runs {
            let c = color(run.kind);
            let pts = run.evals.iter().map(|p| (p.step as f64, p.accuracy));
            chart
                .draw_series(LineSeries::new(pts, c.stroke_width(2)))?
                .label(run.kind.label())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
        }
        legend(&mut chart, SeriesLabelPosition::LowerRight)?;

        let all = runs
            .iter()
            .flat_map(|r| r.evals.iter().flat_map(|p| p.percentiles));
        let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        let pad = ((hi - lo) * 0.08).max(0.1);
        let (lo, hi) = if lo.is_finite() {
            (lo - pad, hi + pad)
        } else {
            (-1.0, 1.0)
        };
        for (panel, (run, letter)) in panels[1..].iter().zip(runs.iter().zip(["b", "c"])) {
            let mut chart = ChartBuilder::on(panel)
                .caption(
                    format!("({letter}) sigmoid input, {}", run.kind.label()),
                    ("sans-serif", 18),
                )
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(48)
                .build_cartesian_2d(0f64..x_max, lo..hi)?;
            chart
                .configure_mesh()
                .x_desc("step")
                .label_style(("sans-serif", 12))
                .axis_desc_style(("sans-serif", 13))
                .x_labels(6)
                .x_label_formatter(&step_label)
                .draw()?;
            let c = color(run.kind);
            for (i, (q, shade)) in [(15, 0.45), (50, 1.0), (85, 0.45)].into_iter().enumerate() {
                let style = c.mix(shade).stroke_width(2);
                let pts = run
                    .evals
                    .iter()
                    .map(move |p| (p.step as f64, p.percentiles[i]));
                chart
                    .draw_series(LineSeries::new(pts, style))?
                    .label(format!("{q}th percentile"))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
            }
            legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        }
        Ok(())
    })
}

/// Training loss (mean over a sliding window of steps) for both networks.
pub fn train_loss(path: &Path, runs: &[Run]) -> Result<()> {
    png(path, (800, 450), |root| {
        let n = runs
            .iter()
            .map(|r| r.train_loss.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let window = (n / 100).max(1);
        let smooth = |v: &[f32]| -> Vec<(f64, f64)> {
            let mut out = Vec::new();
            let mut sum = 0.0f64;
            for (i, &x) in v.iter().enumerate() {
                sum += x as f64;
                if i >= window {
                    sum -= v[i - window] as f64;
                }
                if (i + 1) % window == 0 || i + 1 == v.len() {
                    out.push(((i + 1) as f64, sum / window.min(i + 1) as f64));
                }
            }
            out
        };
        let series: Vec<_> = runs
            .iter()
            .map(|r| (r.kind, smooth(&r.train_loss)))
            .collect();
        let y_max = series
            .iter()
            .flat_map(|(_, s)| s.iter().map(|p| p.1))
            .fold(0.1f64, f64::max)
            * 1.05;
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!("training loss (mean over {window} steps)"),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..n as f64, 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("cross-entropy")
            .x_label_formatter(&step_label)
            .label_style(("sans-serif", 12))
            .axis_desc_style(("sans-serif", 13))
            .draw()?;
        for (kind, s) in series {
            let c = color(kind);
            chart
                .draw_series(LineSeries::new(s, c.stroke_width(2)))?
                .label(kind.label())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    })
}

/// Santurkar et al.'s internal covariate shift: ‖G − G′‖ (top, log scale) and
/// cos(G, G′) (bottom) per dense layer 2–4, both networks.
pub fn ics(path: &Path, runs: &[Run]) -> Result<()> {
    png(path, (1350, 700), |root| {
        let mut layers: Vec<usize> = runs
            .iter()
            .flat_map(|r| r.ics.iter().map(|p| p.layer))
            .collect();
        layers.sort_unstable();
        layers.dedup();
        let panels = root.split_evenly((2, layers.len().max(1)));
        let x_max = steps(runs);
        let l2s = runs
            .iter()
            .flat_map(|r| r.ics.iter().map(|p| p.l2))
            .filter(|&v| v > 0.0);
        let (lo, hi) = l2s.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        let (lo, hi) = if lo.is_finite() {
            (lo / 1.5, hi * 1.5)
        } else {
            (1e-6, 1.0)
        };
        let cos_lo = runs
            .iter()
            .flat_map(|r| r.ics.iter().map(|p| p.cos))
            .fold(0.9f64, f64::min)
            .max(-1.0);
        for (col, &layer) in layers.iter().enumerate() {
            let mut top = ChartBuilder::on(&panels[col])
                .caption(format!("layer {layer}: ‖G − G′‖"), ("sans-serif", 17))
                .margin(12)
                .x_label_area_size(32)
                .y_label_area_size(64)
                .build_cartesian_2d(0f64..x_max, (lo..hi).log_scale())?;
            top.configure_mesh()
                .label_style(("sans-serif", 12))
                .y_label_formatter(&|v| format!("{v:.0e}"))
                .x_label_formatter(&step_label)
                .x_labels(5)
                .draw()?;
            let mut bottom = ChartBuilder::on(&panels[layers.len() + col])
                .caption(format!("layer {layer}: cos(G, G′)"), ("sans-serif", 17))
                .margin(12)
                .x_label_area_size(32)
                .y_label_area_size(64)
                .build_cartesian_2d(0f64..x_max, cos_lo..1.0f64)?;
            bottom
                .configure_mesh()
                .x_desc("step")
                .label_style(("sans-serif", 12))
                .axis_desc_style(("sans-serif", 13))
                .x_labels(5)
                .x_label_formatter(&step_label)
                .draw()?;
            for run in runs {
                let c = color(run.kind);
                let pts: Vec<_> = run.ics.iter().filter(|p| p.layer == layer).collect();
                top.draw_series(LineSeries::new(
                    pts.iter()
                        .filter(|p| p.l2 > 0.0)
                        .map(|p| (p.step as f64, p.l2)),
                    c.stroke_width(2),
                ))?
                .label(run.kind.label())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
                bottom.draw_series(LineSeries::new(
                    pts.iter().map(|p| (p.step as f64, p.cos)),
                    c.stroke_width(2),
                ))?;
            }
            if col == 0 {
                legend(&mut top, SeriesLabelPosition::LowerRight)?;
            }
        }
        Ok(())
    })
}

/// The loss landscape along the gradient: per network, the band between the lowest and
/// highest batch loss over the step sizes η measured (shaded), and the loss before the
/// step (line), log scale.
pub fn landscape(path: &Path, runs: &[Run]) -> Result<()> {
    png(path, (800, 450), |root| {
        let x_max = steps(runs);
        let values = runs.iter().flat_map(|r| {
            r.landscape
                .iter()
                .flat_map(|p| p.losses.iter().map(|l| l.1).chain([p.base]))
        });
        let (lo, hi) = values
            .filter(|v| v.is_finite() && *v > 0.0)
            .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        let (lo, hi) = if lo.is_finite() {
            (lo / 1.3, hi * 1.3)
        } else {
            (0.01, 10.0)
        };
        let mut chart = ChartBuilder::on(root)
            .caption(
                "loss along the gradient: range over step sizes",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..x_max, (lo..hi).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("batch loss")
            .x_label_formatter(&step_label)
            .label_style(("sans-serif", 12))
            .axis_desc_style(("sans-serif", 13))
            .draw()?;
        for run in runs {
            let c = color(run.kind);
            let clamp = |v: f64| v.clamp(lo, hi);
            let upper = run.landscape.iter().map(|p| {
                let max = p
                    .losses
                    .iter()
                    .map(|l| l.1)
                    .fold(f64::NEG_INFINITY, f64::max);
                (p.step as f64, clamp(max))
            });
            let lower = run.landscape.iter().rev().map(|p| {
                let min = p.losses.iter().map(|l| l.1).fold(f64::INFINITY, f64::min);
                (p.step as f64, clamp(min))
            });
            let band: Vec<_> = upper.chain(lower).collect();
            chart
                .draw_series(std::iter::once(Polygon::new(band, c.mix(0.25).filled())))?
                .label(run.kind.label())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 18, y + 5)], c.mix(0.4).filled())
                });
            chart.draw_series(LineSeries::new(
                run.landscape.iter().map(|p| (p.step as f64, clamp(p.base))),
                c.stroke_width(2),
            ))?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    })
}
