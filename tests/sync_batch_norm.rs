//! `SyncBatchNorm` in the in-process group (`LocalComm`: ranks on threads), on the CPU path
//! and every wgpu adapter found:
//!
//! 1. the defining property: for world sizes 1 to 4 and random splits of a batch along N
//!    among the ranks (empty ranks included), over two training steps, every rank's y, dx,
//!    saved statistics and running statistics, and the rank-sum of dγ and dβ, equal one
//!    single-process `BatchNorm` on the whole batch, within f32 rounding; the running
//!    statistics are bit-identical on ranks of one backend. With every rank on one backend
//!    (each backend in turn) and with ranks on different backends (CPU, Vulkan, GL as ranks
//!    of one group);
//! 2. the communicator: results, mismatched calls, and the values a step exchanges;
//! 3. bad input on some ranks: a typed error on every rank, nothing changed anywhere, and
//!    the group still usable;
//! 4. a rank that drops out (panics, leaves, loses its device, never arrives): the others
//!    return an error instead of hanging, under a deadline.
//!
//! GL: wgpu's GL backend panics a thread that waits more than 6 s for its context lock
//! (see `common::gl_lock`). A group never holds more than one GL context, and a test whose
//! group holds one takes `gl_lock` for the whole group; the ranks of a GL-only group share
//! its one context (short dispatches on small shapes, so no rank waits long for the lock).
//!
//! Tolerances are those of tests/functional.rs, whose split-versus-whole property this is
//! with a communicator between the pieces (see its head): f32 ε ≈ 6e-8, data O(1),
//! - y: Y_ATOL + Y_RTOL·|y|; means: MEAN_ATOL + MEAN_RTOL·|μ|; invstd and variances:
//!   VAR_RTOL relative;
//! - dx: DX_TOL·max_c(|γ_c|·invstd_c)·max|dy| (dx combines O(max|dy|) terms that may
//!   cancel);
//! - dγ, dβ: PARAM_TOL·Σ|terms| (the worst case of an f32 sum of those terms, in any order);
//! - plus what a one-ulp difference of the two saved f32 means moves (zero unless they
//!   round differently; see `assert_rank_matches`).

mod common;

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{assert_close, backends, channel_of, describe, gl_lock, normal, ulp, widen};
use wgpu_batchnorm::{
    BatchNorm, BatchNormConfig, BatchNormState, Communicator, Context, Error, GradMask, Layout,
    LocalComm, Shape, SyncBatchNorm, Tensor,
};

const Y_ATOL: f64 = 2e-5;
const Y_RTOL: f64 = 2e-5;
const MEAN_ATOL: f64 = 1e-6;
const MEAN_RTOL: f64 = 1e-5;
const VAR_RTOL: f64 = 1e-5;
const DX_TOL: f64 = 1e-5;
const PARAM_TOL: f64 = 1e-5;

/// How long a test waits for a whole group before it calls it hung. Far above what a group
/// of these sizes takes (well under a second), far below the communicator's own
/// `DEFAULT_TIMEOUT`, so a test that passes did not lean on that timeout.
const GROUP_DEADLINE: Duration = Duration::from_secs(90);

// ---- running a group ----

/// Runs `body` on one thread per communicator and returns each rank's outcome (a panic
/// included), in rank order; fails the test if the group has not finished by
/// [`GROUP_DEADLINE`].
fn run_group_raw<T: Send + 'static>(
    comms: Vec<LocalComm>,
    body: impl Fn(LocalComm) -> T + Send + Sync + 'static,
) -> Vec<std::thread::Result<T>> {
    let world = comms.len();
    let body = Arc::new(body);
    let (tx, rx) = mpsc::channel();
    for comm in comms {
        let (tx, body) = (tx.clone(), body.clone());
        let rank = comm.rank();
        std::thread::Builder::new()
            .name(format!("rank {rank}"))
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(comm)));
                let _ = tx.send((rank, r));
            })
            .expect("spawn a rank");
    }
    drop(tx);
    let deadline = Instant::now() + GROUP_DEADLINE;
    let mut out: Vec<Option<std::thread::Result<T>>> = (0..world).map(|_| None).collect();
    for _ in 0..world {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((rank, r)) => out[rank] = Some(r),
            Err(_) => {
                let missing: Vec<usize> = (0..world).filter(|&r| out[r].is_none()).collect();
                panic!(
                    "the group hung: ranks {missing:?} did not finish within {GROUP_DEADLINE:?}"
                );
            }
        }
    }
    out.into_iter().map(|r| r.expect("every rank")).collect()
}

/// [`run_group_raw`], re-raising the first rank's panic.
fn run_group<T: Send + 'static>(
    comms: Vec<LocalComm>,
    body: impl Fn(LocalComm) -> T + Send + Sync + 'static,
) -> Vec<T> {
    run_group_raw(comms, body)
        .into_iter()
        .enumerate()
        .map(|(rank, r)| match r {
            Ok(v) => v,
            Err(p) => {
                eprintln!("rank {rank} panicked");
                std::panic::resume_unwind(p)
            }
        })
        .collect()
}

fn group(world: usize) -> Vec<LocalComm> {
    LocalComm::group(world).unwrap()
}

/// Whether any of `ctxs` is a GL context (its group then takes `gl_lock`).
fn any_gl(ctxs: &[&Context]) -> bool {
    ctxs.iter().any(|c| c.backend_kind() == "gl")
}

// ---- cases ----

/// SplitMix64, for the random shapes, configurations and splits.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in lo..=hi (the modulo bias does not matter here).
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

/// A whole batch over several training steps, its configuration and initial state.
struct Case {
    shape: Shape,
    config: BatchNormConfig,
    /// (x, dy) of each step, in memory (layout) order.
    steps: Vec<(Vec<f32>, Vec<f32>)>,
    initial: BatchNormState,
}

impl Case {
    fn new(dims: &[usize], layout: Layout, config: BatchNormConfig, seed: u64) -> Self {
        let (numel, c) = (dims.iter().product(), dims[1]);
        let in_layout = |v: Vec<f32>| match layout {
            Layout::ChannelsFirst => v,
            Layout::ChannelsLast => common::to_channels_last(&v, dims),
        };
        let steps = (0..2)
            .map(|s| {
                let seed = seed + 1000 * s;
                (
                    in_layout(normal(numel, seed, 0.3 + s as f64, 1.5)),
                    in_layout(normal(numel, seed ^ 0xD1, 0.0, 1.0)),
                )
            })
            .collect();
        let affine = config.affine;
        let track = config.track_running_stats;
        let initial = BatchNormState {
            weight: affine.then(|| normal(c, seed ^ 0xA11CE, 1.0, 0.25)),
            bias: affine.then(|| normal(c, seed ^ 0xB0B, 0.0, 0.5)),
            running_mean: track.then(|| normal(c, seed ^ 0x3EA, 0.0, 0.5)),
            running_var: track.then(|| {
                normal(c, seed ^ 0x7A2, 1.0, 0.25)
                    .iter()
                    .map(|v| v.abs() + 0.25)
                    .collect()
            }),
            num_batches_tracked: track.then_some(3),
        };
        Self {
            shape: Shape::with_layout(dims, layout).unwrap(),
            config,
            steps,
            initial,
        }
    }

    fn name(&self) -> String {
        format!(
            "{:?} {:?} momentum {:?} affine {} track {}",
            self.shape.dims(),
            self.shape.layout(),
            self.config.momentum,
            self.config.affine,
            self.config.track_running_stats
        )
    }

    fn channels(&self) -> usize {
        self.shape.channels()
    }

    /// The dims and memory range of `rank`'s part when the batch is split along N into
    /// `sizes` (for both layouts a part is contiguous: N is outermost).
    fn part(&self, sizes: &[usize], rank: usize) -> (Vec<usize>, Range<usize>) {
        let dims = self.shape.dims();
        assert_eq!(sizes.iter().sum::<usize>(), dims[0], "split sizes");
        let row: usize = dims[1..].iter().product();
        let start: usize = sizes[..rank].iter().sum();
        let mut d = dims.to_vec();
        d[0] = sizes[rank];
        (d, start * row..(start + sizes[rank]) * row)
    }

    fn gamma(&self) -> Vec<f64> {
        match &self.initial.weight {
            Some(w) => widen(w),
            None => vec![1.0; self.channels()],
        }
    }

    fn max_abs_dy(&self, step: usize) -> f64 {
        max_of(self.steps[step].1.iter().map(|v| v.abs() as f64))
    }

    /// max |x − μ_c|·invstd_c of a step.
    fn max_xhat(&self, step: usize, mean: &[f64], invstd: &[f64]) -> f64 {
        max_of(self.steps[step].0.iter().enumerate().map(|(i, &v)| {
            let c = channel_of(&self.shape, i);
            (v as f64 - mean[c]).abs() * invstd[c]
        }))
    }

    /// Per channel Σ|dy·(x − μ)| and Σ|dy| of a step.
    fn term_scales(&self, step: usize, mean: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let c = self.channels();
        let (mut sdyx, mut sdy) = (vec![0.0; c], vec![0.0; c]);
        let (x, dy) = &self.steps[step];
        for (i, (&x, &dy)) in x.iter().zip(dy).enumerate() {
            let ch = channel_of(&self.shape, i);
            sdyx[ch] += (dy as f64 * (x as f64 - mean[ch])).abs();
            sdy[ch] += (dy as f64).abs();
        }
        (sdyx, sdy)
    }
}

fn max_of(v: impl IntoIterator<Item = f64>) -> f64 {
    v.into_iter().fold(0.0, f64::max)
}

/// A random shape of kind `i % 4` (rank 2; rank 4 channels-first; rank 4 channels-last;
/// rank 3 or 5) with N from 2 to 12, so that splits over 4 ranks leave some ranks empty.
fn random_dims(rng: &mut SplitMix64, i: usize) -> (Vec<usize>, Layout) {
    let c = rng.range(1, 7);
    let n = rng.range(2, 12);
    match i % 4 {
        0 => (vec![n, c], Layout::ChannelsFirst),
        1 => (
            vec![n, c, rng.range(1, 4), rng.range(1, 4)],
            Layout::ChannelsFirst,
        ),
        2 => (
            vec![n, c, rng.range(1, 4), rng.range(1, 4)],
            Layout::ChannelsLast,
        ),
        _ if rng.range(0, 1) == 0 => (vec![n, c, rng.range(1, 9)], Layout::ChannelsFirst),
        _ => (
            vec![n, c, rng.range(1, 3), rng.range(1, 3), rng.range(1, 3)],
            Layout::ChannelsFirst,
        ),
    }
}

/// The configuration of case `i`: PyTorch's defaults; `momentum = None`; no γ/β and no
/// running statistics.
fn config_of(c: usize, i: usize) -> BatchNormConfig {
    match i % 3 {
        0 => BatchNormConfig::new(c),
        1 => BatchNormConfig::new(c).cumulative_average(),
        _ => BatchNormConfig::new(c)
            .affine(false)
            .track_running_stats(false),
    }
}

/// Per-rank batch sizes summing to n over `world` ranks: first fixed awkward splits (the
/// whole batch on the last rank, then on the first; one row on a rank between empty ones),
/// then uniform cut points in 0..=n (empty ranks included).
fn split_sizes(rng: &mut SplitMix64, n: usize, world: usize, i: usize) -> Vec<usize> {
    let mut sizes = vec![0; world];
    match i {
        0 => sizes[world - 1] = n,
        1 => sizes[0] = n,
        2 if world >= 3 => {
            sizes[1] = 1;
            sizes[world - 1] = n - 1;
        }
        _ => {
            let mut cuts: Vec<usize> = (1..world).map(|_| rng.range(0, n)).collect();
            cuts.sort_unstable();
            cuts.push(n);
            let mut prev = 0;
            for (s, cut) in sizes.iter_mut().zip(cuts) {
                *s = cut - prev;
                prev = cut;
            }
        }
    }
    sizes
}

// ---- one rank's run and the single-process reference ----

/// What one training step gives a rank, read back.
#[derive(Debug)]
struct StepOut {
    y: Vec<f32>,
    dx: Vec<f32>,
    dweight: Option<Vec<f32>>,
    dbias: Option<Vec<f32>>,
    mean: Vec<f32>,
    invstd: Vec<f32>,
}

/// What a run of every step gives, and the state after it.
#[derive(Debug)]
struct RunOut {
    steps: Vec<StepOut>,
    state: BatchNormState,
}

fn tensor(ctx: &Context, data: &[f32], dims: &[usize], layout: Layout) -> Tensor {
    ctx.tensor_with_layout(data, dims, layout).unwrap()
}

fn values(t: Option<&Tensor>) -> Option<Vec<f32>> {
    t.map(|t| t.to_vec().unwrap())
}

/// Every step of `case` on `rank`'s part, through a `SyncBatchNorm` on `ctx`.
fn run_rank(ctx: &Context, case: &Case, sizes: &[usize], comm: LocalComm) -> RunOut {
    let (dims, range) = case.part(sizes, comm.rank());
    let layout = case.shape.layout();
    let mut bn = SyncBatchNorm::new(ctx, case.config, Arc::new(comm)).unwrap();
    bn.load_state(&case.initial).unwrap();
    let steps = case
        .steps
        .iter()
        .map(|(x, dy)| {
            let x = tensor(ctx, &x[range.clone()], &dims, layout);
            let dy = tensor(ctx, &dy[range.clone()], &dims, layout);
            let out = bn.forward_train(&x).unwrap();
            let g = bn.backward(&dy, &x, &out.saved).unwrap();
            StepOut {
                y: out.y.to_vec().unwrap(),
                dx: values(g.dx.as_ref()).expect("dx"),
                dweight: values(g.dweight.as_ref()),
                dbias: values(g.dbias.as_ref()),
                mean: out.saved.mean().unwrap(),
                invstd: out.saved.invstd().unwrap(),
            }
        })
        .collect();
    RunOut {
        steps,
        state: bn.state().unwrap(),
    }
}

/// Every step of `case` on the whole batch, through one `BatchNorm` on `ctx`.
fn run_whole(ctx: &Context, case: &Case) -> RunOut {
    let (dims, layout) = (case.shape.dims(), case.shape.layout());
    let mut bn = BatchNorm::new(ctx, case.config).unwrap();
    bn.load_state(&case.initial).unwrap();
    let steps = case
        .steps
        .iter()
        .map(|(x, dy)| {
            let (x, dy) = (tensor(ctx, x, dims, layout), tensor(ctx, dy, dims, layout));
            let out = bn.forward_train(&x).unwrap();
            let g = bn.backward(&dy, &x, &out.saved).unwrap();
            StepOut {
                y: out.y.to_vec().unwrap(),
                dx: values(g.dx.as_ref()).expect("dx"),
                dweight: values(g.dweight.as_ref()),
                dbias: values(g.dbias.as_ref()),
                mean: out.saved.mean().unwrap(),
                invstd: out.saved.invstd().unwrap(),
            }
        })
        .collect();
    RunOut {
        steps,
        state: bn.state().unwrap(),
    }
}

/// δ_c = |μ_rank − μ_whole| of the two saved f32 means of a step.
fn mean_delta(got: &StepOut, want: &StepOut) -> Vec<f64> {
    got.mean
        .iter()
        .zip(&want.mean)
        .map(|(&a, &b)| (a as f64 - b as f64).abs())
        .collect()
}

/// One rank's y, dx, saved statistics and final state against the whole batch's (its part
/// of y and dx), within f32 rounding (see the file's head).
///
/// Both saved means are f32 roundings of means that agree far below one ulp: equal, or one
/// ulp apart where they straddle a rounding boundary. Where they differ by δ_c, y moves by
/// δ·|γ|·invstd and dx by δ·|γ|·invstd²·2·max|x̂|·max|dy|; those terms are added to the
/// tolerances.
#[track_caller]
fn assert_rank_matches(what: &str, case: &Case, range: &Range<usize>, got: &RunOut, want: &RunOut) {
    let c = case.channels();
    let gamma = case.gamma();
    for (s, (g, w)) in got.steps.iter().zip(&want.steps).enumerate() {
        let what = format!("{what}: step {s}");
        let (mean, invstd) = (widen(&w.mean), widen(&w.invstd));
        let delta = mean_delta(g, w);
        assert_close(
            &format!("{what}: saved mean"),
            &g.mean,
            &mean,
            MEAN_ATOL + max_of(mean.iter().map(|&m| ulp(m))),
            0.0,
        );
        assert_close(
            &format!("{what}: saved invstd"),
            &g.invstd,
            &invstd,
            0.0,
            VAR_RTOL,
        );
        let y_shift = max_of((0..c).map(|k| delta[k] * gamma[k].abs() * invstd[k]));
        assert_close(
            &format!("{what}: y"),
            &g.y,
            &widen(&w.y[range.clone()]),
            Y_ATOL + y_shift,
            Y_RTOL,
        );
        let max_dy = case.max_abs_dy(s);
        let max_xhat = case.max_xhat(s, &mean, &invstd);
        let scale = max_of((0..c).map(|k| gamma[k].abs() * invstd[k]));
        let dx_shift = max_of(
            (0..c).map(|k| delta[k] * gamma[k].abs() * invstd[k].powi(2) * 2.0 * max_xhat * max_dy),
        );
        assert_close(
            &format!("{what}: dx"),
            &g.dx,
            &widen(&w.dx[range.clone()]),
            DX_TOL * scale * max_dy + dx_shift,
            DX_TOL,
        );
        assert_eq!(
            g.dweight.is_some(),
            case.config.affine,
            "{what}: dγ exactly with affine"
        );
    }
    let (gs, ws) = (&got.state, &want.state);
    assert_eq!(
        gs.num_batches_tracked, ws.num_batches_tracked,
        "{what}: num_batches_tracked"
    );
    assert_eq!(gs.weight, ws.weight, "{what}: γ is not changed by a step");
    match (&gs.running_mean, &ws.running_mean) {
        (Some(g), Some(w)) => assert_close(
            &format!("{what}: running_mean"),
            g,
            &widen(w),
            MEAN_ATOL,
            MEAN_RTOL,
        ),
        (None, None) => {}
        _ => panic!("{what}: running_mean present on one side only"),
    }
    match (&gs.running_var, &ws.running_var) {
        (Some(g), Some(w)) => {
            assert_close(&format!("{what}: running_var"), g, &widen(w), 0.0, VAR_RTOL)
        }
        (None, None) => {}
        _ => panic!("{what}: running_var present on one side only"),
    }
}

/// The rank-sum of dγ and dβ of each step against the whole batch's: PARAM_TOL·Σ|terms|,
/// plus δ·invstd·Σ|dy| for dγ where a rank's saved mean is one ulp off.
#[track_caller]
fn assert_param_sums(what: &str, case: &Case, ranks: &[RunOut], want: &RunOut) {
    if !case.config.affine {
        return;
    }
    let c = case.channels();
    for (s, w) in want.steps.iter().enumerate() {
        let (mean, invstd) = (widen(&w.mean), widen(&w.invstd));
        let (sdyx, sdy) = case.term_scales(s, &mean);
        let delta = (0..c)
            .map(|k| max_of(ranks.iter().map(|r| mean_delta(&r.steps[s], w)[k])))
            .collect::<Vec<_>>();
        let dw_atol = PARAM_TOL * max_of(sdyx.iter().zip(&invstd).map(|(s, i)| s * i))
            + max_of((0..c).map(|k| delta[k] * invstd[k] * sdy[k]));
        let db_atol = PARAM_TOL * max_of(sdy.iter().copied());
        let sum = |get: fn(&StepOut) -> &Option<Vec<f32>>| -> Vec<f32> {
            let mut acc = vec![0.0f64; c];
            for r in ranks {
                for (a, &v) in acc.iter_mut().zip(get(&r.steps[s]).as_ref().unwrap()) {
                    *a += v as f64;
                }
            }
            acc.iter().map(|&v| v as f32).collect()
        };
        assert_close(
            &format!("{what}: step {s}: rank-sum of dγ"),
            &sum(|o| &o.dweight),
            &widen(w.dweight.as_ref().unwrap()),
            dw_atol,
            0.0,
        );
        assert_close(
            &format!("{what}: step {s}: rank-sum of dβ"),
            &sum(|o| &o.dbias),
            &widen(w.dbias.as_ref().unwrap()),
            db_atol,
            0.0,
        );
    }
}

/// Runs `case` split into `sizes` over a group whose rank r lives on `ctxs[r]`, and checks
/// every rank against one `BatchNorm` on the whole batch on its own context (the rank-sum
/// of dγ and dβ against rank 0's), and that ranks on one context end with bit-identical
/// running statistics.
fn check_group(what: &str, ctxs: &[&'static Context], case: Arc<Case>, sizes: Vec<usize>) {
    let world = ctxs.len();
    let owned: Vec<Context> = ctxs.iter().map(|&c| c.clone()).collect();
    let (c2, s2) = (case.clone(), sizes.clone());
    let outs = run_group(group(world), move |comm| {
        let ctx = owned[comm.rank()].clone();
        run_rank(&ctx, &c2, &s2, comm)
    });
    let mut wholes: Vec<(u64, RunOut)> = Vec::new();
    for (rank, (out, ctx)) in outs.iter().zip(ctxs).enumerate() {
        if !wholes.iter().any(|(id, _)| *id == ctx.id()) {
            wholes.push((ctx.id(), run_whole(ctx, &case)));
        }
        let whole = &wholes.iter().find(|(id, _)| *id == ctx.id()).unwrap().1;
        let (_, range) = case.part(&sizes, rank);
        let what = format!("{what}: rank {rank} of {world} on {}", describe(ctx));
        assert_rank_matches(&what, &case, &range, out, whole);
        let first_here = ctxs.iter().position(|c| c.id() == ctx.id()).unwrap();
        let (a, b) = (&outs[first_here].state, &out.state);
        let bits = |v: &Option<Vec<f32>>| {
            v.as_ref()
                .map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
        };
        assert!(
            bits(&a.running_mean) == bits(&b.running_mean)
                && bits(&a.running_var) == bits(&b.running_var),
            "{what}: running statistics differ from rank {first_here}'s, on the same context"
        );
    }
    let rank0_whole = &wholes.iter().find(|(id, _)| *id == ctxs[0].id()).unwrap().1;
    assert_param_sums(what, &case, &outs, rank0_whole);
}

/// `cases` random cases per world size 1 to 4, each split at random over the ranks of
/// `ctxs_for(world, i)`; asserts that empty ranks were among them.
fn check_random_groups(
    seed: u64,
    cases: usize,
    ctxs_for: impl Fn(usize, usize) -> Vec<&'static Context>,
) {
    let mut rng = SplitMix64(seed);
    let mut with_empty_rank = 0;
    for world in 1..=4 {
        for i in 0..cases {
            let (dims, layout) = random_dims(&mut rng, i);
            let config = config_of(dims[1], i + world);
            let case = Arc::new(Case::new(&dims, layout, config, seed + 37 * i as u64));
            let sizes = split_sizes(&mut rng, dims[0], world, i);
            with_empty_rank += sizes.contains(&0) as usize;
            let ctxs = ctxs_for(world, i);
            let what = format!("world {world} case {i}: {} split {sizes:?}", case.name());
            let _gl = any_gl(&ctxs).then(gl_lock);
            check_group(&what, &ctxs, case, sizes);
        }
    }
    assert!(
        with_empty_rank >= cases,
        "only {with_empty_rank} of {} groups had an empty rank",
        4 * cases
    );
}

// ---- 1. the defining property ----

#[test]
fn every_rank_on_one_backend_matches_batch_norm_on_the_whole_batch() {
    for ctx in backends() {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_random_groups(0x5B1, 5, |world, _| vec![ctx; world]);
        }));
        if let Err(e) = r {
            eprintln!("failed on backend {}", describe(ctx));
            std::panic::resume_unwind(e);
        }
    }
}

/// The contexts ranks of a mixed group are drawn from: every backend, but one GL context at
/// most (see the file's head).
fn mixed_pool() -> Vec<&'static Context> {
    let mut pool: Vec<&'static Context> = Vec::new();
    for ctx in backends() {
        let gl = ctx.backend_kind() == "gl";
        if !(gl && pool.iter().any(|c| c.backend_kind() == "gl")) {
            pool.push(ctx);
        }
    }
    pool
}

#[test]
fn ranks_on_different_backends_match_batch_norm_on_the_whole_batch() {
    let pool = mixed_pool();
    if pool.len() == 1 {
        eprintln!("!!! only the CPU path: ranks on different backends are all CPU ranks");
    }
    eprintln!(
        "mixed groups draw from: {:?}",
        pool.iter().map(|c| describe(c)).collect::<Vec<_>>()
    );
    // Rank r of case i on pool[(r + i) % len]: each context takes each rank index, and a
    // group of three or more holds the CPU, Vulkan and GL at once where all are found.
    let p = pool.clone();
    check_random_groups(0x313ED, 4, move |world, i| {
        (0..world).map(|r| p[(r + i) % p.len()]).collect()
    });
}

#[test]
fn cpu_vulkan_and_gl_as_three_ranks_of_one_group() {
    let pick = |kind: &str| backends().iter().find(|c| c.backend_kind() == kind);
    let ctxs: Vec<&'static Context> = ["cpu", "vulkan", "gl"]
        .iter()
        .filter_map(|k| {
            let c = pick(k);
            if c.is_none() {
                eprintln!("!!! no {k} context: the three-backend group runs without it");
            }
            c
        })
        .collect();
    let _gl = any_gl(&ctxs).then(gl_lock);
    let dims = [7, 5, 3, 4];
    let config = BatchNormConfig::new(5).momentum(0.3);
    let case = Arc::new(Case::new(&dims, Layout::ChannelsFirst, config, 0x3B));
    let mut sizes = vec![0; ctxs.len()];
    sizes[0] = 3;
    *sizes.last_mut().unwrap() += 4;
    check_group("cpu+vulkan+gl", &ctxs, case, sizes);
}

#[test]
fn every_rank_empty_updates_nothing_and_counts_the_step() {
    on_one_backend_each(|ctx| {
        let case = Arc::new(Case::new(
            &[0, 3, 2],
            Layout::ChannelsFirst,
            BatchNormConfig::new(3),
            0xE,
        ));
        let c2 = case.clone();
        let outs = run_group(group(3), move |comm| run_rank(ctx, &c2, &[0, 0, 0], comm));
        let whole = run_whole(ctx, &case);
        assert_eq!(
            whole.state.num_batches_tracked,
            Some(5),
            "BatchNorm counts it"
        );
        for (rank, out) in outs.iter().enumerate() {
            assert!(out.steps.iter().all(|s| s.y.is_empty() && s.dx.is_empty()));
            assert_eq!(out.state, whole.state, "rank {rank}: state");
            assert_eq!(out.state.running_mean, case.initial.running_mean);
        }
    });
}

/// Runs `body` once per backend (the GL one under `gl_lock`), naming the failing backend.
fn on_one_backend_each(body: impl Fn(&'static Context)) {
    for ctx in backends() {
        let _gl = (ctx.backend_kind() == "gl").then(gl_lock);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(ctx)));
        if let Err(e) = r {
            eprintln!("failed on backend {}", describe(ctx));
            std::panic::resume_unwind(e);
        }
    }
}

#[test]
fn summed_affine_grads_equal_the_whole_batchs_on_every_rank() {
    on_one_backend_each(|ctx| {
        let case = Arc::new(Case::new(
            &[9, 4, 5],
            Layout::ChannelsFirst,
            BatchNormConfig::new(4),
            0x5A,
        ));
        let sizes = vec![4, 0, 5];
        let (c2, s2) = (case.clone(), sizes.clone());
        let outs = run_group(group(3), move |comm| {
            let (dims, range) = c2.part(&s2, comm.rank());
            let mut bn = SyncBatchNorm::new(ctx, c2.config, Arc::new(comm))
                .unwrap()
                .sync_affine_grads(true);
            assert!(bn.syncs_affine_grads());
            bn.load_state(&c2.initial).unwrap();
            let (x, dy) = &c2.steps[0];
            let x = tensor(ctx, &x[range.clone()], &dims, Layout::ChannelsFirst);
            let dy = tensor(ctx, &dy[range], &dims, Layout::ChannelsFirst);
            let out = bn.forward_train(&x).unwrap();
            let g = bn.backward(&dy, &x, &out.saved).unwrap();
            (
                values(g.dweight.as_ref()).unwrap(),
                values(g.dbias.as_ref()).unwrap(),
                out.saved.mean().unwrap(),
            )
        });
        let whole = run_whole(ctx, &case);
        let w = &whole.steps[0];
        let (mean, invstd) = (widen(&w.mean), widen(&w.invstd));
        let (sdyx, sdy) = case.term_scales(0, &mean);
        for (rank, (dw, db, m)) in outs.iter().enumerate() {
            let delta = max_of(m.iter().zip(&w.mean).map(|(a, b)| (a - b).abs() as f64));
            let dw_atol = PARAM_TOL * max_of(sdyx.iter().zip(&invstd).map(|(s, i)| s * i))
                + delta * max_of(invstd.iter().zip(&sdy).map(|(i, s)| i * s));
            let what = format!("rank {rank}");
            let want_dw = widen(w.dweight.as_ref().unwrap());
            assert_close(&format!("{what}: dγ"), dw, &want_dw, dw_atol, 0.0);
            let db_atol = PARAM_TOL * max_of(sdy.iter().copied());
            let want_db = widen(w.dbias.as_ref().unwrap());
            assert_close(&format!("{what}: dβ"), db, &want_db, db_atol, 0.0);
            assert_eq!(
                (dw, db),
                (&outs[0].0, &outs[0].1),
                "{what}: every rank gets the same sums"
            );
        }
    });
}

#[test]
fn eval_and_a_group_of_one_run_local_batch_norm() {
    on_one_backend_each(|ctx| {
        // Eval in a group of two: each rank normalizes alone (running statistics, or its
        // own batch statistics without them), and nothing is exchanged.
        for track in [true, false] {
            let config = BatchNormConfig::new(3).track_running_stats(track);
            let case = Arc::new(Case::new(&[6, 3, 2], Layout::ChannelsFirst, config, 0xE7));
            let counted = Arc::new(AtomicUsize::new(0));
            let (c2, n2) = (case.clone(), counted.clone());
            let outs = run_group(group(2), move |comm| {
                let rank = comm.rank();
                let (dims, range) = c2.part(&[2, 4], rank);
                let comm = Counting::new(comm, n2.clone());
                let mut bn = SyncBatchNorm::new(ctx, c2.config, Arc::new(comm)).unwrap();
                bn.load_state(&c2.initial).unwrap();
                bn.eval();
                let (x, dy) = &c2.steps[0];
                let x = tensor(ctx, &x[range.clone()], &dims, Layout::ChannelsFirst);
                let dy = tensor(ctx, &dy[range], &dims, Layout::ChannelsFirst);
                let out = bn.forward(&x).unwrap();
                let g = bn.backward(&dy, &x, &out.saved).unwrap();
                let mut local = BatchNorm::new(ctx, c2.config).unwrap();
                local.load_state(&c2.initial).unwrap();
                local.eval();
                let want = local.forward(&x).unwrap();
                let gw = local.backward(&dy, &x, &want.saved).unwrap();
                assert_eq!(out.y.to_vec().unwrap(), want.y.to_vec().unwrap());
                assert_eq!(values(g.dx.as_ref()), values(gw.dx.as_ref()));
                if track {
                    let ge = bn.backward_eval(&dy, &x).unwrap();
                    let we = local.backward_eval(&dy, &x).unwrap();
                    assert_eq!(values(ge.dx.as_ref()), values(we.dx.as_ref()));
                }
                assert_eq!(bn.state().unwrap(), c2.initial, "eval changes no state");
            });
            assert_eq!(outs.len(), 2);
            assert_eq!(counted.load(Ordering::SeqCst), 0, "eval communicated");
        }
        // A group of one: BatchNorm exactly, bit for bit, and its errors.
        let case = Case::new(
            &[5, 2, 3],
            Layout::ChannelsFirst,
            BatchNormConfig::new(2),
            0x1,
        );
        let mut comms = group(1);
        let counted = Arc::new(AtomicUsize::new(0));
        let comm = Counting::new(comms.pop().unwrap(), counted.clone());
        let mut bn = SyncBatchNorm::new(ctx, case.config, Arc::new(comm)).unwrap();
        assert_eq!(bn.exchange_lengths(), (0, 0));
        bn.load_state(&case.initial).unwrap();
        let (x, dy) = &case.steps[0];
        let x = tensor(ctx, x, case.shape.dims(), Layout::ChannelsFirst);
        let dy = tensor(ctx, dy, case.shape.dims(), Layout::ChannelsFirst);
        let out = bn.forward_train(&x).unwrap();
        let g = bn.backward(&dy, &x, &out.saved).unwrap();
        let mut local = BatchNorm::new(ctx, case.config).unwrap();
        local.load_state(&case.initial).unwrap();
        let want = local.forward_train(&x).unwrap();
        let gw = local.backward(&dy, &x, &want.saved).unwrap();
        assert_eq!(out.y.to_vec().unwrap(), want.y.to_vec().unwrap());
        assert_eq!(values(g.dx.as_ref()), values(gw.dx.as_ref()));
        assert_eq!(values(g.dweight.as_ref()), values(gw.dweight.as_ref()));
        assert_eq!(bn.state().unwrap(), local.state().unwrap());
        assert_eq!(
            counted.load(Ordering::SeqCst),
            0,
            "a group of one communicated"
        );
        let one = tensor(ctx, &[1.0, 2.0], &[1, 2], Layout::ChannelsFirst);
        assert!(matches!(
            bn.forward_train(&one),
            Err(Error::TooFewValuesPerChannel { .. })
        ));
    });
}

#[test]
fn from_batch_norm_keeps_configuration_mode_and_state() {
    let ctx = &backends()[0];
    let config = BatchNormConfig::new(3).cumulative_average().eps(1e-3);
    let mut bn = BatchNorm::new(ctx, config).unwrap();
    let case = Case::new(&[4, 3], Layout::ChannelsFirst, config, 0xF);
    bn.load_state(&case.initial).unwrap();
    bn.eval();
    let sync = SyncBatchNorm::from_batch_norm(&bn, Arc::new(group(1).pop().unwrap())).unwrap();
    assert_eq!(sync.config(), &config);
    assert!(!sync.is_training());
    assert_eq!(sync.state().unwrap(), case.initial);
    assert_eq!((sync.rank(), sync.world_size()), (0, 1));
}

// ---- 2. the communicator ----

/// A communicator that counts the values it sends.
struct Counting<C> {
    inner: C,
    sent: Arc<AtomicUsize>,
}

impl<C> Counting<C> {
    fn new(inner: C, sent: Arc<AtomicUsize>) -> Self {
        Self { inner, sent }
    }
}

impl<C: Communicator> Communicator for Counting<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_gather(&self, send: &[f64]) -> wgpu_batchnorm::Result<Vec<f64>> {
        self.sent.fetch_add(send.len(), Ordering::SeqCst);
        self.inner.all_gather(send)
    }
    fn all_reduce_sum(&self, send: &[f64]) -> wgpu_batchnorm::Result<Vec<f64>> {
        self.sent.fetch_add(send.len(), Ordering::SeqCst);
        self.inner.all_reduce_sum(send)
    }
}

#[test]
fn collectives_gather_in_rank_order_and_sum() {
    for world in 1..=4 {
        let outs = run_group(group(world), move |comm| {
            let r = comm.rank() as f64;
            assert_eq!(comm.world_size(), world);
            let g = comm.all_gather(&[r, 10.0 + r]).unwrap();
            let s = comm.all_reduce_sum(&[r, 1.0, 0.5]).unwrap();
            let empty = comm.all_gather(&[]).unwrap();
            (g, s, empty)
        });
        let want_g: Vec<f64> = (0..world)
            .flat_map(|r| [r as f64, 10.0 + r as f64])
            .collect();
        let n = world as f64;
        let want_s = vec![n * (n - 1.0) / 2.0, n, 0.5 * n];
        for (rank, (g, s, e)) in outs.iter().enumerate() {
            assert_eq!(g, &want_g, "world {world} rank {rank}: all_gather");
            assert_eq!(s, &want_s, "world {world} rank {rank}: all_reduce_sum");
            assert!(e.is_empty());
        }
    }
    assert!(matches!(
        LocalComm::group(0),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn mismatched_collectives_fail_on_every_rank_and_the_group_goes_on() {
    let outs = run_group(group(3), |comm| {
        let rank = comm.rank();
        let len = if rank == 1 { 3 } else { 2 };
        let a = comm.all_gather(&vec![1.0; len]);
        let b = if rank == 2 {
            comm.all_reduce_sum(&[1.0, 2.0])
        } else {
            comm.all_gather(&[1.0, 2.0])
        };
        let c = comm.all_reduce_sum(&[rank as f64]);
        (a, b, c)
    });
    for (rank, (a, b, c)) in outs.into_iter().enumerate() {
        assert!(
            matches!(&a, Err(Error::Communication(m)) if m.contains("rank 1")),
            "rank {rank}: lengths: {a:?}"
        );
        assert!(
            matches!(&b, Err(Error::Communication(m)) if m.contains("all_reduce_sum")),
            "rank {rank}: kinds: {b:?}"
        );
        assert_eq!(c.unwrap(), vec![3.0], "rank {rank}: the next collective");
    }
}

#[test]
fn a_step_exchanges_the_documented_lengths() {
    let ctx = &backends()[0];
    for (world, sync_params, affine) in [(2, false, true), (3, true, true), (4, true, false)] {
        let sent = Arc::new(AtomicUsize::new(0));
        let s2 = sent.clone();
        let outs = run_group(group(world), move |comm| {
            let counting = Counting::new(comm, Arc::new(AtomicUsize::new(0)));
            let mine = counting.sent.clone();
            let config = BatchNormConfig::new(5).affine(affine);
            let mut bn = SyncBatchNorm::new(ctx, config, Arc::new(counting))
                .unwrap()
                .sync_affine_grads(sync_params);
            let x = tensor(
                ctx,
                &normal(30, 4, 0.0, 1.0),
                &[6, 5],
                Layout::ChannelsFirst,
            );
            let out = bn.forward_train(&x).unwrap();
            let fwd = mine.load(Ordering::SeqCst);
            bn.backward(&x, &x, &out.saved).unwrap();
            let bwd = mine.load(Ordering::SeqCst) - fwd;
            // dγ and dβ alone, not summed: local, nothing exchanged.
            if !sync_params {
                bn.backward_with_mask(&x, &x, &out.saved, GradMask::PARAMS)
                    .unwrap();
                assert_eq!(mine.load(Ordering::SeqCst), fwd + bwd, "PARAMS exchanged");
            }
            s2.fetch_add(fwd + bwd, Ordering::SeqCst);
            ((fwd, bwd), bn.exchange_lengths())
        });
        for (rank, (got, documented)) in outs.iter().enumerate() {
            assert_eq!(got, documented, "world {world} rank {rank}");
        }
        let c = 5;
        let params = if sync_params && affine { 2 * c } else { 0 };
        assert_eq!(
            outs[0].1,
            (4 + 2 * c, 2 * world + 2 + 2 * c + params),
            "the module docs' layout"
        );
        assert!(sent.load(Ordering::SeqCst) > 0);
    }
}

// ---- 3. bad input on some ranks ----

/// The group's shared case for the bad-input tests: (6, 3, 4), split 2/2/2.
fn small_case() -> Arc<Case> {
    Arc::new(Case::new(
        &[6, 3, 4],
        Layout::ChannelsFirst,
        BatchNormConfig::new(3),
        0xBAD,
    ))
}

/// What a rank saw in a step that was meant to fail somewhere: its error, whether its state
/// stayed as it was, and whether a good step afterwards worked.
type BadStep = (Error, bool, bool);

/// On every backend, a group of three where `bad(rank, ctx, good_x)` gives the x each rank
/// passes to a training forward (`good_x` for a rank with nothing wrong) and, where
/// `in_backward`, the dy of the backward that follows a good forward.
fn run_bad_step(
    ctx: &'static Context,
    sizes: [usize; 3],
    bad: impl Fn(usize, &Context, Tensor) -> Tensor + Send + Sync + 'static,
    in_backward: bool,
) -> Vec<BadStep> {
    let case = small_case();
    run_group(group(3), move |comm| {
        let rank = comm.rank();
        let (dims, range) = case.part(&sizes, rank);
        let mut bn = SyncBatchNorm::new(ctx, case.config, Arc::new(comm)).unwrap();
        bn.load_state(&case.initial).unwrap();
        let (x, dy) = &case.steps[0];
        let good_x = tensor(ctx, &x[range.clone()], &dims, Layout::ChannelsFirst);
        let good_dy = tensor(ctx, &dy[range], &dims, Layout::ChannelsFirst);
        let err = if in_backward {
            let out = bn.forward_train(&good_x).unwrap();
            let after_forward = bn.state().unwrap();
            let dy = bad(rank, ctx, good_dy.clone());
            let e = bn.backward(&dy, &good_x, &out.saved).unwrap_err();
            assert_eq!(bn.state().unwrap(), after_forward);
            e
        } else {
            let x = bad(rank, ctx, good_x.clone());
            bn.forward_train(&x).unwrap_err()
        };
        let unchanged = in_backward || bn.state().unwrap() == case.initial;
        // The group goes on: a good step on every rank.
        let ok = bn
            .forward_train(&good_x)
            .and_then(|out| bn.backward(&good_dy, &good_x, &out.saved))
            .is_ok();
        (err, unchanged, ok)
    })
}

/// Checks a bad step: each rank of `bad_ranks` got the error `own` accepts, every other
/// rank [`Error::PeerFailed`] naming `peer_rank`; every state unchanged, every next step
/// fine.
#[track_caller]
fn assert_failed_everywhere(
    what: &str,
    outs: &[BadStep],
    bad_ranks: &[usize],
    own: impl Fn(usize, &Error) -> bool,
    peer_rank: usize,
) {
    for (rank, (e, unchanged, ok)) in outs.iter().enumerate() {
        if bad_ranks.contains(&rank) {
            assert!(
                own(rank, e),
                "{what}: rank {rank}: not its own error: {e:?}"
            );
        } else {
            assert!(
                matches!(e, Error::PeerFailed { rank: r, .. } if *r == peer_rank),
                "{what}: rank {rank}: expected PeerFailed naming rank {peer_rank}, got {e:?}"
            );
        }
        assert!(
            *unchanged,
            "{what}: rank {rank}: the failed step changed the state"
        );
        assert!(*ok, "{what}: rank {rank}: the next step failed");
    }
}

#[test]
fn a_wrong_channel_count_on_one_rank_fails_every_rank() {
    on_one_backend_each(|ctx| {
        let outs = run_bad_step(
            ctx,
            [2, 2, 2],
            |rank, ctx, x| {
                if rank == 1 {
                    tensor(
                        ctx,
                        &normal(16, 9, 0.0, 1.0),
                        &[2, 4, 2],
                        Layout::ChannelsFirst,
                    )
                } else {
                    x
                }
            },
            false,
        );
        let own = |_, e: &Error| {
            matches!(
                e,
                Error::ChannelMismatch {
                    expected: 3,
                    got: 4,
                    ..
                }
            )
        };
        assert_failed_everywhere("channels", &outs, &[1], own, 1);
        let Error::PeerFailed { reason, .. } = &outs[0].0 else {
            unreachable!()
        };
        assert!(reason.contains("4 channels"), "{reason}");
    });
}

#[test]
fn an_input_of_bad_rank_or_another_context_on_one_rank_fails_every_rank() {
    on_one_backend_each(|ctx| {
        let outs = run_bad_step(
            ctx,
            [2, 2, 2],
            |rank, ctx, x| {
                if rank == 2 {
                    tensor(ctx, &[1.0; 6], &[6], Layout::ChannelsFirst)
                } else {
                    x
                }
            },
            false,
        );
        let own = |_, e: &Error| matches!(e, Error::InvalidRank { .. });
        assert_failed_everywhere("rank", &outs, &[2], own, 2);

        let outs = run_bad_step(
            ctx,
            [2, 2, 2],
            |rank, _, x| {
                if rank == 0 {
                    // The same values on a context of its own.
                    let other = Context::cpu();
                    other
                        .tensor_from_slice(&x.to_vec().unwrap(), x.dims())
                        .unwrap()
                } else {
                    x
                }
            },
            false,
        );
        let own = |_, e: &Error| matches!(e, Error::ContextMismatch { .. });
        assert_failed_everywhere("context", &outs, &[0], own, 0);
    });
}

#[test]
fn several_failing_ranks_are_all_named() {
    on_one_backend_each(|ctx| {
        let outs = run_bad_step(
            ctx,
            [2, 2, 2],
            |rank, ctx, x| match rank {
                0 => tensor(ctx, &[0.0; 10], &[2, 5], Layout::ChannelsFirst),
                2 => tensor(ctx, &[1.0; 6], &[6], Layout::ChannelsFirst),
                _ => x,
            },
            false,
        );
        let own = |rank, e: &Error| {
            (rank == 0 && matches!(e, Error::ChannelMismatch { .. }))
                || (rank == 2 && matches!(e, Error::InvalidRank { .. }))
        };
        assert_failed_everywhere("two ranks", &outs, &[0, 2], own, 0);
        let Error::PeerFailed { reason, .. } = &outs[1].0 else {
            unreachable!()
        };
        assert!(reason.contains("[2]"), "rank 2 is named too: {reason}");
    });
}

#[test]
fn a_bad_dy_on_one_rank_fails_every_ranks_backward() {
    on_one_backend_each(|ctx| {
        let outs = run_bad_step(
            ctx,
            [3, 0, 3],
            |rank, ctx, dy| {
                if rank == 2 {
                    tensor(ctx, &[1.0; 9], &[3, 3], Layout::ChannelsFirst)
                } else {
                    dy
                }
            },
            true,
        );
        let own = |_, e: &Error| matches!(e, Error::ShapeMismatch { .. });
        assert_failed_everywhere("dy", &outs, &[2], own, 2);
    });
}

#[test]
fn a_globally_too_small_batch_fails_every_rank_and_one_value_on_a_rank_does_not() {
    on_one_backend_each(|ctx| {
        // One value per channel in all: rank 0 holds it, the others are empty.
        let case = Arc::new(Case::new(
            &[2, 3],
            Layout::ChannelsFirst,
            BatchNormConfig::new(3),
            0x70,
        ));
        let c2 = case.clone();
        let outs = run_group(group(3), move |comm| {
            let rank = comm.rank();
            let sizes = [1, 0, 0];
            let (dims, range) = c2.part(&[1, 0, 1], rank);
            let mut bn = SyncBatchNorm::new(ctx, c2.config, Arc::new(comm)).unwrap();
            bn.load_state(&c2.initial).unwrap();
            let dims1 = [sizes[rank], 3];
            let x1 = tensor(
                ctx,
                &c2.steps[0].0[..3 * sizes[rank]],
                &dims1,
                Layout::ChannelsFirst,
            );
            let e = bn.forward_train(&x1).unwrap_err();
            let unchanged = bn.state().unwrap() == c2.initial;
            // Two ranks with one value each: two in all, fine (PyTorch's rule too).
            let x2 = tensor(ctx, &c2.steps[0].0[range], &dims, Layout::ChannelsFirst);
            let ok = bn.forward_train(&x2).map(|o| o.y.to_vec().unwrap());
            (e, unchanged, ok)
        });
        let whole = run_whole(ctx, &case);
        for (rank, (e, unchanged, ok)) in outs.into_iter().enumerate() {
            assert!(
                matches!(e, Error::TooFewValuesPerChannel { .. }),
                "rank {rank}: {e:?}"
            );
            assert!(unchanged, "rank {rank}: state changed");
            let y = ok.unwrap_or_else(|e| panic!("rank {rank}: one value here: {e}"));
            let (_, range) = case.part(&[1, 0, 1], rank);
            let want = widen(&whole.steps[0].y[range]);
            // Two values per channel normalize to ±1·γ + β: y within the y tolerance.
            assert_close(&format!("rank {rank}: y"), &y, &want, Y_ATOL, Y_RTOL);
        }
    });
}

// ---- 4. a rank that drops out ----

/// A group of three whose ranks 0 and 1 run training steps on the CPU path while rank 2
/// does `rank2`; returns ranks 0 and 1's first error and the time it took, and rank 2's
/// outcome (a panic in it included).
fn others_while_rank2(
    timeout: Duration,
    rank2: impl Fn(LocalComm, &Context) + Send + Sync + 'static,
) -> (Vec<(Error, Duration)>, std::thread::Result<()>) {
    let ctx = backends()[0].clone();
    assert_eq!(ctx.backend_kind(), "cpu");
    let comms = LocalComm::group_with_timeout(3, timeout).unwrap();
    let mut outs = run_group_raw(comms, move |comm| {
        if comm.rank() == 2 {
            rank2(comm, &ctx);
            return None;
        }
        let mut bn = SyncBatchNorm::new(&ctx, BatchNormConfig::new(2), Arc::new(comm)).unwrap();
        let x = tensor(
            &ctx,
            &normal(8, 1, 0.0, 1.0),
            &[4, 2],
            Layout::ChannelsFirst,
        );
        let start = Instant::now();
        for _ in 0..3 {
            let r = bn
                .forward_train(&x)
                .and_then(|o| bn.backward(&x, &x, &o.saved));
            if let Err(e) = r {
                return Some((e, start.elapsed()));
            }
        }
        panic!("three steps succeeded without rank 2");
    });
    let rank2 = outs.pop().expect("rank 2").map(|r| assert!(r.is_none()));
    let others = outs
        .into_iter()
        .enumerate()
        .map(|(rank, r)| match r {
            Ok(Some(v)) => v,
            Ok(None) => unreachable!("ranks 0 and 1 return their error"),
            Err(p) => {
                eprintln!("rank {rank} panicked");
                std::panic::resume_unwind(p)
            }
        })
        .collect();
    (others, rank2)
}

/// A group timeout no passing test waits for: errors must come from the drop-out itself.
const LONG: Duration = Duration::from_secs(3600);

#[test]
fn a_rank_that_panics_makes_the_others_fail_not_hang() {
    // Before its first forward, and between a forward and its backward.
    for steps_first in [false, true] {
        let (outs, rank2) = others_while_rank2(LONG, move |comm, ctx| {
            let mut bn = SyncBatchNorm::new(ctx, BatchNormConfig::new(2), Arc::new(comm)).unwrap();
            if steps_first {
                let x = tensor(ctx, &normal(6, 2, 0.0, 1.0), &[3, 2], Layout::ChannelsFirst);
                bn.forward_train(&x).unwrap();
            }
            panic!("rank 2 drops out on purpose (this panic is part of the test)");
        });
        assert!(rank2.is_err(), "rank 2 panicked");
        for (rank, (e, _)) in outs.iter().enumerate() {
            assert!(
                matches!(e, Error::Communication(m) if m.contains("rank 2 panicked")),
                "steps first {steps_first}: rank {rank}: {e:?}"
            );
        }
    }
}

#[test]
fn a_rank_that_leaves_makes_the_others_fail_not_hang() {
    let (outs, rank2) = others_while_rank2(LONG, |comm, ctx| {
        let mut bn = SyncBatchNorm::new(ctx, BatchNormConfig::new(2), Arc::new(comm)).unwrap();
        let x = tensor(ctx, &normal(6, 2, 0.0, 1.0), &[3, 2], Layout::ChannelsFirst);
        let out = bn.forward_train(&x).unwrap();
        bn.backward(&x, &x, &out.saved).unwrap();
        // Returns after one step: the layer and its communicator are dropped.
    });
    assert!(rank2.is_ok(), "rank 2 ran its step");
    for (rank, (e, _)) in outs.iter().enumerate() {
        assert!(
            matches!(e, Error::Communication(m) if m.contains("rank 2 left")),
            "rank {rank}: {e:?}"
        );
    }
}

#[test]
fn a_rank_that_never_arrives_times_the_others_out() {
    let timeout = Duration::from_millis(500);
    let (outs, rank2) = others_while_rank2(timeout, move |comm, _| {
        std::thread::sleep(4 * timeout);
        // Arriving late: the group is broken by then, so rank 2 fails too, at once.
        let start = Instant::now();
        let e = comm.all_gather(&[1.0]).unwrap_err();
        assert!(matches!(e, Error::Communication(_)), "{e:?}");
        assert!(start.elapsed() < timeout, "the late rank waited");
        assert!(comm.broken().is_some());
    });
    if let Err(p) = rank2 {
        std::panic::resume_unwind(p);
    }
    for (rank, (e, took)) in outs.iter().enumerate() {
        assert!(
            matches!(e, Error::Communication(m) if m.contains("waited")),
            "rank {rank}: {e:?}"
        );
        // The first rank to time out breaks the group for the other, which may have started
        // its wait a little later: half the timeout is a safe lower bound for both.
        assert!(*took >= timeout / 2, "rank {rank} gave up after {took:?}");
        assert!(*took < 3 * timeout, "rank {rank} took {took:?}");
    }
}

#[test]
fn a_rank_whose_device_is_lost_fails_every_rank() {
    backends();
    let fresh: Vec<Context> = Context::all_gpus()
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    if fresh.is_empty() {
        eprintln!("!!! NO GPU ADAPTER: the lost-device case runs on no rank");
    }
    for gpu in fresh {
        let name = describe(&gpu);
        let _gl = (gpu.backend_kind() == "gl").then(gl_lock);
        let cpu = Context::cpu();
        let outs = run_group(group(3), move |comm| {
            let rank = comm.rank();
            let ctx = if rank == 1 { gpu.clone() } else { cpu.clone() };
            let mut bn = SyncBatchNorm::new(&ctx, BatchNormConfig::new(2), Arc::new(comm)).unwrap();
            let x = tensor(
                &ctx,
                &normal(8, 3, 0.0, 1.0),
                &[4, 2],
                Layout::ChannelsFirst,
            );
            if rank == 1 {
                ctx.wgpu().unwrap().0.destroy();
            }
            let e = bn.forward_train(&x).unwrap_err();
            (e, bn.num_batches_tracked())
        });
        for (rank, (e, nbt)) in outs.iter().enumerate() {
            assert_eq!(*nbt, Some(0), "{name}: rank {rank}: state changed");
            if rank == 1 {
                assert!(
                    matches!(
                        e,
                        Error::DeviceLost(_) | Error::GpuValidation(_) | Error::Readback(_)
                    ),
                    "{name}: rank 1: {e:?}"
                );
            } else {
                assert!(
                    matches!(e, Error::PeerFailed { rank: 1, reason } if reason.contains("device")),
                    "{name}: rank {rank}: {e:?}"
                );
            }
        }
    }
}
