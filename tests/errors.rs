//! Every way to misuse the API returns the documented [`Error`] variant — never a panic —
//! and a call that fails changes nothing the caller owns: γ, β, the running statistics and
//! `num_batches_tracked` read back bit-identical before and after. Runs on every backend.

mod common;

use std::fmt::Debug;
use std::process::Command;
use std::sync::OnceLock;

use wgpu_batchnorm::{BatchNorm, BatchNormConfig, Context, Error, Layout, Result};

/// A per-channel setter (`BatchNorm::set_weight` and its siblings).
type Setter = fn(&mut BatchNorm, &[f32]) -> Result<()>;

/// Everything a failing call must leave alone, as bits (so -0.0 ≠ 0.0 and NaN == NaN).
#[derive(Debug, PartialEq, Eq)]
struct Owned {
    weight: Option<Vec<u32>>,
    bias: Option<Vec<u32>>,
    running_mean: Option<Vec<u32>>,
    running_var: Option<Vec<u32>>,
    num_batches_tracked: Option<u64>,
}

fn bits(v: Result<Option<Vec<f32>>>) -> Option<Vec<u32>> {
    v.expect("reading state succeeds")
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
}

fn owned(bn: &BatchNorm) -> Owned {
    Owned {
        weight: bits(bn.weight()),
        bias: bits(bn.bias()),
        running_mean: bits(bn.running_mean()),
        running_var: bits(bn.running_var()),
        num_batches_tracked: bn.num_batches_tracked(),
    }
}

/// Runs `op`, which must fail, and checks the module's state did not change. Returns the
/// error for the caller to match.
#[track_caller]
fn fails<T: Debug>(bn: &mut BatchNorm, op: impl FnOnce(&mut BatchNorm) -> Result<T>) -> Error {
    let before = owned(bn);
    let result = op(bn);
    assert_eq!(
        before,
        owned(bn),
        "a failing call changed the module's state"
    );
    match result {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => {
            // Every error renders a message (Display must not panic either).
            assert!(!e.to_string().is_empty());
            e
        }
    }
}

/// A module whose state is not the default (so that a reset would be noticed too):
/// γ, β, running statistics set where the config has them, one training step taken.
fn module(ctx: &Context, config: BatchNormConfig) -> BatchNorm {
    let c = config.num_features;
    let mut bn = BatchNorm::new(ctx, config).unwrap();
    let ramp = |a: f32, b: f32| (0..c).map(|i| a + b * i as f32).collect::<Vec<_>>();
    if config.affine {
        bn.set_weight(&ramp(1.5, 0.25)).unwrap();
        bn.set_bias(&ramp(-0.5, 0.125)).unwrap();
    }
    if config.track_running_stats {
        bn.set_running_mean(&ramp(0.25, -0.5)).unwrap();
        bn.set_running_var(&ramp(2.0, 0.5)).unwrap();
        bn.set_num_batches_tracked(5).unwrap();
    }
    let x = ctx
        .tensor_from_slice(&common::normal(4 * c * 3, 7, 1.0, 2.0), &[4, c, 3])
        .unwrap();
    bn.forward_train(&x).unwrap();
    bn
}

fn tensor(ctx: &Context, dims: &[usize], seed: u64) -> wgpu_batchnorm::Tensor {
    let n = dims.iter().product();
    ctx.tensor_from_slice(&common::normal(n, seed, 0.0, 1.0), dims)
        .unwrap()
}

/// A second context on the same backend as `ctx` (built once per backend per binary).
fn twin(ctx: &Context) -> Context {
    static GPU_TWINS: OnceLock<Vec<Context>> = OnceLock::new();
    if ctx.backend_kind() == "cpu" {
        return Context::cpu();
    }
    let twins = GPU_TWINS.get_or_init(|| {
        Context::all_gpus()
            .into_iter()
            .filter_map(|c| c.ok())
            .collect()
    });
    let twin = twins
        .iter()
        .find(|t| t.name() == ctx.name())
        .unwrap_or_else(|| panic!("no second context on {}", ctx.name()))
        .clone();
    assert_ne!(twin.id(), ctx.id());
    twin
}

// ---- shapes ----

#[test]
fn rank_below_two() {
    common::on_every_backend("rank_below_two", |ctx| {
        let mut bn = module(ctx, BatchNormConfig::new(3));
        let x = tensor(ctx, &[3], 1);
        let good = tensor(ctx, &[2, 3], 2);
        let saved = bn.forward_eval(&good).unwrap().saved;
        for training in [true, false] {
            if training {
                bn.train()
            } else {
                bn.eval()
            }
            let e = fails(&mut bn, |bn| bn.forward(&x));
            assert!(
                matches!(&e, Error::InvalidRank { shape } if shape == &[3]),
                "{e:?}"
            );
        }
        let e = fails(&mut bn, |bn| bn.backward(&x, &x, &saved));
        assert!(matches!(e, Error::InvalidRank { .. }), "{e:?}");
        let e = fails(&mut bn, |bn| bn.backward_eval(&x, &x));
        assert!(matches!(e, Error::InvalidRank { .. }), "{e:?}");
        // Rank 0 has no channel axis: rejected when the tensor is made.
        let e = ctx.tensor_from_slice(&[1.0], &[]).unwrap_err();
        assert!(matches!(e, Error::InvalidRank { .. }), "{e:?}");
    });
}

#[test]
fn rank_above_five() {
    common::on_every_backend("rank_above_five", |ctx| {
        let mut bn = module(ctx, BatchNormConfig::new(3));
        let dims = [2, 3, 1, 2, 1, 2];
        let x = tensor(ctx, &dims, 3);
        let good = tensor(ctx, &[2, 3, 4], 4);
        let saved = bn.forward_eval(&good).unwrap().saved;
        for training in [true, false] {
            if training {
                bn.train()
            } else {
                bn.eval()
            }
            let e = fails(&mut bn, |bn| bn.forward(&x));
            assert!(
                matches!(&e, Error::InvalidRank { shape } if shape == &dims),
                "{e:?}"
            );
        }
        let e = fails(&mut bn, |bn| bn.backward(&x, &x, &saved));
        assert!(matches!(e, Error::InvalidRank { .. }), "{e:?}");
        let e = fails(&mut bn, |bn| bn.backward_eval(&x, &x));
        assert!(matches!(e, Error::InvalidRank { .. }), "{e:?}");
    });
}

#[test]
fn channel_mismatch() {
    common::on_every_backend("channel_mismatch", |ctx| {
        let mut bn = module(ctx, BatchNormConfig::new(3));
        let good = tensor(ctx, &[2, 3, 5], 5);
        let saved = bn.forward_eval(&good).unwrap().saved;
        for dims in [&[2, 4, 5][..], &[2, 2], &[2, 1, 3, 3], &[1, 4, 1, 1, 1]] {
            let x = tensor(ctx, dims, 6);
            for training in [true, false] {
                if training {
                    bn.train()
                } else {
                    bn.eval()
                }
                let e = fails(&mut bn, |bn| bn.forward(&x));
                assert!(
                    matches!(&e, Error::ChannelMismatch { expected: 3, got, shape }
                        if *got == dims[1] && shape == dims),
                    "{dims:?}: {e:?}"
                );
            }
            let e = fails(&mut bn, |bn| bn.backward(&x, &x, &saved));
            assert!(
                matches!(e, Error::ChannelMismatch { .. }),
                "{dims:?}: {e:?}"
            );
            let e = fails(&mut bn, |bn| bn.backward_eval(&x, &x));
            assert!(
                matches!(e, Error::ChannelMismatch { .. }),
                "{dims:?}: {e:?}"
            );
        }
    });
}

#[test]
fn one_value_per_channel_in_training() {
    common::on_every_backend("one_value_per_channel_in_training", |ctx| {
        let mut bn = module(ctx, BatchNormConfig::new(3));
        bn.train();
        for dims in [&[1, 3][..], &[1, 3, 1, 1], &[1, 3, 1], &[1, 3, 1, 1, 1]] {
            let x = tensor(ctx, dims, 8);
            let e = fails(&mut bn, |bn| bn.forward(&x));
            assert!(
                matches!(&e, Error::TooFewValuesPerChannel { shape } if shape == dims),
                "{dims:?}: {e:?}"
            );
            let e = fails(&mut bn, |bn| bn.forward_train(&x));
            assert!(matches!(e, Error::TooFewValuesPerChannel { .. }), "{e:?}");
        }
        // Channels-last memory changes nothing about the count.
        let x = ctx
            .tensor_with_layout(&[1.0, 2.0, 3.0], &[1, 3, 1, 1], Layout::ChannelsLast)
            .unwrap();
        let e = fails(&mut bn, |bn| bn.forward(&x));
        assert!(matches!(e, Error::TooFewValuesPerChannel { .. }), "{e:?}");

        // Without running statistics, inference normalizes with batch statistics too, and
        // PyTorch raises the same error.
        let mut untracked = module(ctx, BatchNormConfig::new(3).track_running_stats(false));
        untracked.eval();
        let x = tensor(ctx, &[1, 3], 9);
        let e = fails(&mut untracked, |bn| bn.forward(&x));
        assert!(matches!(e, Error::TooFewValuesPerChannel { .. }), "{e:?}");
    });
}

#[test]
fn eval_with_one_value_per_channel_is_fine() {
    common::on_every_backend("eval_with_one_value_per_channel_is_fine", |ctx| {
        let mut bn = module(ctx, BatchNormConfig::new(3));
        bn.eval();
        let xs = [0.5f32, -1.0, 2.0];
        let x = ctx.tensor_from_slice(&xs, &[1, 3]).unwrap();
        let before = owned(&bn);
        let y = bn.forward(&x).unwrap().y.to_vec().unwrap();
        let grads = bn.backward_eval(&x, &x).unwrap();
        assert_eq!(before, owned(&bn), "inference changed the state");
        // y = (x − running_mean) / sqrt(running_var + eps)·γ + β, in f64.
        let (w, b) = (bn.weight().unwrap().unwrap(), bn.bias().unwrap().unwrap());
        let (rm, rv) = (
            bn.running_mean().unwrap().unwrap(),
            bn.running_var().unwrap().unwrap(),
        );
        let want: Vec<f64> = (0..3)
            .map(|c| {
                (xs[c] as f64 - rm[c] as f64) / (rv[c] as f64 + 1e-5f32 as f64).sqrt() * w[c] as f64
                    + b[c] as f64
            })
            .collect();
        // A subtraction, a square root and a fused scale in f32: a few ulps of O(1).
        common::assert_close("y", &y, &want, 1e-6, 1e-6);
        assert_eq!(grads.dx.unwrap().dims(), &[1, 3]);
    });
}

// ---- configuration ----

#[test]
fn invalid_eps() {
    common::on_every_backend("invalid_eps", |ctx| {
        for eps in [0.0, -0.0, -1e-5, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let config = BatchNormConfig::new(3).eps(eps);
            let e = BatchNorm::new(ctx, config).unwrap_err();
            assert!(
                matches!(e, Error::InvalidEps(v) if v.to_bits() == eps.to_bits()),
                "eps {eps}: {e:?}"
            );
            assert!(matches!(config.validate(), Err(Error::InvalidEps(_))));
        }
        // The smallest positive values are fine.
        for eps in [f32::MIN_POSITIVE, 1e-45, f32::MAX] {
            BatchNorm::new(ctx, BatchNormConfig::new(3).eps(eps))
                .unwrap_or_else(|e| panic!("eps {eps}: {e}"));
        }
    });
}

#[test]
fn invalid_momentum() {
    common::on_every_backend("invalid_momentum", |ctx| {
        for m in [
            -0.1,
            -1e-9,
            1.0001,
            2.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ] {
            let config = BatchNormConfig::new(3).momentum(m);
            let e = BatchNorm::new(ctx, config).unwrap_err();
            assert!(
                matches!(e, Error::InvalidMomentum(v) if v.to_bits() == m.to_bits()),
                "momentum {m}: {e:?}"
            );
            assert!(matches!(config.validate(), Err(Error::InvalidMomentum(_))));
        }
        // The closed interval's ends are PyTorch-legal (momentum_edges, momentum_zero).
        for m in [0.0, -0.0, 1.0] {
            BatchNorm::new(ctx, BatchNormConfig::new(3).momentum(m))
                .unwrap_or_else(|e| panic!("momentum {m}: {e}"));
        }
    });
}

#[test]
fn zero_num_features() {
    common::on_every_backend("zero_num_features", |ctx| {
        let e = BatchNorm::new(ctx, BatchNormConfig::new(0)).unwrap_err();
        assert!(matches!(e, Error::InvalidNumFeatures(0)), "{e:?}");
        // Checked first: a config wrong in several ways names the channel count.
        let e = BatchNorm::new(ctx, BatchNormConfig::new(0).eps(f32::NAN)).unwrap_err();
        assert!(matches!(e, Error::InvalidNumFeatures(0)), "{e:?}");
    });
}

// ---- parameters ----

#[test]
fn setters_with_wrong_length() {
    common::on_every_backend("setters_with_wrong_length", |ctx| {
        let mut bn = module(ctx, BatchNormConfig::new(3));
        for len in [0, 2, 4, 100] {
            let v = vec![0.75f32; len];
            let cases: [(&str, Setter); 4] = [
                ("weight", BatchNorm::set_weight),
                ("bias", BatchNorm::set_bias),
                ("running_mean", BatchNorm::set_running_mean),
                ("running_var", BatchNorm::set_running_var),
            ];
            for (name, set) in cases {
                let e = fails(&mut bn, |bn| set(bn, &v));
                assert!(
                    matches!(&e, Error::ParameterLength { name: n, expected: 3, got }
                        if *n == name && *got == len),
                    "{name} of length {len}: {e:?}"
                );
            }
        }
    });
}

#[test]
fn setters_on_missing_parameters() {
    common::on_every_backend("setters_on_missing_parameters", |ctx| {
        let v = [0.75f32; 3];
        let mut no_affine = module(ctx, BatchNormConfig::new(3).affine(false));
        assert_eq!(no_affine.weight().unwrap(), None);
        assert_eq!(no_affine.bias().unwrap(), None);
        for (name, set) in [
            ("weight", BatchNorm::set_weight as Setter),
            ("bias", BatchNorm::set_bias),
        ] {
            let e = fails(&mut no_affine, |bn| set(bn, &v));
            assert!(
                matches!(&e, Error::NoSuchParameter { name: n, .. } if *n == name),
                "{name}: {e:?}"
            );
            // A wrong length too: the missing parameter is the error that matters.
            let e = fails(&mut no_affine, |bn| set(bn, &[1.0]));
            assert!(matches!(e, Error::NoSuchParameter { .. }), "{name}: {e:?}");
        }

        let mut untracked = module(ctx, BatchNormConfig::new(3).track_running_stats(false));
        assert_eq!(untracked.running_mean().unwrap(), None);
        assert_eq!(untracked.running_var().unwrap(), None);
        assert_eq!(untracked.num_batches_tracked(), None);
        for (name, set) in [
            ("running_mean", BatchNorm::set_running_mean as Setter),
            ("running_var", BatchNorm::set_running_var),
        ] {
            let e = fails(&mut untracked, |bn| set(bn, &v));
            assert!(
                matches!(&e, Error::NoSuchParameter { name: n, .. } if *n == name),
                "{name}: {e:?}"
            );
        }
        let e = fails(&mut untracked, |bn| bn.set_num_batches_tracked(3));
        assert!(
            matches!(
                e,
                Error::NoSuchParameter {
                    name: "num_batches_tracked",
                    ..
                }
            ),
            "{e:?}"
        );
    });
}

// ---- tensors ----

#[test]
fn data_length_differs_from_shape() {
    common::on_every_backend("data_length_differs_from_shape", |ctx| {
        for (len, dims) in [
            (5, &[2, 3][..]),
            (7, &[2, 3]),
            (0, &[2, 3, 4]),
            (1, &[0, 3]),
        ] {
            let data = vec![1.0; len];
            for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
                let e = ctx.tensor_with_layout(&data, dims, layout).unwrap_err();
                let numel: usize = dims.iter().product();
                assert!(
                    matches!(&e, Error::DataLength { shape, expected, got }
                        if shape == dims && *expected == numel && *got == len),
                    "{len} values for {dims:?} ({layout:?}): {e:?}"
                );
            }
            let e = ctx.tensor_from_slice(&data, dims).unwrap_err();
            assert!(matches!(e, Error::DataLength { .. }), "{e:?}");
        }
        // More elements than u32 indexing reaches: refused before looking at the data.
        let e = ctx
            .tensor_from_slice(&[], &[1 << 16, 1 << 16, 2])
            .unwrap_err();
        assert!(matches!(e, Error::TooManyElements { .. }), "{e:?}");
    });
}

#[test]
fn tensors_from_another_context_in_forward() {
    common::on_every_backend("tensors_from_another_context_in_forward", |ctx| {
        let other = twin(ctx);
        let mut bn = module(ctx, BatchNormConfig::new(3));
        let x = tensor(&other, &[2, 3, 4], 10);
        for training in [true, false] {
            if training {
                bn.train()
            } else {
                bn.eval()
            }
            let e = fails(&mut bn, |bn| bn.forward(&x));
            assert!(
                matches!(e, Error::ContextMismatch { expected, got, .. }
                    if expected == ctx.id() && got == other.id()),
                "{e:?}"
            );
        }
    });
}

#[test]
fn tensors_from_another_context_in_backward() {
    common::on_every_backend("tensors_from_another_context_in_backward", |ctx| {
        let other = twin(ctx);
        let dims = [2, 3, 4];
        let mut bn = module(ctx, BatchNormConfig::new(3));
        let mut foreign_bn = module(&other, BatchNormConfig::new(3));
        let (x, dy) = (tensor(ctx, &dims, 11), tensor(ctx, &dims, 12));
        let (fx, fdy) = (tensor(&other, &dims, 11), tensor(&other, &dims, 12));
        let saved = bn.forward_train(&x).unwrap().saved;
        let foreign_saved = foreign_bn.forward_train(&fx).unwrap().saved;
        let is_mismatch = |e: &Error| {
            matches!(e, Error::ContextMismatch { expected, got, .. }
                if *expected == ctx.id() && *got == other.id())
        };
        let e = fails(&mut bn, |bn| bn.backward(&dy, &fx, &saved));
        assert!(is_mismatch(&e), "foreign x: {e:?}");
        let e = fails(&mut bn, |bn| bn.backward(&fdy, &x, &saved));
        assert!(is_mismatch(&e), "foreign dy: {e:?}");
        let e = fails(&mut bn, |bn| bn.backward(&dy, &x, &foreign_saved));
        assert!(is_mismatch(&e), "foreign saved statistics: {e:?}");
        let e = fails(&mut bn, |bn| bn.backward(&fdy, &fx, &foreign_saved));
        assert!(is_mismatch(&e), "everything foreign: {e:?}");
        let e = fails(&mut bn, |bn| bn.backward_eval(&dy, &fx));
        assert!(is_mismatch(&e), "backward_eval, foreign x: {e:?}");
        let e = fails(&mut bn, |bn| bn.backward_eval(&fdy, &x));
        assert!(is_mismatch(&e), "backward_eval, foreign dy: {e:?}");
    });
}

#[test]
fn dy_shape_differs_from_x() {
    common::on_every_backend("dy_shape_differs_from_x", |ctx| {
        let mut bn = module(ctx, BatchNormConfig::new(3));
        let x = tensor(ctx, &[2, 3, 4], 13);
        let saved = bn.forward_train(&x).unwrap().saved;
        for dims in [&[2, 3, 5][..], &[2, 3, 2, 2], &[4, 3, 2], &[2, 4, 4]] {
            let dy = tensor(ctx, dims, 14);
            let e = fails(&mut bn, |bn| bn.backward(&dy, &x, &saved));
            assert!(
                matches!(&e, Error::ShapeMismatch { expected, got, .. }
                    if expected == &[2, 3, 4] && got == dims),
                "dy {dims:?}: {e:?}"
            );
            let e = fails(&mut bn, |bn| bn.backward_eval(&dy, &x));
            assert!(
                matches!(e, Error::ShapeMismatch { .. }),
                "dy {dims:?}: {e:?}"
            );
        }
        // Same dims, other memory layout: the values would be read in the wrong order.
        let x4 = tensor(ctx, &[2, 3, 2, 2], 15);
        let saved4 = bn.forward_train(&x4).unwrap().saved;
        let dy = ctx
            .tensor_with_layout(&[0.5; 24], &[2, 3, 2, 2], Layout::ChannelsLast)
            .unwrap();
        let e = fails(&mut bn, |bn| bn.backward(&dy, &x4, &saved4));
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    });
}

#[test]
fn saved_stats_from_another_shape() {
    common::on_every_backend("saved_stats_from_another_shape", |ctx| {
        let mut bn = module(ctx, BatchNormConfig::new(3));
        let x = tensor(ctx, &[2, 3, 4], 16);
        let saved = bn.forward_train(&x).unwrap().saved;
        for dims in [&[2, 3, 5][..], &[4, 3, 4], &[2, 3], &[2, 3, 2, 2]] {
            let (x2, dy2) = (tensor(ctx, dims, 17), tensor(ctx, dims, 18));
            let e = fails(&mut bn, |bn| bn.backward(&dy2, &x2, &saved));
            assert!(
                matches!(&e, Error::SavedStatsMismatch { expected_channels: 3, expected_shape, got }
                    if expected_shape == &[2, 3, 4] && got == dims),
                "x {dims:?}: {e:?}"
            );
        }
        // Saved statistics of another module with other channels: also refused.
        let mut wide = module(ctx, BatchNormConfig::new(5));
        let xw = tensor(ctx, &[2, 5, 4], 19);
        let saved_wide = wide.forward_train(&xw).unwrap().saved;
        let dy = tensor(ctx, &[2, 3, 4], 20);
        let e = fails(&mut bn, |bn| bn.backward(&dy, &x, &saved_wide));
        assert!(matches!(e, Error::SavedStatsMismatch { .. }), "{e:?}");
    });
}

#[test]
fn backward_eval_without_running_stats() {
    common::on_every_backend("backward_eval_without_running_stats", |ctx| {
        let mut bn = module(ctx, BatchNormConfig::new(3).track_running_stats(false));
        let x = tensor(ctx, &[2, 3, 4], 21);
        for training in [true, false] {
            if training {
                bn.train()
            } else {
                bn.eval()
            }
            let e = fails(&mut bn, |bn| bn.backward_eval(&x, &x));
            assert!(
                matches!(
                    e,
                    Error::NoRunningStats {
                        op: "backward_eval"
                    }
                ),
                "{e:?}"
            );
        }
    });
}

// ---- no adapter ----

/// Set in the child process that runs [`no_adapter_child`].
const CHILD: &str = "WGPU_BATCHNORM_ERRORS_CHILD";

/// Runs [`no_adapter_child`] in a child process with `env` set (the adapter search reads
/// the environment, which threads of this process share).
fn run_child(mode: &str, env: &[(&str, &str)]) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "no_adapter_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD, mode)
    .env_remove("WGPU_BACKEND")
    .env_remove("WGPU_ADAPTER_NAME");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("spawn the test binary");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "child ({mode}) failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("NO_ADAPTER_CHECKED {mode}")),
        "the child ({mode}) did not run the check:\n{stdout}\n{stderr}"
    );
}

#[test]
fn no_adapter_for_a_backend_not_here() {
    // Metal does not exist on this platform (the tests run on Linux and Windows).
    if cfg!(any(target_os = "macos", target_os = "ios")) {
        eprintln!("skipped: Metal exists on this platform");
        return;
    }
    run_child("backend", &[("WGPU_BACKEND", "metal")]);
}

#[test]
fn no_adapter_for_an_adapter_name_not_here() {
    run_child("name", &[("WGPU_ADAPTER_NAME", "no-such-adapter-7f3a9c")]);
}

/// The check itself; does nothing unless [`run_child`] started this process.
#[test]
fn no_adapter_child() {
    let Ok(mode) = std::env::var(CHILD) else {
        return;
    };
    let e = Context::new().unwrap_err();
    let message = e.to_string();
    match &e {
        Error::NoAdapter { tried, filter } => match mode.as_str() {
            "backend" => {
                assert!(tried.to_lowercase().contains("metal"), "tried = {tried:?}");
                assert!(message.to_lowercase().contains("metal"), "{message}");
            }
            "name" => {
                assert!(
                    filter.contains("no-such-adapter-7f3a9c"),
                    "filter = {filter:?}"
                );
                assert!(message.contains("no-such-adapter-7f3a9c"), "{message}");
                assert!(message.contains("WGPU_ADAPTER_NAME"), "{message}");
            }
            other => panic!("unknown child mode {other}"),
        },
        other => panic!("expected Error::NoAdapter, got {other:?}"),
    }
    // The message points at the fallback, and the fallback works.
    assert!(message.contains("Context::cpu()"), "{message}");
    assert!(Context::all_gpus().is_empty());
    let cpu = Context::cpu();
    BatchNorm::new(&cpu, BatchNormConfig::new(2)).unwrap();
    println!("NO_ADAPTER_CHECKED {mode}");
}
