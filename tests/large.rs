//! Tensors larger than one storage binding: processed in chunks of whole rows, the caller
//! sees one tensor. A small binding cap (`ContextOptions::max_binding_size`) exercises the
//! chunked path on awkward small shapes on every adapter; two real cases (205 MB and 617 MB,
//! past the 128 MiB default binding limit) run once per adapter.

mod common;

use common::{assert_close, normal};
use wgpu_batchnorm::cpu::reference::ReferenceBatchNorm;
use wgpu_batchnorm::{
    BatchNorm, BatchNormConfig, Context, ContextOptions, DType, Error, Layout, Shape,
};

/// The tests of this file one at a time: the big cases hold an adapter for seconds, and
/// wgpu's GL backend panics a thread that waits more than 6 s for its GL context.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// GPU contexts whose storage bindings are capped at `cap` bytes, under each tuning of
/// `common::tunings` (see `common::gpus_with`).
fn capped(cap: u64) -> Vec<Context> {
    common::backends(); // enforces WGPU_BATCHNORM_REQUIRE_BACKENDS and reports missing GPUs
    common::gpus_with(ContextOptions {
        max_binding_size: Some(cap),
    })
    .into_iter()
    .collect::<Result<_, _>>()
    .expect("adapters that work uncapped work capped")
}

/// Like [`capped`], with chunks bound at multiples of `align` bytes (a coarser storage-offset
/// alignment than the software adapters', as real GPUs report up to 256).
fn capped_aligned(cap: u64, align: u64) -> Vec<Context> {
    common::backends();
    let options = ContextOptions {
        max_binding_size: Some(cap),
    };
    common::tunings()
        .into_iter()
        .flat_map(|t| Context::all_gpus_tuned(options, t.offset_alignment(align)))
        .collect::<Result<_, _>>()
        .expect("adapters that work uncapped work capped")
}

fn check_chunked(dims: &[usize], layout: Layout, cap: u64) {
    check_chunked_on(capped(cap), dims, layout, cap);
}

fn check_chunked_on(contexts: Vec<Context>, dims: &[usize], layout: Layout, cap: u64) {
    let n: usize = dims.iter().product();
    let c = dims[1];
    let shape = Shape::with_layout(dims, layout).unwrap();
    let xs = normal(n, 11, 3.0, 2.0);
    let dys = normal(n, 12, 0.0, 1.0);
    let config = BatchNormConfig::new(c).momentum(0.3);
    for ctx in contexts {
        let mut reference = ReferenceBatchNorm::new(config);
        let mut bn = BatchNorm::new(&ctx, config).unwrap();
        let x = ctx.tensor_with_layout(&xs, dims, layout).unwrap();
        let dy = ctx.tensor_with_layout(&dys, dims, layout).unwrap();
        let what = |s: &str| {
            let on = common::describe(&ctx);
            format!("{s} {dims:?} {layout:?} cap {cap} on {on}")
        };
        for _ in 0..2 {
            let want = reference.forward_train(&xs, &shape).unwrap();
            let out = bn.forward_train(&x).unwrap();
            // f32 normalization of O(1) data: a few ulps of |y| ≲ 4.
            assert_close(&what("y"), &out.y.to_vec().unwrap(), &want.y, 1e-5, 1e-5);
            let g = bn.backward(&dy, &x, &out.saved).unwrap();
            let gw = reference.backward(&dys, &xs, &shape, &want);
            let dx = g.dx.unwrap().to_vec().unwrap();
            // dx subtracts per-channel means of O(1) terms: f32 sums over ~1e4 values.
            assert_close(&what("dx"), &dx, &gw.dx, 1e-4, 1e-4);
            let dw = g.dweight.unwrap().to_vec().unwrap();
            // dγ, dβ are sums of n ~ 1e4 products: relative 1e-5 of their magnitude.
            assert_close(&what("dweight"), &dw, &gw.dweight, 1e-2, 1e-4);
        }
        let rm = bn.running_mean().unwrap().unwrap();
        let rv = bn.running_var().unwrap().unwrap();
        assert_close(
            &what("running_mean"),
            &rm,
            &reference.running_mean,
            1e-5,
            1e-5,
        );
        assert_close(
            &what("running_var"),
            &rv,
            &reference.running_var,
            1e-5,
            1e-5,
        );
        bn.eval();
        let want = reference.forward_eval(&xs, &shape).unwrap();
        let y = bn.forward(&x).unwrap().y.to_vec().unwrap();
        assert_close(&what("eval y"), &y, &want.y, 1e-5, 1e-5);
    }
}

#[test]
fn chunked_nchw_scalar_runs() {
    let _serial = serial();
    // Rows of 5·7·3·4 = 420 B; a 64 KiB cap gives chunks of 128 rows (256-B aligned offsets).
    check_chunked(&[300, 5, 7, 3], Layout::ChannelsFirst, 64 << 10);
}

#[test]
fn chunked_nchw_vec4_runs() {
    let _serial = serial();
    // Spatial 16: the vec4 kernels; rows of 3·16·4 = 192 B.
    check_chunked(&[700, 3, 16], Layout::ChannelsFirst, 32 << 10);
}

#[test]
fn chunked_rank2_and_channels_last() {
    let _serial = serial();
    check_chunked(&[5000, 7], Layout::ChannelsFirst, 16 << 10);
    check_chunked(&[40, 6, 5, 3], Layout::ChannelsLast, 4 << 10);
}

#[test]
fn chunked_channel_columns() {
    let _serial = serial();
    // inner = 1 and C % 4 = 0: the channels-contiguous (*_cl) kernels.
    check_chunked(&[3000, 8], Layout::ChannelsFirst, 16 << 10);
    check_chunked(&[40, 12, 5, 3], Layout::ChannelsLast, 4 << 10);
    check_chunked(&[20, 1028, 1, 1], Layout::ChannelsLast, 32 << 10);
}

#[test]
fn chunked_odd_row_sizes() {
    let _serial = serial();
    // Rows whose size is not a multiple of 32 bytes, so that no whole number of rows that
    // fits a binding starts at an aligned offset: each chunk is bound from the aligned
    // offset before its first row. Rows of 420 B (scalar runs), 1716 B, 180 B, 144 B (vec4
    // runs), and channels-last rows of 420 B (columns).
    check_chunked(&[64, 3, 7, 5], Layout::ChannelsFirst, 8 << 10);
    check_chunked(&[50, 3, 11, 13], Layout::ChannelsFirst, 4 << 10);
    check_chunked(&[33, 5, 9], Layout::ChannelsFirst, 1 << 10);
    check_chunked(&[40, 3, 12], Layout::ChannelsFirst, 2 << 10);
    check_chunked(&[30, 7, 3, 5], Layout::ChannelsLast, 2 << 10);
}

#[test]
fn chunked_at_a_256_byte_offset_alignment() {
    let _serial = serial();
    // Every chunk starts up to 252 bytes past the aligned offset it is bound at, and the
    // cap leaves room for few rows: odd rows (420 B, 180 B), vec4 rows (144 B), columns.
    for (dims, layout, cap) in [
        (&[64, 3, 7, 5][..], Layout::ChannelsFirst, 2 << 10),
        (&[33, 5, 9], Layout::ChannelsFirst, 1 << 10),
        (&[40, 3, 12], Layout::ChannelsFirst, 1 << 10),
        (&[30, 7, 3, 5], Layout::ChannelsLast, 1 << 10),
    ] {
        check_chunked_on(capped_aligned(cap, 256), dims, layout, cap);
    }
    for ctx in capped_aligned(1 << 10, 256) {
        assert_eq!(
            ctx.tuning().unwrap().offset_alignment,
            Some(256),
            "{}",
            ctx.name()
        );
    }
}

#[test]
fn webgpu_default_limits() {
    let _serial = serial();
    // Devices created with WebGPU's default limits (the baseline browsers and many real
    // GPUs report: 256-byte storage-offset alignment, 16 KiB of workgroup memory, 128 MiB
    // bindings, 8 storage buffers per stage), under both partitionings; a binding cap makes
    // the tensors chunked. A software adapter that cannot give such a device fails the test.
    let contexts = |cap: u64| {
        let options = ContextOptions {
            max_binding_size: Some(cap),
        };
        let found = common::gpus_on_devices("webgpu-default", options, |_| wgpu::Limits::default());
        // As many as the suite's GPU contexts: one per adapter and tuning.
        let gpus = common::backends()
            .iter()
            .filter(|c| c.wgpu().is_some())
            .count();
        assert_eq!(
            found.len(),
            gpus,
            "every adapter gives a WebGPU-default device"
        );
        found
    };
    for ctx in contexts(1 << 20) {
        let (device, _) = ctx.wgpu().unwrap();
        assert_eq!(device.limits().min_storage_buffer_offset_alignment, 256);
        assert_eq!(device.limits().max_compute_workgroup_storage_size, 16 << 10);
    }
    for (dims, layout, cap) in [
        (&[64, 3, 7, 5][..], Layout::ChannelsFirst, 8 << 10),
        (&[40, 3, 12], Layout::ChannelsFirst, 2 << 10),
        (&[9, 2, 32, 64], Layout::ChannelsFirst, 40 << 10),
        (&[30, 7, 3, 5], Layout::ChannelsLast, 2 << 10),
        (&[3000, 8], Layout::ChannelsFirst, 16 << 10),
    ] {
        check_chunked_on(contexts(cap), dims, layout, cap);
    }
}

#[test]
fn a_row_that_fits_only_without_the_alignment_slack_is_a_typed_error() {
    let _serial = serial();
    // Rows of 1000 B and a 1 KiB cap: a chunk bound 252 bytes early does not fit.
    for ctx in capped_aligned(1 << 10, 256) {
        let x = ctx
            .tensor_from_slice(&normal(4 * 250, 2, 0.0, 1.0), &[4, 250])
            .unwrap();
        let mut bn = BatchNorm::new(&ctx, BatchNormConfig::new(250)).unwrap();
        let err = bn.forward_train(&x).unwrap_err();
        assert!(
            matches!(err, Error::TooLarge { limit: 1024, .. }),
            "{err:?} on {}",
            common::describe(&ctx)
        );
        assert_eq!(bn.num_batches_tracked(), Some(0));
    }
}

#[test]
fn chunked_long_runs_use_row_mapping() {
    let _serial = serial();
    // Spatial 32·64 = 2048 floats per run: the row-mapped element-wise kernels, 2 rows a chunk.
    check_chunked(&[9, 2, 32, 64], Layout::ChannelsFirst, 32 << 10);
}

#[test]
fn a_row_larger_than_a_binding_is_a_typed_error() {
    let _serial = serial();
    for ctx in capped(1024) {
        let dims = [4, 3, 16, 16]; // rows of 3 KiB
        let x = ctx
            .tensor_from_slice(&normal(4 * 3 * 256, 1, 0.0, 1.0), &dims)
            .unwrap();
        let mut bn = BatchNorm::new(&ctx, BatchNormConfig::new(3)).unwrap();
        let before = (bn.running_mean().unwrap(), bn.num_batches_tracked());
        let err = bn.forward_train(&x).unwrap_err();
        assert!(
            matches!(err, Error::TooLarge { .. }),
            "{err:?} on {}",
            ctx.name()
        );
        assert_eq!(
            before,
            (bn.running_mean().unwrap(), bn.num_batches_tracked())
        );
    }
}

/// Contexts on devices whose storage bindings hold at most 1 MiB (the crate's own scratch
/// included, unlike a `max_binding_size` cap, which chunks tensors only).
fn small_binding_devices() -> Vec<Context> {
    let found = common::gpus_on_devices("1-MiB-binding", ContextOptions::default(), |l| {
        wgpu::Limits {
            max_storage_buffer_binding_size: 1 << 20,
            ..l.clone()
        }
    });
    // As many as the suite's GPU contexts (one per adapter and tuning); this also enforces
    // WGPU_BATCHNORM_REQUIRE_BACKENDS and reports missing adapters loudly.
    let gpus = common::backends()
        .iter()
        .filter(|c| c.wgpu().is_some())
        .count();
    assert_eq!(
        found.len(),
        gpus,
        "every adapter gives a 1 MiB-binding device"
    );
    assert!(!found.is_empty(), "no adapter gives a 1 MiB-binding device");
    found
}

#[test]
fn partials_past_the_device_binding_take_longer_tiles() {
    let _serial = serial();
    // (256, 4096) f32: rows of 16 KiB, 5 chunks of 63 rows, 320 KiB of partials per tile of
    // rows (16 bytes per value column and chunk). Both presets ask for more tiles than the
    // 3 that fit a 1 MiB binding (4 and 16): the plan takes longer tiles instead.
    check_chunked_on(
        small_binding_devices(),
        &[256, 4096],
        Layout::ChannelsFirst,
        1 << 20,
    );
}

#[test]
fn partials_that_cannot_fit_the_device_binding_are_a_typed_error() {
    let _serial = serial();
    // (256, 16384) f32: 18 chunks of 64 KiB rows, 4.5 MiB of partials at one tile per chunk;
    // (2, 3, 171, 171) float16: rows of 87 723 values, odd, so two rows make a mapping row
    // and each value column keeps two partials: 2.7 MiB. Training fails before anything
    // changes; inference, which reduces nothing, still runs.
    let cases: [(&[usize], Option<DType>); 2] =
        [(&[256, 16384], None), (&[2, 3, 171, 171], Some(DType::F16))];
    for ctx in small_binding_devices() {
        for &(dims, half) in &cases {
            let n: usize = dims.iter().product();
            let c = dims[1];
            let xs = normal(n, 5, 1.0, 2.0);
            let (x, xs) = match half {
                None => (ctx.tensor_from_slice(&xs, dims).unwrap(), xs),
                Some(_) => {
                    let h: Vec<half::f16> = xs.iter().map(|&v| half::f16::from_f32(v)).collect();
                    let back = h.iter().map(|v| v.to_f32()).collect();
                    let x = ctx
                        .tensor_from_half(&h, dims, Layout::ChannelsFirst)
                        .unwrap();
                    (x, back)
                }
            };
            let what = format!("{dims:?} on {}", common::describe(&ctx));
            let config = BatchNormConfig::new(c).momentum(0.5);
            let mut bn = BatchNorm::new(&ctx, config).unwrap();
            let before = (bn.running_mean().unwrap(), bn.running_var().unwrap());
            let err = bn.forward_train(&x).unwrap_err();
            assert!(
                matches!(err, Error::TooLarge { limit, .. } if limit == 1 << 20),
                "{what}: {err:?}"
            );
            assert_eq!(
                (bn.running_mean().unwrap(), bn.running_var().unwrap()),
                before,
                "{what}"
            );
            assert_eq!(bn.num_batches_tracked(), Some(0), "{what}");
            bn.eval();
            let shape = Shape::new(dims).unwrap();
            let want = ReferenceBatchNorm::new(config)
                .forward_eval(&xs, &shape)
                .unwrap();
            let y = bn.forward(&x).unwrap().y.to_vec().unwrap();
            // (x − 0)/sqrt(1 + eps): f32 rounding, or one float16 ulp (2^-11 relative).
            let tol = if half.is_some() { 1.0 / 1024.0 } else { 1e-6 };
            assert_close(&format!("eval y {what}"), &y, &want.y, tol, tol);
        }
    }
}

/// A real tensor past the default 128 MiB binding limit: training forward on every adapter,
/// statistics against the f64 reference and y against the CPU path.
fn past_binding_limit(dims: &[usize]) {
    let n: usize = dims.iter().product();
    let xs = normal(n, 5, 1.0, 3.0);
    let shape = Shape::new(dims).unwrap();
    let (mean, var) = wgpu_batchnorm::cpu::reference::batch_stats(&xs, &shape);
    let cpu = Context::cpu();
    let mut cpu_bn = BatchNorm::new(&cpu, BatchNormConfig::new(dims[1])).unwrap();
    let cpu_y = cpu_bn
        .forward_train(&cpu.tensor_from_slice(&xs, dims).unwrap())
        .unwrap()
        .y
        .to_vec()
        .unwrap();
    let mut ran = 0;
    for ctx in common::backends().iter().filter(|c| c.wgpu().is_some()) {
        let x = ctx.tensor_from_slice(&xs, dims).unwrap();
        let mut bn = BatchNorm::new(ctx, BatchNormConfig::new(dims[1])).unwrap();
        let out = bn.forward_train(&x).unwrap();
        let what = |s: &str| format!("{s} {dims:?} ({} MB) on {}", n * 4 / 1_000_000, ctx.name());
        // Mean of ~1e6 values per channel: relative 1e-6 of the spread (f32 merges).
        assert_close(&what("mean"), &out.saved.mean().unwrap(), &mean, 1e-5, 1e-6);
        let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
        assert_close(
            &what("invstd"),
            &out.saved.invstd().unwrap(),
            &invstd,
            1e-6,
            1e-5,
        );
        let y = out.y.to_vec().unwrap();
        assert_close(
            &what("y vs CPU path"),
            &y,
            &common::widen(&cpu_y),
            1e-4,
            1e-4,
        );
        ran += 1;
    }
    eprintln!("{dims:?}: ran on {ran} adapters");
}

#[test]
fn past_binding_limit_205_mb() {
    let _serial = serial();
    past_binding_limit(&[64, 256, 56, 56]);
}

#[test]
fn past_binding_limit_216_mb_with_odd_rows() {
    let _serial = serial();
    // Rows of 3·1501·1501·4 = 27 036 012 bytes: not a multiple of 32, so no chunk of whole
    // rows starts at an aligned offset.
    past_binding_limit(&[8, 3, 1501, 1501]);
}

#[test]
fn past_binding_limit_617_mb() {
    let _serial = serial();
    past_binding_limit(&[48, 256, 112, 112]);
}

#[test]
fn kernel_timing_reports_gpu_time_where_available() {
    let _serial = serial();
    for ctx in common::backends() {
        let x = ctx
            .tensor_from_slice(&normal(8 * 4 * 64, 3, 0.0, 1.0), &[8, 4, 64])
            .unwrap();
        let mut bn = BatchNorm::new(ctx, BatchNormConfig::new(4)).unwrap();
        if !ctx.set_kernel_timing(true) {
            assert!(ctx.wgpu().is_none() || !ctx.has_kernel_timing());
            assert_eq!(ctx.take_kernel_time().unwrap(), None);
            eprintln!("{}: no kernel timing", ctx.name());
            continue;
        }
        ctx.take_kernel_time().unwrap();
        bn.forward_train(&x).unwrap();
        let t = ctx.take_kernel_time().unwrap().expect("timing is on");
        ctx.set_kernel_timing(false);
        eprintln!("{}: training forward kernels {t:?}", ctx.name());
        assert!(
            t > std::time::Duration::ZERO,
            "{}: zero kernel time",
            ctx.name()
        );
    }
}
