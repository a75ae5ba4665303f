//! A property-based fuzz of the whole public API, on every backend: random sequences of
//! forwards (training, inference, current mode), backwards (every gradient mask),
//! `backward_eval`, setters and mode switches, over random configurations (edge values of
//! `eps` and `momentum`, valid and invalid), inputs of rank 0 to 6 with zero-sized
//! dimensions, wrong channel counts, wrong data lengths, NaN/±Inf values, layouts that
//! differ between x and dy, and tensors or saved statistics from another context.
//!
//! Every call runs under `catch_unwind`: a panic fails the case. Every call either
//! - fails with the documented [`Error`] variant (one of those that apply to the input),
//!   and then nothing the caller owns changed (γ, β, running statistics,
//!   `num_batches_tracked`, compared as bits); or
//! - succeeds, and its results agree with the f64 oracle ([`ReferenceBatchNorm`]) within a
//!   tolerance derived from the condition of each channel (see [`Tol`]), and the state
//!   moved exactly as the oracle's did.
//!
//! NaN/Inf: a NaN input element gives a NaN output element; in batch-statistics mode a
//! channel with any non-finite input gives NaN everywhere in that channel (and poisons its
//! running statistics), while the other channels are checked as usual. Channels whose own state was
//! set to non-finite values are only checked for NaN propagation: the f32 rounding of
//! `0·∞` patterns depends on how the formula is arranged. The empty batch follows PyTorch:
//! empty output, running statistics unchanged, `num_batches_tracked` incremented, and
//! dγ = dβ = 0 (sums over nothing) in every mode.
//!
//! Cases per backend: 4096 (`PROPTEST_CASES` overrides). Failing seeds are saved in
//! `proptest-regressions/fuzz.txt` and replayed first.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use wgpu_batchnorm::cpu::reference::{batch_stats, RefForward, ReferenceBatchNorm};
use wgpu_batchnorm::{
    BatchNorm, BatchNormConfig, Context, Error, ForwardOutput, GradMask, Gradients, Layout,
    SavedStats, Shape, Tensor,
};

/// f32 machine epsilon, the unit of every tolerance here.
const E: f64 = f32::EPSILON as f64;
/// Elements per input at most (keeps 64 cases on the emulated GPUs within seconds).
const MAX_ELEMENTS: usize = 2000;

// =======================================================================================
// Generated cases
// =======================================================================================

#[derive(Debug, Clone)]
struct Case {
    num_features: usize,
    eps: f32,
    /// `None`: cumulative moving average (PyTorch `momentum=None`).
    momentum: Option<f32>,
    affine: bool,
    track: bool,
    ops: Vec<Op>,
}

#[derive(Debug, Clone)]
enum Op {
    Forward {
        x: Input,
        mode: Mode,
        backward: Option<Bwd>,
    },
    BackwardEval {
        x: Input,
        dy: Values,
    },
    Set {
        param: Param,
        len_delta: i8,
        values: Values,
    },
    SetNumBatchesTracked(u64),
    Train,
    Eval,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Current,
    Train,
    Eval,
}

#[derive(Debug, Clone, Copy)]
enum Param {
    Weight,
    Bias,
    RunningMean,
    RunningVar,
}

/// An input tensor's description; the channel count is resolved against the module.
#[derive(Debug, Clone)]
struct Input {
    rank: usize,
    n: usize,
    /// `None`: the module's `num_features`.
    channels: Option<usize>,
    spatial: [usize; 4],
    channels_last: bool,
    values: Values,
    /// Data length minus the shape's element count (≠ 0: a `DataLength` error).
    len_delta: i8,
    /// Built in another context (index into the foreign contexts).
    foreign: Option<usize>,
}

/// Deterministic data: `mean + std·N(0,1)`, then some elements replaced by specials.
#[derive(Debug, Clone)]
struct Values {
    seed: u64,
    mean: f32,
    std: f32,
    specials: Vec<(usize, f32)>,
}

#[derive(Debug, Clone)]
struct Bwd {
    dy: Values,
    mask: GradMask,
    dy_layout_flipped: bool,
    dy_batch_plus_one: bool,
    dy_foreign: Option<usize>,
    saved: SavedFrom,
}

#[derive(Debug, Clone, Copy)]
enum SavedFrom {
    ThisForward,
    AnotherShape,
    AnotherContext(usize),
}

fn eps() -> impl Strategy<Value = f32> {
    prop_oneof![
        10 => Just(1e-5f32),
        3 => 1e-6f32..1e-1,
        1 => Just(1.0f32),
        1 => Just(1.0 + f32::EPSILON),
        1 => Just(f32::MIN_POSITIVE),
        1 => Just(1e-30f32),
        1 => Just(1e30f32),
        // Invalid: PyTorch would produce NaN/Inf outputs; this crate rejects them.
        1 => prop_oneof![
            Just(0.0f32),
            Just(-1e-5f32),
            Just(f32::NAN),
            Just(f32::INFINITY),
            Just(f32::NEG_INFINITY)
        ],
    ]
}

fn momentum() -> impl Strategy<Value = Option<f32>> {
    prop_oneof![
        8 => Just(Some(0.1f32)),
        3 => (0.0f32..=1.0).prop_map(Some),
        2 => Just(None),
        1 => Just(Some(0.0f32)),
        1 => Just(Some(-0.0f32)),
        1 => Just(Some(1.0f32)),
        1 => Just(Some(1e-30f32)),
        1 => prop_oneof![
            Just(Some(1.0 + f32::EPSILON)),
            Just(Some(-0.1f32)),
            Just(Some(f32::NAN)),
            Just(Some(f32::INFINITY)),
        ],
    ]
}

fn special() -> impl Strategy<Value = f32> {
    prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)]
}

/// Data scales: centred, offset, a large offset with a tiny spread (cancellation), wide,
/// constant (zero variance).
fn values(specials: impl Strategy<Value = f32> + 'static) -> impl Strategy<Value = Values> {
    let scale = prop_oneof![
        Just((0.0f32, 1.0f32)),
        Just((3.0, 2.0)),
        Just((1000.0, 1e-3)),
        Just((-50.0, 10.0)),
        Just((2.5, 0.0)),
    ];
    let specials = prop_oneof![
        4 => Just(Vec::new()),
        1 => prop::collection::vec((any::<usize>(), specials), 1..=3),
    ];
    (any::<u64>(), scale, specials).prop_map(|(seed, (mean, std), specials)| Values {
        seed,
        mean,
        std,
        specials,
    })
}

fn input() -> impl Strategy<Value = Input> {
    (
        prop_oneof![
            1 => Just(0usize), 1 => Just(1), 3 => Just(2), 3 => Just(3), 3 => Just(4),
            2 => Just(5), 1 => Just(6)
        ],
        prop_oneof![1 => Just(0usize), 2 => Just(1), 6 => 2usize..=6],
        prop_oneof![12 => Just(None), 1 => Just(Some(0usize)), 2 => (1usize..=6).prop_map(Some)],
        prop::array::uniform4(prop_oneof![1 => Just(0usize), 8 => 1usize..=5]),
        any::<bool>(),
        values(special()),
        prop_oneof![20 => Just(0i8), 1 => Just(-1i8), 1 => Just(1i8)],
        prop_oneof![14 => Just(None), 1 => Just(Some(0usize)), 1 => Just(Some(1usize))],
    )
        .prop_map(
            |(rank, n, channels, spatial, channels_last, values, len_delta, foreign)| Input {
                rank,
                n,
                channels,
                spatial,
                channels_last,
                values,
                len_delta,
                foreign,
            },
        )
}

fn mask() -> impl Strategy<Value = GradMask> {
    (0u8..8).prop_map(|b| GradMask {
        input: b & 1 != 0,
        weight: b & 2 != 0,
        bias: b & 4 != 0,
    })
}

fn bwd() -> impl Strategy<Value = Bwd> {
    (
        values(special()),
        prop_oneof![3 => Just(GradMask::ALL), 2 => mask()],
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
        prop_oneof![14 => Just(None), 1 => Just(Some(0usize)), 1 => Just(Some(1usize))],
        prop_oneof![
            14 => Just(SavedFrom::ThisForward),
            1 => Just(SavedFrom::AnotherShape),
            1 => (0usize..2).prop_map(SavedFrom::AnotherContext),
        ],
    )
        .prop_map(
            |(dy, mask, dy_layout_flipped, dy_batch_plus_one, dy_foreign, saved)| Bwd {
                dy,
                mask,
                dy_layout_flipped,
                dy_batch_plus_one,
                dy_foreign,
                saved,
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    let mode = prop_oneof![Just(Mode::Current), Just(Mode::Train), Just(Mode::Eval)];
    let param = prop_oneof![
        Just(Param::Weight),
        Just(Param::Bias),
        Just(Param::RunningMean),
        Just(Param::RunningVar)
    ];
    let setter_specials = prop_oneof![
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(0.0f32),
        Just(-0.0f32),
    ];
    prop_oneof![
        6 => (input(), mode, prop::option::weighted(0.6, bwd()))
            .prop_map(|(x, mode, backward)| Op::Forward { x, mode, backward }),
        2 => (input(), values(special())).prop_map(|(x, dy)| Op::BackwardEval { x, dy }),
        2 => (
            param,
            prop_oneof![8 => Just(0i8), 1 => Just(-1i8), 1 => Just(1i8)],
            values(setter_specials)
        )
            .prop_map(|(param, len_delta, values)| Op::Set { param, len_delta, values }),
        1 => prop_oneof![Just(0u64), Just(1), Just(7), Just(1 << 40), Just(u64::MAX / 2)]
            .prop_map(Op::SetNumBatchesTracked),
        1 => Just(Op::Train),
        1 => Just(Op::Eval),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![1 => Just(0usize), 20 => 1usize..=5],
        eps(),
        momentum(),
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.8),
        prop::collection::vec(op(), 1..=5),
    )
        .prop_map(|(num_features, eps, momentum, affine, track, ops)| Case {
            num_features,
            eps,
            momentum,
            affine,
            track,
            ops,
        })
}

impl Values {
    fn generate(&self, len: usize) -> Vec<f32> {
        let mut v = common::normal(len, self.seed, self.mean as f64, self.std as f64);
        if len > 0 {
            for &(at, s) in &self.specials {
                v[at % len] = s;
            }
        }
        v
    }
}

impl Input {
    /// The logical dims, with the channel count resolved and at most [`MAX_ELEMENTS`].
    fn dims(&self, num_features: usize) -> Vec<usize> {
        let mut dims = match self.rank {
            0 => vec![],
            1 => vec![self.n],
            r => {
                let mut d = vec![self.n, self.channels.unwrap_or(num_features)];
                d.extend_from_slice(&self.spatial[..r - 2]);
                d
            }
        };
        while dims.iter().product::<usize>() > MAX_ELEMENTS {
            let (i, _) = dims
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != 1)
                .max_by_key(|&(_, d)| *d)
                .expect("a dimension to shrink");
            dims[i] -= 1;
        }
        dims
    }

    fn layout(&self) -> Layout {
        if self.channels_last {
            Layout::ChannelsLast
        } else {
            Layout::ChannelsFirst
        }
    }
}

fn flip(layout: Layout) -> Layout {
    match layout {
        Layout::ChannelsFirst => Layout::ChannelsLast,
        Layout::ChannelsLast => Layout::ChannelsFirst,
    }
}

// =======================================================================================
// Calls, errors, state
// =======================================================================================

/// The error variants a call may legitimately return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    InvalidRank,
    ChannelMismatch,
    ParameterLength,
    DataLength,
    TooFewValuesPerChannel,
    InvalidEps,
    InvalidMomentum,
    InvalidNumFeatures,
    ShapeMismatch,
    SavedStatsMismatch,
    ContextMismatch,
    NoSuchParameter,
    NoRunningStats,
    /// Anything else (GPU errors, ...): never expected here.
    Other,
}

fn kind(e: &Error) -> Kind {
    match e {
        Error::InvalidRank { .. } => Kind::InvalidRank,
        Error::ChannelMismatch { .. } => Kind::ChannelMismatch,
        Error::ParameterLength { .. } => Kind::ParameterLength,
        Error::DataLength { .. } => Kind::DataLength,
        Error::TooFewValuesPerChannel { .. } => Kind::TooFewValuesPerChannel,
        Error::InvalidEps(_) => Kind::InvalidEps,
        Error::InvalidMomentum(_) => Kind::InvalidMomentum,
        Error::InvalidNumFeatures(_) => Kind::InvalidNumFeatures,
        Error::ShapeMismatch { .. } => Kind::ShapeMismatch,
        Error::SavedStatsMismatch { .. } => Kind::SavedStatsMismatch,
        Error::ContextMismatch { .. } => Kind::ContextMismatch,
        Error::NoSuchParameter { .. } => Kind::NoSuchParameter,
        Error::NoRunningStats { .. } => Kind::NoRunningStats,
        _ => Kind::Other,
    }
}

/// Runs a library call; a panic (in it or in rendering its error) fails the case.
fn call<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, Error>,
) -> Result<Result<T, Error>, TestCaseError> {
    catch_unwind(AssertUnwindSafe(|| {
        let r = f();
        if let Err(e) = &r {
            let _ = e.to_string();
        }
        r
    }))
    .map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        TestCaseError::fail(format!("{what} PANICKED: {msg}"))
    })
}

/// A call that must succeed (reading results and state of a healthy device).
fn must<T>(what: &str, f: impl FnOnce() -> Result<T, Error>) -> Result<T, TestCaseError> {
    call(what, f)?.map_err(|e| TestCaseError::fail(format!("{what} failed: {e:?}")))
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

/// Everything the caller owns in a module.
#[derive(Debug, Clone)]
struct State {
    weight: Option<Vec<f32>>,
    bias: Option<Vec<f32>>,
    running_mean: Option<Vec<f32>>,
    running_var: Option<Vec<f32>>,
    num_batches_tracked: Option<u64>,
}

fn to_bits(v: &Option<Vec<f32>>) -> Option<Vec<u32>> {
    v.as_ref().map(|v| v.iter().map(|x| x.to_bits()).collect())
}

impl State {
    fn read(bn: &BatchNorm) -> Result<Self, TestCaseError> {
        Ok(Self {
            weight: must("weight()", || bn.weight())?,
            bias: must("bias()", || bn.bias())?,
            running_mean: must("running_mean()", || bn.running_mean())?,
            running_var: must("running_var()", || bn.running_var())?,
            num_batches_tracked: bn.num_batches_tracked(),
        })
    }

    /// Bitwise equality (-0.0 ≠ 0.0, NaN payloads count).
    fn same(&self, other: &Self) -> bool {
        to_bits(&self.weight) == to_bits(&other.weight)
            && to_bits(&self.bias) == to_bits(&other.bias)
            && to_bits(&self.running_mean) == to_bits(&other.running_mean)
            && to_bits(&self.running_var) == to_bits(&other.running_var)
            && self.num_batches_tracked == other.num_batches_tracked
    }

    fn gamma(&self, c: usize) -> f64 {
        self.weight.as_ref().map_or(1.0, |w| w[c] as f64)
    }

    fn beta(&self, c: usize) -> f64 {
        self.bias.as_ref().map_or(0.0, |b| b[c] as f64)
    }

    /// The oracle in this state.
    fn reference(&self, config: BatchNormConfig) -> ReferenceBatchNorm {
        let widen = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        let mut r = ReferenceBatchNorm::new(config);
        if let Some(w) = &self.weight {
            r.weight = widen(w);
        }
        if let Some(b) = &self.bias {
            r.bias = widen(b);
        }
        if let Some(m) = &self.running_mean {
            r.running_mean = widen(m);
        }
        if let Some(v) = &self.running_var {
            r.running_var = widen(v);
        }
        r.num_batches_tracked = self.num_batches_tracked.unwrap_or(0);
        r
    }
}

// =======================================================================================
// Comparison
// =======================================================================================

/// Whether `got` agrees with the oracle's `want` within `tol`:
/// - want NaN: got NaN (NaN propagates);
/// - want ±∞: got the same infinity or NaN (∞ − ∞ patterns depend on summation order);
/// - tol not finite (an ill-defined quantity): anything;
/// - otherwise |got − want| ≤ tol (a NaN or ∞ got fails).
fn agrees(got: f32, want: f64, tol: f64) -> bool {
    let g = got as f64;
    if want.is_nan() {
        g.is_nan()
    } else if want.is_infinite() {
        g == want || g.is_nan()
    } else if !tol.is_finite() {
        true
    } else {
        (g - want).abs() <= tol
    }
}

/// Checks every element `i` for which `expect(i)` gives (want, tol).
fn check_all(
    what: &str,
    got: &[f32],
    len: usize,
    expect: impl Fn(usize) -> Option<(f64, f64)>,
) -> Result<(), TestCaseError> {
    if got.len() != len {
        return Err(fail(format!("{what}: length {} ≠ {len}", got.len())));
    }
    for (i, &g) in got.iter().enumerate() {
        if let Some((want, tol)) = expect(i) {
            if !agrees(g, want, tol) {
                return Err(fail(format!(
                    "{what}: index {i}: got {g:e}, want {want:e} (tol {tol:e})"
                )));
            }
        }
    }
    Ok(())
}

/// Per-channel facts about an input, over its finite values.
#[derive(Debug, Clone, Default)]
struct Channel {
    count: usize,
    all_finite: bool,
    max_abs: f64,
    min: f64,
    max: f64,
}

/// An input tensor built for an operation, with what the checks need.
struct Built {
    tensor: Tensor,
    data: Vec<f32>,
    dims: Vec<usize>,
    layout: Layout,
    foreign: bool,
}

impl Built {
    fn shape(&self) -> Shape {
        Shape::with_layout(&self.dims, self.layout).expect("a built tensor has a valid shape")
    }

    fn channels(&self) -> usize {
        self.dims[1]
    }

    /// The channel of element `i` in memory order.
    fn channel_of(&self, i: usize) -> usize {
        let c = self.channels();
        match self.layout {
            Layout::ChannelsFirst => (i / self.dims[2..].iter().product::<usize>()) % c,
            Layout::ChannelsLast => i % c,
        }
    }

    fn channel_facts(&self) -> Vec<Channel> {
        let mut ch = vec![
            Channel {
                all_finite: true,
                min: f64::INFINITY,
                max: f64::NEG_INFINITY,
                ..Channel::default()
            };
            self.channels()
        ];
        for (i, &x) in self.data.iter().enumerate() {
            let c = &mut ch[self.channel_of(i)];
            c.count += 1;
            if x.is_finite() {
                let x = x as f64;
                c.max_abs = c.max_abs.max(x.abs());
                c.min = c.min.min(x);
                c.max = c.max.max(x);
            } else {
                c.all_finite = false;
            }
        }
        ch
    }
}

/// Tolerances, from the f32 error model of each quantity (u = f32 epsilon):
/// - batch mean: a sum of n values in f32 (or f64) with a shift: ≤ 64u·max|x|;
/// - batch variance: shifted sums of squared deviations: ≤ 32u·(max − min)² + 8u·var,
///   so invstd = 1/√(var + eps) has relative error ≤ 8u + that / (var + eps);
/// - y = (x − μ)·invstd·γ + β with the module's own μ and invstd: a few roundings of
///   terms as large as (|x| + |μ|)·invstd·|γ| and |β|;
/// - gradients: f32 sums over n values of |dy|, |dy|·|x − μ|, and the roundings of x − μ.
struct Tol;

impl Tol {
    fn mean(ch: &Channel) -> f64 {
        64.0 * E * ch.max_abs
    }

    fn var_abs(ch: &Channel, var: f64) -> f64 {
        let spread = if ch.count > 0 { ch.max - ch.min } else { 0.0 };
        32.0 * E * spread * spread + 8.0 * E * var
    }

    fn invstd_rel(ch: &Channel, var: f64, eps: f64) -> f64 {
        8.0 * E + Self::var_abs(ch, var) / (var + eps)
    }
}

// =======================================================================================
// The runner of one case
// =======================================================================================

/// What a fuzz run saw, for the summary line.
#[derive(Default)]
struct Counts {
    cases: AtomicUsize,
    calls: AtomicUsize,
    ok: AtomicUsize,
    errors: AtomicUsize,
    /// Successful forwards / backwards of non-empty inputs checked against the oracle.
    forwards: AtomicUsize,
    backwards: AtomicUsize,
}

struct Run<'a> {
    ctx: &'a Context,
    foreign: &'a [Context],
    config: BatchNormConfig,
    bn: BatchNorm,
    counts: &'a Counts,
}

impl Run<'_> {
    fn ctx_for(&self, foreign: Option<usize>) -> &Context {
        foreign.map_or(self.ctx, |k| &self.foreign[k % self.foreign.len()])
    }

    /// Checks a call's result against the error kinds that apply (`expected`; an empty list
    /// means it must succeed, `may_succeed` allows success anyway), and that a failing call
    /// left the state alone. Returns the value of a successful call.
    fn outcome<T>(
        &self,
        what: &str,
        result: Result<T, Error>,
        expected: &[Kind],
        may_succeed: bool,
        before: &State,
    ) -> Result<Option<T>, TestCaseError> {
        self.counts.calls.fetch_add(1, Relaxed);
        match result {
            Ok(v) => {
                self.counts.ok.fetch_add(1, Relaxed);
                if expected.is_empty() || may_succeed {
                    Ok(Some(v))
                } else {
                    Err(fail(format!(
                        "{what}: expected one of {expected:?}, got Ok"
                    )))
                }
            }
            Err(e) => {
                self.counts.errors.fetch_add(1, Relaxed);
                if !expected.contains(&kind(&e)) {
                    return Err(fail(format!(
                        "{what}: expected {}, got {e:?}",
                        if expected.is_empty() {
                            "success".to_string()
                        } else {
                            format!("one of {expected:?}")
                        }
                    )));
                }
                let after = State::read(&self.bn)?;
                if !before.same(&after) {
                    return Err(fail(format!(
                        "{what} failed with {e:?} but changed the state:\n{before:?}\n->\n{after:?}"
                    )));
                }
                Ok(None)
            }
        }
    }

    /// Builds an input tensor; `None` when its construction fails (as expected).
    fn build(&self, input: &Input, state: &State) -> Result<Option<Built>, TestCaseError> {
        let dims = input.dims(self.config.num_features);
        let numel: usize = dims.iter().product();
        let len = (numel as i64 + input.len_delta as i64).max(0) as usize;
        let len = if len == numel && input.len_delta != 0 {
            numel + 1
        } else {
            len
        };
        let data = input.values.generate(len);
        let layout = input.layout();
        let ctx = self.ctx_for(input.foreign);
        let mut expected = Vec::new();
        if dims.is_empty() {
            expected.push(Kind::InvalidRank);
        }
        if len != numel {
            expected.push(Kind::DataLength);
        }
        let r = call("tensor_with_layout", || {
            ctx.tensor_with_layout(&data, &dims, layout)
        })?;
        let what = format!(
            "tensor_with_layout({dims:?}, {layout:?}, {} values)",
            data.len()
        );
        Ok(self
            .outcome(&what, r, &expected, false, state)?
            .map(|tensor| Built {
                tensor,
                data,
                dims,
                layout,
                foreign: input.foreign.is_some(),
            }))
    }

    /// The errors a forward of `x` may return: PyTorch's shape checks, plus the context.
    fn forward_errors(&self, x: &Built, batch_stats: bool) -> Vec<Kind> {
        let mut e = Vec::new();
        if x.foreign {
            e.push(Kind::ContextMismatch);
        }
        if !(2..=5).contains(&x.dims.len()) {
            e.push(Kind::InvalidRank);
        } else {
            if x.dims[1] != self.config.num_features {
                e.push(Kind::ChannelMismatch);
            }
            let per_channel = x.dims[0] * x.dims[2..].iter().product::<usize>();
            if batch_stats && per_channel == 1 {
                e.push(Kind::TooFewValuesPerChannel);
            }
        }
        e
    }

    fn op(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Forward { x, mode, backward } => self.forward(x, *mode, backward.as_ref()),
            Op::BackwardEval { x, dy } => self.backward_eval(x, dy),
            Op::Set {
                param,
                len_delta,
                values,
            } => self.set(*param, *len_delta, values),
            Op::SetNumBatchesTracked(n) => {
                let before = State::read(&self.bn)?;
                let expected: &[Kind] = if self.config.track_running_stats {
                    &[]
                } else {
                    &[Kind::NoSuchParameter]
                };
                let r = call("set_num_batches_tracked", || {
                    self.bn.set_num_batches_tracked(*n)
                })?;
                if self
                    .outcome("set_num_batches_tracked", r, expected, false, &before)?
                    .is_some()
                {
                    let after = State::read(&self.bn)?;
                    let mut want = before.clone();
                    want.num_batches_tracked = Some(*n);
                    if !after.same(&want) {
                        return Err(fail(format!("set_num_batches_tracked({n}): {after:?}")));
                    }
                }
                Ok(())
            }
            Op::Train => {
                self.bn.train();
                prop_assert!(self.bn.is_training());
                Ok(())
            }
            Op::Eval => {
                self.bn.eval();
                prop_assert!(!self.bn.is_training());
                Ok(())
            }
        }
    }

    fn set(&mut self, param: Param, len_delta: i8, values: &Values) -> Result<(), TestCaseError> {
        let c = self.config.num_features;
        let len = (c as i64 + len_delta as i64).max(0) as usize;
        let v = values.generate(len);
        let before = State::read(&self.bn)?;
        let mut expected = Vec::new();
        let has = match param {
            Param::Weight | Param::Bias => self.config.affine,
            Param::RunningMean | Param::RunningVar => self.config.track_running_stats,
        };
        if !has {
            expected.push(Kind::NoSuchParameter);
        }
        if len != c {
            expected.push(Kind::ParameterLength);
        }
        let what = format!("set {param:?} ({len} values)");
        let r = call(&what, || match param {
            Param::Weight => self.bn.set_weight(&v),
            Param::Bias => self.bn.set_bias(&v),
            Param::RunningMean => self.bn.set_running_mean(&v),
            Param::RunningVar => self.bn.set_running_var(&v),
        })?;
        if self.outcome(&what, r, &expected, false, &before)?.is_some() {
            let after = State::read(&self.bn)?;
            let mut want = before.clone();
            *match param {
                Param::Weight => &mut want.weight,
                Param::Bias => &mut want.bias,
                Param::RunningMean => &mut want.running_mean,
                Param::RunningVar => &mut want.running_var,
            } = Some(v);
            if !after.same(&want) {
                return Err(fail(format!(
                    "{what}: state {after:?}, want exactly {want:?}"
                )));
            }
        }
        Ok(())
    }

    fn forward(
        &mut self,
        input: &Input,
        mode: Mode,
        bwd: Option<&Bwd>,
    ) -> Result<(), TestCaseError> {
        let before = State::read(&self.bn)?;
        let Some(x) = self.build(input, &before)? else {
            return Ok(());
        };
        let training = match mode {
            Mode::Train => true,
            Mode::Eval => false,
            Mode::Current => self.bn.is_training(),
        };
        let batch = self.config.uses_batch_stats(training);
        let expected = self.forward_errors(&x, batch);
        let what = format!(
            "forward ({mode:?}, training = {training}) of {:?} {:?}",
            x.dims, x.layout
        );
        let r = call(&what, || match mode {
            Mode::Current => self.bn.forward(&x.tensor),
            Mode::Train => self.bn.forward_train(&x.tensor),
            Mode::Eval => self.bn.forward_eval(&x.tensor),
        })?;
        let Some(out) = self.outcome(&what, r, &expected, false, &before)? else {
            return Ok(());
        };
        self.check_forward(&what, &x, training, &before, &out)?;
        if let Some(b) = bwd {
            self.backward(&x, &out, training, b)?;
        }
        Ok(())
    }

    /// A successful forward against the oracle.
    fn check_forward(
        &self,
        what: &str,
        x: &Built,
        training: bool,
        before: &State,
        out: &ForwardOutput,
    ) -> Result<(), TestCaseError> {
        let config = self.config;
        let batch = config.uses_batch_stats(training);
        let shape = x.shape();
        let numel = x.data.len();
        let c_n = x.channels();
        let after = State::read(&self.bn)?;
        prop_assert_eq!(out.y.dims(), &x.dims[..], "{}: y dims", what);
        prop_assert_eq!(out.y.layout(), x.layout, "{}: y layout", what);
        prop_assert_eq!(out.y.context().id(), self.ctx.id(), "{}: y context", what);
        prop_assert_eq!(out.saved.is_batch_stats(), batch, "{}: saved kind", what);

        let mut reference = before.reference(config);
        let r = catch_unwind(AssertUnwindSafe(|| {
            if training {
                reference.forward_train(&x.data, &shape)
            } else {
                reference.forward_eval(&x.data, &shape)
            }
        }))
        .map_err(|_| fail(format!("{what}: the reference panicked")))?;
        let want = r.map_err(|e| fail(format!("{what}: the reference failed: {e:?}")))?;

        // State: γ, β never change; the running statistics and the counter move as the
        // oracle's did (the empty batch: counter only).
        let update = training && config.track_running_stats;
        prop_assert_eq!(
            to_bits(&after.weight),
            to_bits(&before.weight),
            "{}: weight changed",
            what
        );
        prop_assert_eq!(
            to_bits(&after.bias),
            to_bits(&before.bias),
            "{}: bias changed",
            what
        );
        prop_assert_eq!(
            after.num_batches_tracked,
            config
                .track_running_stats
                .then_some(reference.num_batches_tracked),
            "{}: num_batches_tracked",
            what
        );

        let y = must("y.to_vec()", || out.y.to_vec())?;
        if numel == 0 {
            prop_assert!(
                y.is_empty(),
                "{}: y of an empty input has {} values",
                what,
                y.len()
            );
            prop_assert_eq!(
                to_bits(&after.running_mean),
                to_bits(&before.running_mean),
                "{}: running_mean changed on an empty batch",
                what
            );
            prop_assert_eq!(
                to_bits(&after.running_var),
                to_bits(&before.running_var),
                "{}: running_var changed on an empty batch",
                what
            );
            return Ok(());
        }
        if !update {
            prop_assert!(
                after.same(before),
                "{}: state changed without an update: {:?} -> {:?}",
                what,
                before,
                after
            );
        }

        self.counts.forwards.fetch_add(1, Relaxed);
        let facts = x.channel_facts();
        let eps = config.eps as f64;
        let mean = must("saved.mean()", || out.saved.mean())?;
        let invstd = must("saved.invstd()", || out.saved.invstd())?;
        prop_assert_eq!(mean.len(), c_n, "{}: saved mean length", what);
        prop_assert_eq!(invstd.len(), c_n, "{}: saved invstd length", what);
        let (_, var) = batch_stats(&x.data, &shape);

        // A channel is clean when everything its formula reads is finite.
        let running_ok = |c: usize| {
            let rm = before.running_mean.as_ref().map_or(0.0, |v| v[c]);
            let rv = before.running_var.as_ref().map_or(1.0, |v| v[c]);
            rm.is_finite() && rv.is_finite() && rv as f64 + eps > 0.0
        };
        let clean: Vec<bool> = (0..c_n)
            .map(|c| {
                before.gamma(c).is_finite()
                    && before.beta(c).is_finite()
                    && (batch || running_ok(c))
            })
            .collect();

        // Saved statistics against the oracle's.
        for c in 0..c_n {
            let ch = &facts[c];
            if batch {
                if !ch.all_finite {
                    continue;
                }
                let m = mean[c] as f64;
                if !agrees(mean[c], want.mean[c], Tol::mean(ch)) {
                    return Err(fail(format!(
                        "{what}: channel {c}: batch mean {m:e}, want {:e} (tol {:e}); {ch:?}",
                        want.mean[c],
                        Tol::mean(ch)
                    )));
                }
                let tol = want.invstd[c] * Tol::invstd_rel(ch, var[c], eps);
                if !agrees(invstd[c], want.invstd[c], tol) {
                    return Err(fail(format!(
                        "{what}: channel {c}: invstd {:e}, want {:e} (tol {tol:e}); var {:e}, \
                         eps {eps:e}; {ch:?}",
                        invstd[c], want.invstd[c], var[c]
                    )));
                }
            } else if running_ok(c) {
                let rm = before.running_mean.as_ref().expect("tracked")[c];
                prop_assert_eq!(
                    mean[c].to_bits(),
                    rm.to_bits(),
                    "{}: channel {}: inference mean is not the running mean",
                    what,
                    c
                );
                let tol = want.invstd[c] * 8.0 * E;
                if !agrees(invstd[c], want.invstd[c], tol) {
                    return Err(fail(format!(
                        "{what}: channel {c}: running invstd {:e}, want {:e} (tol {tol:e})",
                        invstd[c], want.invstd[c]
                    )));
                }
            }
        }

        // y, with the module's own μ and invstd (their errors were bounded above).
        check_all(&format!("{what}: y"), &y, numel, |i| {
            let c = x.channel_of(i);
            let xi = x.data[i] as f64;
            if xi.is_nan() || (batch && !facts[c].all_finite) {
                return Some((f64::NAN, 0.0));
            }
            if !clean[c] {
                return None;
            }
            let (m, is, g, b) = (
                mean[c] as f64,
                invstd[c] as f64,
                before.gamma(c),
                before.beta(c),
            );
            let want = (xi - m) * is * g + b;
            let tol =
                8.0 * E * ((xi.abs() + m.abs()) * is * g.abs() + b.abs()) + 16.0 * E * want.abs();
            Some((want, tol))
        })?;

        // Running statistics.
        if update {
            let m = config.momentum.factor(reference.num_batches_tracked) as f64;
            let rm0 = before.running_mean.as_ref().expect("tracked");
            let rv0 = before.running_var.as_ref().expect("tracked");
            let rm1 = after.running_mean.as_ref().expect("tracked");
            let rv1 = after.running_var.as_ref().expect("tracked");
            for c in 0..c_n {
                let ch = &facts[c];
                let n = ch.count as f64;
                let what = format!("{what}: channel {c} (momentum {m:e})");
                if !ch.all_finite {
                    // Poisoned by the batch (PyTorch gives NaN or ±∞ here too).
                    prop_assert!(
                        !rm1[c].is_finite() || m == 0.0 && rm0[c] == rm1[c],
                        "{}: running_mean {} after a non-finite batch",
                        what,
                        rm1[c]
                    );
                    continue;
                }
                if !(rm0[c].is_finite() && rv0[c].is_finite()) {
                    continue;
                }
                let (r0, v0) = (rm0[c] as f64, rv0[c] as f64);
                let var_u = var[c] * n / (n - 1.0);
                let tol_m = 4.0 * E * ((1.0 - m).abs() * r0.abs() + m * want.mean[c].abs())
                    + m * Tol::mean(ch);
                let tol_v = 4.0 * E * ((1.0 - m).abs() * v0.abs() + m * var_u)
                    + m * n / (n - 1.0) * Tol::var_abs(ch, var[c]);
                if !agrees(rm1[c], reference.running_mean[c], tol_m) {
                    return Err(fail(format!(
                        "{what}: running_mean {:e} -> {:e}, want {:e} (tol {tol_m:e})",
                        rm0[c], rm1[c], reference.running_mean[c]
                    )));
                }
                if !agrees(rv1[c], reference.running_var[c], tol_v) {
                    return Err(fail(format!(
                        "{what}: running_var {:e} -> {:e}, want {:e} (tol {tol_v:e})",
                        rv0[c], rv1[c], reference.running_var[c]
                    )));
                }
            }
        }
        Ok(())
    }

    fn backward(
        &mut self,
        x: &Built,
        out: &ForwardOutput,
        training: bool,
        b: &Bwd,
    ) -> Result<(), TestCaseError> {
        let before = State::read(&self.bn)?;
        let mut dy_dims = x.dims.clone();
        if b.dy_batch_plus_one {
            dy_dims[0] += 1;
        }
        let dy_layout = if b.dy_layout_flipped {
            flip(x.layout)
        } else {
            x.layout
        };
        let dys = b.dy.generate(dy_dims.iter().product());
        let dy_ctx = self.ctx_for(b.dy_foreign);
        let dy = must("dy tensor", || {
            dy_ctx.tensor_with_layout(&dys, &dy_dims, dy_layout)
        })?;

        let mut expected = Vec::new();
        let mut may_succeed = false;
        if b.dy_foreign.is_some() {
            expected.push(Kind::ContextMismatch);
        }
        if dy_dims != x.dims {
            expected.push(Kind::ShapeMismatch);
        } else if dy_layout != x.layout {
            expected.push(Kind::ShapeMismatch);
            // Rank 2: both layouts are the same memory, so accepting dy is correct too.
            may_succeed = x.dims.len() == 2 && expected.len() == 1;
        }
        let other: SavedStats;
        let saved = match b.saved {
            SavedFrom::ThisForward => &out.saved,
            SavedFrom::AnotherShape => {
                // Same context, one more batch row: statistics of another input.
                let mut dims = x.dims.clone();
                dims[0] += 1;
                let data = vec![0.5f32; dims.iter().product()];
                let x2 = must("x2", || self.ctx.tensor_with_layout(&data, &dims, x.layout))?;
                let Ok(o) = call("forward_eval of x2", || self.bn.forward_eval(&x2))? else {
                    return Ok(());
                };
                expected.push(Kind::SavedStatsMismatch);
                may_succeed = false;
                other = o.saved;
                &other
            }
            SavedFrom::AnotherContext(k) => {
                let ctx = self.ctx_for(Some(k));
                let mut bn = must("foreign module", || BatchNorm::new(ctx, self.config))?;
                let x2 = must("foreign x", || {
                    ctx.tensor_with_layout(&x.data, &x.dims, x.layout)
                })?;
                let o = must("foreign forward", || {
                    if training {
                        bn.forward_train(&x2)
                    } else {
                        bn.forward_eval(&x2)
                    }
                })?;
                expected.push(Kind::ContextMismatch);
                may_succeed = false;
                other = o.saved;
                &other
            }
        };
        if b.saved.is_another_shape() {
            // forward_eval must not have changed anything.
            let now = State::read(&self.bn)?;
            prop_assert!(now.same(&before), "forward_eval changed the state");
        }

        let what = format!(
            "backward (mask {:?}) of x {:?} {:?}, dy {:?} {:?}, saved {:?}",
            b.mask, x.dims, x.layout, dy_dims, dy_layout, b.saved
        );
        let r = call(&what, || {
            self.bn.backward_with_mask(&dy, &x.tensor, saved, b.mask)
        })?;
        let Some(g) = self.outcome(&what, r, &expected, may_succeed, &before)? else {
            return Ok(());
        };
        let after = State::read(&self.bn)?;
        prop_assert!(
            after.same(&before),
            "{}: the backward changed the state",
            what
        );
        let mean = must("saved.mean()", || out.saved.mean())?;
        let invstd = must("saved.invstd()", || out.saved.invstd())?;
        self.check_grads(
            &what,
            x,
            &dys,
            &g,
            b.mask,
            &mean,
            &invstd,
            out.saved.is_batch_stats(),
            &before,
        )
    }

    fn backward_eval(&mut self, input: &Input, dy_values: &Values) -> Result<(), TestCaseError> {
        let before = State::read(&self.bn)?;
        let Some(x) = self.build(input, &before)? else {
            return Ok(());
        };
        let dys = dy_values.generate(x.data.len());
        let dy = must("dy tensor", || {
            x.tensor
                .context()
                .tensor_with_layout(&dys, &x.dims, x.layout)
        })?;
        let mut expected = self.forward_errors(&x, false);
        if !self.config.track_running_stats {
            expected.push(Kind::NoRunningStats);
        }
        let what = format!("backward_eval of {:?} {:?}", x.dims, x.layout);
        let r = call(&what, || self.bn.backward_eval(&dy, &x.tensor))?;
        let Some(g) = self.outcome(&what, r, &expected, false, &before)? else {
            return Ok(());
        };
        let after = State::read(&self.bn)?;
        prop_assert!(after.same(&before), "{}: changed the state", what);
        // The frozen statistics: the running mean, and 1/√(running_var + eps) (computed in
        // f64 here, in f32 by the module: its relative error adds 8u).
        let eps = self.config.eps as f64;
        let mean = before.running_mean.clone().expect("tracked");
        let invstd: Vec<f32> = before
            .running_var
            .as_ref()
            .expect("tracked")
            .iter()
            .map(|&v| (1.0 / (v as f64 + eps).sqrt()) as f32)
            .collect();
        self.check_grads(
            &what,
            &x,
            &dys,
            &g,
            GradMask::ALL,
            &mean,
            &invstd,
            false,
            &before,
        )
    }

    /// Gradients against the oracle's backward, evaluated at the module's own saved μ and
    /// invstd (whose errors the forward checks bound).
    #[allow(clippy::too_many_arguments)]
    fn check_grads(
        &self,
        what: &str,
        x: &Built,
        dys: &[f32],
        g: &Gradients,
        mask: GradMask,
        mean: &[f32],
        invstd: &[f32],
        batch: bool,
        state: &State,
    ) -> Result<(), TestCaseError> {
        let affine = self.config.affine;
        prop_assert_eq!(g.dx.is_some(), mask.input, "{}: dx presence", what);
        prop_assert_eq!(
            g.dweight.is_some(),
            affine && mask.weight,
            "{}: dweight presence",
            what
        );
        prop_assert_eq!(
            g.dbias.is_some(),
            affine && mask.bias,
            "{}: dbias presence",
            what
        );
        let c_n = x.channels();
        let numel = x.data.len();
        let dx = match &g.dx {
            Some(t) => {
                prop_assert_eq!(t.dims(), &x.dims[..], "{}: dx dims", what);
                prop_assert_eq!(t.layout(), x.layout, "{}: dx layout", what);
                Some(must("dx.to_vec()", || t.to_vec())?)
            }
            None => None,
        };
        let dw = match &g.dweight {
            Some(t) => Some(must("dweight.to_vec()", || t.to_vec())?),
            None => None,
        };
        let db = match &g.dbias {
            Some(t) => Some(must("dbias.to_vec()", || t.to_vec())?),
            None => None,
        };
        if numel == 0 {
            // Sums over nothing: exactly zero (PyTorch's gradients of an empty batch).
            if let Some(dx) = &dx {
                prop_assert!(dx.is_empty(), "{}: dx of an empty input", what);
            }
            for (name, v) in [("dweight", &dw), ("dbias", &db)] {
                if let Some(v) = v {
                    prop_assert!(
                        v.len() == c_n && v.iter().all(|&z| z == 0.0),
                        "{}: {} of an empty batch is {:?}, want zeros",
                        what,
                        name,
                        v
                    );
                }
            }
            return Ok(());
        }

        self.counts.backwards.fetch_add(1, Relaxed);
        let reference = state.reference(self.config);
        let fwd = RefForward {
            y: Vec::new(),
            mean: mean.iter().map(|&m| m as f64).collect(),
            invstd: invstd.iter().map(|&s| s as f64).collect(),
            batch_stats: batch,
        };
        let shape = x.shape();
        let want = catch_unwind(AssertUnwindSafe(|| {
            reference.backward(dys, &x.data, &shape, &fwd)
        }))
        .map_err(|_| fail(format!("{what}: the reference backward panicked")))?;

        // Per-channel sums of magnitudes for the tolerances, and which channels are clean.
        let mut s_dy = vec![0.0f64; c_n];
        let mut s_dyxm = vec![0.0f64; c_n];
        let mut s_dyx = vec![0.0f64; c_n];
        let mut count = vec![0usize; c_n];
        let mut finite = vec![true; c_n];
        let mut dy_finite = vec![true; c_n];
        for (i, (&xi, &dyi)) in x.data.iter().zip(dys).enumerate() {
            let c = x.channel_of(i);
            let (xi, dyi, m) = (xi as f64, dyi as f64, mean[c] as f64);
            count[c] += 1;
            dy_finite[c] &= dyi.is_finite();
            if dyi.is_finite() {
                s_dy[c] += dyi.abs();
            }
            if !(xi.is_finite() && dyi.is_finite()) {
                finite[c] = false;
                continue;
            }
            s_dyxm[c] += dyi.abs() * (xi - m).abs();
            s_dyx[c] += dyi.abs() * (xi.abs() + m.abs());
        }
        let clean: Vec<bool> = (0..c_n)
            .map(|c| {
                finite[c]
                    && state.gamma(c).is_finite()
                    && mean[c].is_finite()
                    && invstd[c].is_finite()
            })
            .collect();
        // Channels with non-finite x or dy: the oracle's NaN/∞ must show (a sum with a NaN
        // is NaN); channels with non-finite parameters: NaN where the oracle has NaN from
        // the data only.
        let data_nan = |c: usize| !finite[c] && state.gamma(c).is_finite() && invstd[c].is_finite();

        if let Some(dx) = &dx {
            check_all(&format!("{what}: dx"), dx, numel, |i| {
                let c = x.channel_of(i);
                let w = want.dx[i];
                if !clean[c] {
                    let nan_input = dys[i].is_nan() || x.data[i].is_nan();
                    return (w.is_nan() && (nan_input || (batch && data_nan(c))))
                        .then_some((w, 0.0));
                }
                let (xi, dyi) = (x.data[i] as f64, dys[i] as f64);
                let (m, is, gm) = (mean[c] as f64, invstd[c] as f64, state.gamma(c).abs());
                let n = count[c] as f64;
                let tol = if batch {
                    is * gm
                        * (8.0 * E * dyi.abs()
                            + 32.0 * E * s_dy[c] / n
                            + is * is
                                * (8.0 * E * ((xi - m).abs() + xi.abs() + m.abs()) * s_dyxm[c] / n
                                    + (xi - m).abs() * (32.0 * E * s_dyxm[c] + 4.0 * E * s_dyx[c])
                                        / n))
                } else {
                    8.0 * E * dyi.abs() * is * gm
                };
                Some((w, tol + 16.0 * E * w.abs()))
            })?;
        }
        if let Some(dw) = &dw {
            check_all(&format!("{what}: dweight"), dw, c_n, |c| {
                let w = want.dweight[c];
                if !clean[c] {
                    return (w.is_nan() && data_nan(c)).then_some((w, 0.0));
                }
                let is = invstd[c] as f64;
                let tol = is * (32.0 * E * s_dyxm[c] + 4.0 * E * s_dyx[c]) + 16.0 * E * w.abs();
                Some((w, tol))
            })?;
        }
        if let Some(db) = &db {
            check_all(&format!("{what}: dbias"), db, c_n, |c| {
                let w = want.dbias[c];
                if !dy_finite[c] {
                    return Some((w, f64::INFINITY));
                }
                Some((w, 32.0 * E * s_dy[c]))
            })?;
        }
        Ok(())
    }
}

impl SavedFrom {
    fn is_another_shape(&self) -> bool {
        matches!(self, SavedFrom::AnotherShape)
    }
}

/// One case: build the module (or check that its configuration is rejected), then run the
/// operations.
fn run_case(
    ctx: &Context,
    foreign: &[Context],
    case: &Case,
    counts: &Counts,
) -> Result<(), TestCaseError> {
    counts.cases.fetch_add(1, Relaxed);
    let mut config = BatchNormConfig::new(case.num_features)
        .eps(case.eps)
        .affine(case.affine)
        .track_running_stats(case.track);
    config = match case.momentum {
        Some(m) => config.momentum(m),
        None => config.cumulative_average(),
    };
    let mut expected = Vec::new();
    if case.num_features == 0 {
        expected.push(Kind::InvalidNumFeatures);
    }
    if !(case.eps.is_finite() && case.eps > 0.0) {
        expected.push(Kind::InvalidEps);
    }
    if let Some(m) = case.momentum {
        if !(0.0..=1.0).contains(&m) {
            expected.push(Kind::InvalidMomentum);
        }
    }
    counts.calls.fetch_add(1, Relaxed);
    let bn = match call("BatchNorm::new", || BatchNorm::new(ctx, config))? {
        Ok(bn) => {
            counts.ok.fetch_add(1, Relaxed);
            prop_assert!(
                expected.is_empty(),
                "BatchNorm::new({:?}) succeeded; expected one of {:?}",
                config,
                expected
            );
            bn
        }
        Err(e) => {
            counts.errors.fetch_add(1, Relaxed);
            prop_assert!(
                expected.contains(&kind(&e)),
                "BatchNorm::new({:?}): expected one of {:?}, got {:?}",
                config,
                expected,
                e
            );
            return Ok(());
        }
    };
    // PyTorch's initial state.
    let s = State::read(&bn)?;
    let c = case.num_features;
    let init = |v: f32| Some(vec![v; c]);
    let want = State {
        weight: if case.affine { init(1.0) } else { None },
        bias: if case.affine { init(0.0) } else { None },
        running_mean: if case.track { init(0.0) } else { None },
        running_var: if case.track { init(1.0) } else { None },
        num_batches_tracked: case.track.then_some(0),
    };
    prop_assert!(s.same(&want), "initial state {:?}, want {:?}", s, want);
    prop_assert!(bn.is_training());

    let mut run = Run {
        ctx,
        foreign,
        config,
        bn,
        counts,
    };
    for (k, op) in case.ops.iter().enumerate() {
        run.op(op).map_err(|e| {
            fail(format!(
                "operation {k} ({op:?}) on {}: {e}",
                common::describe(ctx)
            ))
        })?;
    }
    Ok(())
}

/// Runs the fuzz on every backend whose kind `matches`, printing the count of cases.
fn fuzz(label: &str, matches: impl Fn(&Context) -> bool) {
    let backends: Vec<&Context> = common::backends().iter().filter(|c| matches(c)).collect();
    if backends.is_empty() {
        eprintln!("fuzz {label}: SKIPPED, no such backend here");
        return;
    }
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096);
    for ctx in backends {
        // The other contexts: a CPU one and a twin of this backend (another device on the
        // same adapter, or another CPU context).
        let twin = match ctx.adapter_info() {
            None => Context::cpu(),
            Some(_) => Context::all_gpus()
                .into_iter()
                .flatten()
                .find(|g| g.name() == ctx.name())
                .expect("the adapter opens a second device"),
        };
        let foreign = [Context::cpu(), twin];
        let counts = Counts::default();
        let mut runner = TestRunner::new(Config {
            cases,
            max_shrink_iters: 256,
            max_shrink_time: 60_000,
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
                "proptest-regressions/fuzz.txt",
            ))),
            ..Config::default()
        });
        let t = Instant::now();
        let result = runner.run(&case(), |case| run_case(ctx, &foreign, &case, &counts));
        eprintln!(
            "fuzz on {}: {} cases ({} calls: {} Ok, {} typed errors; {} forwards and {} \
             backwards checked against the oracle) in {:.1} s",
            common::describe(ctx),
            counts.cases.load(Relaxed),
            counts.calls.load(Relaxed),
            counts.ok.load(Relaxed),
            counts.errors.load(Relaxed),
            counts.forwards.load(Relaxed),
            counts.backwards.load(Relaxed),
            t.elapsed().as_secs_f64()
        );
        if let Err(e) = result {
            panic!("fuzz on {}: {e}", common::describe(ctx));
        }
    }
}

#[test]
fn fuzz_cpu() {
    fuzz("cpu", |c| c.backend_kind() == "cpu");
}

#[test]
fn fuzz_vulkan() {
    fuzz("vulkan", |c| c.backend_kind() == "vulkan");
}

#[test]
fn fuzz_gl() {
    fuzz("gl", |c| c.backend_kind() == "gl");
}

#[test]
fn fuzz_other_adapters() {
    fuzz("other adapters", |c| {
        !matches!(c.backend_kind(), "cpu" | "vulkan" | "gl")
    });
}
