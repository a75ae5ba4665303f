//! Shared by every test file: the backends to run on, deterministic data, and a tolerance
//! check that names the failing index.
//!
//! Every test body is written once and run on every backend: the CPU path and each wgpu
//! adapter found. No adapter is reported loudly on stderr; with
//! `WGPU_BATCHNORM_REQUIRE_BACKENDS=vulkan,gl` (CI sets it) a missing backend fails the run.
#![allow(dead_code)]

use std::sync::OnceLock;

use wgpu_batchnorm::{Context, ContextOptions, DeviceTuning, Layout, Partitioning, Shape};

/// The tunings every GPU test body runs under: the device's own with packed float16 words,
/// and, where either differs from that (the software adapters' partitioning, a device with
/// `SHADER_F16`), the discrete-GPU work partitioning (many tiles per channel, the
/// tree-merge finalize) with native float16 storage, so that the paths every real GPU
/// takes run on the software adapters too, and both float16 paths run on a GPU.
pub fn tunings() -> [DeviceTuning; 2] {
    [
        DeviceTuning::default().native_f16(false),
        DeviceTuning::default()
            .partitioning(Partitioning::DiscreteGpu)
            .native_f16(true),
    ]
}

/// GPU contexts with `options`: one per adapter with the first of [`tunings`], then one
/// with the second where it differs: on the software adapters (whose own partitioning is
/// the CPU-adapter one) and on devices with `SHADER_F16`.
pub fn gpus_with(options: ContextOptions) -> Vec<Result<Context, wgpu_batchnorm::Error>> {
    let [own, gpu] = tunings();
    let mut out = Context::all_gpus_tuned(options, own);
    out.extend(
        Context::all_gpus_tuned(options, gpu)
            .into_iter()
            .filter(|c| match c {
                Ok(c) => {
                    c.adapter_info().map(|i| i.device_type) == Some(wgpu::DeviceType::Cpu)
                        || c.tuning().and_then(|t| t.native_f16) == Some(true)
                }
                Err(_) => true,
            }),
    );
    out
}

/// How a context is named in failure messages: its adapter and, on a GPU, its partitioning
/// and float16 storage.
pub fn describe(ctx: &Context) -> String {
    match ctx.tuning() {
        Some(t) => format!(
            "{} (partitioning {:?}, {} float16)",
            ctx.name(),
            t.partitioning,
            if t.native_f16 == Some(true) {
                "native"
            } else {
                "packed"
            }
        ),
        None => ctx.name(),
    }
}

/// The CPU context and, per GPU adapter, one context per tuning of [`tunings`], built once
/// per test binary.
pub fn backends() -> &'static [Context] {
    static BACKENDS: OnceLock<Vec<Context>> = OnceLock::new();
    BACKENDS.get_or_init(|| {
        let mut all = vec![Context::cpu()];
        for ctx in gpus_with(ContextOptions::default()) {
            match ctx {
                Ok(ctx) => all.push(ctx),
                Err(e) => eprintln!("!!! wgpu-batchnorm tests: an adapter is unusable: {e}"),
            }
        }
        if all.len() == 1 {
            eprintln!(
                "!!! wgpu-batchnorm tests: NO GPU ADAPTER FOUND: only the CPU path is tested \
                 (install mesa-vulkan-drivers for lavapipe; WGPU_BACKEND filters adapters)"
            );
        }
        if let Ok(required) = std::env::var("WGPU_BATCHNORM_REQUIRE_BACKENDS") {
            for want in required.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                assert!(
                    all.iter().any(|c| c.backend_kind().eq_ignore_ascii_case(want)),
                    "WGPU_BATCHNORM_REQUIRE_BACKENDS names {want:?} but no such adapter was found; \
                     found: {:?}",
                    all.iter().map(Context::name).collect::<Vec<_>>()
                );
            }
        }
        all
    })
}

/// One GL body at a time per test binary: wgpu's GL backend panics a thread that waits more
/// than 6 s for the GL context lock, and a long llvmpipe dispatch in one test can hold it
/// that long while another test waits.
pub fn gl_lock() -> std::sync::MutexGuard<'static, ()> {
    static GL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    GL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `body` on every backend (GL bodies one at a time, see [`gl_lock`]), saying which
/// one fails.
pub fn on_every_backend(test: &str, body: impl Fn(&Context)) {
    for ctx in backends() {
        let _gl = (ctx.backend_kind() == "gl").then(gl_lock);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(ctx)));
        if let Err(e) = r {
            eprintln!("test {test} failed on backend {}", describe(ctx));
            std::panic::resume_unwind(e);
        }
    }
}

/// Deterministic normal samples: mean + std·N(0, 1) (SplitMix64 + Box–Muller).
pub fn normal(len: usize, seed: u64, mean: f64, std: f64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..len)
        .map(|_| {
            let (u1, u2) = (next(), next());
            let g = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            (mean + std * g) as f32
        })
        .collect()
}

/// Asserts |got − want| ≤ atol + rtol·|want| everywhere; NaN must match NaN. The message
/// names the first failing index, both values, and the worst error.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0.0f64, 0usize);
    let mut first_bad = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g as f64;
        if w.is_nan() || g.is_nan() {
            if w.is_nan() != g.is_nan() && first_bad.is_none() {
                first_bad = Some(i);
            }
            continue;
        }
        let err = (g - w).abs();
        if err > worst.0 {
            worst = (err, i);
        }
        if err > atol + rtol * w.abs() && first_bad.is_none() {
            first_bad = Some(i);
        }
    }
    if let Some(i) = first_bad {
        panic!(
            "{what}: index {i}: got {} want {} (atol {atol:e}, rtol {rtol:e}); worst |err| {:e} at {}",
            got[i], want[i], worst.0, worst.1
        );
    }
}

/// f32 → f64 for comparisons against exact values.
pub fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// One context per GPU adapter and tuning (as [`gpus_with`]) on a device that allows only
/// `max` workgroups per dispatch dimension (wgpu validates every dispatch against the limits
/// the device was created with), so that small tensors need the 2-D grids, whatever plan the
/// library picks.
pub fn gpus_with_grid_limit(max: u32) -> Vec<Context> {
    gpus_on_devices("grid-limited", ContextOptions::default(), |adapter| {
        wgpu::Limits {
            max_compute_workgroups_per_dimension: max,
            ..adapter.clone()
        }
    })
    .into_iter()
    .inspect(|c| {
        // What the library plans with and what wgpu validates dispatches against.
        let (device, _) = c.wgpu().unwrap();
        assert_eq!(device.limits().max_compute_workgroups_per_dimension, max);
    })
    .collect()
}

/// One context per GPU adapter and tuning (as [`gpus_with`], on the software adapters; the
/// first tuning on GPUs) on a device created with the limits `limits(adapter's limits)`
/// and no optional features (so float16 is packed), and the given options. An adapter that cannot give
/// such a device is reported on stderr and left out.
pub fn gpus_on_devices(
    label: &str,
    options: ContextOptions,
    limits: impl Fn(&wgpu::Limits) -> wgpu::Limits,
) -> Vec<Context> {
    let desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    let backends = desc.backends;
    let instance = wgpu::Instance::new(desc);
    let mut out = Vec::new();
    for adapter in pollster::block_on(instance.enumerate_adapters(backends)) {
        if !adapter
            .get_downlevel_capabilities()
            .flags
            .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
        {
            continue;
        }
        let software = adapter.get_info().device_type == wgpu::DeviceType::Cpu;
        for tuning in tunings().into_iter().take(if software { 2 } else { 1 }) {
            let request = adapter.request_device(&wgpu::DeviceDescriptor {
                label: Some(label),
                required_limits: limits(&adapter.limits()),
                ..Default::default()
            });
            match pollster::block_on(request) {
                Ok((device, queue)) => out.push(
                    Context::from_device_tuned(device, queue, options, tuning)
                        .expect("a device with the crate's minimum limits"),
                ),
                Err(e) => eprintln!("!!! {:?}: no {label} device: {e}", adapter.get_info().name),
            }
        }
    }
    out
}

/// Channels-first (N, C, S) data → channels-last (N, S, C) memory.
pub fn to_channels_last(x: &[f32], dims: &[usize]) -> Vec<f32> {
    let (n, c) = (dims[0], dims[1]);
    let s: usize = dims[2..].iter().product();
    let mut out = vec![0.0; x.len()];
    for b in 0..n {
        for ch in 0..c {
            for p in 0..s {
                out[(b * s + p) * c + ch] = x[(b * c + ch) * s + p];
            }
        }
    }
    out
}

/// Channels-last (N, S, C) memory → channels-first (N, C, S).
pub fn to_channels_first(x: &[f32], dims: &[usize]) -> Vec<f32> {
    let (n, c) = (dims[0], dims[1]);
    let s: usize = dims[2..].iter().product();
    let mut out = vec![0.0; x.len()];
    for b in 0..n {
        for ch in 0..c {
            for p in 0..s {
                out[(b * c + ch) * s + p] = x[(b * s + p) * c + ch];
            }
        }
    }
    out
}

/// One ulp of `v` as an f32.
pub fn ulp(v: f64) -> f64 {
    let bits = (v as f32).abs().to_bits();
    (f32::from_bits(bits + 1) - f32::from_bits(bits)) as f64
}

/// The channel of the value at memory index `i`.
pub fn channel_of(shape: &Shape, i: usize) -> usize {
    let c = shape.channels();
    match shape.layout() {
        Layout::ChannelsFirst => (i / shape.spatial().max(1)) % c,
        Layout::ChannelsLast => i % c,
    }
}
