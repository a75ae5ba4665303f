//! One table of the benchmark suite: shape, op, backend, median ms (submit + wait, data
//! resident), kernel-only ms where the adapter has timestamp queries, effective GB/s
//! (minimal bytes: train forward 12 B/element, inference 8, backward 20), % of that
//! backend's copy ceiling (a vec4 copy kernel of x's size on a GPU, memcpy on the CPU,
//! timed in the same run), and speed-up against the CPU path; as markdown, CSV or JSON
//! lines, and optionally a PNG chart of the % of copy per row.
//!
//! cargo run --release --example bench_report -- --help

use std::collections::HashMap;
use std::time::Duration;

use plotters::prelude::*;

#[path = "../benches/support.rs"]
mod support;
use support::{
    bench_name, contexts_tuned, median_ms, prepare_typed, register_chart_font, Copier, Op, SUITE,
};
use wgpu_batchnorm::{Context, ContextOptions, DType, DeviceTuning, Partitioning};

const USAGE: &str = "\
bench_report: the benchmark suite as one table

usage: bench_report [options]
  --shapes a,b          only these shapes (default: all of the suite)
  --backends cpu,vulkan only these backends (cpu, vulkan, gl, metal, dx12)
  --min-time SECONDS    measuring time per row at least (default 0.5)
  --format md|csv|json  markdown table (default), CSV, or one JSON object per line
  --pytorch FILE        JSON lines from benches/pytorch_cpu.py --json, shown beside the
                        CPU path (measure them back to back on the same machine)
  --chart FILE.png      also draw the % of the copy ceiling per row as a PNG
  --one-pass            also measure every GPU adapter with the one-pass kernels on
                        (rows \"<backend> one-pass\"), an A/B against the default ones
  --partitioning P      auto (default), software or gpu: the GPU contexts' work
                        partitioning (gpu: many short workgroups, as on real GPUs)
  --tree                also measure every GPU adapter that reduces with subgroup
                        operations with them off (rows \"<backend> tree\": the
                        workgroup-memory tree reductions), an A/B against the default
  --half                also measure float16 and bfloat16 storage (rows \"<backend> f16\",
                        \"<backend> bf16\"); their \"vs plain\" column is the time over the
                        f32 row's, and their GB/s count 2-byte values
  --native-f16          also measure every GPU adapter with SHADER_F16 with its float16
                        storage the other way round: rows \"<backend> native f16\" where
                        the default packs words (CPU adapters), \"<backend> packed f16\"
                        where it is native (GPUs); implies --half
  --fused               also measure the fused add + ReLU (forward and backward) and the
                        unfused forward then add + ReLU pass; their \"vs plain\" column
                        is the time over the plain op's on the same backend
  --help                this text";

/// One measured row.
struct Row {
    shape: &'static str,
    op: Op,
    backend: String,
    ms: f64,
    kernel_ms: Option<f64>,
    gbs: f64,
    pct_copy: f64,
    vs_cpu: Option<f64>,
    pytorch_ms: Option<f64>,
    /// A fused-epilogue row: its time over the plain op's, same shape and backend.
    vs_plain: Option<f64>,
}

struct Args {
    shapes: Option<Vec<String>>,
    backends: Option<Vec<String>>,
    min_time: Duration,
    format: String,
    pytorch: Option<String>,
    chart: Option<String>,
    one_pass: bool,
    tree: bool,
    native_f16: bool,
    fused: bool,
    half: bool,
    partitioning: Partitioning,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        shapes: None,
        backends: None,
        min_time: Duration::from_secs_f64(0.5),
        format: "md".into(),
        pytorch: None,
        chart: None,
        one_pass: false,
        tree: false,
        native_f16: false,
        fused: false,
        half: false,
        partitioning: Partitioning::Auto,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let list = |v: String| v.split(',').map(str::to_string).collect::<Vec<_>>();
        match flag.as_str() {
            "--shapes" => args.shapes = Some(list(value()?)),
            "--backends" => args.backends = Some(list(value()?)),
            "--min-time" => {
                let v = value()?;
                let s: f64 = v
                    .parse()
                    .map_err(|_| format!("--min-time {v}: not a number"))?;
                if !(s.is_finite() && s >= 0.0) {
                    return Err(format!("--min-time {v}: must be ≥ 0"));
                }
                args.min_time = Duration::from_secs_f64(s);
            }
            "--format" => {
                let v = value()?;
                if !matches!(v.as_str(), "md" | "csv" | "json") {
                    return Err(format!("--format {v}: one of md, csv, json"));
                }
                args.format = v;
            }
            "--pytorch" => args.pytorch = Some(value()?),
            "--chart" => args.chart = Some(value()?),
            "--one-pass" => args.one_pass = true,
            "--tree" => args.tree = true,
            "--native-f16" => {
                args.native_f16 = true;
                args.half = true;
            }
            "--half" => args.half = true,
            "--partitioning" => {
                args.partitioning = match value()?.as_str() {
                    "auto" => Partitioning::Auto,
                    "software" => Partitioning::SoftwareAdapter,
                    "gpu" => Partitioning::DiscreteGpu,
                    v => return Err(format!("--partitioning {v}: one of auto, software, gpu")),
                }
            }
            "--fused" => args.fused = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if let Some(shapes) = &args.shapes {
        for s in shapes {
            if !SUITE.iter().any(|c| c.name == s) {
                let known: Vec<_> = SUITE.iter().map(|c| c.name).collect();
                return Err(format!("unknown shape {s:?}; the suite has {known:?}"));
            }
        }
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let pytorch = match &args.pytorch {
        Some(f) => match read_pytorch(f) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        },
        None => HashMap::new(),
    };
    let base = DeviceTuning::default().partitioning(args.partitioning);
    let mut ctxs: Vec<_> = contexts_tuned(base)
        .into_iter()
        .map(|c| (bench_name(&c), c))
        .collect();
    if args.one_pass {
        let tuning = base.one_pass(true);
        for ctx in Context::all_gpus_tuned(ContextOptions::default(), tuning) {
            match ctx {
                Ok(c) => ctxs.push((format!("{} one-pass", bench_name(&c)), c)),
                Err(e) => eprintln!("skipping unusable adapter: {e}"),
            }
        }
    }
    if args.tree {
        // Only the adapters whose default context reduces with subgroups.
        let with_subgroups: Vec<String> = ctxs
            .iter()
            .filter(|(_, c)| c.tuning().is_some_and(|t| t.subgroups == Some(true)))
            .map(|(_, c)| c.name())
            .collect();
        let tuning = base.subgroups(false);
        for ctx in Context::all_gpus_tuned(ContextOptions::default(), tuning) {
            match ctx {
                Ok(c) if with_subgroups.contains(&c.name()) => {
                    ctxs.push((format!("{} tree", bench_name(&c)), c))
                }
                Ok(_) => {}
                Err(e) => eprintln!("skipping unusable adapter: {e}"),
            }
        }
    }
    // The contexts of --native-f16, measured in f16 and in f32 for the vs-plain column (the
    // plain ops only).
    let mut f16_only = Vec::new();
    if args.native_f16 {
        let defaults: Vec<(String, Option<bool>)> = ctxs
            .iter()
            .map(|(_, c)| (c.name(), c.tuning().and_then(|t| t.native_f16)))
            .collect();
        for native in [true, false] {
            let tuning = base.native_f16(native);
            for ctx in Context::all_gpus_tuned(ContextOptions::default(), tuning) {
                match ctx {
                    Ok(c)
                        if c.tuning().and_then(|t| t.native_f16) == Some(native)
                            && defaults.contains(&(c.name(), Some(!native))) =>
                    {
                        let label = format!(
                            "{} {}",
                            bench_name(&c),
                            if native { "native" } else { "packed" }
                        );
                        f16_only.push(label.clone());
                        ctxs.push((label, c));
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("skipping unusable adapter: {e}"),
                }
            }
        }
    }
    let ctxs: Vec<_> = ctxs
        .into_iter()
        .filter(|(_, c)| {
            args.backends
                .as_ref()
                .is_none_or(|b| b.iter().any(|k| k == c.backend_kind()))
        })
        .collect();
    if ctxs.is_empty() {
        eprintln!("error: no backend matches --backends {:?}", args.backends);
        std::process::exit(2);
    }
    let mut all = Vec::new();
    let print = Printer::new(&args.format, !pytorch.is_empty(), args.fused || args.half);
    let dtypes: &[DType] = if args.half {
        &[DType::F32, DType::F16, DType::BF16]
    } else {
        &[DType::F32]
    };
    let ops: Vec<Op> = if args.fused {
        Op::ALL.into_iter().chain(Op::FUSED).collect()
    } else {
        Op::ALL.to_vec()
    };
    for case in SUITE {
        if args
            .shapes
            .as_ref()
            .is_some_and(|s| !s.iter().any(|n| n == case.name))
        {
            continue;
        }
        let numel: usize = case.dims.iter().product();
        let mut measured = Vec::new();
        // (op, label, ms, copy GB/s, kernel ms, dtype, the f32 row's label)
        let mut half_rows = Vec::new();
        for (label, ctx) in &ctxs {
            let mut copier = Copier::new(ctx, numel * 4);
            let copy_ms = median_ms(|i| copier.time(i), 5, args.min_time);
            let copy_gbs = (numel * 8) as f64 / copy_ms / 1e6;
            for &dtype in dtypes {
                if dtype == DType::BF16 && f16_only.contains(label) {
                    continue;
                }
                let mut p = match prepare_typed(ctx, case, dtype) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("{} {dtype} on {}: {e}", case.name, ctx.name());
                        continue;
                    }
                };
                let row_label = match dtype {
                    DType::F16 => format!("{label} f16"),
                    DType::BF16 => format!("{label} bf16"),
                    _ => label.clone(),
                };
                // The half rows: the plain ops (the unfused comparison pass is f32 only).
                let its_ops: Vec<Op> = if dtype == DType::F32 && !f16_only.contains(label) {
                    ops.clone()
                } else {
                    Op::ALL.to_vec()
                };
                for &op in &its_ops {
                    let ms = median_ms(|i| p.time(op, i), 5, args.min_time);
                    let kernel = p.kernel_ms(op, 5);
                    measured.push((op, row_label.clone(), ms, copy_gbs, kernel));
                    if dtype != DType::F32 {
                        half_rows.push((row_label.clone(), label.clone()));
                    }
                }
            }
        }
        for &op in &ops {
            let plain_ms = |backend: &str| {
                measured
                    .iter()
                    .find(|r| r.0 == op.plain() && r.1 == backend)
                    .map(|r| r.2)
            };
            let cpu_ms = measured
                .iter()
                .find(|r| r.0 == op && r.1 == "cpu")
                .map(|r| r.2);
            for (_, backend, ms, copy_gbs, kernel) in measured.iter().filter(|r| r.0 == op) {
                // A half row: its f32 twin's label, and half the bytes.
                let f32_twin = half_rows
                    .iter()
                    .find(|(l, _)| l == backend)
                    .map(|(_, base)| base);
                let bytes = op.bytes_per_element() / if f32_twin.is_some() { 2 } else { 1 };
                let gbs = (numel * bytes) as f64 / ms / 1e6;
                let row = Row {
                    shape: case.name,
                    op,
                    backend: backend.clone(),
                    ms: *ms,
                    kernel_ms: *kernel,
                    gbs,
                    pct_copy: 100.0 * gbs / copy_gbs,
                    vs_cpu: cpu_ms.map(|c| c / ms),
                    pytorch_ms: (backend == "cpu")
                        .then(|| pytorch.get(&(case.name.to_string(), op.name().to_string())))
                        .flatten()
                        .copied(),
                    vs_plain: match f32_twin {
                        Some(base) => measured
                            .iter()
                            .find(|r| r.0 == op && &r.1 == base)
                            .map(|r| ms / r.2),
                        None => (op.plain() != op)
                            .then(|| plain_ms(backend).map(|p| ms / p))
                            .flatten(),
                    },
                };
                print.row(&row);
                all.push(row);
            }
        }
    }
    if let Some(path) = &args.chart {
        match chart(path, &all) {
            Ok(()) => eprintln!("chart: {path}"),
            Err(e) => {
                eprintln!("error: drawing {path}: {e}");
                std::process::exit(1);
            }
        }
    }
}

/// Prints rows as they come, in the chosen format.
struct Printer {
    format: String,
    pytorch: bool,
    fused: bool,
}

impl Printer {
    fn new(format: &str, pytorch: bool, fused: bool) -> Self {
        let p = Self {
            format: format.into(),
            pytorch,
            fused,
        };
        match format {
            "md" => {
                let mut extra = String::new();
                let mut rule = String::new();
                if pytorch {
                    extra += " PyTorch CPU ms | ours vs PyTorch |";
                    rule += "---:|---:|";
                }
                if fused {
                    extra += " vs plain |";
                    rule += "---:|";
                }
                println!("| shape | op | backend | median ms | kernel ms | GB/s | % of copy | vs CPU path |{extra}");
                println!("|---|---|---|---:|---:|---:|---:|---:|{rule}");
            }
            "csv" => {
                println!(
                    "shape,op,backend,median_ms,kernel_ms,gbs,pct_copy,vs_cpu,pytorch_ms,vs_plain"
                )
            }
            _ => {}
        }
        p
    }

    fn row(&self, r: &Row) {
        let opt = |v: Option<f64>, prec: usize| v.map(|v| format!("{v:.prec$}"));
        match self.format.as_str() {
            "md" => {
                let torch = match (self.pytorch, r.pytorch_ms) {
                    (false, _) => String::new(),
                    (true, Some(t)) => format!(" {t:.3} | {:.2}× |", t / r.ms),
                    (true, None) => " | |".into(),
                };
                let plain = if self.fused {
                    format!(
                        " {} |",
                        opt(r.vs_plain, 2).map(|v| v + "×").unwrap_or_default()
                    )
                } else {
                    String::new()
                };
                println!(
                    "| {} | {} | {} | {:.3} | {} | {:.1} | {:.0} % | {} |{}{}",
                    r.shape,
                    r.op.name(),
                    r.backend,
                    r.ms,
                    opt(r.kernel_ms, 3).unwrap_or_else(|| "–".into()),
                    r.gbs,
                    r.pct_copy,
                    opt(r.vs_cpu, 2).map(|v| v + "×").unwrap_or_default(),
                    torch,
                    plain
                );
            }
            "csv" => println!(
                "{},{},{},{:.4},{},{:.2},{:.1},{},{},{}",
                r.shape,
                r.op.name(),
                r.backend,
                r.ms,
                opt(r.kernel_ms, 4).unwrap_or_default(),
                r.gbs,
                r.pct_copy,
                opt(r.vs_cpu, 3).unwrap_or_default(),
                opt(r.pytorch_ms, 4).unwrap_or_default(),
                opt(r.vs_plain, 3).unwrap_or_default()
            ),
            _ => {
                let num = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v}"));
                println!(
                    "{{\"shape\":\"{}\",\"op\":\"{}\",\"backend\":\"{}\",\"median_ms\":{},\"kernel_ms\":{},\"gbs\":{},\"pct_copy\":{},\"vs_cpu\":{},\"pytorch_ms\":{},\"vs_plain\":{}}}",
                    r.shape,
                    r.op.name(),
                    r.backend.replace('"', "'"),
                    r.ms,
                    num(r.kernel_ms),
                    r.gbs,
                    r.pct_copy,
                    num(r.vs_cpu),
                    num(r.pytorch_ms),
                    num(r.vs_plain)
                );
            }
        }
    }
}

/// Grouped bars: per shape and op, each backend's % of its copy ceiling.
fn chart(path: &str, rows: &[Row]) -> Result<(), Box<dyn std::error::Error>> {
    register_chart_font()?;
    let mut groups: Vec<(String, Vec<&Row>)> = Vec::new();
    for r in rows {
        let key = format!("{} {}", r.shape, r.op.name());
        match groups.iter_mut().find(|g| g.0 == key) {
            Some(g) => g.1.push(r),
            None => groups.push((key, vec![r])),
        }
    }
    let mut backends: Vec<&str> = Vec::new();
    for r in rows {
        if !backends.contains(&r.backend.as_str()) {
            backends.push(&r.backend);
        }
    }
    // Horizontal bars, a row per shape and op, clipped at 150 % (the CPU path's small
    // tensors sit in cache and can pass a memcpy of the same size many times over).
    const CLIP: f64 = 150.0;
    let (w, h) = (
        1000u32,
        80 + 22 * groups.len() as u32 * backends.len().max(1) as u32,
    );
    let mut pixels = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let n = groups.len().max(1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "% of the copy ceiling per row (higher is better; bars clipped at 150 %)",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(190)
            .build_cartesian_2d(0.0..CLIP, n..0.0)?;
        let labels: Vec<String> = groups.iter().map(|g| g.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(groups.len() * 2 + 1)
            .y_label_formatter(&|v| {
                let i = v.floor() as usize;
                if (v - v.floor() - 0.5).abs() < 0.26 && i < labels.len() {
                    labels[i].clone()
                } else {
                    String::new()
                }
            })
            .label_style(("sans-serif", 13))
            .x_desc("% of copy")
            .draw()?;
        let palette = [
            RGBColor(31, 100, 180),
            RGBColor(214, 96, 39),
            RGBColor(60, 150, 70),
            RGBColor(140, 90, 170),
        ];
        let height = 0.8 / backends.len().max(1) as f64;
        for (b, name) in backends.iter().enumerate() {
            let color = palette[b % palette.len()];
            let bars = groups.iter().enumerate().filter_map(|(g, (_, rs))| {
                let r = rs.iter().find(|r| r.backend == *name)?;
                let y0 = g as f64 + 0.1 + b as f64 * height;
                let x = r.pct_copy.min(CLIP);
                Some(Rectangle::new(
                    [(0.0, y0), (x, y0 + height)],
                    color.filled(),
                ))
            });
            chart
                .draw_series(bars)?
                .label(name.to_string())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()?;
        root.present()?;
    }
    let file = std::fs::File::create(path)?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&pixels)?;
    writer.finish()?;
    Ok(())
}

/// (shape, op) → median ms from the PyTorch script's JSON lines.
fn read_pytorch(path: &str) -> Result<HashMap<(String, String), f64>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
    let mut out = HashMap::new();
    for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
        let field = |name: &str| -> Option<String> {
            let key = format!("\"{name}\":");
            let rest = line[line.find(&key)? + key.len()..].trim_start();
            let end = rest.find([',', '}'])?;
            Some(rest[..end].trim().trim_matches('"').to_string())
        };
        if let (Some(shape), Some(op), Some(ms)) = (field("shape"), field("op"), field("median_ms"))
        {
            if let Ok(ms) = ms.parse() {
                out.insert((shape, op), ms);
            }
        }
    }
    Ok(out)
}
