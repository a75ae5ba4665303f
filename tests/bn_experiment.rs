//! The batch-norm experiment (examples/bn_experiment), short: a few hundred SGD steps on a
//! subset of Fashion-MNIST, on the CPU backend and on the best GPU adapter, checking
//! - that the batch-norm network's training loss is below the plain network's at equal
//!   steps (windows of the loss curve, not one noisy batch);
//! - that each layer's running statistics equal the exponential average (momentum 0.1, as
//!   PyTorch) of the batch statistics of the inputs it saw, computed here in f64 from those
//!   inputs;
//! - that a run is deterministic: the same seed gives the same losses, bit for bit;
//! - that the covariate-shift and landscape measurements are well-formed;
//! - that the example's WGSL kernels agree with its CPU loops, op by op and over whole
//!   training steps.
//!
//! The data come from Debian's package dataset-fashion-mnist (CI installs it); without it
//! the test fails, naming the package.

#[allow(dead_code)]
#[path = "../examples/bn_experiment/cpu.rs"]
mod cpu;
#[allow(dead_code)]
#[path = "../examples/bn_experiment/data.rs"]
mod data;
#[allow(dead_code)]
#[path = "../examples/bn_experiment/engine.rs"]
mod engine;
#[allow(dead_code)]
#[path = "../examples/bn_experiment/experiment.rs"]
mod experiment;
#[allow(dead_code)]
#[path = "../examples/bn_experiment/gpu.rs"]
mod gpu;
#[allow(dead_code)]
#[path = "../examples/bn_experiment/net.rs"]
mod net;
#[allow(dead_code)]
#[path = "../examples/bn_experiment/rng.rs"]
mod rng;

use std::path::Path;

use engine::Engine;
use experiment::{Config, Run, TestSet};
use net::{Kind, HIDDEN};

const WINDOW: usize = 50;

fn config(steps: usize) -> Config {
    Config {
        steps,
        seed: 7,
        lr: 0.5,
        init_std: 0.1,
        batch: 60,
        evals: 2,
        measures: 2,
        eta_factors: vec![0.5, 1.0, 4.0],
        unit: 0,
    }
}

fn dataset() -> data::FashionMnist {
    data::load(Path::new(data::DEFAULT_DIR), Some(6000), Some(1000))
        .unwrap_or_else(|e| panic!("the experiment's data: {e}"))
}

fn window_means(run: &Run) -> Vec<f64> {
    run.train_loss
        .chunks(WINDOW)
        .map(|w| w.iter().map(|&v| v as f64).sum::<f64>() / w.len() as f64)
        .collect()
}

/// Missing, truncated and corrupt files are errors that name the file and the package.
#[test]
fn bad_data_files_are_errors_naming_the_package() {
    let dir = std::env::temp_dir().join(format!("bn_experiment_data_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let real = Path::new(data::DEFAULT_DIR);
    let files = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ];
    let bytes: Vec<Vec<u8>> = files
        .iter()
        .map(|f| {
            std::fs::read(real.join(f))
                .unwrap_or_else(|e| panic!("{f}: {e}: install {}", data::PACKAGE))
        })
        .collect();
    let expect_error = |what: &str, file: &str, contains: &str| {
        let err = data::load(&dir, None, None).expect_err(what);
        assert!(
            err.contains(file) && err.contains(data::PACKAGE) && err.contains(contains),
            "{what}: the message does not name {file}, {} and {contains:?}: {err}",
            data::PACKAGE
        );
    };
    expect_error("an empty directory", files[0], "not found");
    for (f, b) in files.iter().zip(&bytes) {
        std::fs::write(dir.join(f), b).unwrap();
    }
    data::load(&dir, Some(10), Some(10)).expect("an intact copy loads");
    // Cut inside the pixels (limits do not hide it when the cut is before them), at the
    // header, and inside the gzip trailer of the test labels.
    let images = &bytes[0];
    std::fs::write(dir.join(files[0]), &images[..images.len() / 2]).unwrap();
    expect_error("truncated images", files[0], "truncated");
    std::fs::write(dir.join(files[0]), &images[..30]).unwrap();
    expect_error("a cut header", files[0], "");
    std::fs::write(dir.join(files[0]), b"not gzip at all").unwrap();
    expect_error("not gzip", files[0], "");
    std::fs::write(dir.join(files[0]), images).unwrap();
    let labels = &bytes[3];
    std::fs::write(dir.join(files[3]), &labels[..labels.len() - 4]).unwrap();
    expect_error("a cut gzip trailer", files[3], "");
    std::fs::write(dir.join(files[3]), labels).unwrap();
    // Images of the test set under the training labels' name: wrong kind of idx file.
    std::fs::write(dir.join(files[1]), &bytes[2]).unwrap();
    expect_error("an image file for labels", files[1], "magic");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The training losses of both networks over `steps` steps.
fn losses<E: Engine>(
    e: &E,
    data: &data::FashionMnist,
    test: &TestSet<E>,
    steps: usize,
) -> [Vec<f32>; 2] {
    Kind::BOTH.map(|kind| {
        experiment::train(e, kind, data, test, None, &config(steps), false, |_| {})
            .map(|(run, _)| run.train_loss)
            .unwrap_or_else(|err| panic!("{}: {kind:?}: {err}", e.context().name()))
    })
}

/// Trains both networks for `steps` (a multiple of [`WINDOW`]) and checks the properties.
fn check<E: Engine>(e: &E, steps: usize) {
    let name = e.context().name();
    let data = dataset();
    let test = TestSet::new(e, &data.test).expect("upload the test set");
    let cfg = config(steps);
    let start = std::time::Instant::now();
    let (plain, _) = experiment::train(e, Kind::Plain, &data, &test, None, &cfg, false, |_| {})
        .unwrap_or_else(|err| panic!("{name}: plain run: {err}"));
    let (bn, net) = experiment::train(e, Kind::BatchNorm, &data, &test, None, &cfg, true, |_| {})
        .unwrap_or_else(|err| panic!("{name}: batch-norm run: {err}"));
    eprintln!(
        "{name}: two runs of {steps} steps in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    // 1. Training loss at equal steps: every window of 50 steps after the first.
    let (p, b) = (window_means(&plain), window_means(&bn));
    eprintln!("{name}: training loss per {WINDOW} steps: plain {p:.3?}, batch norm {b:.3?}");
    for (w, (p, b)) in p.iter().zip(&b).enumerate().skip(1) {
        assert!(
            b < p,
            "{name}: steps {}..{}: the batch-norm network's mean training loss {b:.4} is not \
             below the plain network's {p:.4}",
            w * WINDOW,
            (w + 1) * WINDOW
        );
    }

    // 2. Running statistics against the exponential average of the logged batch moments.
    let log = net.bn_input_log.as_ref().expect("logging was asked for");
    assert_eq!(log.len(), HIDDEN, "{name}: one log per batch-norm layer");
    for (l, moments) in log.iter().enumerate() {
        assert_eq!(
            moments.len(),
            steps,
            "{name}: layer {l}: one entry per training step"
        );
        let c = moments[0].0.len();
        let (mut mean, mut var) = (vec![0.0f64; c], vec![1.0f64; c]);
        for (m, v) in moments {
            for i in 0..c {
                mean[i] = 0.9 * mean[i] + 0.1 * m[i];
                var[i] = 0.9 * var[i] + 0.1 * v[i];
            }
        }
        let bn_layer = &net.bn[l];
        assert_eq!(
            bn_layer.num_batches_tracked(),
            Some(steps as u64),
            "{name}: layer {l}"
        );
        let got_mean = bn_layer.running_mean().unwrap().unwrap();
        let got_var = bn_layer.running_var().unwrap().unwrap();
        for i in 0..c {
            // f32 storage, 300 updates: each rounds by ~6e-8 relative; 1e-4 leaves margin
            // while a wrong momentum, a biased variance (×59/60) or a skipped update fails.
            let tol = |want: f64| 1e-5 + 1e-4 * want.abs();
            assert!(
                (got_mean[i] as f64 - mean[i]).abs() <= tol(mean[i]),
                "{name}: layer {l} channel {i}: running mean {} but the average of the batch \
                 means is {}",
                got_mean[i],
                mean[i]
            );
            assert!(
                (got_var[i] as f64 - var[i]).abs() <= tol(var[i]),
                "{name}: layer {l} channel {i}: running var {} but the average of the \
                 unbiased batch variances is {}",
                got_var[i],
                var[i]
            );
        }
    }

    // 3. The measurements: layers 2..=4 at each of the two measured steps, finite values.
    for run in [&plain, &bn] {
        let layers: Vec<usize> = run.ics.iter().map(|p| p.layer).collect();
        assert_eq!(
            layers,
            [2, 3, 4, 2, 3, 4],
            "{name}: {:?}: ICS layers",
            run.kind
        );
        for p in &run.ics {
            assert!(
                p.l2.is_finite() && p.l2 >= 0.0,
                "{name}: ‖G − G′‖ = {}",
                p.l2
            );
            assert!(
                (-1.0 - 1e-9..=1.0 + 1e-9).contains(&p.cos),
                "{name}: cos = {}",
                p.cos
            );
        }
        assert_eq!(run.landscape.len(), 2, "{name}: landscape measurements");
        for p in &run.landscape {
            assert_eq!(p.losses.len(), 3);
            assert!(
                p.losses.iter().all(|l| l.1.is_finite()),
                "{name}: {:?}",
                p.losses
            );
        }
        // Chance is 0.1: both have learned something by now.
        assert!(
            run.final_accuracy() > 0.3,
            "{name}: {:?}: test accuracy {}",
            run.kind,
            run.final_accuracy()
        );
    }
    assert!(
        bn.final_accuracy() > plain.final_accuracy(),
        "{name}: test accuracy with batch norm {} is not above the plain network's {}",
        bn.final_accuracy(),
        plain.final_accuracy()
    );

    // 4. Determinism: the same seed again, bit for bit.
    let first = losses(e, &data, &test, 20);
    assert_eq!(
        first,
        losses(e, &data, &test, 20),
        "{name}: two runs with one seed differ"
    );
}

#[test]
fn cpu_backend() {
    check(&cpu::CpuEngine::new(), 300);
}

/// The best GPU adapter, or `None` (said loudly; a failure where CI requires adapters).
fn gpu() -> Option<gpu::GpuEngine> {
    match wgpu_batchnorm::Context::new() {
        Ok(ctx) => Some(gpu::GpuEngine::new(&ctx).expect("the example's kernels")),
        Err(e) => {
            let required = std::env::var("WGPU_BATCHNORM_REQUIRE_BACKENDS").unwrap_or_default();
            assert!(
                required.trim().is_empty(),
                "WGPU_BATCHNORM_REQUIRE_BACKENDS={required} but no GPU adapter: {e}"
            );
            eprintln!(
                "!!! bn_experiment test: NO GPU ADAPTER ({e}): only the CPU backend was tested \
                 (install mesa-vulkan-drivers for a software Vulkan adapter)"
            );
            None
        }
    }
}

/// Fewer steps than on the CPU: a software adapter takes ~0.1 s a step.
#[test]
fn gpu_backend() {
    if let Some(e) = gpu() {
        check(&e, 200);
    }
}

/// The WGSL kernels against the CPU loops: every product variant (blocked NN, TN, NT and
/// the scalar fallback) with each epilogue, softmax cross-entropy, sigmoid and axpy, on
/// seeded data; then the first 30 training steps of both networks.
#[test]
fn gpu_kernels_agree_with_the_cpu_loops() {
    use engine::{Act, Gemm};
    let Some(g) = gpu() else { return };
    let c = cpu::CpuEngine::new();
    let name = g.context().name();
    let mut rng = rng::Rng::new(3);
    let mut values = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.normal() as f32).collect() };
    let close = |what: &str, got: &[f32], want: &[f32]| {
        assert_eq!(got.len(), want.len(), "{name}: {what}: length");
        for (i, (&x, &y)) in got.iter().zip(want).enumerate() {
            // Sums of up to 100 products of N(0, 1) values: f32 rounding in a different order.
            assert!(
                (x - y).abs() <= 1e-4 + 1e-5 * y.abs() * 100.0,
                "{name}: {what}: index {i}: GPU {x}, CPU {y}"
            );
        }
    };
    let shapes = [
        (12, 20, 8),   // every blocked variant
        (60, 100, 28), // the network's widths
        (6, 10, 7),    // scalar fallback: nothing a multiple of 4
        (1, 8, 12),    // m = 1: the bias sums
        (8, 12, 10),   // k not a multiple of 4: NN and NT fall back, TN does not
    ];
    for (m, n, k) in shapes {
        for (a_t, b_t) in [(false, false), (true, false), (false, true)] {
            for act in [Act::None, Act::Sigmoid, Act::SigmoidGrad] {
                let (a, b, bias, aux) = (values(m * k), values(k * n), values(n), values(m * n));
                let aux: Vec<f32> = aux.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
                let spec = Gemm { m, n, k, a_t, b_t };
                let up = |v: &[f32]| g.upload(v).unwrap();
                let (ga, gb, gbias, gaux) = (up(&a), up(&b), up(&bias), up(&aux));
                let product = g.gemm(spec, &ga, &gb, Some(&gbias), act, Some(&gaux));
                let on_gpu = g.download(&product.unwrap()).unwrap();
                let on_cpu = c.gemm(spec, &a, &b, Some(&bias), act, Some(&aux)).unwrap();
                close(&format!("gemm {spec:?} {act:?}"), &on_gpu, &on_cpu);
            }
        }
    }
    let rows = 37;
    let logits = values(rows * data::CLASSES);
    let labels: Vec<f32> = (0..rows).map(|i| (i * 7 % data::CLASSES) as f32).collect();
    let (gd, gs) = g
        .softmax_xent(
            &g.upload(&logits).unwrap(),
            &g.upload(&labels).unwrap(),
            rows,
        )
        .unwrap();
    let (cd, cs) = c.softmax_xent(&logits, &labels, rows).unwrap();
    close("softmax gradient", &g.download(&gd).unwrap(), &cd);
    close("softmax loss, correct", &g.download(&gs).unwrap(), &cs);
    let x = values(1001);
    close(
        "sigmoid",
        &g.download(&g.sigmoid(&g.upload(&x).unwrap()).unwrap())
            .unwrap(),
        &c.sigmoid(&x).unwrap(),
    );
    let (mut yg, mut yc) = (g.upload(&x).unwrap(), x.clone());
    let d = values(1001);
    g.axpy(&mut yg, -0.25, &g.upload(&d).unwrap()).unwrap();
    c.axpy(&mut yc, -0.25, &d).unwrap();
    close("axpy", &g.download(&yg).unwrap(), &yc);

    // Whole training steps: the two engines' losses stay together.
    let data = dataset();
    let (tg, tc) = (
        TestSet::new(&g, &data.test).unwrap(),
        TestSet::new(&c, &data.test).unwrap(),
    );
    let (on_gpu, on_cpu) = (losses(&g, &data, &tg, 30), losses(&c, &data, &tc, 30));
    for (kind, (lg, lc)) in Kind::BOTH.iter().zip(on_gpu.iter().zip(&on_cpu)) {
        close(&format!("{kind:?}: training losses"), lg, lc);
    }
}
