//! Golden tests against real PyTorch: each fixture in `tests/fixtures/` (written by
//! `tests/fixtures/gen.py` from `torch.nn.BatchNorm{1,2,3}d`, float32, CPU) is replayed step
//! by step on every backend, and y, dx, dγ, dβ, the running statistics and
//! `num_batches_tracked` are compared after each step. `errors.json` holds PyTorch's error
//! messages; ours must contain their key phrases.
//!
//! Fixture floats are f32 values written as the shortest text that parses back to the same
//! f32: they are read as f64 and rounded to f32 before any comparison.

mod common;

use serde::Deserialize;
use wgpu_batchnorm::{BatchNorm, BatchNormConfig, Context, Error};

/// Module state: `init`, and the state recorded after each step.
#[derive(Debug, Deserialize)]
struct State {
    weight: Option<Vec<f64>>,
    bias: Option<Vec<f64>>,
    running_mean: Option<Vec<f64>>,
    running_var: Option<Vec<f64>>,
    num_batches_tracked: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Step {
    mode: String,
    x: Vec<f64>,
    dy: Vec<f64>,
    y: Option<Vec<f64>>,
    dx: Option<Vec<f64>>,
    dweight: Option<Vec<f64>>,
    dbias: Option<Vec<f64>>,
    running_mean: Option<Vec<f64>>,
    running_var: Option<Vec<f64>>,
    num_batches_tracked: Option<u64>,
    /// PyTorch raised this (only ever expected for `zero_batch`, and it did not).
    #[serde(default)]
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    module: String,
    shape: Vec<usize>,
    num_features: usize,
    eps: f64,
    momentum: Option<f64>,
    affine: bool,
    track_running_stats: bool,
    init: State,
    steps: Vec<Step>,
}

/// Absolute and relative tolerance: |got − want| ≤ atol + rtol·|want|.
#[derive(Clone, Copy, Debug)]
struct Tol {
    atol: f64,
    rtol: f64,
}

/// Tolerances of one case, per compared quantity.
#[derive(Clone, Copy, Debug)]
struct Tolerances {
    y: Tol,
    dx: Tol,
    /// dγ and dβ: sums over the N·spatial values of a channel.
    dparams: Tol,
    running_mean: Tol,
    running_var: Tol,
    /// Spacing of f32 values at the batch mean. PyTorch saves the batch mean as an f32 and
    /// so do we; the two may round to neighbouring values, and dγ = Σ dy·(x − μ)·invstd
    /// moves by δ·|Σ dy|·invstd = δ·|dβ|·invstd when μ moves by δ. dγ of channel c gets
    /// 2·mean_spacing·|dβ_c|·invstd_c added to its absolute tolerance (0 for data whose
    /// mean is O(σ), where this is below the rounding of the sum itself).
    mean_spacing: f64,
}

/// Ordinary data (|x| ≲ 10, |dy| ≲ 3, a few hundred values per channel).
const ORDINARY: Tolerances = Tolerances {
    // y and dx are O(1) and each is a handful of f32 operations on statistics that both
    // sides compute to ~1e-7 relative: 1e-5 leaves room for reduction-order differences.
    y: Tol {
        atol: 1e-5,
        rtol: 1e-5,
    },
    dx: Tol {
        atol: 1e-5,
        rtol: 1e-5,
    },
    // dγ, dβ sum up to ~300 terms of size ~3 in f32 (PyTorch and the GPU in different
    // orders): the rounding of such a sum is a few 1e-6 absolute (4e-6 seen).
    dparams: Tol {
        atol: 2e-5,
        rtol: 1e-5,
    },
    // Running statistics are a momentum blend of O(1) values.
    running_mean: Tol {
        atol: 1e-6,
        rtol: 1e-5,
    },
    running_var: Tol {
        atol: 1e-6,
        rtol: 1e-5,
    },
    mean_spacing: 0.0,
};

/// Replays `json` on every backend with the given tolerances.
fn replay(json: &str, tol: Tolerances) {
    let case: Case = serde_json::from_str(json).expect("fixture parses");
    common::on_every_backend(&case.name, |ctx| replay_on(ctx, &case, tol));
}

/// f64 fixture text → the f32 it encodes (the only correct way to read these values).
fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// The f32 fixture values, widened for `assert_close`.
fn want(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| x as f32 as f64).collect()
}

fn config(case: &Case) -> BatchNormConfig {
    let cfg = BatchNormConfig::new(case.num_features)
        .eps(case.eps as f32)
        .affine(case.affine)
        .track_running_stats(case.track_running_stats);
    match case.momentum {
        Some(m) => cfg.momentum(m as f32),
        None => cfg.cumulative_average(),
    }
}

/// A module in the fixture's `init` state.
fn load(ctx: &Context, case: &Case) -> BatchNorm {
    let mut bn = BatchNorm::new(ctx, config(case)).expect("valid fixture config");
    let init = &case.init;
    if let Some(w) = &init.weight {
        bn.set_weight(&f32s(w)).unwrap();
    }
    if let Some(b) = &init.bias {
        bn.set_bias(&f32s(b)).unwrap();
    }
    if let Some(m) = &init.running_mean {
        bn.set_running_mean(&f32s(m)).unwrap();
    }
    if let Some(v) = &init.running_var {
        bn.set_running_var(&f32s(v)).unwrap();
    }
    if let Some(n) = init.num_batches_tracked {
        bn.set_num_batches_tracked(n).unwrap();
    }
    // The module exposes exactly the state PyTorch's has.
    assert_eq!(bn.weight().unwrap().is_some(), init.weight.is_some());
    assert_eq!(
        bn.running_mean().unwrap().is_some(),
        init.running_mean.is_some()
    );
    assert_eq!(bn.num_batches_tracked(), init.num_batches_tracked);
    bn
}

#[track_caller]
fn compare(what: &str, got: Option<Vec<f32>>, want_values: &Option<Vec<f64>>, tol: Tol) {
    match (got, want_values) {
        (Some(g), Some(w)) => common::assert_close(what, &g, &want(w), tol.atol, tol.rtol),
        (None, None) => {}
        (g, w) => panic!(
            "{what}: got {}, PyTorch has {}",
            if g.is_some() { "a value" } else { "none" },
            if w.is_some() { "a value" } else { "none" }
        ),
    }
}

fn replay_on(ctx: &Context, case: &Case, tol: Tolerances) {
    let mut bn = load(ctx, case);
    for (i, step) in case.steps.iter().enumerate() {
        let at = |what: &str| format!("{} step {i} ({}) {what}", case.name, step.mode);
        match step.mode.as_str() {
            "train" => bn.train(),
            "eval" => bn.eval(),
            other => panic!("unknown mode {other:?}"),
        }
        let x = ctx.tensor_from_slice(&f32s(&step.x), &case.shape).unwrap();
        let dy = ctx.tensor_from_slice(&f32s(&step.dy), &case.shape).unwrap();
        let out = bn.forward(&x);
        if let Some(err) = &step.error {
            assert!(
                out.is_err(),
                "{}: PyTorch raised {err:?}, we returned Ok",
                at("forward")
            );
            continue;
        }
        let out = out.unwrap_or_else(|e| panic!("{}: {e}", at("forward")));
        let grads = bn
            .backward(&dy, &x, &out.saved)
            .unwrap_or_else(|e| panic!("{}: {e}", at("backward")));

        compare(&at("y"), Some(out.y.to_vec().unwrap()), &step.y, tol.y);
        compare(
            &at("dx"),
            grads.dx.map(|t| t.to_vec().unwrap()),
            &step.dx,
            tol.dx,
        );
        let dweight = grads.dweight.map(|t| t.to_vec().unwrap());
        match (&dweight, &step.dweight, &step.dbias) {
            (Some(got), Some(w), Some(db)) if tol.mean_spacing > 0.0 => {
                let invstd = out.saved.invstd().unwrap();
                for c in 0..got.len() {
                    let atol =
                        tol.dparams.atol + 2.0 * tol.mean_spacing * db[c].abs() * invstd[c] as f64;
                    common::assert_close(
                        &at(&format!("dweight[{c}]")),
                        &got[c..=c],
                        &want(&w[c..=c]),
                        atol,
                        tol.dparams.rtol,
                    );
                }
            }
            _ => compare(&at("dweight"), dweight, &step.dweight, tol.dparams),
        }
        compare(
            &at("dbias"),
            grads.dbias.map(|t| t.to_vec().unwrap()),
            &step.dbias,
            tol.dparams,
        );
        compare(
            &at("running_mean"),
            bn.running_mean().unwrap(),
            &step.running_mean,
            tol.running_mean,
        );
        compare(
            &at("running_var"),
            bn.running_var().unwrap(),
            &step.running_var,
            tol.running_var,
        );
        assert_eq!(
            bn.num_batches_tracked(),
            step.num_batches_tracked,
            "{}",
            at("num_batches_tracked")
        );
        // Parameters are never changed by a forward or backward (PyTorch's weren't either:
        // no optimizer step between the fixture's steps).
        compare(
            &at("weight"),
            bn.weight().unwrap(),
            &case.init.weight,
            Tol {
                atol: 0.0,
                rtol: 0.0,
            },
        );
        compare(
            &at("bias"),
            bn.bias().unwrap(),
            &case.init.bias,
            Tol {
                atol: 0.0,
                rtol: 0.0,
            },
        );
    }
}

macro_rules! fixture {
    ($name:ident) => {
        include_str!(concat!("fixtures/", stringify!($name), ".json"))
    };
}

#[test]
fn train2d_default() {
    replay(fixture!(train2d_default), ORDINARY);
}

#[test]
fn momentum_none() {
    replay(fixture!(momentum_none), ORDINARY);
}

#[test]
fn no_affine_3d() {
    replay(fixture!(no_affine_3d), ORDINARY);
}

#[test]
fn no_track() {
    replay(fixture!(no_track), ORDINARY);
}

#[test]
fn rank2_custom() {
    replay(fixture!(rank2_custom), ORDINARY);
}

#[test]
fn eval_loaded() {
    replay(fixture!(eval_loaded), ORDINARY);
}

#[test]
fn large_offset() {
    // x = 1e4 + N(0, 1), σ ≈ 1. f32 values near 1e4 are 2⁻¹⁰ ≈ 9.8e-4 apart, and the batch
    // mean is saved as an f32 on both sides: they may differ by a spacing δ or two.
    // - y = (x − μ)·invstd·γ + β moves by δ·invstd·γ ≤ 2·9.8e-4·1.0·1.5 ≈ 3e-3 (γ ≤ 1.5 in
    //   the fixtures). In eval, |y| ≈ 9e3 and PyTorch's own rounding is ~2e-7 relative:
    //   the ordinary rtol of 1e-5 is already 50 times that.
    // - dx = γ·invstd·(dy − dβ/n − x̂·dγ/n) moves by γ·invstd·(δ·invstd·|dγ| + |x̂|·Δdγ)/n
    //   ≈ 1.5·(2e-3·22 + 4·4.4e-2)/288 ≈ 1.1e-3: 1.5e-3.
    // - dγ: per channel, from `mean_spacing` (|dβ| ≤ 22 here: up to 4.4e-2).
    // - The running mean reaches ≈1.9e3 (spacing 1.2e-4); the batch means blended into
    //   it may differ by δ, times momentum 0.1: rtol 1e-6 (1.9e-3) covers both.
    // - The running variance does not depend on the mean's rounding (a shift δ changes
    //   Σ(x − μ)² by n·δ² ≈ 3e-4·1e-6): the ordinary tolerance stands.
    replay(
        fixture!(large_offset),
        Tolerances {
            y: Tol {
                atol: 3e-3,
                rtol: 1e-5,
            },
            dx: Tol {
                atol: 1.5e-3,
                rtol: 1e-5,
            },
            mean_spacing: 2f64.powi(-10),
            running_mean: Tol {
                atol: 1e-6,
                rtol: 1e-6,
            },
            ..ORDINARY
        },
    );
}

#[test]
fn momentum_edges() {
    replay(fixture!(momentum_edges), ORDINARY);
}

#[test]
fn momentum_zero() {
    replay(fixture!(momentum_zero), ORDINARY);
}

#[test]
fn n1_spatial() {
    replay(fixture!(n1_spatial), ORDINARY);
}

#[test]
fn zero_batch() {
    let json = fixture!(zero_batch);
    let case: Case = serde_json::from_str(json).expect("fixture parses");
    // What PyTorch did on an empty (0, 3, 4, 4) batch in training mode, spelled out so
    // that a regenerated fixture that changed it would be noticed: no error, empty y and
    // dx, zero dγ/dβ, running statistics untouched, num_batches_tracked incremented.
    let step = &case.steps[0];
    assert_eq!(case.shape[0], 0);
    assert!(step.error.is_none(), "PyTorch raised {:?}", step.error);
    assert_eq!(step.y.as_deref(), Some(&[][..]));
    assert_eq!(step.dx.as_deref(), Some(&[][..]));
    assert!(step.dweight.as_ref().unwrap().iter().all(|&v| v == 0.0));
    assert!(step.dbias.as_ref().unwrap().iter().all(|&v| v == 0.0));
    assert_eq!(step.running_mean, case.init.running_mean);
    assert_eq!(step.running_var, case.init.running_var);
    assert_eq!(
        step.num_batches_tracked,
        case.init.num_batches_tracked.map(|n| n + 1)
    );
    // Exact: nothing is computed, so nothing can round.
    let exact = Tol {
        atol: 0.0,
        rtol: 0.0,
    };
    replay(
        json,
        Tolerances {
            y: exact,
            dx: exact,
            dparams: exact,
            running_mean: exact,
            running_var: exact,
            mean_spacing: 0.0,
        },
    );
}

/// Every fixture file has a test above (a new case in gen.py needs one here).
#[test]
fn every_fixture_has_a_test() {
    let tested = [
        "train2d_default",
        "momentum_none",
        "no_affine_3d",
        "no_track",
        "rank2_custom",
        "eval_loaded",
        "large_offset",
        "momentum_edges",
        "momentum_zero",
        "n1_spatial",
        "zero_batch",
    ];
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".json")
                // errors.json: the error test; half.json: tests/half.rs.
                .filter(|n| *n != "errors" && *n != "half")
                .map(str::to_owned)
        })
        .collect();
    on_disk.sort();
    let mut tested: Vec<String> = tested.iter().map(|s| s.to_string()).collect();
    tested.sort();
    assert_eq!(on_disk, tested, "fixtures on disk vs fixtures tested");
}

/// Sanity of the fixture schema itself: shapes, lengths and module names agree.
#[test]
fn fixtures_are_consistent() {
    for json in [
        fixture!(train2d_default),
        fixture!(momentum_none),
        fixture!(no_affine_3d),
        fixture!(no_track),
        fixture!(rank2_custom),
        fixture!(eval_loaded),
        fixture!(large_offset),
        fixture!(momentum_edges),
        fixture!(momentum_zero),
        fixture!(n1_spatial),
        fixture!(zero_batch),
    ] {
        let case: Case = serde_json::from_str(json).expect("fixture parses");
        let numel: usize = case.shape.iter().product();
        let rank = match case.module.as_str() {
            "BatchNorm1d" => 2..=3,
            "BatchNorm2d" => 4..=4,
            "BatchNorm3d" => 5..=5,
            m => panic!("{}: unknown module {m}", case.name),
        };
        assert!(rank.contains(&case.shape.len()), "{}: rank", case.name);
        assert_eq!(case.shape[1], case.num_features, "{}: C", case.name);
        for (i, s) in case.steps.iter().enumerate() {
            assert_eq!(s.x.len(), numel, "{} step {i}: x length", case.name);
            assert_eq!(s.dy.len(), numel, "{} step {i}: dy length", case.name);
            assert!(
                s.x.iter().chain(&s.dy).all(|v| v.is_finite()),
                "{} step {i}: non-finite input",
                case.name
            );
        }
    }
}

// ---- error messages: ours contain PyTorch's key phrases ----

#[derive(Debug, Deserialize)]
struct PyError {
    shape: Vec<usize>,
    message: String,
}

fn pytorch_errors() -> std::collections::HashMap<String, PyError> {
    serde_json::from_str(include_str!("fixtures/errors.json")).expect("errors.json parses")
}

/// Checks that PyTorch's message for `case` and ours both contain every phrase in
/// `phrases`; records each miss in `misses` (so one run reports every case).
fn check_phrases(
    misses: &mut Vec<String>,
    case: &str,
    pytorch: &str,
    ours: &Error,
    phrases: &[&str],
) {
    let ours = ours.to_string();
    for p in phrases {
        assert!(
            pytorch.contains(p),
            "{case}: the key phrase {p:?} is not in PyTorch's message {pytorch:?} (fixture changed?)"
        );
        if !ours.contains(p) {
            misses.push(format!(
                "{case}: our message {ours:?} lacks PyTorch's key phrase {p:?} (PyTorch: {pytorch:?})"
            ));
        }
    }
}

#[test]
fn error_messages_match_pytorch() {
    let errors = pytorch_errors();
    let get = |name: &str| {
        errors
            .get(name)
            .unwrap_or_else(|| panic!("errors.json lacks {name}"))
    };
    common::on_every_backend("error_messages_match_pytorch", |ctx| {
        let mut misses = Vec::new();
        // BatchNorm2d(3) in training mode on (1, 3, 1, 1).
        let e = get("single_value_per_channel_train");
        let mut bn = BatchNorm::new(ctx, BatchNormConfig::new(3)).unwrap();
        let x = ctx
            .tensor_from_slice(&vec![0.5; e.shape.iter().product()], &e.shape)
            .unwrap();
        let err = bn.forward(&x).unwrap_err();
        assert!(
            matches!(err, Error::TooFewValuesPerChannel { .. }),
            "{err:?}"
        );
        check_phrases(
            &mut misses,
            "single_value_per_channel_train",
            &e.message,
            &err,
            &[
                "Expected more than 1 value per channel when training",
                "got input size",
                "[1, 3, 1, 1]",
            ],
        );

        // BatchNorm1d(3) on a rank-1 (3,) input. PyTorch's message is module-specific
        // ("expected 2D or 3D input (got 1D input)"); ours covers every rank the module
        // takes, so the shared phrases are "expected", "2D" and "input".
        let e = get("batchnorm1d_rank1");
        let x = ctx.tensor_from_slice(&[1.0, 2.0, 3.0], &e.shape).unwrap();
        let err = bn.forward(&x).unwrap_err();
        assert!(matches!(err, Error::InvalidRank { .. }), "{err:?}");
        check_phrases(
            &mut misses,
            "batchnorm1d_rank1",
            &e.message,
            &err,
            &["expected", "2D", "input"],
        );

        // BatchNorm2d(3) on (2, 4, 5, 5): PyTorch says the running mean should have the
        // input's 4 elements, not its 3.
        let e = get("batchnorm2d_channel_mismatch");
        let x = ctx
            .tensor_from_slice(&vec![0.5; e.shape.iter().product()], &e.shape)
            .unwrap();
        let err = bn.forward(&x).unwrap_err();
        assert!(matches!(err, Error::ChannelMismatch { .. }), "{err:?}");
        check_phrases(
            &mut misses,
            "batchnorm2d_channel_mismatch",
            &e.message,
            &err,
            &["running_mean should contain 4 elements not 3"],
        );

        // F.batch_norm on (2, 3, 4) with a running mean of 2 elements: here, loading a
        // 2-element running mean into a 3-channel module. PyTorch ends "... not 2", we
        // end ", got 2"; the key phrase is the expected length.
        let e = get("functional_running_mean_wrong_length");
        let err = bn.set_running_mean(&[0.0, 0.0]).unwrap_err();
        assert!(matches!(err, Error::ParameterLength { .. }), "{err:?}");
        check_phrases(
            &mut misses,
            "functional_running_mean_wrong_length",
            &e.message,
            &err,
            &["running_mean should contain 3 elements"],
        );
        assert!(err.to_string().contains('2'), "{err}: names the bad length");

        assert!(misses.is_empty(), "{}", misses.join("\n"));
    });
}
