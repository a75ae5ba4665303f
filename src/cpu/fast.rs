//! The production CPU path: f32 arithmetic over f32 or half storage ([`Elem`]), f64
//! accumulation, multithreaded on rayon's threads
//! (through [`pool`](super::pool), where the calling thread works too; single-threaded on
//! wasm32), inner loops written over contiguous runs with independent lanes so that LLVM
//! vectorizes them.
//!
//! Two passes over x for a training forward (statistics, then normalize), as on the GPU.
//! The statistics use sums shifted by one value of each channel: the shift removes any
//! large common offset exactly, short f32 blocks keep the lanes wide, and f64 totals keep
//! the long sums exact.

use std::mem::MaybeUninit;
use std::sync::{Mutex, OnceLock};

use super::elem::{self, Elem, Isa};
use super::{buffers, pool};
use crate::dtype::DType;
use crate::shape::View;

/// Whether the loops run as compiled for AVX2 (with FMA and F16C) rather than for the
/// x86-64 baseline (SSE2): checked once at run time. The baseline has no instructions to
/// widen 16-bit lanes to 32 or to pack them back, so its half-storage loops take 2–9× the
/// f32 rows (benches/NOTES.md). The arithmetic is the same either way
/// (no contraction into FMA), so both give the same bits.
#[cfg(target_arch = "x86_64")]
fn wide_simd() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    // 0: not yet checked, 1: no, 2: yes.
    static STATE: AtomicU8 = AtomicU8::new(0);
    let mut state = STATE.load(Ordering::Relaxed);
    if state == 0 {
        // WGPU_BATCHNORM_CPU_BASELINE=1 keeps the baseline loops (for A/B measurements).
        let baseline = std::env::var_os("WGPU_BATCHNORM_CPU_BASELINE").is_some_and(|v| v == "1");
        let yes = !baseline
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c");
        state = 1 + yes as u8;
        STATE.store(state, Ordering::Relaxed);
    }
    state == 2 && !BASELINE_ONLY.load(Ordering::Relaxed)
}

/// Set (by the unit tests) to run the baseline loops where the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
static BASELINE_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Defines a loop driver twice: as written, and (x86-64) as a clone compiled for AVX2,
/// called where [`wide_simd`] says the CPU has it. The closures a driver hands to the
/// thread pool are written inside it, so they are compiled for its features too, and the
/// per-value code they call (`Elem`, the `run` / `rows` bodies) is inlined into them. The
/// first name is the [`Isa`] of each clone, for that code's eight-value conversions.
macro_rules! with_wide_clone {
    ($isa:ident; $(#[$m:meta])* fn $name:ident [$($gen:tt)*] ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        fn $name<$($gen)*>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if wide_simd() {
                #[target_feature(enable = "avx2,fma,f16c")]
                fn wide<$($gen)*>($($arg: $ty),*) $(-> $ret)? {
                    type $isa = elem::Avx2;
                    $body
                }
                // SAFETY: the CPU has these features (checked at run time by wide_simd).
                return unsafe { wide($($arg),*) };
            }
            type $isa = elem::Baseline;
            $body
        }
    };
}

/// Values one task handles at least; smaller splits cost more in scheduling than they save.
const TASK_ELEMS: usize = 1 << 15;
const LANES: usize = 8;

/// How the (outer, channels) plane is split into tasks: rows of `o_chunk` outer indices by
/// `c_chunk` channels.
#[derive(Clone, Copy)]
struct Split {
    o_chunk: usize,
    c_chunk: usize,
}

fn split(v: View) -> Split {
    let threads = pool::threads().max(1);
    let row = v.channels * v.inner;
    // Enough tasks to keep every thread busy, none smaller than TASK_ELEMS.
    let want = (v.numel() / TASK_ELEMS).clamp(1, threads * 4);
    if v.inner == 1 {
        // Channel-contiguous rows: whole rows per task, in whole row groups.
        let g = row_group(v.channels);
        return Split {
            o_chunk: v.outer.div_ceil(want).next_multiple_of(g).max(g),
            c_chunk: v.channels.max(1),
        };
    }
    let o_chunk = v.outer.div_ceil(want).max(1);
    let o_tasks = v.outer.div_ceil(o_chunk).max(1);
    let c_tasks = (want / o_tasks).clamp(1, v.channels.max(1));
    let c_chunk = if row == 0 {
        1
    } else {
        v.channels.div_ceil(c_tasks)
    };
    Split {
        o_chunk,
        c_chunk: c_chunk.max(1),
    }
}

/// Values a channel-contiguous (inner = 1) loop covers per call: that many rows' worth, so
/// that narrow rows (tall_2d has 32 channels) do not pay the per-call setup each row.
const ROW_GROUP_VALUES: usize = 512;

/// Rows per group for `channels` channels.
fn row_group(channels: usize) -> usize {
    (ROW_GROUP_VALUES / channels.max(1)).max(1)
}

/// `v` repeated for each row of a row group, so that a group of rows zips with it.
fn tile_rows(v: &[f32]) -> Vec<f32> {
    let g = row_group(v.len());
    let mut out = Vec::with_capacity(g * v.len());
    for _ in 0..g {
        out.extend_from_slice(v);
    }
    out
}

/// Values (per lane, or rows in the channel-contiguous case) summed in f32 before the
/// partial sum is added to an f64 total: short enough that f32 rounding stays ~1e-6
/// relative, long enough that the f64 adds cost little. f32 lanes are twice as wide as f64.
const F32_BLOCK: usize = 32;

/// A per-channel reduction to two sums, over contiguous slices (so that the loops
/// vectorize: no per-element index arithmetic or bounds checks).
trait PairSums: Sync {
    /// Adds the `len` values of channel `c` starting at `start` to `acc`.
    fn run<I: Isa>(&self, start: usize, len: usize, c: usize, acc: &mut Lanes);
    /// Adds consecutive channel-contiguous rows (inner = 1) starting at `start`, at most a
    /// row group: value `start + k` is channel `k % C`, its two terms go to `a0[k]`, `a1[k]`.
    fn rows<I: Isa>(&self, start: usize, a0: &mut [f32], a1: &mut [f32]);
}

/// Two sums in `LANES` independent f32 lanes (fixed-size arrays: no bounds checks, LLVM
/// vectorizes), flushed to f64 totals every `F32_BLOCK` values per lane. Kept across all
/// the runs of one channel, so short runs (7×7) do not pay a horizontal sum each.
struct Lanes {
    l0: [f32; LANES],
    l1: [f32; LANES],
    /// Values per lane since the last flush.
    pending: usize,
    total: [f64; 2],
}

impl Lanes {
    fn new() -> Self {
        Self {
            l0: [0.0; LANES],
            l1: [0.0; LANES],
            pending: 0,
            total: [0.0; 2],
        }
    }

    fn flush(&mut self) {
        self.total[0] += self.l0.iter().map(|&v| v as f64).sum::<f64>();
        self.total[1] += self.l1.iter().map(|&v| v as f64).sum::<f64>();
        self.l0 = [0.0; LANES];
        self.l1 = [0.0; LANES];
        self.pending = 0;
    }

    /// Adds Σ f(x[i], y[i]) over two equal-length slices.
    #[inline(always)]
    fn add<I: Isa, T: Elem>(&mut self, x: &[T], y: &[T], f: impl Fn(f32, f32) -> (f32, f32)) {
        let per_block = LANES * F32_BLOCK;
        for (xb, yb) in x.chunks(per_block).zip(y.chunks(per_block)) {
            let (xc, yc) = (xb.chunks_exact(LANES), yb.chunks_exact(LANES));
            let (xr, yr) = (xc.remainder(), yc.remainder());
            for (xa, ya) in xc.zip(yc) {
                let (xa, ya): (&[T; LANES], &[T; LANES]) = (
                    xa.try_into().expect("chunks_exact"),
                    ya.try_into().expect("chunks_exact"),
                );
                if in_blocks::<I, T>() {
                    let (xw, yw) = (T::get8::<I>(xa), T::get8::<I>(ya));
                    for l in 0..LANES {
                        let (p, q) = f(xw[l], yw[l]);
                        self.l0[l] += p;
                        self.l1[l] += q;
                    }
                } else {
                    for l in 0..LANES {
                        let (p, q) = f(xa[l].get(), ya[l].get());
                        self.l0[l] += p;
                        self.l1[l] += q;
                    }
                }
            }
            for (l, (&xv, &yv)) in xr.iter().zip(yr).enumerate() {
                let (p, q) = f(xv.get(), yv.get());
                self.l0[l] += p;
                self.l1[l] += q;
            }
            self.pending += xb.len().div_ceil(LANES);
            if self.pending >= F32_BLOCK {
                self.flush();
            }
        }
    }

    fn finish(mut self) -> [f64; 2] {
        self.flush();
        self.total
    }
}

with_wide_clone! { I;
fn reduce_pairs[R: PairSums](v: View, r: &R) -> Vec<[f64; 2]> {
    let c_n = v.channels;
    if v.numel() == 0 {
        return vec![[0.0; 2]; c_n];
    }
    let sp = split(v);
    let o_tasks = v.outer.div_ceil(sp.o_chunk);
    let c_tasks = c_n.div_ceil(sp.c_chunk);
    let parts: Vec<OnceLock<Vec<[f64; 2]>>> =
        (0..o_tasks * c_tasks).map(|_| OnceLock::new()).collect();
    pool::for_each(parts.len(), |t| {
        let (ot, ct) = (t / c_tasks, t % c_tasks);
        let c0 = ct * sp.c_chunk;
        let c1 = (c0 + sp.c_chunk).min(c_n);
        let o0 = ot * sp.o_chunk;
        let o1 = (o0 + sp.o_chunk).min(v.outer);
        let acc = if v.inner == 1 {
            // Struct-of-arrays f32 sums per (row in group, channel), flushed to f64
            // every F32_BLOCK groups, folded per channel at the end.
            let g = row_group(c_n);
            let mut acc = vec![[0.0f64; 2]; c_n];
            let (mut a0, mut a1) = (vec![0.0f32; g * c_n], vec![0.0f32; g * c_n]);
            let flush = |acc: &mut Vec<[f64; 2]>, a0: &mut [f32], a1: &mut [f32]| {
                // Row by row (no per-value `%`: a division per value cost more than
                // the f32 sums themselves on wide rows).
                for (r0, r1) in a0.chunks_exact_mut(c_n).zip(a1.chunks_exact_mut(c_n)) {
                    for ((a, p), q) in acc.iter_mut().zip(r0.iter_mut()).zip(r1.iter_mut()) {
                        a[0] += *p as f64;
                        a[1] += *q as f64;
                        (*p, *q) = (0.0, 0.0);
                    }
                }
            };
            for (k, o) in (o0..o1).step_by(g).enumerate() {
                let len = (o1 - o).min(g) * c_n;
                r.rows::<I>(o * c_n, &mut a0[..len], &mut a1[..len]);
                if (k + 1) % F32_BLOCK == 0 {
                    flush(&mut acc, &mut a0, &mut a1);
                }
            }
            flush(&mut acc, &mut a0, &mut a1);
            acc
        } else {
            // Channel by channel over the task's rows, lanes kept across the runs.
            (c0..c1)
                .map(|c| {
                    let mut lanes = Lanes::new();
                    for o in o0..o1 {
                        r.run::<I>((o * c_n + c) * v.inner, v.inner, c, &mut lanes);
                    }
                    lanes.finish()
                })
                .collect()
        };
        parts[t].set(acc).expect("each task runs once");
    });
    let mut out = vec![[0.0f64; 2]; c_n];
    for (t, acc) in parts.into_iter().enumerate() {
        let c0 = (t % c_tasks) * sp.c_chunk;
        let acc = acc.into_inner().expect("every task ran");
        for (k, a) in acc.into_iter().enumerate() {
            out[c0 + k][0] += a[0];
            out[c0 + k][1] += a[1];
        }
    }
    out
}
}

/// [f(0), …, f(7)] (a plain loop over a fixed array, which vectorizes; `array::from_fn`
/// did not always).
#[inline(always)]
fn each8(f: impl Fn(usize) -> f32) -> [f32; 8] {
    let mut out = [0.0; 8];
    for (l, o) in out.iter_mut().enumerate() {
        *o = f(l);
    }
    out
}

/// Whether `T`'s values are widened and rounded eight at a time under `I` (float16 with
/// F16C: one instruction each way). Elsewhere the loops go value by value, which LLVM's
/// loop vectorizer handles better than eight-lane blocks (bfloat16's shifts, and float16's
/// bit arithmetic, ran 2–10× slower in blocks).
#[inline(always)]
fn in_blocks<I: Isa, T: Elem>() -> bool {
    I::F16C && T::DTYPE == DType::F16
}

/// Calls `f(i, len, inputs, parameters)` eight values at a time (`len` < 8 only at the
/// end, zero-padded) for `K` stored inputs and `P` f32 per-value parameters.
#[inline(always)]
fn lanes8<I: Isa, T: Elem, const K: usize, const P: usize>(
    n: usize,
    ins: [&[T]; K],
    params: [&[f32]; P],
    mut f: impl FnMut(usize, usize, [[f32; 8]; K], [[f32; 8]; P]),
) {
    let full = n - n % 8;
    let mut i = 0;
    while i < full {
        let v = ins.map(|s| T::get8::<I>(s[i..i + 8].try_into().expect("8 values")));
        let p = params.map(|s| <[f32; 8]>::try_from(&s[i..i + 8]).expect("8 values"));
        f(i, 8, v, p);
        i += 8;
    }
    if i < n {
        let rem = n - i;
        let v = ins.map(|s| each8(|l| if l < rem { s[i + l].get() } else { 0.0 }));
        let p = params.map(|s| each8(|l| if l < rem { s[i + l] } else { 0.0 }));
        f(i, rem, v, p);
    }
}

/// Lane `l` of each of `K` eight-value arrays.
#[inline(always)]
fn lane<const K: usize>(v: &[[f32; 8]; K], l: usize) -> [f32; K] {
    let mut out = [0.0; K];
    for (o, a) in out.iter_mut().zip(v) {
        *o = a[l];
    }
    out
}

/// out[i] = f(the inputs at i, the parameters at i), stored as `T`.
#[inline(always)]
fn map8<I: Isa, T: Elem, const K: usize, const P: usize>(
    out: &mut [MaybeUninit<T>],
    ins: [&[T]; K],
    params: [&[f32]; P],
    f: impl Fn([f32; K], [f32; P]) -> f32,
) {
    let n = out.len();
    let (ins, params) = (ins.map(|s| &s[..n]), params.map(|s| &s[..n]));
    if in_blocks::<I, T>() {
        lanes8::<I, T, K, P>(n, ins, params, |i, len, v, p| {
            let y = each8(|l| f(lane(&v, l), lane(&p, l)));
            if len == 8 {
                for (o, y) in out[i..i + 8].iter_mut().zip(T::put8::<I>(y)) {
                    o.write(y);
                }
            } else {
                for (o, &y) in out[i..i + len].iter_mut().zip(&y) {
                    o.write(T::put(y));
                }
            }
        });
    } else {
        for (i, o) in out.iter_mut().enumerate() {
            o.write(T::put(f(ins.map(|s| s[i].get()), params.map(|s| s[i]))));
        }
    }
}

/// (a0[i], a1[i]) += f(the inputs at i, the parameters at i), value by value for every
/// type: float16 with F16C in eight-value blocks took 1.2–1.9× longer here (the training
/// passes of tall_2d, mlp_2d and both NHWC shapes; benches/NOTES.md).
#[inline(always)]
fn sum_rows<T: Elem, const K: usize, const P: usize>(
    (a0, a1): (&mut [f32], &mut [f32]),
    ins: [&[T]; K],
    params: [&[f32]; P],
    f: impl Fn([f32; K], [f32; P]) -> (f32, f32),
) {
    let n = a0.len();
    let a1 = &mut a1[..n];
    let (ins, params) = (ins.map(|s| &s[..n]), params.map(|s| &s[..n]));
    for (i, (p, q)) in a0.iter_mut().zip(a1.iter_mut()).enumerate() {
        let (d0, d1) = f(ins.map(|s| s[i].get()), params.map(|s| s[i]));
        *p += d0;
        *q += d1;
    }
}

/// `acc.add(x, y, f)` as its own function, compiled for `I` (AVX2 where `I` has it). Its
/// own function either way: inlined into the reduction's task closure, the loop ran
/// 1.6–2× slower (benches/NOTES.md).
#[inline(never)]
fn add_run<I: Isa, T: Elem>(acc: &mut Lanes, x: &[T], y: &[T], f: impl Fn(f32, f32) -> (f32, f32)) {
    #[cfg(target_arch = "x86_64")]
    if I::F16C {
        #[target_feature(enable = "avx2,fma,f16c")]
        fn wide<I: Isa, T: Elem>(
            acc: &mut Lanes,
            x: &[T],
            y: &[T],
            f: impl Fn(f32, f32) -> (f32, f32),
        ) {
            acc.add::<I, T>(x, y, f)
        }
        // SAFETY: an `I` with F16C is the AVX2 clone's, which runs only where the CPU
        // has these features.
        return unsafe { wide::<I, T>(acc, x, y, f) };
    }
    acc.add::<I, T>(x, y, f)
}

/// Shifted moments: Σ (x − k_c), Σ (x − k_c)² with k_c one value of channel c, so that a
/// large common offset cancels exactly before anything is squared.
struct Moments<'a, T> {
    x: &'a [T],
    shift: &'a [f32],
    /// `shift` tiled over a row group (inner = 1).
    shift_rows: &'a [f32],
}

impl<T: Elem> PairSums for Moments<'_, T> {
    fn run<I: Isa>(&self, start: usize, len: usize, c: usize, acc: &mut Lanes) {
        let xs = &self.x[start..start + len];
        let k = self.shift[c];
        add_run::<I, T>(acc, xs, xs, |v, _| {
            let d = v - k;
            (d, d * d)
        })
    }
    #[inline(always)]
    fn rows<I: Isa>(&self, start: usize, a0: &mut [f32], a1: &mut [f32]) {
        let n = a0.len();
        let xs = &self.x[start..start + n];
        let ks = &self.shift_rows[..n];
        sum_rows::<T, 1, 1>((a0, a1), [xs], [ks], |[v], [k]| {
            let d = v - k;
            (d, d * d)
        });
    }
}

struct GradSums<'a, T> {
    x: &'a [T],
    dy: &'a [T],
    mean: &'a [f32],
    /// `mean` tiled over a row group (inner = 1).
    mean_rows: &'a [f32],
}

impl<T: Elem> PairSums for GradSums<'_, T> {
    fn run<I: Isa>(&self, start: usize, len: usize, c: usize, acc: &mut Lanes) {
        let xs = &self.x[start..start + len];
        let gs = &self.dy[start..start + len];
        let m = self.mean[c];
        add_run::<I, T>(acc, xs, gs, |v, g| (g, g * (v - m)))
    }
    #[inline(always)]
    fn rows<I: Isa>(&self, start: usize, a0: &mut [f32], a1: &mut [f32]) {
        let n = a0.len();
        let xs = &self.x[start..start + n];
        let gs = &self.dy[start..start + n];
        let ms = &self.mean_rows[..n];
        sum_rows::<T, 2, 1>((a0, a1), [xs, gs], [ms], |[v, g], [m]| (g, g * (v - m)));
    }
}

/// Per-channel (mean, biased M2) of `x`, in f64.
pub fn stats<T: Elem>(x: &[T], v: View) -> Vec<(f64, f64)> {
    let n = v.per_channel() as f64;
    // Shift: the channel's first value, when finite (an infinite shift would turn every
    // difference into ±Inf or NaN; with 0 a +Inf value still gives a +Inf mean).
    let shift: Vec<f32> = (0..v.channels)
        .map(|c| {
            if v.numel() == 0 {
                0.0
            } else {
                x[c * v.inner].get()
            }
        })
        .map(|k| if k.is_finite() { k } else { 0.0 })
        .collect();
    let shift_rows = tile_rows(&shift);
    let sums = reduce_pairs(
        v,
        &Moments {
            x,
            shift: &shift,
            shift_rows: &shift_rows,
        },
    );
    sums.iter()
        .zip(&shift)
        .enumerate()
        .map(|(c, (s, &k))| {
            let k = k as f64;
            if n == 0.0 {
                (0.0, 0.0)
            } else if !s[1].is_finite() && s[0].is_finite() {
                // Finite data whose f32 squared differences overflowed (|x − k| past 1.8e19):
                // this channel again, in f64.
                channel_moments_f64(x, v, c)
            } else {
                // Clamp rounding below zero, but let NaN through (f64::max would eat it).
                let m2 = s[1] - s[0] * s[0] / n;
                (k + s[0] / n, if m2 < 0.0 { 0.0 } else { m2 })
            }
        })
        .collect()
}

/// (mean, M2) of channel c in f64, two passes: the slow path for data whose f32 squares
/// overflow.
fn channel_moments_f64<T: Elem>(x: &[T], v: View, c: usize) -> (f64, f64) {
    let values = || {
        (0..v.outer).flat_map(move |o| {
            let start = (o * v.channels + c) * v.inner;
            x[start..start + v.inner].iter().map(|&x| x.get() as f64)
        })
    };
    let n = v.per_channel() as f64;
    let mean = values().sum::<f64>() / n;
    (mean, values().map(|x| (x - mean) * (x - mean)).sum())
}

/// Per-channel (Σ dy, Σ dy·(x − mean_c)), in f64.
pub fn grad_sums<T: Elem>(x: &[T], dy: &[T], mean: &[f32], v: View) -> Vec<(f64, f64)> {
    let mean_rows = tile_rows(mean);
    reduce_pairs(
        v,
        &GradSums {
            x,
            dy,
            mean,
            mean_rows: &mean_rows,
        },
    )
    .into_iter()
    .map(|s| (s[0], s[1]))
    .collect()
}

/// The storage words of `n` values of `T`, written by `fill` through a view of the values
/// (it must write every one). Not zeroed first: that would be one more pass over memory;
/// only the unused upper half of an odd half count's last word is.
fn build<T: Elem>(n: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<f32> {
    let words = T::DTYPE.words(n);
    let mut out: Vec<f32> = buffers::take(words);
    let spare = &mut out.spare_capacity_mut()[..words];
    if T::DTYPE != DType::F32 && n % 2 == 1 {
        spare[words - 1].write(0.0);
    }
    // SAFETY: MaybeUninit<T> has T's layout, f32 or a repr(transparent) u16, for which the
    // f32 slots are aligned; the `words` slots hold n of them.
    let values =
        unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<MaybeUninit<T>>(), n) };
    fill(values);
    // SAFETY: `fill` wrote every value, and the padding half (if any) was written above.
    unsafe { out.set_len(words) };
    out
}

/// An element-wise kernel for [`map_runs`] (a trait rather than closures so that its loops
/// inline into the driver, and are compiled for the driver's features).
trait RunMap<T: Elem>: Sync {
    /// Writes the run of channel `c` that starts at `start` (`out.len()` values).
    fn run<I: Isa>(&self, out: &mut [MaybeUninit<T>], start: usize, c: usize);
    /// Writes consecutive channel-contiguous rows (inner = 1) starting at `start`, at most
    /// a row group.
    fn rows<I: Isa>(&self, out: &mut [MaybeUninit<T>], start: usize);
}

/// Builds an output row block by row block in parallel with `k`: [`RunMap::run`] per run,
/// or with inner = 1 [`RunMap::rows`] per row group. Each must write every value of its
/// slice. Returns the output's storage words.
fn map_runs<T: Elem>(v: View, k: &impl RunMap<T>) -> Vec<f32> {
    build::<T>(v.numel(), |out| fill_runs(v, out, k))
}

with_wide_clone! { I;
fn fill_runs[T: Elem, K: RunMap<T>](v: View, out: &mut [MaybeUninit<T>], k: &K) {
    let n = v.numel();
    let row_len = v.channels * v.inner;
    if row_len == 0 || n == 0 {
        return;
    }
    let g = if v.inner == 1 {
        row_group(v.channels)
    } else {
        1
    };
    let threads = pool::threads().max(1);
    let per_task = (n / (threads * 4)).max(TASK_ELEMS);
    let rows_per_task = (per_task / row_len).next_multiple_of(g).max(g);
    // One uncontended lock per task: safe disjoint mutable access from any thread.
    let chunks: Vec<Mutex<&mut [MaybeUninit<T>]>> = out
        .chunks_mut(rows_per_task * row_len)
        .map(Mutex::new)
        .collect();
    pool::for_each(chunks.len(), |t| {
        let mut chunk = chunks[t].lock().expect("not poisoned");
        let chunk: &mut [MaybeUninit<T>] = &mut chunk;
        let first = t * rows_per_task * row_len;
        if v.inner == 1 {
            for (r, block) in chunk.chunks_mut(g * row_len).enumerate() {
                k.rows::<I>(block, first + r * g * row_len);
            }
        } else {
            for (r, block) in chunk.chunks_mut(row_len).enumerate() {
                let base = first + r * row_len;
                for (c, out_run) in block.chunks_mut(v.inner).enumerate() {
                    k.run::<I>(out_run, base + c * v.inner, c);
                }
            }
        }
    });
    // The chunks cover the n values exactly once, and every `run`/`rows` writes each value
    // of its slice (they zip the slice with input slices of its length).
}
}

/// Per-channel parameters tiled over a row group where rows are channel-contiguous
/// (inner = 1; struct of arrays, to zip with a group of rows), else nothing.
fn tiled(p: &[f32], v: View) -> Vec<f32> {
    if v.inner == 1 {
        tile_rows(p)
    } else {
        Vec::new()
    }
}

/// y = (x − m_c)·a_c + b_c with per-channel (m, a, b), then the epilogue: + z (`residual`,
/// x's shape) and the ReLU (`relu`), in the same pass. Returns y's storage words.
pub fn affine_centered<T: Elem>(
    x: &[T],
    m: &[f32],
    a: &[f32],
    b: &[f32],
    residual: Option<&[T]>,
    relu: bool,
    v: View,
) -> Vec<f32> {
    let (mr, ar, br) = (tiled(m, v), tiled(a, v), tiled(b, v));
    let k = |z| Affine {
        x,
        z,
        m,
        a,
        b,
        mr: &mr,
        ar: &ar,
        br: &br,
    };
    match (residual, relu) {
        (None, false) => map_runs(v, &k(x).epilogue::<false, false>()),
        (None, true) => map_runs(v, &k(x).epilogue::<false, true>()),
        (Some(z), false) => map_runs(v, &k(z).epilogue::<true, false>()),
        (Some(z), true) => map_runs(v, &k(z).epilogue::<true, true>()),
    }
}

/// The epilogue of one value: + z with `ADD`, then max(·, 0) keeping NaN with `RELU`. A
/// half y is rounded to its type before the add, as PyTorch's relu(bn(x) + z) on half
/// tensors rounds bn's output (and as the GPU kernels do).
#[inline(always)]
fn finish<T: Elem, const ADD: bool, const RELU: bool>(y: f32, z: f32) -> f32 {
    let y = if ADD { T::round(y) + z } else { y };
    if RELU && y < 0.0 {
        0.0
    } else {
        y
    }
}

/// The operands of [`affine_centered`] (`z` is read only with an `ADD` epilogue; `*r`:
/// the parameters tiled over a row group).
struct Affine<'a, T> {
    x: &'a [T],
    z: &'a [T],
    m: &'a [f32],
    a: &'a [f32],
    b: &'a [f32],
    mr: &'a [f32],
    ar: &'a [f32],
    br: &'a [f32],
}

impl<'a, T> Affine<'a, T> {
    fn epilogue<const ADD: bool, const RELU: bool>(self) -> AffineWith<'a, T, ADD, RELU> {
        AffineWith(self)
    }
}

/// [`Affine`] with one epilogue.
struct AffineWith<'a, T, const ADD: bool, const RELU: bool>(Affine<'a, T>);

impl<T: Elem, const ADD: bool, const RELU: bool> RunMap<T> for AffineWith<'_, T, ADD, RELU> {
    #[inline(always)]
    fn run<I: Isa>(&self, out: &mut [MaybeUninit<T>], start: usize, c: usize) {
        let k = &self.0;
        let (mc, ac, bc) = (k.m[c], k.a[c], k.b[c]);
        let n = out.len();
        let (xs, zs) = (&k.x[start..start + n], &k.z[start..start + n]);
        if ADD {
            map8::<I, T, 2, 0>(out, [xs, zs], [], |[x, z], []| {
                finish::<T, ADD, RELU>((x - mc) * ac + bc, z)
            });
        } else {
            map8::<I, T, 1, 0>(out, [xs], [], |[x], []| {
                finish::<T, ADD, RELU>((x - mc) * ac + bc, 0.0)
            });
        }
    }
    #[inline(always)]
    fn rows<I: Isa>(&self, out: &mut [MaybeUninit<T>], start: usize) {
        let k = &self.0;
        let n = out.len();
        let (xs, zs) = (&k.x[start..start + n], &k.z[start..start + n]);
        let params = [&k.mr[..n], &k.ar[..n], &k.br[..n]];
        if ADD {
            map8::<I, T, 2, 3>(out, [xs, zs], params, |[x, z], [m, a, b]| {
                finish::<T, ADD, RELU>((x - m) * a + b, z)
            });
        } else {
            map8::<I, T, 1, 3>(out, [xs], params, |[x], [m, a, b]| {
                finish::<T, ADD, RELU>((x - m) * a + b, 0.0)
            });
        }
    }
}

/// Training: dx = a_c·dy + k_c·(x − m_c) − d_c with coef = [m, a, k, d]; eval: dx = a_c·dy.
/// Returns dx's storage words.
pub fn grad_input<T: Elem>(
    x: &[T],
    dy: &[T],
    coef: &[[f32; 4]],
    training: bool,
    v: View,
) -> Vec<f32> {
    // Channel-contiguous rows: the coefficients as tiled arrays (struct of arrays).
    let column = |k: usize| tiled(&coef.iter().map(|c| c[k]).collect::<Vec<_>>(), v);
    let (mr, ar, kr, dr) = (column(0), column(1), column(2), column(3));
    let k = GradInput {
        x,
        dy,
        coef,
        mr: &mr,
        ar: &ar,
        kr: &kr,
        dr: &dr,
    };
    if training {
        map_runs(v, &GradInputOf::<T, true>(k))
    } else {
        map_runs(v, &GradInputOf::<T, false>(k))
    }
}

/// The operands of [`grad_input`] (`*r`: the coefficients tiled over a row group).
struct GradInput<'a, T> {
    x: &'a [T],
    dy: &'a [T],
    coef: &'a [[f32; 4]],
    mr: &'a [f32],
    ar: &'a [f32],
    kr: &'a [f32],
    dr: &'a [f32],
}

/// [`GradInput`] in training (`TRAINING`: the batch statistics' terms) or inference.
struct GradInputOf<'a, T, const TRAINING: bool>(GradInput<'a, T>);

impl<T: Elem, const TRAINING: bool> RunMap<T> for GradInputOf<'_, T, TRAINING> {
    #[inline(always)]
    fn run<I: Isa>(&self, out: &mut [MaybeUninit<T>], start: usize, c: usize) {
        let k = &self.0;
        let [m, a, kc, d] = k.coef[c];
        let n = out.len();
        let (xs, gs) = (&k.x[start..start + n], &k.dy[start..start + n]);
        if TRAINING {
            map8::<I, T, 2, 0>(out, [xs, gs], [], |[x, g], []| a * g + kc * (x - m) - d);
        } else {
            map8::<I, T, 1, 0>(out, [gs], [], |[g], []| a * g);
        }
    }
    #[inline(always)]
    fn rows<I: Isa>(&self, out: &mut [MaybeUninit<T>], start: usize) {
        let k = &self.0;
        let n = out.len();
        let (xs, gs) = (&k.x[start..start + n], &k.dy[start..start + n]);
        if TRAINING {
            let params = [&k.mr[..n], &k.ar[..n], &k.kr[..n], &k.dr[..n]];
            map8::<I, T, 2, 4>(out, [xs, gs], params, |[x, g], [m, a, kc, d]| {
                a * g + kc * (x - m) - d
            });
        } else {
            map8::<I, T, 1, 1>(out, [gs], [&k.ar[..n]], |[g], [a]| a * g);
        }
    }
}

/// ReLU's backward on the result (PyTorch's threshold_backward): dy where y > 0, else 0
/// (dy's own pattern: no rounding). Returns the storage words.
pub fn relu_grad<T: Elem>(dy: &[T], y: &[T]) -> Vec<f32> {
    build::<T>(dy.len(), |out| mask_into(dy, y, out))
}

with_wide_clone! { _I;
fn mask_into[T: Elem](dy: &[T], y: &[T], out: &mut [MaybeUninit<T>]) {
    let n = dy.len();
    let per_task = (n / (pool::threads().max(1) * 4)).max(TASK_ELEMS);
    let chunks: Vec<Mutex<&mut [MaybeUninit<T>]>> =
        out.chunks_mut(per_task).map(Mutex::new).collect();
    pool::for_each(chunks.len(), |t| {
        let mut chunk = chunks[t].lock().expect("not poisoned");
        let start = t * per_task;
        let len = chunk.len();
        let it = chunk.iter_mut().zip(&dy[start..start + len]);
        // Every value of the chunk: dy and y have n values.
        for ((o, &g), &yv) in it.zip(&y[start..start + len]) {
            o.write(if yv.get() > 0.0 { g } else { T::ZERO });
        }
    });
}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::elem::{Bf16, F16};

    /// Every kernel over every storage type and both loop shapes (runs, channel-contiguous
    /// rows, with tails of every length), as the AVX2 clones and as the baseline loops:
    /// the same bits (the clones differ only in instructions). On a CPU without AVX2 both
    /// runs take the baseline, and the test says so.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_avx2_clones_give_the_baseline_bits() {
        use std::sync::atomic::Ordering;
        if !wide_simd() {
            eprintln!("!!! this CPU has no AVX2 + F16C: only the baseline loops ran");
        }
        fn outputs<T: Elem>(v: View, x: &[T], dy: &[T]) -> Vec<Vec<u32>> {
            let c = v.channels;
            let ps = |k: f32| (0..c).map(|i| k + i as f32 * 0.25).collect::<Vec<f32>>();
            let (m, a, b) = (ps(0.1), ps(1.5), ps(-0.2));
            let coef: Vec<[f32; 4]> = (0..c).map(|i| [m[i], a[i], b[i], 0.3]).collect();
            let bits = |w: Vec<f32>| w.into_iter().map(f32::to_bits).collect::<Vec<u32>>();
            let sums = |s: Vec<(f64, f64)>| {
                s.into_iter()
                    .flat_map(|(p, q)| {
                        [
                            p.to_bits() as u32,
                            (p.to_bits() >> 32) as u32,
                            q.to_bits() as u32,
                        ]
                    })
                    .collect::<Vec<u32>>()
            };
            vec![
                sums(stats(x, v)),
                sums(grad_sums(x, dy, &m, v)),
                bits(affine_centered(x, &m, &a, &b, None, false, v)),
                bits(affine_centered(x, &m, &a, &b, Some(dy), true, v)),
                bits(grad_input(x, dy, &coef, true, v)),
                bits(grad_input(x, dy, &coef, false, v)),
                bits(relu_grad(dy, x)),
            ]
        }
        fn both<T: Elem>(v: View, value: impl Fn(f32) -> T) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
            let n = v.numel();
            let x: Vec<T> = (0..n)
                .map(|i| value(((i * 37 % 101) as f32 - 50.0) * 0.07))
                .collect();
            let dy: Vec<T> = (0..n)
                .map(|i| value(((i * 53 % 89) as f32 - 44.0) * 0.05))
                .collect();
            let wide = outputs(v, &x, &dy);
            BASELINE_ONLY.store(true, Ordering::Relaxed);
            let base = outputs(v, &x, &dy);
            BASELINE_ONLY.store(false, Ordering::Relaxed);
            (wide, base)
        }
        for (outer, channels, inner) in
            [(3, 5, 37), (2, 3, 1000), (40, 13, 1), (9, 8, 1), (1, 3, 5)]
        {
            let v = View {
                outer,
                channels,
                inner,
            };
            let (w, b) = both(v, |x| x);
            assert_eq!(w, b, "f32 {v:?}");
            let (w, b) = both(v, F16::put);
            assert_eq!(w, b, "float16 {v:?}");
            let (w, b) = both(v, Bf16::put);
            assert_eq!(w, b, "bfloat16 {v:?}");
        }
    }
}
