//! The fused epilogues, y = relu(bn(x) + z) and y = relu(bn(x)), and their backward, on
//! every backend: `ops::batch_norm_relu`, `ops::batch_norm_relu_backward` and the layer's
//! `forward_relu` / `backward_relu`.
//!
//! How they are checked. The fused ops must compute exactly what PyTorch's autograd computes
//! for `relu(batch_norm(x) + z)`, built from the plain pieces this suite checks elsewhere
//! against the f64 oracle and PyTorch:
//! - forward: the statistics (saved and running) of plain batch norm, bit for bit (the same
//!   passes compute them), and y = relu(y_plain + z) up to the rounding of the one add, which
//!   a GPU compiler may contract with the affine transform into a fused multiply-add:
//!   |Δ| ≤ 4 ε (|y_plain| + |z|);
//! - backward: g = dy·[y > 0] (threshold_backward on the result); dz = g bit for bit; dx,
//!   dγ, dβ those of plain `batch_norm_backward(g)` within 1e-6 of their scale (the same
//!   sums in the same order; only the contraction of the masked load may differ).

mod common;

use common::{assert_close, normal, on_every_backend, widen};
use wgpu_batchnorm::{
    ops, BatchNorm, BatchNormConfig, Context, ContextOptions, Error, GradMask, Layout, Tensor,
};

const EPS: f32 = 1e-5;
const F32_EPS: f64 = f32::EPSILON as f64;

fn max_abs(v: &[f32]) -> f64 {
    v.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()))
}

/// The reference forward: relu(y_plain + z), with its tolerance per value.
fn expected_y(plain: &[f32], z: Option<&[f32]>) -> (Vec<f64>, f64) {
    let y: Vec<f64> = match z {
        Some(z) => plain
            .iter()
            .zip(z)
            .map(|(&a, &b)| (a + b).max(0.0) as f64)
            .collect(),
        None => plain.iter().map(|&a| a.max(0.0) as f64).collect(),
    };
    let scale = max_abs(plain) + z.map_or(0.0, max_abs);
    (y, 4.0 * F32_EPS * scale)
}

fn masked(dy: &[f32], y: &[f32]) -> Vec<f32> {
    dy.iter()
        .zip(y)
        .map(|(&g, &v)| if v > 0.0 { g } else { 0.0 })
        .collect()
}

fn read(t: &Option<Tensor>) -> Vec<f32> {
    t.as_ref().expect("asked for").to_vec().unwrap()
}

/// Fused against plain on one context, one shape, one mode.
fn check_case(ctx: &Context, dims: &[usize], layout: Layout, residual: bool, training: bool) {
    let n: usize = dims.iter().product();
    let c = dims[1];
    let seed = (n * 31 + c) as u64 + residual as u64;
    let xs = normal(n, seed, 0.5, 2.0);
    let zs = normal(n, seed + 1, 0.0, 1.0);
    let dys = normal(n, seed + 2, 0.0, 1.0);
    let tensor = |v: &[f32]| ctx.tensor_with_layout(v, dims, layout).unwrap();
    let channel = |v: &[f32]| ctx.tensor_from_slice(v, &[c]).unwrap();
    let (x, z, dy) = (tensor(&xs), tensor(&zs), tensor(&dys));
    let w = channel(&normal(c, seed + 3, 1.0, 0.5));
    let b = channel(&normal(c, seed + 4, 0.0, 0.5));
    let rm0 = normal(c, seed + 5, 0.0, 1.0);
    let rv0: Vec<f32> = normal(c, seed + 6, 2.0, 0.5)
        .iter()
        .map(|v| v.abs())
        .collect();
    let what = format!("{dims:?} {layout:?} residual={residual} training={training}");

    let (mut rm_a, mut rv_a) = (channel(&rm0), channel(&rv0));
    let (mut rm_b, mut rv_b) = (channel(&rm0), channel(&rv0));
    let plain = ops::batch_norm(
        &x,
        Some(&mut rm_a),
        Some(&mut rv_a),
        Some(&w),
        Some(&b),
        training,
        0.1,
        EPS,
    )
    .unwrap();
    let zt = residual.then_some(&z);
    let fused = ops::batch_norm_relu(
        &x,
        zt,
        Some(&mut rm_b),
        Some(&mut rv_b),
        Some(&w),
        Some(&b),
        training,
        0.1,
        EPS,
    )
    .unwrap();

    // The statistics are plain batch norm's, bit for bit.
    assert_eq!(
        fused.saved.mean().unwrap(),
        plain.saved.mean().unwrap(),
        "{what}: saved mean"
    );
    assert_eq!(
        fused.saved.invstd().unwrap(),
        plain.saved.invstd().unwrap(),
        "{what}: invstd"
    );
    assert_eq!(
        rm_b.to_vec().unwrap(),
        rm_a.to_vec().unwrap(),
        "{what}: running mean"
    );
    assert_eq!(
        rv_b.to_vec().unwrap(),
        rv_a.to_vec().unwrap(),
        "{what}: running var"
    );

    let y_plain = plain.y.to_vec().unwrap();
    let y = fused.y.to_vec().unwrap();
    let (want, tol) = expected_y(&y_plain, residual.then_some(&zs[..]));
    assert_close(&format!("{what}: y"), &y, &want, tol, 0.0);
    assert!(
        y.iter().all(|&v| v >= 0.0),
        "{what}: a ReLU output is negative"
    );

    // Backward: plain batch norm's of the masked gradient.
    let g = masked(&dys, &y);
    let gt = tensor(&g);
    let want = ops::batch_norm_backward(&gt, &x, &fused.saved, Some(&w), GradMask::ALL).unwrap();
    let got = ops::batch_norm_relu_backward(
        &dy,
        &fused.y,
        &x,
        &fused.saved,
        Some(&w),
        residual,
        GradMask::ALL,
    )
    .unwrap();
    for (name, got, want) in [
        ("dx", &got.dx, &want.dx),
        ("dγ", &got.dweight, &want.dweight),
        ("dβ", &got.dbias, &want.dbias),
    ] {
        let (got, want) = (read(got), read(want));
        let tol = 1e-6 * max_abs(&want).max(f32::MIN_POSITIVE as f64);
        assert_close(&format!("{what}: {name}"), &got, &widen(&want), tol, 1e-6);
    }
    match (residual, &got.dz) {
        (true, Some(dz)) => assert_eq!(dz.to_vec().unwrap(), g, "{what}: dz = dy·[y > 0]"),
        (false, None) => {}
        (_, dz) => panic!(
            "{what}: dz is {:?} with residual = {residual}",
            dz.is_some()
        ),
    }
}

/// Every mapping the kernels have: long NCHW runs (vec4 and scalar), short runs in the
/// column mapping, (N, C), channels-last, one value per run.
const SHAPES: &[(&[usize], Layout)] = &[
    (&[2, 3, 64, 64], Layout::ChannelsFirst),
    (&[2, 2, 33, 35], Layout::ChannelsFirst),
    (&[4, 3, 8, 8], Layout::ChannelsFirst),
    (&[6, 3, 5, 7], Layout::ChannelsFirst),
    (&[64, 5], Layout::ChannelsFirst),
    (&[8, 300, 1, 1], Layout::ChannelsFirst),
    (&[3, 4, 5, 6], Layout::ChannelsLast),
    (&[2, 8, 3, 4, 5], Layout::ChannelsLast),
    (&[2, 2], Layout::ChannelsFirst),
    // Large enough that the CPU path splits its passes into several tasks.
    (&[8, 6, 40, 40], Layout::ChannelsFirst),
    (&[2048, 40], Layout::ChannelsFirst),
];

#[test]
fn add_relu_training_matches_the_plain_pieces() {
    on_every_backend("add_relu_training_matches_the_plain_pieces", |ctx| {
        for &(dims, layout) in SHAPES {
            check_case(ctx, dims, layout, true, true);
        }
    });
}

#[test]
fn relu_training_matches_the_plain_pieces() {
    on_every_backend("relu_training_matches_the_plain_pieces", |ctx| {
        for &(dims, layout) in SHAPES {
            check_case(ctx, dims, layout, false, true);
        }
    });
}

#[test]
fn add_relu_and_relu_in_inference_match_the_plain_pieces() {
    on_every_backend(
        "add_relu_and_relu_in_inference_match_the_plain_pieces",
        |ctx| {
            for &(dims, layout) in SHAPES {
                check_case(ctx, dims, layout, true, false);
                check_case(ctx, dims, layout, false, false);
            }
        },
    );
}

#[test]
fn chunked_past_a_small_binding_cap() {
    common::backends(); // enforces WGPU_BATCHNORM_REQUIRE_BACKENDS
    let contexts: Vec<Context> = common::gpus_with(ContextOptions {
        max_binding_size: Some(8192),
    })
    .into_iter()
    .collect::<Result<_, _>>()
    .expect("adapters that work uncapped work capped");
    for ctx in &contexts {
        let _gl = (ctx.backend_kind() == "gl").then(common::gl_lock);
        check_case(ctx, &[32, 3, 7, 9], Layout::ChannelsFirst, true, true);
        check_case(ctx, &[40, 2, 16, 8], Layout::ChannelsFirst, false, true);
        check_case(ctx, &[24, 7, 3, 5], Layout::ChannelsLast, true, false);
    }
}

#[test]
fn relu_keeps_nan_and_its_backward_passes_nothing_through_it() {
    on_every_backend(
        "relu_keeps_nan_and_its_backward_passes_nothing_through_it",
        |ctx| {
            // Channel 1 holds a NaN: its statistics and every y of it are NaN, as in PyTorch
            // (torch.relu(nan) = nan); threshold_backward passes 0 where y is NaN.
            let mut xs = normal(2 * 2 * 6, 5, 0.0, 1.0);
            xs[6 + 2] = f32::NAN;
            let x = ctx.tensor_from_slice(&xs, &[2, 2, 6]).unwrap();
            let z = ctx.tensor_from_slice(&[0.25; 24], &[2, 2, 6]).unwrap();
            let out =
                ops::batch_norm_relu(&x, Some(&z), None, None, None, None, true, 0.1, EPS).unwrap();
            let y = out.y.to_vec().unwrap();
            for (i, v) in y.iter().enumerate() {
                let channel = (i / 6) % 2;
                assert_eq!(v.is_nan(), channel == 1, "y[{i}] = {v}");
            }
            let dy = ctx.tensor_from_slice(&[1.0; 24], &[2, 2, 6]).unwrap();
            let g = ops::batch_norm_relu_backward(
                &dy,
                &out.y,
                &x,
                &out.saved,
                None,
                true,
                GradMask::ALL,
            )
            .unwrap();
            let dz = g.dz.unwrap().to_vec().unwrap();
            for (i, (&d, &v)) in dz.iter().zip(&y).enumerate() {
                assert_eq!(d, if v > 0.0 { 1.0 } else { 0.0 }, "dz[{i}] (y = {v})");
            }
        },
    );
}

#[test]
fn the_layer_fuses_in_both_modes() {
    on_every_backend("the_layer_fuses_in_both_modes", |ctx| {
        let dims = [4, 3, 5, 5];
        let n: usize = dims.iter().product();
        let xs = normal(n, 21, 1.0, 3.0);
        let zs = normal(n, 22, 0.0, 1.0);
        let x = ctx.tensor_from_slice(&xs, &dims).unwrap();
        let z = ctx.tensor_from_slice(&zs, &dims).unwrap();
        let dy = ctx
            .tensor_from_slice(&normal(n, 23, 0.0, 1.0), &dims)
            .unwrap();
        let config = BatchNormConfig::new(3).momentum(0.2);
        let mut fused = BatchNorm::new(ctx, config).unwrap();
        let mut plain = BatchNorm::new(ctx, config).unwrap();
        for training in [true, false] {
            if !training {
                fused.eval();
                plain.eval();
            }
            let out = fused.forward_relu(&x, Some(&z)).unwrap();
            let reference = plain.forward(&x).unwrap();
            let (want, tol) = expected_y(&reference.y.to_vec().unwrap(), Some(&zs));
            assert_close("layer y", &out.y.to_vec().unwrap(), &want, tol, 0.0);
            assert_eq!(
                fused.state().unwrap(),
                plain.state().unwrap(),
                "training={training}"
            );
            let g = fused
                .backward_relu(&dy, &out.y, &x, &out.saved, true)
                .unwrap();
            let gt = ctx
                .tensor_from_slice(
                    &masked(&dy.to_vec().unwrap(), &out.y.to_vec().unwrap()),
                    &dims,
                )
                .unwrap();
            let want = plain.backward(&gt, &x, &reference.saved).unwrap();
            let dx = want.dx.unwrap().to_vec().unwrap();
            let tol = 1e-6 * max_abs(&dx);
            assert_close("layer dx", &read(&g.dx), &widen(&dx), tol, 1e-6);
            let dw = want.dweight.unwrap().to_vec().unwrap();
            assert_close(
                "layer dγ",
                &read(&g.dweight),
                &widen(&dw),
                1e-6 * max_abs(&dw),
                1e-6,
            );
            assert_eq!(read(&g.dz), gt.to_vec().unwrap(), "layer dz");
        }
        assert_eq!(fused.num_batches_tracked(), Some(1));
    });
}

#[test]
fn a_residual_or_output_of_another_shape_is_a_typed_error_and_changes_nothing() {
    on_every_backend(
        "a_residual_or_output_of_another_shape_is_a_typed_error_and_changes_nothing",
        |ctx| {
            let x = ctx
                .tensor_from_slice(&normal(24, 1, 0.0, 1.0), &[2, 3, 4])
                .unwrap();
            let mut rm = ctx.tensor_from_slice(&[0.5; 3], &[3]).unwrap();
            let mut rv = ctx.tensor_from_slice(&[2.0; 3], &[3]).unwrap();
            let bad = [
                ctx.tensor_from_slice(&[0.0; 24], &[2, 4, 3]).unwrap(),
                ctx.tensor_from_slice(&[0.0; 12], &[1, 3, 4]).unwrap(),
                ctx.tensor_with_layout(&[0.0; 24], &[2, 3, 4], Layout::ChannelsLast)
                    .unwrap(),
            ];
            for z in &bad {
                let r = ops::batch_norm_relu(
                    &x,
                    Some(z),
                    Some(&mut rm),
                    Some(&mut rv),
                    None,
                    None,
                    true,
                    0.1,
                    EPS,
                );
                assert!(
                    matches!(r, Err(Error::ShapeMismatch { .. })),
                    "residual {:?}: {r:?}",
                    z.dims()
                );
                assert_eq!(rm.to_vec().unwrap(), vec![0.5; 3]);
                assert_eq!(rv.to_vec().unwrap(), vec![2.0; 3]);
            }
            let out =
                ops::batch_norm_relu(&x, None, None, None, None, None, true, 0.1, EPS).unwrap();
            let dy = ctx.tensor_from_slice(&[1.0; 24], &[2, 3, 4]).unwrap();
            for y in &bad {
                let r = ops::batch_norm_relu_backward(
                    &dy,
                    y,
                    &x,
                    &out.saved,
                    None,
                    true,
                    GradMask::ALL,
                );
                assert!(
                    matches!(r, Err(Error::ShapeMismatch { .. })),
                    "y {:?}: {r:?}",
                    y.dims()
                );
            }
            // A residual from another context.
            let other = Context::cpu();
            if ctx.backend_kind() != "cpu" {
                let z = other.tensor_from_slice(&[0.0; 24], &[2, 3, 4]).unwrap();
                let r = ops::batch_norm_relu(&x, Some(&z), None, None, None, None, true, 0.1, EPS);
                assert!(
                    r.is_err(),
                    "a residual from the CPU context was accepted on {}",
                    ctx.name()
                );
            }
        },
    );
}
