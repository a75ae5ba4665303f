//! `SyncBatchNorm` across MPI processes, checked against single-process `BatchNorm`, and
//! what the synchronization costs.
//!
//! ```text
//! cargo build --release --features mpi --example sync_bn
//! mpirun -np 4 target/release/examples/sync_bn [--check] [--backend cpu|gpu|both]
//! mpirun -np 4 target/release/examples/sync_bn --bench [--backend cpu|gpu] [--steps N] [--rounds R]
//! mpirun -np 2 target/release/examples/sync_bn --drop-out [--no-abort-on-panic]
//! ```
//!
//! - `--check` (the default): every rank generates the same batches (deterministic), takes
//!   its part of each (parts of random sizes, empty ones included), runs two training steps
//!   through `SyncBatchNorm`, and compares its y, dx, saved statistics and running
//!   statistics, and the rank-sum of dγ and dβ, with one `BatchNorm` on the whole batch on
//!   its own context, with float32, float16 and bfloat16 storage; then bad input on one
//!   rank (a wrong channel count, a dy of another shape) and a globally too-small batch
//!   must fail on every rank with nothing changed. It
//!   prints each rank's agreement and exits non-zero on every rank if any rank disagrees.
//!   `--backend gpu` gives each process its own GPU context (`Context::new()`; choose the
//!   adapter with `WGPU_BACKEND`); no adapter is a failure, never a skip.
//! - `--bench`: per-step time of a training forward + backward, local `BatchNorm` against
//!   `SyncBatchNorm` on the same per-rank shape, and the bytes each rank exchanges per step.
//! - `--drop-out`: rank 1 panics in the middle of a step while the others wait in a
//!   collective; with `MpiComm::abort_on_panic` the job must end (non-zero) instead of
//!   hanging. `--no-abort-on-panic` leaves the hook out, to see what happens without it.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

use wgpu_batchnorm::dist::mpi::MpiComm;
use wgpu_batchnorm::half::{bf16, f16};
use wgpu_batchnorm::{
    BatchNorm, BatchNormConfig, BatchNormState, Communicator, Context, DType, Error, Layout,
    Result, SyncBatchNorm, Tensor,
};

// ---- deterministic data, the same on every rank ----

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// mean + std·N(0, 1) (Box–Muller).
    fn normal(&mut self, len: usize, mean: f64, std: f64) -> Vec<f32> {
        (0..len)
            .map(|_| {
                let (u1, u2) = (self.uniform(), self.uniform());
                let g = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                (mean + std * g) as f32
            })
            .collect()
    }

    /// Uniform in lo..=hi.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

/// A batch of shape `dims` (channels-first) over two steps, with its configuration and
/// initial state, split along N into `sizes` (one part per rank).
struct Case {
    dims: Vec<usize>,
    config: BatchNormConfig,
    steps: Vec<(Vec<f32>, Vec<f32>)>,
    initial: BatchNormState,
    sizes: Vec<usize>,
}

impl Case {
    /// Case `i` for `world` ranks; with `even_rows`, rows (C × spatial) of an even length,
    /// which a GPU stores in a half type (the last dimension doubled where needed).
    fn random(i: usize, world: usize, even_rows: bool) -> Self {
        let mut rng = Rng(0x5EED + i as u64);
        let mut c = rng.range(1, 8);
        let n = rng.range(2, 3 * world + 2);
        let mut dims = match i % 3 {
            0 => vec![n, c],
            1 => vec![n, c, rng.range(1, 5), rng.range(1, 5)],
            _ => vec![n, c, rng.range(1, 9)],
        };
        if even_rows && dims[1..].iter().product::<usize>() % 2 == 1 {
            *dims.last_mut().expect("rank 2 or more") *= 2;
            c = dims[1];
        }
        let config = match i % 3 {
            0 => BatchNormConfig::new(c),
            1 => BatchNormConfig::new(c).cumulative_average(),
            _ => BatchNormConfig::new(c).momentum(0.3),
        };
        let numel: usize = dims.iter().product();
        let steps = (0..2)
            .map(|s| {
                (
                    rng.normal(numel, 0.5 + s as f64, 1.5),
                    rng.normal(numel, 0.0, 1.0),
                )
            })
            .collect();
        let initial = BatchNormState {
            weight: Some(rng.normal(c, 1.0, 0.25)),
            bias: Some(rng.normal(c, 0.0, 0.5)),
            running_mean: Some(rng.normal(c, 0.0, 0.5)),
            running_var: Some(
                rng.normal(c, 1.0, 0.1)
                    .iter()
                    .map(|v| v.abs() + 0.5)
                    .collect(),
            ),
            num_batches_tracked: Some(2),
        };
        // Case 0: the whole batch on the last rank; then uniform cut points (empty parts
        // included).
        let mut sizes = vec![0; world];
        if i == 0 {
            sizes[world - 1] = n;
        } else {
            let mut cuts: Vec<usize> = (1..world).map(|_| rng.range(0, n)).collect();
            cuts.sort_unstable();
            cuts.push(n);
            let mut prev = 0;
            for (s, cut) in sizes.iter_mut().zip(cuts) {
                *s = cut - prev;
                prev = cut;
            }
        }
        Self {
            dims,
            config,
            steps,
            initial,
            sizes,
        }
    }

    fn row(&self) -> usize {
        self.dims[1..].iter().product()
    }

    fn part(&self, rank: usize) -> (Vec<usize>, std::ops::Range<usize>) {
        let start: usize = self.sizes[..rank].iter().sum();
        let mut d = self.dims.clone();
        d[0] = self.sizes[rank];
        (
            d,
            start * self.row()..(start + self.sizes[rank]) * self.row(),
        )
    }
}

// ---- comparisons ----

/// max |got − want| / (atol + rtol·|want|): ≤ 1 passes.
fn worst(got: &[f32], want: &[f32], atol: f64, rtol: f64) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).abs() / (atol + rtol * (w as f64).abs()))
        .fold(0.0, f64::max)
}

fn max_abs(v: &[f32]) -> f64 {
    v.iter().map(|x| x.abs() as f64).fold(0.0, f64::max)
}

struct Step {
    y: Vec<f32>,
    dx: Vec<f32>,
    dweight: Vec<f32>,
    dbias: Vec<f32>,
    mean: Vec<f32>,
    invstd: Vec<f32>,
}

fn read(t: Option<&Tensor>) -> Result<Vec<f32>> {
    t.expect("asked for").to_vec()
}

/// A tensor of `dtype` holding `v` (rounded to it, to nearest even).
fn tensor(ctx: &Context, v: &[f32], dims: &[usize], dtype: DType) -> Result<Tensor> {
    match dtype {
        DType::F16 => {
            let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            ctx.tensor_from_half(&h, dims, Layout::ChannelsFirst)
        }
        DType::BF16 => {
            let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            ctx.tensor_from_half(&h, dims, Layout::ChannelsFirst)
        }
        _ => ctx.tensor_from_slice(v, dims),
    }
}

/// `v` rounded to `dtype` (what a tensor of it holds).
fn rounded(v: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F16 => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
        DType::BF16 => v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
        _ => v.to_vec(),
    }
}

/// One unit in the last place, relative, of a value stored in `dtype`. A half y or dx is
/// an f32 result rounded once; the part's and the whole batch's f32 results differ in
/// their last bits (other summation orders), which can round to neighbouring half values.
fn storage_ulp(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 1.0 / 1024.0,
        DType::BF16 => 1.0 / 128.0,
        _ => 0.0,
    }
}

/// Runs and checks every case on `ctx`; returns (passed, failed) checks of this rank.
fn check_backend(ctx: &Context, comm: &Rc<MpiComm>) -> Result<(usize, usize)> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let (mut passed, mut failed) = (0, 0);
    let mut report = |what: String, ratio: f64| {
        let ok = ratio <= 1.0;
        if ok {
            passed += 1;
        } else {
            failed += 1;
        }
        println!(
            "rank {rank}/{world} [{}] {what}: worst |err|/tol {ratio:.3} {}",
            ctx.name(),
            if ok { "PASS" } else { "FAIL" }
        );
    };
    for (i, dtype) in (0..6).flat_map(|i| [DType::F32, DType::F16, DType::BF16].map(|d| (i, d))) {
        let case = Case::random(i, world, dtype != DType::F32);
        let (dims, range) = case.part(rank);
        let mut sync = SyncBatchNorm::new(ctx, case.config, comm.clone())?;
        sync.load_state(&case.initial)?;
        let mut whole = BatchNorm::new(ctx, case.config)?;
        whole.load_state(&case.initial)?;
        let name = format!("case {i} {dtype} {:?} split {:?}", case.dims, case.sizes);
        for (s, (x, dy)) in case.steps.iter().enumerate() {
            let (x, dy) = (&rounded(x, dtype), &rounded(dy, dtype));
            let xr = tensor(ctx, &x[range.clone()], &dims, dtype)?;
            let dyr = tensor(ctx, &dy[range.clone()], &dims, dtype)?;
            let out = sync.forward_train(&xr)?;
            let g = sync.backward(&dyr, &xr, &out.saved)?;
            let dtypes = [out.y.dtype(), g.dx.as_ref().expect("asked for").dtype()];
            let mine = Step {
                y: out.y.to_vec()?,
                dx: read(g.dx.as_ref())?,
                dweight: read(g.dweight.as_ref())?,
                dbias: read(g.dbias.as_ref())?,
                mean: out.saved.mean()?,
                invstd: out.saved.invstd()?,
            };
            let (xw, dyw) = (
                tensor(ctx, x, &case.dims, dtype)?,
                tensor(ctx, dy, &case.dims, dtype)?,
            );
            let out = whole.forward_train(&xw)?;
            let g = whole.backward(&dyw, &xw, &out.saved)?;
            let want = Step {
                y: out.y.to_vec()?[range.clone()].to_vec(),
                dx: read(g.dx.as_ref())?[range.clone()].to_vec(),
                dweight: read(g.dweight.as_ref())?,
                dbias: read(g.dbias.as_ref())?,
                mean: out.saved.mean()?,
                invstd: out.saved.invstd()?,
            };
            // The rank-sum of dγ and dβ (an all-reduce, as data-parallel training does).
            let local: Vec<f64> = mine
                .dweight
                .iter()
                .chain(&mine.dbias)
                .map(|&v| v as f64)
                .collect();
            let summed: Vec<f32> = comm
                .all_reduce_sum(&local)?
                .iter()
                .map(|&v| v as f32)
                .collect();
            let c = case.dims[1];
            let (dw_sum, db_sum) = summed.split_at(c);
            // Tolerances (f32 ε ≈ 6e-8, O(1) data) as in tests/functional.rs: y and the
            // saved statistics to a handful of roundings; dx to 1e-5 of its terms' scale
            // max|γ|·invstd·max|dy| (its terms may cancel); dγ, dβ to 1e-5 of Σ|dy|·scale
            // over the whole batch (the worst case of an f32 sum of the terms, any order);
            // a half y or dx one storage ulp more (storage_ulp).
            let gamma = max_abs(case.initial.weight.as_ref().unwrap());
            let invstd = max_abs(&want.invstd);
            let max_dy = max_abs(dy);
            let n_values = (x.len() / c) as f64;
            let xhat = 8.0; // |x − μ|·invstd of normal data of ≲ 40 values
            let at = format!("{name} step {s}");
            report(
                format!("{at} y and dx dtypes {dtypes:?}"),
                if dtypes == [dtype; 2] {
                    0.0
                } else {
                    f64::INFINITY
                },
            );
            let ulp = storage_ulp(dtype);
            report(format!("{at} y"), worst(&mine.y, &want.y, 2e-5, 2e-5 + ulp));
            report(
                format!("{at} saved mean"),
                worst(&mine.mean, &want.mean, 1e-6, 1e-5),
            );
            report(
                format!("{at} saved invstd"),
                worst(&mine.invstd, &want.invstd, 0.0, 1e-5),
            );
            let dx_atol = 1e-5 * gamma * invstd * max_dy;
            report(
                format!("{at} dx"),
                worst(&mine.dx, &want.dx, dx_atol, 1e-5 + ulp),
            );
            let dw_atol = 1e-5 * n_values * max_dy * xhat;
            report(
                format!("{at} rank-sum dγ"),
                worst(dw_sum, &want.dweight, dw_atol, 0.0),
            );
            let db_atol = 1e-5 * n_values * max_dy;
            report(
                format!("{at} rank-sum dβ"),
                worst(db_sum, &want.dbias, db_atol, 0.0),
            );
        }
        let (got, want) = (sync.state()?, whole.state()?);
        report(
            format!("{name} running_mean"),
            worst(
                got.running_mean.as_ref().unwrap(),
                want.running_mean.as_ref().unwrap(),
                1e-6,
                1e-5,
            ),
        );
        report(
            format!("{name} running_var"),
            worst(
                got.running_var.as_ref().unwrap(),
                want.running_var.as_ref().unwrap(),
                0.0,
                1e-5,
            ),
        );
        report(
            format!("{name} num_batches_tracked"),
            if got.num_batches_tracked == want.num_batches_tracked {
                0.0
            } else {
                f64::INFINITY
            },
        );
    }
    let (p, f) = check_bad_input(ctx, comm)?;
    Ok((passed + p, failed + f))
}

/// Bad input on the last rank, and a globally too-small batch: an error on every rank,
/// nothing changed, and the next step fine.
fn check_bad_input(ctx: &Context, comm: &Rc<MpiComm>) -> Result<(usize, usize)> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let last = world - 1;
    let (mut passed, mut failed) = (0, 0);
    let mut report = |what: &str, ok: bool, detail: String| {
        if ok {
            passed += 1;
        } else {
            failed += 1;
        }
        println!(
            "rank {rank}/{world} [{}] {what}: {detail} {}",
            ctx.name(),
            if ok { "PASS" } else { "FAIL" }
        );
    };
    let c = 3;
    let mut bn = SyncBatchNorm::new(ctx, BatchNormConfig::new(c), comm.clone())?;
    let before = bn.state()?;
    let good = ctx.tensor_from_slice(&Rng(rank as u64).normal(2 * c * 4, 0.0, 1.0), &[2, c, 4])?;
    let expect = |e: &Error, own: fn(&Error) -> bool| {
        if world == 1 || rank == last {
            own(e)
        } else {
            matches!(e, Error::PeerFailed { rank: r, .. } if *r == last)
        }
    };
    if world > 1 {
        // A wrong channel count on the last rank.
        let x = if rank == last {
            ctx.tensor_from_slice(&[0.5; 2 * 5 * 4], &[2, 5, 4])?
        } else {
            good.clone()
        };
        match bn.forward_train(&x) {
            Err(e) => {
                let ok = expect(&e, |e| matches!(e, Error::ChannelMismatch { got: 5, .. }));
                report(
                    "wrong channels on the last rank",
                    ok && bn.state()? == before,
                    e.to_string(),
                );
            }
            Ok(_) => report("wrong channels on the last rank", false, "no error".into()),
        }
        // A dy of another shape on the last rank.
        let out = bn.forward_train(&good)?;
        let after = bn.state()?;
        let dy = if rank == last {
            ctx.tensor_from_slice(&vec![1.0; 2 * c], &[2, c])?
        } else {
            good.clone()
        };
        match bn.backward(&dy, &good, &out.saved) {
            Err(e) => {
                let ok = expect(&e, |e| matches!(e, Error::ShapeMismatch { .. }));
                report(
                    "bad dy on the last rank",
                    ok && bn.state()? == after,
                    e.to_string(),
                );
            }
            Ok(_) => report("bad dy on the last rank", false, "no error".into()),
        }
        bn.backward(&good, &good, &out.saved)?;
    }
    // One value per channel in all, on rank 0.
    let state = bn.state()?;
    let n = usize::from(rank == 0);
    let x = ctx.tensor_from_slice(&vec![1.5; n * c], &[n, c])?;
    match bn.forward_train(&x) {
        Err(e @ Error::TooFewValuesPerChannel { .. }) => {
            report("globally too small", bn.state()? == state, e.to_string())
        }
        other => report("globally too small", false, format!("{other:?}")),
    }
    Ok((passed, failed))
}

fn gpu_context() -> Result<Context> {
    Context::new()
}

fn contexts(backend: &str) -> Result<Vec<Context>> {
    let mut out = Vec::new();
    if matches!(backend, "cpu" | "both") {
        out.push(Context::cpu());
    }
    if matches!(backend, "gpu" | "both") {
        out.push(gpu_context()?);
    }
    if out.is_empty() {
        return Err(Error::InvalidArgument {
            op: "sync_bn",
            reason: format!("--backend {backend}: expected cpu, gpu or both"),
        });
    }
    Ok(out)
}

// ---- --bench ----

/// A communicator that adds up the time spent in its collectives.
struct Timed {
    inner: Rc<MpiComm>,
    ms: Cell<f64>,
}

impl Timed {
    fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.ms.set(self.ms.get() + t.elapsed().as_secs_f64() * 1e3);
        out
    }
}

impl Communicator for Timed {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_gather(&self, send: &[f64]) -> Result<Vec<f64>> {
        self.time(|| self.inner.all_gather(send))
    }
    fn all_reduce_sum(&self, send: &[f64]) -> Result<Vec<f64>> {
        self.time(|| self.inner.all_reduce_sum(send))
    }
}

/// Medians over `steps` training steps (forward + backward, dx read back) after warm-up,
/// every rank starting each step together: (step ms, ms of it in `timed`'s collectives).
fn time_steps(
    comm: &MpiComm,
    timed: Option<&Timed>,
    steps: usize,
    mut step: impl FnMut() -> Result<()>,
) -> Result<(f64, f64)> {
    for _ in 0..3 {
        step()?;
    }
    let (mut times, mut in_comm) = (Vec::with_capacity(steps), Vec::with_capacity(steps));
    for _ in 0..steps {
        comm.all_reduce_sum(&[0.0])?; // line the ranks up
        let before = timed.map_or(0.0, |t| t.ms.get());
        let t = Instant::now();
        step()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        in_comm.push(timed.map_or(0.0, |t| t.ms.get()) - before);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(times), median(in_comm)))
}

fn bench(ctx: &Context, comm: &Rc<MpiComm>, steps: usize, rounds: usize) -> Result<()> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let shapes: [&[usize]; 3] = [&[32, 256], &[8, 64, 8, 8], &[16, 64, 32, 32]];
    for dims in shapes {
        let c = dims[1];
        let numel: usize = dims.iter().product();
        let mut rng = Rng(rank as u64 + 1);
        let x = ctx.tensor_from_slice(&rng.normal(numel, 0.5, 1.0), dims)?;
        let dy = ctx.tensor_from_slice(&rng.normal(numel, 0.0, 1.0), dims)?;
        let config = BatchNormConfig::new(c);
        let mut local = BatchNorm::new(ctx, config)?;
        let timed = Rc::new(Timed {
            inner: comm.clone(),
            ms: Cell::new(0.0),
        });
        let mut sync = SyncBatchNorm::new(ctx, config, timed.clone())?;
        // Rounds interleaved, the best median of each side kept, so that drift and other
        // load hit both sides alike.
        let (mut t_local, mut t_sync, mut t_comm) = (f64::INFINITY, f64::INFINITY, 0.0);
        for _ in 0..rounds {
            let (l, _) = time_steps(comm, None, steps, || {
                let out = local.forward_train(&x)?;
                let g = local.backward(&dy, &x, &out.saved)?;
                g.dx.expect("dx").to_vec().map(|_| ())
            })?;
            t_local = t_local.min(l);
            let (s, in_comm) = time_steps(comm, Some(&timed), steps, || {
                let out = sync.forward_train(&x)?;
                let g = sync.backward(&dy, &x, &out.saved)?;
                g.dx.expect("dx").to_vec().map(|_| ())
            })?;
            if s < t_sync {
                (t_sync, t_comm) = (s, in_comm);
            }
        }
        // The slowest rank sets the pace of a data-parallel step.
        let all = comm.all_gather(&[t_local, t_sync, t_comm])?;
        let slowest = |k: usize| all.iter().skip(k).step_by(3).fold(0.0f64, |a, &b| a.max(b));
        let (fwd, bwd) = sync.exchange_lengths();
        if rank == 0 {
            let (l, s, m) = (slowest(0), slowest(1), slowest(2));
            println!(
                "bench [{}] world {world} per-rank {dims:?}: local {l:.3} ms, sync {s:.3} ms \
                 (of which {m:.3} ms in the two collectives), overhead {:.3} ms ({:+.0} %); \
                 bytes per rank per step: all-gather {} sent / {} received, all-reduce {} \
                 sent / {} received",
                ctx.name(),
                s - l,
                100.0 * (s - l) / l,
                8 * fwd,
                8 * fwd * world,
                8 * bwd,
                8 * bwd,
            );
        }
    }
    Ok(())
}

// ---- --drop-out ----

/// Rank 1 panics between its forward and its backward while the others wait in the
/// backward's all-reduce: the job must end.
fn drop_out(ctx: &Context, comm: &Rc<MpiComm>) -> Result<()> {
    let rank = comm.rank();
    let mut bn = SyncBatchNorm::new(ctx, BatchNormConfig::new(4), comm.clone())?;
    let x = ctx.tensor_from_slice(&Rng(rank as u64).normal(32, 0.0, 1.0), &[2, 4, 4])?;
    for step in 0..3 {
        let out = bn.forward_train(&x)?;
        if step == 1 && rank == 1 {
            panic!("rank 1 drops out on purpose, mid-step");
        }
        bn.backward(&x, &x, &out.saved)?;
    }
    eprintln!("rank {rank}: three steps completed, but rank 1 should have dropped out");
    std::process::exit(3)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let universe = mpi::initialize().expect("MPI initializes once");
    if !flag("--no-abort-on-panic") {
        MpiComm::abort_on_panic();
    }
    let comm = Rc::new(MpiComm::new(universe.world()));
    let (rank, world) = (comm.rank(), comm.world_size());
    let code = if flag("--drop-out") {
        if world < 2 {
            eprintln!("--drop-out needs at least 2 ranks");
            2
        } else {
            drop_out(&Context::cpu(), &comm)
                .map(|_| 0)
                .unwrap_or_else(|e| {
                    eprintln!("rank {rank}: {e}");
                    1
                })
        }
    } else if flag("--bench") {
        let backend = value("--backend").unwrap_or_else(|| "cpu".into());
        let steps = value("--steps").and_then(|s| s.parse().ok()).unwrap_or(30);
        let rounds = value("--rounds").and_then(|s| s.parse().ok()).unwrap_or(4);
        let run = || -> Result<()> {
            for ctx in contexts(&backend)? {
                bench(&ctx, &comm, steps, rounds)?;
            }
            Ok(())
        };
        run().map(|_| 0).unwrap_or_else(|e| {
            eprintln!("rank {rank}: {e}");
            1
        })
    } else {
        let backend = value("--backend").unwrap_or_else(|| "both".into());
        let run = || -> Result<(usize, usize)> {
            let mut total = (0, 0);
            for ctx in contexts(&backend)? {
                let (p, f) = check_backend(&ctx, &comm)?;
                total = (total.0 + p, total.1 + f);
            }
            Ok(total)
        };
        // An error on one rank (no adapter, a step that failed) counts as a failure there;
        // every rank still joins the final tally, so none waits for another.
        let (passed, failed) = run().unwrap_or_else(|e| {
            eprintln!("rank {rank}: FAIL: {e}");
            (0, 1)
        });
        match comm.all_reduce_sum(&[passed as f64, failed as f64]) {
            Ok(t) => {
                if rank == 0 {
                    println!("sync_bn world {world}: {} passed, {} failed", t[0], t[1]);
                }
                i32::from(t[1] > 0.0)
            }
            Err(e) => {
                eprintln!("rank {rank}: {e}");
                1
            }
        }
    };
    drop(universe);
    std::process::exit(code);
}
