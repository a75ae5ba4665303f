//! Half-precision storage (float16, bfloat16) for x, y, dy, dx and the residual, with f32
//! parameters and statistics: PyTorch's mixed type. On every backend and the CPU path, for
//! each mapping the GPU plans take (pair and vec4 units over long runs, the column mapping,
//! channels-last, rows of odd length taken in pairs, chunks past a binding): the outputs
//! against the f32 path run on the same (exactly widened) half inputs, the fused epilogue
//! against the CPU path's half storage, everything against PyTorch's kernels (golden
//! fixtures), and typed errors for mixed dtypes.
//!
//! Tolerances. A half output is the f32 result rounded once, to nearest, to the storage
//! type, so it lies within half a unit in the last place of the value: 2^-11 relative for
//! float16 and 2^-8 for bfloat16, plus the f32 arithmetic's own error on either side (a few
//! 1e-7 relative, 4e-6 allowed) and an absolute 1e-5 for values near 0, where f32
//! cancellation in dx (a difference of terms of size ~1) is larger than their half ulp.
//! A store that truncated instead of rounding would be up to a whole ulp off, and fails.
//! Statistics are f32 and are held to the f32 path's tolerance.

mod common;

use common::{assert_close, normal, on_every_backend, widen};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use wgpu_batchnorm::half::{bf16, f16};
use wgpu_batchnorm::{
    ops, Context, ContextOptions, DType, DeviceTuning, Error, GradMask, HalfFloat, Layout, Tensor,
};

/// (atol, rtol) for a value stored in `dtype`: half an ulp relative, and the f32 margins.
fn half_tol(dtype: DType) -> (f64, f64) {
    let half_ulp = match dtype {
        DType::F16 => 1.0 / 2048.0,
        DType::BF16 => 1.0 / 256.0,
        _ => f32::EPSILON as f64 / 2.0,
    };
    (1e-5, half_ulp + 4e-6)
}

/// `v` rounded to `dtype` (the values a half tensor of them holds).
fn round(v: &[f32], dtype: DType) -> Vec<f32> {
    v.iter()
        .map(|&x| match dtype {
            DType::F16 => f16::from_f32(x).to_f32(),
            DType::BF16 => bf16::from_f32(x).to_f32(),
            _ => x,
        })
        .collect()
}

/// A tensor of `dtype` holding `v` (rounded to it).
fn half_tensor(ctx: &Context, v: &[f32], dims: &[usize], layout: Layout, dtype: DType) -> Tensor {
    fn make<T: HalfFloat>(
        ctx: &Context,
        v: &[f32],
        dims: &[usize],
        layout: Layout,
        from: fn(f32) -> T,
    ) -> Tensor {
        let h: Vec<T> = v.iter().map(|&x| from(x)).collect();
        ctx.tensor_from_half(&h, dims, layout).unwrap()
    }
    match dtype {
        DType::F16 => make(ctx, v, dims, layout, f16::from_f32),
        DType::BF16 => make(ctx, v, dims, layout, bf16::from_f32),
        _ => ctx.tensor_with_layout(v, dims, layout).unwrap(),
    }
}

/// A training step (forward with running statistics, backward) and an inference forward;
/// every output as f32 host values, named.
fn step(
    ctx: &Context,
    dims: &[usize],
    layout: Layout,
    xs: &[f32],
    dys: &[f32],
    dtype: DType,
) -> Vec<(&'static str, Vec<f32>)> {
    let c = dims[1];
    let x = half_tensor(ctx, xs, dims, layout, dtype);
    let dy = half_tensor(ctx, dys, dims, layout, dtype);
    let p = |v: Vec<f32>| ctx.tensor_from_slice(&v, &[c]).unwrap();
    let (w, b) = (p(normal(c, 7, 1.0, 0.5)), p(normal(c, 8, 0.0, 0.5)));
    let (mut rm, mut rv) = (p(vec![0.0; c]), p(vec![1.0; c]));
    let f = ops::batch_norm(
        &x,
        Some(&mut rm),
        Some(&mut rv),
        Some(&w),
        Some(&b),
        true,
        0.1,
        1e-5,
    )
    .unwrap();
    assert_eq!(f.y.dtype(), dtype, "y takes x's dtype");
    let g = ops::batch_norm_backward(&dy, &x, &f.saved, Some(&w), GradMask::ALL).unwrap();
    let dx = g.dx.unwrap();
    assert_eq!(dx.dtype(), dtype, "dx takes x's dtype");
    let e = ops::batch_norm(
        &x,
        Some(&mut rm),
        Some(&mut rv),
        Some(&w),
        Some(&b),
        false,
        0.1,
        1e-5,
    )
    .unwrap();
    vec![
        ("y", f.y.to_vec().unwrap()),
        ("saved mean", f.saved.mean().unwrap()),
        ("saved invstd", f.saved.invstd().unwrap()),
        ("running mean", rm.to_vec().unwrap()),
        ("running var", rv.to_vec().unwrap()),
        ("dx", dx.to_vec().unwrap()),
        ("dweight", g.dweight.unwrap().to_vec().unwrap()),
        ("dbias", g.dbias.unwrap().to_vec().unwrap()),
        ("eval y", e.y.to_vec().unwrap()),
    ]
}

/// Whether output `name` is stored in the half type (else it is an f32 statistic).
fn stored_half(name: &str) -> bool {
    matches!(name, "y" | "dx" | "eval y")
}

/// One shape, both half types, every backend: each output against the f32 path run on the
/// same (widened) inputs, the half outputs within one storage ulp, the statistics within
/// f32 tolerance.
fn compare(dims: &[usize], layout: Layout, mean: f64, std: f64) {
    for dtype in [DType::F16, DType::BF16] {
        compare_one(dims, layout, dtype, (mean, std, 3));
    }
}

/// [`compare`] for one half type, on data N(mean, std²) from `seed` (and seed + 1 for dy).
fn compare_one(dims: &[usize], layout: Layout, dtype: DType, (mean, std, seed): (f64, f64, u64)) {
    let n: usize = dims.iter().product();
    let xs = round(&normal(n, seed, mean, std), dtype);
    let dys = round(&normal(n, seed + 1, 0.0, 1.0), dtype);
    // The reference: the CPU path in f32 on the exact half values (its f64-stable
    // statistics), unrounded.
    let want = step(&Context::cpu(), dims, layout, &xs, &dys, DType::F32);
    on_every_backend("half_storage", |ctx| {
        let got = step(ctx, dims, layout, &xs, &dys, dtype);
        for ((name, g), (_, w)) in got.iter().zip(&want) {
            let what = format!("{dims:?} {layout:?} {dtype} on {}: {name}", ctx.name());
            let w = widen(w);
            if stored_half(name) {
                let (atol, rtol) = half_tol(dtype);
                assert_close(&what, g, &w, atol, rtol);
            } else {
                assert_close(&what, g, &w, 1e-5, 1e-4);
            }
        }
    });
}

#[test]
fn half_storage_matches_the_f32_path_on_every_mapping() {
    let cases: &[(&[usize], Layout)] = &[
        (&[2, 3, 40, 40], Layout::ChannelsFirst), // long runs, vec4 units
        (&[2, 4, 33, 32], Layout::ChannelsFirst), // long runs of 1056: pair units
        (&[8, 6, 7, 7], Layout::ChannelsFirst),   // columns, rows of 294: pairs
        (&[64, 12], Layout::ChannelsFirst),       // (N, C): vec4 columns
        (&[32, 6], Layout::ChannelsFirst),        // (N, C): pair columns
        (&[4, 6, 5, 5], Layout::ChannelsLast),    // channels-last, C = 6
        (&[2, 4, 3, 4, 5], Layout::ChannelsFirst), // rank 5
        (&[2, 2], Layout::ChannelsFirst),         // two values per channel
    ];
    for &(dims, layout) in cases {
        compare(dims, layout, 1.0, 2.0);
    }
}

/// [`step`] on GPU contexts whose bindings hold at most 1 KiB, so that the tensor is
/// processed in chunks, against the f32 path on the same half values.
fn check_chunked(dims: &[usize], dtype: DType) {
    let n: usize = dims.iter().product();
    let xs = round(&normal(n, 5, -2.0, 3.0), dtype);
    let dys = round(&normal(n, 6, 0.0, 1.0), dtype);
    let layout = Layout::ChannelsFirst;
    let want = step(&Context::cpu(), dims, layout, &xs, &dys, DType::F32);
    let capped = ContextOptions {
        max_binding_size: Some(1024),
    };
    for ctx in common::gpus_with(capped) {
        let ctx = ctx.unwrap();
        let _gl = (ctx.backend_kind() == "gl").then(common::gl_lock);
        let got = step(&ctx, dims, layout, &xs, &dys, dtype);
        for ((name, g), (_, w)) in got.iter().zip(&want) {
            let what = format!("chunked {dims:?} {dtype} on {}: {name}", ctx.name());
            let (atol, rtol) = if stored_half(name) {
                half_tol(dtype)
            } else {
                (1e-4, 1e-4)
            };
            assert_close(&what, g, &widen(w), atol, rtol);
        }
    }
}

#[test]
fn half_storage_past_one_binding_is_chunked() {
    check_chunked(&[16, 4, 8, 8], DType::F16);
}

#[test]
fn half_sums_do_not_overflow() {
    // f16's extremes (±65504) and a channel of two million values: the sums run in f32
    // (onnxruntime's f16 LayerNorm and InstanceNorm overflowed in the storage type).
    let dtype = DType::F16;
    let dims = [2, 2, 1024, 1024];
    let n: usize = dims.iter().product();
    let clamped: Vec<f32> = normal(n, 9, 0.0, 20000.0)
        .iter()
        .map(|v| v.clamp(-65504.0, 65504.0))
        .collect();
    let mut xs = round(&clamped, dtype);
    for (i, v) in xs.iter_mut().enumerate().step_by(97) {
        *v = if i % 2 == 0 { 65504.0 } else { -65504.0 };
    }
    let dys = round(&normal(n, 10, 0.0, 1.0), dtype);
    let want = step(
        &Context::cpu(),
        &dims,
        Layout::ChannelsFirst,
        &xs,
        &dys,
        DType::F32,
    );
    on_every_backend("half_sums_do_not_overflow", |ctx| {
        let got = step(ctx, &dims, Layout::ChannelsFirst, &xs, &dys, dtype);
        for ((name, g), (_, w)) in got.iter().zip(&want) {
            let what = format!("{dtype} extremes on {}: {name}", ctx.name());
            assert!(g.iter().all(|v| v.is_finite()), "{what}: not finite");
            // The means are f32 sums of values of size 2e4: they are held to 1e-5 of the
            // spread (0.2), not to an absolute 1e-4.
            let (atol, rtol) = match *name {
                n if stored_half(n) => half_tol(dtype),
                "saved mean" | "running mean" => (0.2, 1e-4),
                _ => (1e-4, 1e-4),
            };
            assert_close(&what, g, &widen(w), atol, rtol);
        }
    });
}

#[test]
fn float16_subnormal_inputs_are_not_flushed() {
    // Every x and dy a float16 subnormal (k · 2^-24, |k| < 1024). A kernel that flushed
    // them to zero on load (WGSL lets a device flush subnormals; the native float16 path
    // relies on the device's conversions) would see a constant channel: y = β, dx = 0.
    let dtype = DType::F16;
    let dims = [4, 3, 16, 16];
    let n: usize = dims.iter().product();
    let subnormals = |seed| -> Vec<f32> {
        normal(n, seed, 0.0, 400.0)
            .iter()
            .map(|v| v.round().clamp(-1023.0, 1023.0) * 2f32.powi(-24))
            .collect()
    };
    let (xs, dys) = (subnormals(11), subnormals(12));
    assert!(xs
        .iter()
        .all(|&v| f16::from_f32(v).to_f32() == v && v.abs() < 6.1e-5));
    let want = step(
        &Context::cpu(),
        &dims,
        Layout::ChannelsFirst,
        &xs,
        &dys,
        DType::F32,
    );
    on_every_backend("float16_subnormal_inputs_are_not_flushed", |ctx| {
        let got = step(ctx, &dims, Layout::ChannelsFirst, &xs, &dys, dtype);
        for ((name, g), (_, w)) in got.iter().zip(&want) {
            let what = format!("f16 subnormals on {}: {name}", ctx.name());
            // The statistics are of size 1e-5 and below: held relative to that.
            let (atol, rtol) = if stored_half(name) {
                half_tol(dtype)
            } else {
                (1e-9, 1e-4)
            };
            assert_close(&what, g, &widen(w), atol, rtol);
        }
    });
}

/// Every 16-bit pattern of `T` through the kernels: an inference forward with mean 0,
/// var + eps = 1 and no affine, y = x (up to the device's inverseSqrt, which moves a
/// value by ulps of f32, far below half a unit of the storage type), so each pattern is
/// decoded and encoded once. Run lengths of 65536 (vec4 units) and 65538 (pairs).
fn every_pattern_survives_the_kernels<T: HalfFloat>(
    name: &str,
    from_bits: fn(u16) -> T,
    to_bits: fn(T) -> u16,
    is_nan: fn(u16) -> bool,
    flushable: fn(u16) -> bool,
) {
    on_every_backend(name, |ctx| {
        for len in [65536usize, 65538] {
            let bits: Vec<u16> = (0..len).map(|i| (i % 65536) as u16).collect();
            let h: Vec<T> = bits.iter().map(|&b| from_bits(b)).collect();
            let x = ctx
                .tensor_from_half(&h, &[1, 1, len], Layout::ChannelsFirst)
                .unwrap();
            let mut rm = ctx.tensor_from_slice(&[0.0], &[1]).unwrap();
            // var + eps = 1 exactly (eps must be positive).
            let eps = 2f32.powi(-24);
            let mut rv = ctx.tensor_from_slice(&[1.0 - eps], &[1]).unwrap();
            let f = ops::batch_norm(
                &x,
                Some(&mut rm),
                Some(&mut rv),
                None,
                None,
                false,
                0.1,
                eps,
            )
            .unwrap();
            let got: Vec<u16> =
                f.y.to_half_vec::<T>()
                    .unwrap()
                    .into_iter()
                    .map(to_bits)
                    .collect();
            for (i, (&w, &g)) in bits.iter().zip(&got).enumerate() {
                let ok = if is_nan(w) {
                    is_nan(g)
                } else if w & 0x7fff == 0 || flushable(w) {
                    // −0 − 0 + 0 is +0; a device may flush an f32 subnormal (bfloat16's).
                    g & 0x7fff == 0 || g == w
                } else {
                    g == w
                };
                assert!(
                    ok,
                    "{name} on {}: pattern {w:#06x} (index {i} of {len}) came back as {g:#06x}",
                    ctx.name()
                );
            }
        }
    });
}

#[test]
fn every_float16_pattern_decodes_and_encodes_exactly() {
    every_pattern_survives_the_kernels(
        "every_float16_pattern",
        f16::from_bits,
        f16::to_bits,
        |b| b & 0x7c00 == 0x7c00 && b & 0x3ff != 0,
        |_| false,
    );
}

#[test]
fn every_bfloat16_pattern_decodes_and_encodes_exactly() {
    every_pattern_survives_the_kernels(
        "every_bfloat16_pattern",
        bf16::from_bits,
        bf16::to_bits,
        |b| b & 0x7f80 == 0x7f80 && b & 0x7f != 0,
        |b| b & 0x7f80 == 0,
    );
}

#[test]
fn half_values_round_trip_and_keep_their_bits() {
    let bits: Vec<u16> = vec![
        0x0000, 0x8000, 0x0001, 0x03ff, 0x3c00, 0x7bff, 0x7c00, 0xfc00, 0x7e00, 0x7c01, 0xff81,
    ];
    let h: Vec<f16> = bits.iter().map(|&b| f16::from_bits(b)).collect();
    let b16: Vec<bf16> = bits.iter().map(|&b| bf16::from_bits(b)).collect();
    on_every_backend("half_round_trip", |ctx| {
        let t = ctx
            .tensor_from_half(&h, &[1, 11], Layout::ChannelsFirst)
            .unwrap();
        assert_eq!(t.dtype(), DType::F16);
        let back: Vec<u16> = t
            .to_half_vec::<f16>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(back, bits, "{}", ctx.name());
        let wide = t.to_vec().unwrap();
        for (w, v) in wide.iter().zip(&h) {
            assert!(
                w.to_bits() == v.to_f32().to_bits() || w.is_nan() && v.is_nan(),
                "{}: {w} vs {v}",
                ctx.name()
            );
        }
        let t = ctx
            .tensor_from_half(&b16, &[1, 11], Layout::ChannelsFirst)
            .unwrap();
        let back: Vec<u16> = t
            .to_half_vec::<bf16>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(back, bits, "{}", ctx.name());
        assert!(matches!(
            t.to_half_vec::<f16>(),
            Err(Error::DTypeMismatch { .. })
        ));
    });
}

#[test]
fn half_stores_round_to_nearest_even_and_saturate_to_inf() {
    // y = x·γ with γ = 1, β = 0 and statistics (0, 1) from running stats (inference): y is x
    // through the f32 arithmetic and one rounding. x is f32-exact in half, so for the test of
    // the store itself scale by γ: ties, overflow past 65504, subnormals, NaN.
    // A tie (to even: down), a tie from an odd mantissa (to even: up), a value past a half
    // ulp (up), the overflow tie at 65520 (to Inf), a subnormal, NaN.
    let gammas = [
        1.0f32 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        1.0 + 3.0 / 4096.0,
        65520.0 / 65504.0,
        1.0 / 65536.0,
        3.0,
    ];
    let xs = [1.0f32, 1.0, 1.0, 65504.0, 1.0, f32::NAN];
    let dtype = DType::F16;
    on_every_backend("half_store_rounding", |ctx| {
        for (&gamma, &xv) in gammas.iter().zip(&xs) {
            let x = half_tensor(ctx, &[xv, xv], &[1, 2], Layout::ChannelsFirst, dtype);
            let p = |v: f32| ctx.tensor_from_slice(&[v, v], &[2]).unwrap();
            let (mut rm, mut rv, w) = (p(0.0), p(1.0 - 1e-5), p(gamma));
            let y = ops::batch_norm(
                &x,
                Some(&mut rm),
                Some(&mut rv),
                Some(&w),
                None,
                false,
                0.1,
                1e-5,
            )
            .unwrap()
            .y
            .to_vec()
            .unwrap();
            let exact = xv as f64 * gamma as f64 / ((1.0 - 1e-5f32) as f64 + 1e-5).sqrt();
            let want = f16::from_f64(exact).to_f32();
            for v in y {
                let same = (v.is_nan() && want.is_nan()) || v == want;
                assert!(
                    same,
                    "{}: {xv}·{gamma} stored as {v} want {want}",
                    ctx.name()
                );
            }
        }
    });
}

#[test]
fn mixed_dtypes_are_typed_errors_and_change_nothing() {
    on_every_backend("mixed_dtypes", |ctx| {
        let dims = [4, 2, 2, 2];
        let xs = normal(32, 1, 0.0, 1.0);
        let x = half_tensor(ctx, &xs, &dims, Layout::ChannelsFirst, DType::F16);
        let dy32 = ctx.tensor_from_slice(&xs, &dims).unwrap();
        let dyb = half_tensor(ctx, &xs, &dims, Layout::ChannelsFirst, DType::BF16);
        let mut rm = ctx.tensor_from_slice(&[0.5, 0.5], &[2]).unwrap();
        let mut rv = ctx.tensor_from_slice(&[2.0, 2.0], &[2]).unwrap();
        let f = ops::batch_norm(
            &x,
            Some(&mut rm),
            Some(&mut rv),
            None,
            None,
            true,
            0.1,
            1e-5,
        )
        .unwrap();
        for dy in [&dy32, &dyb] {
            let e = ops::batch_norm_backward(dy, &x, &f.saved, None, GradMask::ALL).unwrap_err();
            assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
        }
        // A half weight, and a residual of another dtype; the running statistics stay.
        let before = (rm.to_vec().unwrap(), rv.to_vec().unwrap());
        let w = half_tensor(ctx, &[1.0, 1.0], &[2], Layout::ChannelsFirst, DType::F16);
        let e = ops::batch_norm(
            &x,
            Some(&mut rm),
            Some(&mut rv),
            Some(&w),
            None,
            true,
            0.1,
            1e-5,
        )
        .unwrap_err();
        assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
        let e = ops::batch_norm_relu(
            &x,
            Some(&dyb),
            Some(&mut rm),
            Some(&mut rv),
            None,
            None,
            true,
            0.1,
            1e-5,
        )
        .unwrap_err();
        assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
        assert_eq!((rm.to_vec().unwrap(), rv.to_vec().unwrap()), before);
    });
}

#[test]
fn half_rows_of_odd_length_pair_outer_rows() {
    // A row (C × spatial values, in memory order) of odd length: a pair unit would straddle
    // two outer rows, so the column mapping takes two rows at a time, and where the count
    // of rows is odd the tensor ends in half a word.
    let cases: &[(&[usize], Layout)] = &[
        (&[4, 3], Layout::ChannelsFirst),          // (N, C) with C odd
        (&[5, 3], Layout::ChannelsFirst),          // and N odd: the last word half used
        (&[1, 5, 3], Layout::ChannelsFirst),       // one row
        (&[1, 1, 3], Layout::ChannelsFirst),       // one row of three values
        (&[7, 1], Layout::ChannelsFirst),          // one channel of an odd count
        (&[3, 5, 7], Layout::ChannelsFirst),       // (N, C, L), C and L odd
        (&[3, 5, 3, 3], Layout::ChannelsLast),     // channels-last, C and H·W odd
        (&[2, 3, 5, 5], Layout::ChannelsFirst),    // NCHW, rows of 75
        (&[1031, 3], Layout::ChannelsFirst),       // many rows: several row tiles
        (&[9, 517], Layout::ChannelsFirst),        // rows past a workgroup's columns
        (&[3, 3, 1, 1031], Layout::ChannelsFirst), // long odd runs, C odd
    ];
    for &(dims, layout) in cases {
        compare(dims, layout, 1.0, 2.0);
    }
}

/// relu(bn(x) + z) and its backward, in training and from running statistics; every output
/// as f32 host values, named. The backward masks by `ys` (the forward outputs of another
/// run, in that order) where given, else by this run's own.
fn fused_step(
    ctx: &Context,
    dims: &[usize],
    (xs, zs, dys): (&[f32], &[f32], &[f32]),
    ys: Option<[&[f32]; 2]>,
    dtype: DType,
) -> Vec<(String, Vec<f32>)> {
    let c = dims[1];
    let layout = Layout::ChannelsFirst;
    let (x, z, dy) = (
        half_tensor(ctx, xs, dims, layout, dtype),
        half_tensor(ctx, zs, dims, layout, dtype),
        half_tensor(ctx, dys, dims, layout, dtype),
    );
    let p = |v: Vec<f32>| ctx.tensor_from_slice(&v, &[c]).unwrap();
    let (w, b) = (p(normal(c, 7, 1.0, 0.5)), p(normal(c, 8, 0.0, 0.5)));
    let (mut rm, mut rv) = (p(vec![0.5; c]), p(vec![2.0; c]));
    let mut out = Vec::new();
    for (mode, training) in [true, false].into_iter().enumerate() {
        let f = ops::batch_norm_relu(
            &x,
            Some(&z),
            Some(&mut rm),
            Some(&mut rv),
            Some(&w),
            Some(&b),
            training,
            0.1,
            1e-5,
        )
        .unwrap();
        let y = match ys {
            Some(ys) => half_tensor(ctx, ys[mode], dims, layout, dtype),
            None => f.y.clone(),
        };
        let g = ops::batch_norm_relu_backward(&dy, &y, &x, &f.saved, Some(&w), true, GradMask::ALL)
            .unwrap();
        let read = |t: &Option<Tensor>| t.as_ref().unwrap().to_vec().unwrap();
        out.extend([
            (format!("y (training {training})"), f.y.to_vec().unwrap()),
            (format!("dx (training {training})"), read(&g.dx)),
            (format!("dz (training {training})"), read(&g.dz)),
            (format!("dweight (training {training})"), read(&g.dweight)),
            (format!("dbias (training {training})"), read(&g.dbias)),
        ]);
    }
    out
}

#[test]
fn fused_add_relu_on_half_rows_of_odd_length_matches_the_cpu_path() {
    // The fused epilogue's kernels in the paired-row mapping, with the CPU path on the same
    // half tensors as the reference. Both round bn(x) to the storage type before the add;
    // f32 rounding on either side can move that rounding by one ulp of bn(x), so y is held
    // to two storage ulps of the largest |bn(x)| + |z| (below 16 here). The backward of
    // both masks by the CPU path's y, so that dz is exact and dx within its half ulp.
    for dims in [&[5usize, 3][..], &[3, 5, 7], &[1031, 3], &[2, 2, 7, 7]] {
        let n: usize = dims.iter().product();
        for dtype in [DType::F16, DType::BF16] {
            let xs = round(&normal(n, 13, 0.5, 2.0), dtype);
            let zs = round(&normal(n, 14, 0.0, 1.0), dtype);
            let dys = round(&normal(n, 15, 0.0, 1.0), dtype);
            let data = (&xs[..], &zs[..], &dys[..]);
            let want = fused_step(&Context::cpu(), dims, data, None, dtype);
            let ys = [&want[0].1[..], &want[5].1[..]];
            on_every_backend("fused_half_odd_rows", |ctx| {
                let got = fused_step(ctx, dims, data, Some(ys), dtype);
                for ((name, g), (_, w)) in got.iter().zip(&want) {
                    let what = format!("{dims:?} {dtype} on {}: {name}", ctx.name());
                    let (atol, rtol) = half_tol(dtype);
                    let (atol, rtol) = if name.starts_with("y ") {
                        // 2 ulps at 16: 2 · 16 · 2 · (half an ulp, relative).
                        (2.0 * 16.0 * 2.0 * rtol, 0.0)
                    } else if name.starts_with("dweight") || name.starts_with("dbias") {
                        (1e-4, 1e-4)
                    } else {
                        (atol, rtol)
                    };
                    assert_close(&what, g, &widen(w), atol, rtol);
                }
            });
        }
    }
}

#[test]
fn half_rows_of_odd_length_past_one_binding_are_chunked_in_pairs() {
    // Rows of 42 and 50 bytes under a 1 KiB cap: chunks of an even number of rows, the last
    // of an odd one where the count of rows is odd.
    for dims in [&[41usize, 7, 3][..], &[40, 7, 3], &[51, 25]] {
        check_chunked(dims, DType::BF16);
    }
}

/// One case of tests/fixtures/half.json (written by tests/fixtures/gen_half.py from PyTorch).
struct Golden {
    name: String,
    dtype: DType,
    dims: Vec<usize>,
    layout: Layout,
    v: serde_json::Value,
}

impl Golden {
    fn floats(&self, path: &[&str]) -> Vec<f32> {
        let mut at = &self.v;
        for key in path {
            at = &at[*key];
        }
        at.as_array()
            .unwrap_or_else(|| panic!("{}: no {path:?}", self.name))
            .iter()
            .map(|x| x.as_f64().expect("a number") as f32)
            .collect()
    }
}

fn goldens() -> Vec<Golden> {
    let text = include_str!("fixtures/half.json");
    let all: Vec<serde_json::Value> = serde_json::from_str(text).expect("half.json parses");
    all.into_iter()
        .map(|v| Golden {
            name: v["name"].as_str().unwrap().to_string(),
            dtype: match v["dtype"].as_str().unwrap() {
                "float16" => DType::F16,
                "bfloat16" => DType::BF16,
                d => panic!("dtype {d}"),
            },
            dims: v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect(),
            layout: if v["channels_last"].as_bool().unwrap() {
                Layout::ChannelsLast
            } else {
                Layout::ChannelsFirst
            },
            v,
        })
        .collect()
}

/// (atol, rtol) against PyTorch for a value stored in `dtype`: both sides round an f32
/// result once (PyTorch's CPU kernels compute the mixed type in float), and their f32
/// results differ in summation order, so the stored values may sit one ulp apart where
/// the f32 results straddle a rounding point: one ulp (2^-10 float16, 2^-7 bfloat16), and
/// 1e-4 absolute for dx near 0, a difference of f32 terms of size ~1.
fn torch_tol(dtype: DType) -> (f64, f64) {
    let ulp = if dtype == DType::F16 {
        1.0 / 1024.0
    } else {
        1.0 / 128.0
    };
    (1e-4, ulp + 4e-6)
}

#[test]
fn half_storage_matches_pytorch() {
    for g in goldens() {
        let (dims, layout, dtype) = (&g.dims[..], g.layout, g.dtype);
        let c = dims[1];
        on_every_backend("half_storage_matches_pytorch", |ctx| {
            let what = |k: &str| format!("{} on {}: {k}", g.name, ctx.name());
            let t = |k: &str| half_tensor(ctx, &g.floats(&[k]), dims, layout, dtype);
            let p = |k: &str| {
                ctx.tensor_from_slice(&g.floats(&["init", k]), &[c])
                    .unwrap()
            };
            let (x, dy, z) = (t("x"), t("dy"), t("z"));
            let (w, b) = (p("weight"), p("bias"));
            let (mut rm, mut rv) = (p("running_mean"), p("running_var"));
            let half = |name: &str, got: &Tensor, path: &[&str]| {
                let (atol, rtol) = torch_tol(dtype);
                let want = widen(&g.floats(path));
                assert_close(&what(name), &got.to_vec().unwrap(), &want, atol, rtol);
            };
            let single = |name: &str, got: &Tensor, path: &[&str]| {
                let want = widen(&g.floats(path));
                assert_close(&what(name), &got.to_vec().unwrap(), &want, 1e-5, 1e-4);
            };
            let f = ops::batch_norm(
                &x,
                Some(&mut rm),
                Some(&mut rv),
                Some(&w),
                Some(&b),
                true,
                0.1,
                1e-5,
            )
            .unwrap();
            half("y", &f.y, &["train", "y"]);
            let gr = ops::batch_norm_backward(&dy, &x, &f.saved, Some(&w), GradMask::ALL).unwrap();
            half("dx", gr.dx.as_ref().unwrap(), &["train", "dx"]);
            single(
                "dweight",
                gr.dweight.as_ref().unwrap(),
                &["train", "dweight"],
            );
            single("dbias", gr.dbias.as_ref().unwrap(), &["train", "dbias"]);
            single("running mean", &rm, &["train", "running_mean"]);
            single("running var", &rv, &["train", "running_var"]);
            let e = ops::batch_norm(
                &x,
                Some(&mut rm),
                Some(&mut rv),
                Some(&w),
                Some(&b),
                false,
                0.1,
                1e-5,
            )
            .unwrap();
            half("eval y", &e.y, &["eval_y"]);
            // relu(bn(x) + z) from the initial running statistics.
            let (mut rm, mut rv) = (p("running_mean"), p("running_var"));
            let f = ops::batch_norm_relu(
                &x,
                Some(&z),
                Some(&mut rm),
                Some(&mut rv),
                Some(&w),
                Some(&b),
                true,
                0.1,
                1e-5,
            )
            .unwrap();
            half("fused y", &f.y, &["fused", "y"]);
            let gr = ops::batch_norm_relu_backward(
                &dy,
                &f.y,
                &x,
                &f.saved,
                Some(&w),
                true,
                GradMask::ALL,
            )
            .unwrap();
            half("fused dx", gr.dx.as_ref().unwrap(), &["fused", "dx"]);
            half("fused dz", gr.dz.as_ref().unwrap(), &["fused", "dz"]);
            single(
                "fused dweight",
                gr.dweight.as_ref().unwrap(),
                &["fused", "dweight"],
            );
            single(
                "fused dbias",
                gr.dbias.as_ref().unwrap(),
                &["fused", "dbias"],
            );
        });
    }
}

#[test]
fn sync_batch_norm_over_half_parts_matches_one_layer_on_the_whole_batch() {
    use std::sync::Arc;
    use wgpu_batchnorm::{BatchNorm, BatchNormConfig, Communicator, LocalComm, SyncBatchNorm};
    let (dims, parts) = ([6usize, 4, 6, 6], [2usize, 4]);
    let n: usize = dims.iter().product();
    let per = n / dims[0];
    for dtype in [DType::F16, DType::BF16] {
        let xs = round(&normal(n, 31, 0.5, 2.0), dtype);
        let dys = round(&normal(n, 32, 0.0, 1.0), dtype);
        for ctx in common::backends() {
            let _gl = (ctx.backend_kind() == "gl").then(common::gl_lock);
            let whole = |v: &[f32]| half_tensor(ctx, v, &dims, Layout::ChannelsFirst, dtype);
            let mut bn = BatchNorm::new(ctx, BatchNormConfig::new(4)).unwrap();
            let (x, dy) = (whole(&xs), whole(&dys));
            let f = bn.forward_train(&x).unwrap();
            let g = bn.backward(&dy, &x, &f.saved).unwrap();
            let (want_y, want_dx) = (f.y.to_vec().unwrap(), g.dx.unwrap().to_vec().unwrap());
            let comms = LocalComm::group(2).unwrap();
            let handles: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    let (ctx, xs, dys) = (ctx.clone(), xs.clone(), dys.clone());
                    std::thread::spawn(move || {
                        let rank = comm.rank();
                        let start = parts[..rank].iter().sum::<usize>() * per;
                        let len = parts[rank] * per;
                        let pdims = [parts[rank], 4, 6, 6];
                        let t = |v: &[f32]| {
                            half_tensor(
                                &ctx,
                                &v[start..start + len],
                                &pdims,
                                Layout::ChannelsFirst,
                                dtype,
                            )
                        };
                        let mut bn =
                            SyncBatchNorm::new(&ctx, BatchNormConfig::new(4), Arc::new(comm))
                                .unwrap();
                        let (x, dy) = (t(&xs), t(&dys));
                        let f = bn.forward_train(&x).unwrap();
                        assert_eq!(f.y.dtype(), dtype);
                        let g = bn.backward(&dy, &x, &f.saved).unwrap();
                        (
                            start,
                            f.y.to_vec().unwrap(),
                            g.dx.unwrap().to_vec().unwrap(),
                        )
                    })
                })
                .collect();
            for h in handles {
                let (start, y, dx) = h.join().expect("a rank panicked");
                let what = |k: &str| format!("SyncBatchNorm {dtype} on {}: {k}", ctx.name());
                let (atol, rtol) = torch_tol(dtype);
                let part = |v: &[f32]| widen(&v[start..start + y.len()]);
                assert_close(&what("y"), &y, &part(&want_y), atol, rtol);
                assert_close(&what("dx"), &dx, &part(&want_dx), atol, rtol);
            }
        }
    }
}

#[test]
fn native_float16_is_used_where_the_device_has_it_and_asked_for() {
    let mut native = 0;
    for on in [None, Some(true), Some(false)] {
        let tuning = match on {
            Some(on) => DeviceTuning::default().native_f16(on),
            None => DeviceTuning::default(),
        };
        for ctx in Context::all_gpus_tuned(ContextOptions::default(), tuning)
            .into_iter()
            .flatten()
        {
            let info = ctx.adapter_info().expect("a GPU context has an adapter");
            let (device, _) = ctx.wgpu().expect("a GPU context has a device");
            let has = device.features().contains(wgpu::Features::SHADER_F16);
            // The default: native on GPUs, packed on CPU adapters (measured slower there).
            let want = has && on.unwrap_or(info.device_type != wgpu::DeviceType::Cpu);
            let got = ctx.tuning().and_then(|t| t.native_f16);
            assert_eq!(got, Some(want), "{} asked {on:?}", ctx.name());
            if ctx.backend_kind() == "gl" {
                assert_eq!(got, Some(false), "{}: GL has no SHADER_F16", ctx.name());
            }
            native += want as usize;
        }
    }
    if std::env::var("WGPU_BATCHNORM_REQUIRE_BACKENDS").is_ok_and(|b| b.contains("vulkan")) {
        assert!(native > 0, "no Vulkan context stored float16 natively");
    }
}

#[test]
fn a_callers_device_stores_float16_natively_only_if_it_enabled_the_feature() {
    let desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    let backends = desc.backends;
    let instance = wgpu::Instance::new(desc);
    let dims = [2, 3, 8, 8];
    let n: usize = dims.iter().product();
    let xs = round(&normal(n, 31, 1.0, 2.0), DType::F16);
    let dys = round(&normal(n, 32, 0.0, 1.0), DType::F16);
    let want = step(
        &Context::cpu(),
        &dims,
        Layout::ChannelsFirst,
        &xs,
        &dys,
        DType::F16,
    );
    let mut checked = 0;
    for adapter in pollster::block_on(instance.enumerate_adapters(backends)) {
        if !adapter.features().contains(wgpu::Features::SHADER_F16) {
            continue;
        }
        for features in [wgpu::Features::empty(), wgpu::Features::SHADER_F16] {
            let (device, queue) =
                pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
                    label: Some("caller's device"),
                    required_features: features,
                    required_limits: adapter.limits(),
                    ..Default::default()
                }))
                .expect("a device on an adapter that listed the feature");
            let tuning = DeviceTuning::default().native_f16(true);
            let ctx = Context::from_device_tuned(device, queue, ContextOptions::default(), tuning)
                .unwrap();
            let on = features.contains(wgpu::Features::SHADER_F16);
            assert_eq!(
                ctx.tuning().and_then(|t| t.native_f16),
                Some(on),
                "{} with {features:?}",
                ctx.name()
            );
            // Either way the kernels build and agree with the CPU path.
            let got = step(&ctx, &dims, Layout::ChannelsFirst, &xs, &dys, DType::F16);
            for ((name, g), (_, w)) in got.iter().zip(&want) {
                let what = format!("{} with {features:?}: {name}", ctx.name());
                let (atol, rtol) = if stored_half(name) {
                    // Both sides round an f32 result once; their summation orders differ.
                    let (atol, half_ulp) = half_tol(DType::F16);
                    (atol, 2.0 * half_ulp)
                } else {
                    (1e-5, 1e-4)
                };
                assert_close(&what, g, &widen(w), atol, rtol);
            }
            checked += 1;
        }
    }
    if std::env::var("WGPU_BATCHNORM_REQUIRE_BACKENDS").is_ok_and(|b| b.contains("vulkan")) {
        assert!(checked > 0, "no adapter with SHADER_F16 was found");
    }
}

/// Random half problems: rank 2–4, N ≤ 7, C ≤ 9, spatial dims ≤ 9 (rows of every parity),
/// both layouts, both half types, at least two values per channel.
fn half_problem() -> impl Strategy<Value = (Vec<usize>, Layout, DType, u64)> {
    (
        1usize..=7,
        1usize..=9,
        proptest::collection::vec(1usize..=9, 0..=2),
        prop_oneof![Just(Layout::ChannelsFirst), Just(Layout::ChannelsLast)],
        prop_oneof![Just(DType::F16), Just(DType::BF16)],
        0u64..1000,
    )
        .prop_map(|(n, c, spatial, layout, dtype, seed)| {
            let per_channel: usize = n * spatial.iter().product::<usize>();
            let mut dims = vec![if per_channel < 2 { 2 } else { n }, c];
            dims.extend(spatial);
            (dims, layout, dtype, seed)
        })
}

proptest! {
    // Failures are kept in proptest-regressions/ and replayed before new cases.
    #![proptest_config(ProptestConfig {
        cases: 32,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/half.txt",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_half_problems_match_the_f32_path((dims, layout, dtype, seed) in half_problem()) {
        compare_one(&dims, layout, dtype, (0.5, 2.0, seed));
    }
}
