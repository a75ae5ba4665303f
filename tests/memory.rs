//! The caching allocator under control: size classes let batches of varying size reuse
//! each other's buffers, the free buffers it keeps stay under its cap, and
//! `release_cached_buffers` gives them back (PyTorch's `empty_cache`).

mod common;

use wgpu_batchnorm::{BatchNorm, BatchNormConfig, Context, ContextOptions, DeviceTuning};

/// Training steps with batch sizes 1…48 of 64×32×32 (0.26 to 12.6 MB per tensor), every
/// tensor dropped after its step.
fn varying_batches(ctx: &Context) {
    let mut bn = BatchNorm::new(ctx, BatchNormConfig::new(64)).unwrap();
    let cap = ctx.memory_stats().unwrap().cache_limit;
    for n in 1..=48 {
        let dims = [n, 64, 32, 32];
        let len = n * 64 * 32 * 32;
        // Cheap deterministic data: the values do not matter here, the sizes do.
        let xs: Vec<f32> = (0..len).map(|i| (i % 17) as f32 * 0.25).collect();
        let x = ctx.tensor_from_slice(&xs, &dims).unwrap();
        let dy = ctx.tensor_from_slice(&xs, &dims).unwrap();
        let out = bn.forward_train(&x).unwrap();
        let g = bn.backward(&dy, &x, &out.saved).unwrap();
        drop((x, dy, out, g));
        let s = ctx.memory_stats().unwrap();
        assert!(s.cached_bytes <= cap, "N = {n}: {s:?}");
    }
    ctx.synchronize().unwrap();
}

#[test]
fn varying_batch_sizes_stay_under_the_cap_and_release_to_zero() {
    common::on_every_backend("varying_batch_sizes_stay_under_the_cap", |ctx| {
        let Some(before) = ctx.memory_stats() else {
            // The CPU path keeps a few freed buffers (of every CPU context of the process,
            // which other tests use at the same time), 256 MiB at most.
            let mut bn = BatchNorm::new(ctx, BatchNormConfig::new(64)).unwrap();
            for n in [1, 8, 48, 8] {
                let xs = vec![0.5f32; n * 64 * 32 * 32];
                let x = ctx.tensor_from_slice(&xs, &[n, 64, 32, 32]).unwrap();
                let out = bn.forward_train(&x).unwrap();
                drop(bn.backward(&x, &x, &out.saved).unwrap());
            }
            assert!(ctx.release_cached_buffers() <= 256 << 20);
            return;
        };
        varying_batches(ctx);
        let s = ctx.memory_stats().unwrap();
        eprintln!("{}: after the run {s:?}", common::describe(ctx));
        assert!(s.hits > before.hits, "size classes are reused: {s:?}");
        // Live now: the layer's state and the test's own earlier tensors, far below a batch.
        assert!(s.live_bytes < 1 << 20, "{s:?}");
        let released = ctx.release_cached_buffers();
        let after = ctx.memory_stats().unwrap();
        assert_eq!(released, s.cached_bytes);
        assert_eq!(after.cached_bytes, 0, "{after:?}");
    });
}

#[test]
fn a_small_cap_is_kept() {
    common::backends(); // reports missing adapters, enforces WGPU_BATCHNORM_REQUIRE_BACKENDS
    let cap = 16 << 20;
    for ctx in Context::all_gpus_tuned(
        ContextOptions::default(),
        DeviceTuning::default().cache_limit(cap),
    ) {
        let ctx = ctx.unwrap();
        let _gl = (ctx.backend_kind() == "gl").then(common::gl_lock);
        assert_eq!(ctx.memory_stats().unwrap().cache_limit, cap);
        varying_batches(&ctx);
        let s = ctx.memory_stats().unwrap();
        assert!(s.cached_bytes <= cap, "{}: {s:?}", ctx.name());
    }
    // A cap of 0 caches nothing.
    for ctx in Context::all_gpus_tuned(
        ContextOptions::default(),
        DeviceTuning::default().cache_limit(0),
    ) {
        let ctx = ctx.unwrap();
        let _gl = (ctx.backend_kind() == "gl").then(common::gl_lock);
        let x = ctx
            .tensor_from_slice(&[1.0, 2.0, 3.0, 4.0], &[2, 2])
            .unwrap();
        let mut bn = BatchNorm::new(&ctx, BatchNormConfig::new(2)).unwrap();
        drop(bn.forward_train(&x).unwrap());
        assert_eq!(
            ctx.memory_stats().unwrap().cached_bytes,
            0,
            "{}",
            ctx.name()
        );
    }
}
