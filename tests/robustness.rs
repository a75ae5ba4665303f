//! Robustness: the public types are `Send + Sync` and one context serves many threads with
//! bit-identical results; 10,000 training steps leak neither GPU buffers nor host memory; a
//! destroyed device gives typed errors (no panic, no hang); and `Context::new()` fails
//! cleanly, naming what it tried, when the requested backend is absent.
//!
//! The tests of this file take one lock, so that the soak test's memory readings are not
//! disturbed by the others (RSS is per process).

mod common;

use std::process::Command;
use std::sync::mpsc;
use std::sync::{Barrier, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::normal;
use wgpu_batchnorm::{
    BatchNorm, BatchNormConfig, Context, Error, ForwardOutput, Gradients, Layout, SavedStats,
    Tensor,
};

/// Compile-time check: a type that is not `Send + Sync` makes this file fail to build.
fn assert_send_sync<T: Send + Sync>() {}

const _: [fn(); 6] = [
    assert_send_sync::<Context>,
    assert_send_sync::<Tensor>,
    assert_send_sync::<BatchNorm>,
    assert_send_sync::<SavedStats>,
    assert_send_sync::<ForwardOutput>,
    assert_send_sync::<Gradients>,
];

/// Serializes the tests of this binary (see the module docs).
fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A failed test poisons the lock; the next one still runs.
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

// ---------------------------------------------------------------------------------------
// Threads
// ---------------------------------------------------------------------------------------

/// One independent layer's workload.
#[derive(Clone, Debug)]
struct Job {
    dims: Vec<usize>,
    layout: Layout,
    config: BatchNormConfig,
    seed: u64,
}

fn jobs() -> Vec<Job> {
    let job = |dims: &[usize], layout, config, seed| Job {
        dims: dims.to_vec(),
        layout,
        config,
        seed,
    };
    use Layout::{ChannelsFirst as Cf, ChannelsLast as Cl};
    vec![
        job(&[8, 16, 8, 8], Cf, BatchNormConfig::new(16), 1),
        job(&[5, 3, 7], Cf, BatchNormConfig::new(3).momentum(0.3), 2),
        job(
            &[64, 10],
            Cf,
            BatchNormConfig::new(10).cumulative_average(),
            3,
        ),
        job(
            &[2, 4, 3, 5, 6],
            Cf,
            BatchNormConfig::new(4).affine(false),
            4,
        ),
        job(&[3, 6, 5, 4], Cl, BatchNormConfig::new(6).eps(1e-3), 5),
        job(
            &[4, 7, 33],
            Cf,
            BatchNormConfig::new(7).track_running_stats(false),
            6,
        ),
        job(
            &[2, 5, 4, 4, 4],
            Cl,
            BatchNormConfig::new(5).momentum(1.0),
            7,
        ),
        job(&[16, 2, 100], Cf, BatchNormConfig::new(2).momentum(0.0), 8),
    ]
}

/// Three training steps (forward + backward), one inference forward and backward; every
/// result as f32 bits, labelled.
fn run_job(ctx: &Context, job: &Job) -> Vec<(String, Vec<u32>)> {
    let n: usize = job.dims.iter().product();
    let c = job.config.num_features;
    let mut out = Vec::new();
    let mut bn = BatchNorm::new(ctx, job.config).unwrap();
    if job.config.affine {
        bn.set_weight(&normal(c, job.seed + 100, 1.0, 0.5)).unwrap();
        bn.set_bias(&normal(c, job.seed + 200, 0.0, 0.5)).unwrap();
    }
    let mut record = |label: String, t: &Tensor| out.push((label, bits(&t.to_vec().unwrap())));
    for step in 0..3u64 {
        let xs = normal(n, job.seed * 10 + step, 1.5, 2.0);
        let dys = normal(n, job.seed * 10 + step + 5, 0.0, 1.0);
        let x = ctx.tensor_with_layout(&xs, &job.dims, job.layout).unwrap();
        let dy = ctx.tensor_with_layout(&dys, &job.dims, job.layout).unwrap();
        let f = bn.forward_train(&x).unwrap();
        let g = bn.backward(&dy, &x, &f.saved).unwrap();
        record(format!("step {step} y"), &f.y);
        record(format!("step {step} dx"), g.dx.as_ref().unwrap());
        if let (Some(dw), Some(db)) = (&g.dweight, &g.dbias) {
            record(format!("step {step} dweight"), dw);
            record(format!("step {step} dbias"), db);
        }
    }
    bn.eval();
    let xs = normal(n, job.seed * 10 + 9, -1.0, 3.0);
    let x = ctx.tensor_with_layout(&xs, &job.dims, job.layout).unwrap();
    let dy = ctx.tensor_with_layout(&xs, &job.dims, job.layout).unwrap();
    let f = bn.forward(&x).unwrap();
    record("eval y".into(), &f.y);
    let g = bn.backward(&dy, &x, &f.saved).unwrap();
    record("eval dx".into(), g.dx.as_ref().unwrap());
    for (label, v) in [
        ("running_mean", bn.running_mean().unwrap()),
        ("running_var", bn.running_var().unwrap()),
        ("weight", bn.weight().unwrap()),
    ] {
        if let Some(v) = v {
            out.push((label.into(), bits(&v)));
        }
    }
    out.push((
        "num_batches_tracked".into(),
        vec![bn.num_batches_tracked().unwrap_or(0) as u32],
    ));
    out
}

#[test]
fn eight_threads_share_one_context_bit_identically() {
    let _lock = exclusive();
    let jobs = jobs();
    common::on_every_backend("eight_threads_share_one_context", |ctx| {
        let t = Instant::now();
        let serial: Vec<_> = jobs.iter().map(|j| run_job(ctx, j)).collect();
        let serial_s = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let barrier = Barrier::new(jobs.len());
        let parallel: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = jobs
                .iter()
                .map(|job| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        // Start together, so that submissions of different layers interleave.
                        barrier.wait();
                        run_job(ctx, job)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let parallel_s = t.elapsed().as_secs_f64();

        let mut values = 0;
        for (i, (a, b)) in serial.iter().zip(&parallel).enumerate() {
            assert_eq!(a.len(), b.len(), "job {i}: number of results");
            for ((la, va), (lb, vb)) in a.iter().zip(b) {
                assert_eq!(la, lb);
                if let Some(k) = va.iter().zip(vb).position(|(x, y)| x != y) {
                    panic!(
                        "job {i} ({:?}) {la}: index {k}: single-threaded {} vs 8 threads {} on {}",
                        jobs[i],
                        f32::from_bits(va[k]),
                        f32::from_bits(vb[k]),
                        ctx.name()
                    );
                }
                assert_eq!(va.len(), vb.len(), "job {i} {la}: length");
                values += va.len();
            }
        }
        eprintln!(
            "threads on {}: 8 layers, {values} values bit-identical; serial {serial_s:.2} s, \
             8 threads {parallel_s:.2} s",
            ctx.name()
        );
    });
}

// ---------------------------------------------------------------------------------------
// Soak
// ---------------------------------------------------------------------------------------

/// Resident set size in bytes (VmRSS of /proc/self/status, i.e. statm's resident pages ×
/// the page size, reported by the kernel in KiB).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS value");
    kib * 1024
}

/// Live wgpu-hal buffers of the context's device (None on the CPU).
fn live_buffers(ctx: &Context) -> Option<isize> {
    ctx.wgpu()
        .map(|(device, _)| device.get_internal_counters().hal.buffers.read())
}

const SOAK_STEPS: usize = 10_000;
/// Allowed RSS growth over the soak. The layer's own data is 8·16·8·8·4 B = 32 KiB per
/// tensor, and each step allocates (and must free) ~7 such buffers plus staging: a leak of
/// even one 32 KiB buffer per step would be 320 MB. 32 MiB leaves room for allocator
/// high-water marks and driver caches that settle in the first steps, and is 1/10 of the
/// smallest per-step leak this can see.
const RSS_BOUND: u64 = 32 << 20;

#[test]
fn soak_10000_training_steps_leak_nothing() {
    let _lock = exclusive();
    common::on_every_backend("soak", |ctx| {
        let dims = [8, 16, 8, 8];
        let n: usize = dims.iter().product();
        let xs = normal(n, 42, 2.0, 3.0);
        let dys = normal(n, 43, 0.0, 1.0);
        let x = ctx.tensor_from_slice(&xs, &dims).unwrap();
        let dy = ctx.tensor_from_slice(&dys, &dims).unwrap();
        let mut bn = BatchNorm::new(ctx, BatchNormConfig::new(16)).unwrap();
        let mut step = || {
            let f = bn.forward_train(&x).unwrap();
            bn.backward(&dy, &x, &f.saved).unwrap()
        };
        for _ in 0..10 {
            step();
        }
        ctx.synchronize().unwrap();
        let (buffers0, rss0) = (live_buffers(ctx), rss_bytes());

        let t = Instant::now();
        for i in 1..=SOAK_STEPS {
            let g = step();
            if i % 1000 == 0 {
                // The only readback: the last dβ = Σdy per channel, which must stay finite.
                let db = g.dbias.unwrap().to_vec().unwrap();
                assert!(db.iter().all(|v| v.is_finite()), "step {i}: {db:?}");
            }
        }
        ctx.synchronize().unwrap();
        let secs = t.elapsed().as_secs_f64();
        let (buffers1, rss1) = (live_buffers(ctx), rss_bytes());

        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        eprintln!(
            "soak on {}: {SOAK_STEPS} steps in {secs:.1} s ({:.0} µs/step); live buffers \
             {buffers0:?} -> {buffers1:?}; RSS {:.1} MiB -> {:.1} MiB ({:+.2} MiB)",
            ctx.name(),
            secs * 1e6 / SOAK_STEPS as f64,
            mib(rss0),
            mib(rss1),
            mib(rss1) - mib(rss0)
        );
        assert_eq!(
            buffers0,
            buffers1,
            "live GPU buffers grew on {}",
            ctx.name()
        );
        assert!(
            rss1 < rss0 + RSS_BOUND,
            "RSS grew by {:.1} MiB (bound {:.0} MiB) on {}",
            mib(rss1) - mib(rss0),
            mib(RSS_BOUND),
            ctx.name()
        );

        // The state is still right after 10,010 identical batches: momentum 0.1 has long
        // converged the running mean to the batch mean.
        let shape = wgpu_batchnorm::Shape::new(&dims).unwrap();
        let (mean, _) = wgpu_batchnorm::cpu::reference::batch_stats(&xs, &shape);
        let rm = bn.running_mean().unwrap().unwrap();
        // f32 fixed point of (1−m)·r + m·μ: within a few ulps of |μ| ≲ 3.
        common::assert_close("running_mean after soak", &rm, &mean, 1e-5, 1e-5);
        assert_eq!(bn.num_batches_tracked(), Some(SOAK_STEPS as u64 + 10));
    });
}

// ---------------------------------------------------------------------------------------
// Device loss
// ---------------------------------------------------------------------------------------

/// A call's outcome: its result, or the message of its panic.
type Outcome<T> = std::result::Result<Result<T, Error>, String>;

fn attempt<T>(f: impl FnOnce() -> Result<T, Error>) -> Outcome<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

/// The calls tried after `Device::destroy`; each is tried first once, on a fresh context.
const CALLS: [&str; 7] = [
    "forward_train",
    "Tensor::to_vec",
    "running_mean",
    "tensor_from_slice",
    "backward",
    "set_weight",
    "synchronize",
];

/// Destroys `ctx`'s device and runs [`CALLS`] starting with `CALLS[first]`, each call
/// separately caught, on a helper thread (so that a hang is reported, not waited for).
/// Returns the problems found.
fn after_loss(ctx: Context, first: usize) -> Vec<String> {
    let name = ctx.name();
    let dims = [4, 3, 5];
    let xs = normal(60, 9, 1.0, 2.0);
    let x = ctx.tensor_from_slice(&xs, &dims).unwrap();
    let dy = ctx
        .tensor_from_slice(&normal(60, 10, 0.0, 1.0), &dims)
        .unwrap();
    let mut bn = BatchNorm::new(&ctx, BatchNormConfig::new(3)).unwrap();
    let saved = bn.forward_train(&x).unwrap().saved;
    let before = bn.running_mean().unwrap().unwrap();
    let nbt_before = bn.num_batches_tracked();

    ctx.wgpu().unwrap().0.destroy();

    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut outcomes = Vec::new();
        let mut y = None;
        for k in (0..CALLS.len()).map(|i| (i + first) % CALLS.len()) {
            let outcome = match k {
                0 => attempt(|| {
                    y = Some(bn.forward_train(&x)?.y);
                    Ok(())
                }),
                1 => attempt(|| x.to_vec().map(drop)),
                2 => attempt(|| bn.running_mean().map(|rm| rm.map(|rm| bits(&rm)))).map(|r| {
                    r.map(|rm| {
                        if rm != Some(bits(&before)) {
                            outcomes.push((
                                "running_mean",
                                Ok(Err(Error::Readback(format!(
                                    "read back changed values {:?}",
                                    rm.map(|b| b
                                        .iter()
                                        .map(|&u| f32::from_bits(u))
                                        .collect::<Vec<_>>())
                                )))),
                            ));
                        }
                    })
                }),
                3 => attempt(|| ctx.tensor_from_slice(&xs, &dims).map(drop)),
                4 => attempt(|| bn.backward(&dy, &x, &saved).map(drop)),
                5 => attempt(|| bn.set_weight(&[2.0, 3.0, 4.0])),
                _ => attempt(|| ctx.synchronize()),
            };
            outcomes.push((CALLS[k], outcome));
        }
        // A forward that returned Ok must fail at its readback at the latest.
        let y_readback = y.map(|y| attempt(|| y.to_vec().map(drop)));
        let _ = tx.send((outcomes, y_readback, bn.num_batches_tracked()));
    });
    let Ok((outcomes, y_readback, nbt_after)) = rx.recv_timeout(Duration::from_secs(120)) else {
        return vec![format!("{name}: calls after device loss hung (> 120 s)")];
    };

    let mut problems = Vec::new();
    let gpu_error = |e: &Error| {
        matches!(
            e,
            Error::DeviceLost(_) | Error::GpuValidation(_) | Error::Readback(_)
        )
    };
    let first_call = CALLS[first];
    for (call, outcome) in &outcomes {
        match outcome {
            Err(panic) => problems.push(format!(
                "{name}: {call} (first call: {first_call}) panicked: {panic}"
            )),
            Ok(Err(e)) if !gpu_error(e) => problems.push(format!(
                "{name}: {call} (first call: {first_call}) returned {e:?}"
            )),
            Ok(Err(Error::Readback(m))) if m.starts_with("read back changed") => problems.push(
                format!("{name}: running_mean (first call: {first_call}): {m}"),
            ),
            _ => {}
        }
    }
    let forward_ok = outcomes
        .iter()
        .any(|(c, o)| *c == "forward_train" && matches!(o, Ok(Ok(()))));
    if forward_ok {
        if let Some(Ok(Ok(()))) = y_readback {
            problems.push(format!(
                "{name}: forward_train (first call: {first_call}) and its readback succeeded"
            ));
        }
    } else if nbt_after != nbt_before {
        problems.push(format!(
            "{name}: a failed forward (first call: {first_call}) changed num_batches_tracked \
             {nbt_before:?} -> {nbt_after:?}"
        ));
    }
    let summary: Vec<String> = outcomes
        .iter()
        .map(|(c, o)| match o {
            Ok(Ok(())) => format!("{c}: Ok"),
            Ok(Err(e)) => format!("{c}: {}", short(e)),
            Err(_) => format!("{c}: PANIC"),
        })
        .collect();
    eprintln!("after destroy on {name}: {}", summary.join("; "));
    problems
}

/// The variant name of an error (its messages are long).
fn short(e: &Error) -> String {
    format!("{e:?}")
        .split('(')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Device loss is final for a context: every later GPU call on it fails with a typed error
/// (`Error::DeviceLost`, or a wgpu validation error saying the device is invalid) and never
/// panics or hangs, and the layer keeps what it had (`num_batches_tracked`, running
/// statistics). Recovery is to make a new `Context` (`Context::new()` or
/// `Context::all_gpus()`) and rebuild the layers on it, loading their state (γ, β, running
/// statistics, `num_batches_tracked`) from a copy the application kept: a lost device's
/// memory cannot be read.
#[test]
fn device_loss_gives_typed_errors_not_panics() {
    let _lock = exclusive();
    common::backends(); // reports missing adapters, enforces WGPU_BATCHNORM_REQUIRE_BACKENDS
    let adapters = Context::all_gpus().into_iter().flatten().count();
    if adapters == 0 {
        eprintln!("skipped: no GPU adapter");
        return;
    }
    let mut problems = Vec::new();
    for first in 0..CALLS.len() {
        for ctx in Context::all_gpus().into_iter().flatten() {
            problems.extend(after_loss(ctx, first));
        }
    }
    // Recovery: a new context on the same adapters works.
    for ctx in Context::all_gpus().into_iter().flatten() {
        let mut bn = BatchNorm::new(&ctx, BatchNormConfig::new(2)).unwrap();
        let x = ctx
            .tensor_from_slice(&[1.0, 2.0, 3.0, 5.0], &[2, 2])
            .unwrap();
        let y = bn.forward_train(&x).unwrap().y.to_vec().unwrap();
        common::assert_close(
            "y on a new context",
            &y,
            &[-1.0, -1.0, 1.0, 1.0],
            1e-4, // eps = 1e-5 against a variance of 1 and 2.25
            0.0,
        );
    }
    assert!(
        problems.is_empty(),
        "after device loss:\n{}",
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// No adapter
// ---------------------------------------------------------------------------------------

/// Set in the child process that runs [`no_adapter_fallback_child`].
const CHILD: &str = "WGPU_BATCHNORM_ROBUSTNESS_CHILD";

/// `WGPU_BACKEND` naming a backend absent on this platform: `Context::new()` returns
/// `Error::NoAdapter` naming it, and `Context::cpu()` works. The environment is
/// process-global, so the check runs in a child process of this test binary.
#[test]
fn context_new_falls_back_cleanly_without_the_requested_backend() {
    let absent = if cfg!(any(target_os = "macos", target_os = "ios")) {
        "dx12"
    } else {
        "metal"
    };
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "no_adapter_fallback_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, absent)
        .env("WGPU_BACKEND", absent)
        .env_remove("WGPU_ADAPTER_NAME")
        .output()
        .expect("spawn the test binary");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("NO_ADAPTER_FALLBACK_OK"),
        "the child did not run the check:\n{stdout}\n{stderr}"
    );
}

/// The check itself; does nothing unless the test above started this process.
#[test]
fn no_adapter_fallback_child() {
    let Ok(absent) = std::env::var(CHILD) else {
        return;
    };
    let t = Instant::now();
    let e = Context::new().unwrap_err();
    match &e {
        Error::NoAdapter { tried, .. } => {
            assert!(
                tried.to_lowercase().contains(&absent),
                "tried = {tried:?} does not name {absent}"
            );
        }
        other => panic!("expected Error::NoAdapter, got {other:?}"),
    }
    let message = e.to_string();
    assert!(message.to_lowercase().contains(&absent), "{message}");
    assert!(message.contains("Context::cpu()"), "{message}");
    println!(
        "Context::new() with WGPU_BACKEND={absent}: {message} ({:?})",
        t.elapsed()
    );

    let cpu = Context::cpu();
    let mut bn = BatchNorm::new(&cpu, BatchNormConfig::new(2)).unwrap();
    let x = cpu
        .tensor_from_slice(&[1.0, 2.0, 3.0, 5.0], &[2, 2])
        .unwrap();
    let y = bn.forward_train(&x).unwrap().y.to_vec().unwrap();
    common::assert_close("cpu fallback y", &y, &[-1.0, -1.0, 1.0, 1.0], 1e-4, 0.0);
    println!("NO_ADAPTER_FALLBACK_OK");
}
