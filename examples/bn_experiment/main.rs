//! The batch-norm experiment of Ioffe & Szegedy (2015), §4.1, in one command: a
//! 784-100-100-100-10 sigmoid network trained by SGD on Fashion-MNIST twice, without and
//! with batch norm (this library's `BatchNorm`, PyTorch's `BatchNorm1d`), plus the
//! measurements of Santurkar et al. (2018), "How does batch normalization help
//! optimization?": internal covariate shift per layer and the loss along the gradient.
//!
//! ```sh
//! cargo run --release --example bn_experiment                  # the default, short run
//! cargo run --release --example bn_experiment -- --steps 50000 # the paper's length
//! cargo run --release --example bn_experiment -- --help
//! ```
//!
//! Writes PNG plots, `series.csv` and `summary.txt` to `--out` and prints the summary. The
//! data come from Debian's `dataset-fashion-mnist` package; nothing is downloaded.

mod cpu;
mod data;
mod engine;
mod experiment;
mod gpu;
mod net;
mod plot;
mod report;
mod rng;

use std::path::PathBuf;
use std::process::ExitCode;

use wgpu_batchnorm::Context;

use crate::engine::{Engine, Result};
use crate::experiment::Config;
use crate::net::Kind;

/// The default run's length: both networks and their measurements in about two minutes on
/// a 2-core machine without a GPU (software Vulkan).
const DEFAULT_STEPS: usize = 400;

const USAGE: &str = "\
usage: bn_experiment [options]

  --backend B    auto (default: the best adapter, else the CPU), cpu, vulkan, gl, metal, dx12
  --steps N      SGD steps per network (default 400; the paper: 50000)
  --seed S       seeds the initial weights and the batch order (default 1)
  --out DIR      where the plots, series.csv and summary.txt go
                 (default target/bn_experiment)
  --data DIR     the Fashion-MNIST idx files (default /usr/share/datasets/fashion-mnist,
                 from Debian's package dataset-fashion-mnist)
  --lr X         SGD learning rate (default 0.5)
  --init-std X   standard deviation of the Gaussian initial weights (default 0.1)
  --target A     test accuracy whose first step on the curve the summary reports
                 (default: the plain network's final accuracy on the curve)
  --evals N      test evaluations per network (default 16)
  --measures N   covariate-shift and landscape measurements per network (default 8)
  --test-examples N
                 test examples the accuracy curve is measured on (default 2000; the
                 final accuracy is also measured on all 10000)
  -h, --help     this text";

/// Parsed command line.
#[derive(Debug)]
struct Args {
    backend: Backend,
    config: Config,
    out: PathBuf,
    data: PathBuf,
    target: Option<f64>,
    test_examples: usize,
}

/// `--backend`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Auto,
    Cpu,
    Wgpu(wgpu::Backends, &'static str),
}

fn parse_backend(s: &str) -> std::result::Result<Backend, String> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "auto" => Backend::Auto,
        "cpu" => Backend::Cpu,
        "vulkan" => Backend::Wgpu(wgpu::Backends::VULKAN, "vulkan"),
        "gl" => Backend::Wgpu(wgpu::Backends::GL, "gl"),
        "metal" => Backend::Wgpu(wgpu::Backends::METAL, "metal"),
        "dx12" => Backend::Wgpu(wgpu::Backends::DX12, "dx12"),
        _ => {
            return Err(format!(
                "unknown backend {s:?}: expected auto, cpu, vulkan, gl, metal or dx12"
            ))
        }
    })
}

fn parse_args(mut it: impl Iterator<Item = String>) -> std::result::Result<Option<Args>, String> {
    let mut args = Args {
        backend: Backend::Auto,
        config: Config {
            steps: DEFAULT_STEPS,
            seed: 1,
            lr: 0.5,
            init_std: 0.1,
            batch: 60,
            evals: 16,
            measures: 8,
            eta_factors: vec![0.25, 0.5, 1.0, 2.0, 4.0, 8.0],
            unit: 0,
        },
        out: PathBuf::from("target/bn_experiment"),
        data: data::default_dir(),
        target: None,
        test_examples: 2000,
    };
    fn number<T: std::str::FromStr>(flag: &str, v: &str) -> std::result::Result<T, String> {
        v.parse()
            .map_err(|_| format!("{flag}: {v:?} is not a valid number"))
    }
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value (see --help)"))?;
        let c = &mut args.config;
        match flag.as_str() {
            "--backend" => args.backend = parse_backend(&value)?,
            "--steps" => c.steps = number(&flag, &value)?,
            "--seed" => c.seed = number(&flag, &value)?,
            "--out" => args.out = PathBuf::from(value),
            "--data" => args.data = PathBuf::from(value),
            "--lr" => c.lr = number(&flag, &value)?,
            "--init-std" => c.init_std = number(&flag, &value)?,
            "--target" => args.target = Some(number(&flag, &value)?),
            "--evals" => c.evals = number(&flag, &value)?,
            "--measures" => c.measures = number(&flag, &value)?,
            "--test-examples" => args.test_examples = number(&flag, &value)?,
            _ => return Err(format!("unknown option {flag:?} (see --help)")),
        }
    }
    let c = &args.config;
    if c.steps == 0 {
        return Err("--steps must be at least 1".into());
    }
    if !(c.lr.is_finite() && c.lr > 0.0) {
        return Err(format!("--lr must be a positive number, not {}", c.lr));
    }
    if !(c.init_std.is_finite() && c.init_std > 0.0) {
        return Err(format!(
            "--init-std must be a positive number, not {}",
            c.init_std
        ));
    }
    if let Some(t) = args.target.filter(|t| !(0.0..=1.0).contains(t)) {
        return Err(format!("--target is an accuracy in [0, 1], not {t}"));
    }
    if c.evals == 0 || c.measures == 0 || args.test_examples == 0 {
        return Err("--evals, --measures and --test-examples must be at least 1".into());
    }
    Ok(Some(args))
}

/// The best adapter of one wgpu backend.
fn open_wgpu(backends: wgpu::Backends, name: &str) -> Result<Context> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = backends;
    let instance = wgpu::Instance::new(desc);
    let mut adapters = pollster::block_on(instance.enumerate_adapters(backends));
    adapters.retain(|a| {
        a.get_downlevel_capabilities()
            .flags
            .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
    });
    adapters.sort_by_key(|a| match a.get_info().device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    });
    let mut last = None;
    for adapter in &adapters {
        match Context::from_adapter(adapter) {
            Ok(ctx) => return Ok(ctx),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => format!("no usable {name} adapter: {e}").into(),
        None => format!(
            "no {name} adapter found (without a GPU, Mesa's mesa-vulkan-drivers and \
             libgl1-mesa-dri give software ones; or use --backend cpu)"
        )
        .into(),
    })
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("bn_experiment: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bn_experiment: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    // Everything that can be missing is checked before the first step.
    plot::load_font()?;
    let data = data::load(&args.data, None, None)?;
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let ctx = match args.backend {
        Backend::Cpu => None,
        Backend::Wgpu(backends, name) => Some(open_wgpu(backends, name)?),
        Backend::Auto => match Context::new() {
            Ok(ctx) => Some(ctx),
            Err(e) => {
                eprintln!("no GPU adapter ({e}); running on the CPU");
                None
            }
        },
    };
    match ctx {
        None => go(&cpu::CpuEngine::new(), &data, args),
        Some(ctx) => go(&gpu::GpuEngine::new(&ctx)?, &data, args),
    }
}

fn go<E: Engine>(e: &E, data: &data::FashionMnist, args: &Args) -> Result<()> {
    let backend = e.context().name();
    let c = &args.config;
    println!(
        "bn_experiment on {backend}: {} steps per network, batch {}, lr {}, init N(0, {}²), \
         seed {}; {} training and {} test examples",
        c.steps,
        c.batch,
        c.lr,
        c.init_std,
        c.seed,
        data.train.len(),
        data.test.len()
    );
    let curve = experiment::TestSet::new(e, &data.test.head(args.test_examples))?;
    let full = if curve.len() < data.test.len() {
        Some(experiment::TestSet::new(e, &data.test)?)
    } else {
        None
    };
    let mut runs = Vec::new();
    for kind in Kind::BOTH {
        let (run, _) = experiment::train(e, kind, data, &curve, full.as_ref(), c, false, |line| {
            println!("{line}")
        })?;
        runs.push(run);
    }
    let files = [
        (
            "figure1.png",
            plot::figure1 as fn(&std::path::Path, &[experiment::Run]) -> Result<()>,
        ),
        ("train_loss.png", plot::train_loss),
        ("ics.png", plot::ics),
        ("landscape.png", plot::landscape),
    ];
    for (name, draw) in files {
        draw(&args.out.join(name), &runs)?;
    }
    report::write_csv(&args.out.join("series.csv"), &runs)?;
    let target = args.target.unwrap_or_else(|| {
        let plain = runs.iter().find(|r| r.kind == Kind::Plain);
        plain
            .and_then(|r| r.evals.last())
            .map_or(1.0, |p| p.accuracy)
    });
    let note = match args.target {
        Some(_) => "--target",
        None => "the plain network's final accuracy on the curve",
    };
    let summary = report::summary(
        &runs,
        c,
        target,
        &backend,
        note,
        curve.len(),
        data.test.len(),
    );
    std::fs::write(args.out.join("summary.txt"), &summary)
        .map_err(|e| format!("cannot write summary.txt: {e}"))?;
    println!("\n{summary}");
    println!(
        "wrote {}/{{figure1,train_loss,ics,landscape}}.png, series.csv, summary.txt",
        args.out.display()
    );
    Ok(())
}
