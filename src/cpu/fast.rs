//! The production CPU path: f32 data, f64 accumulation, multithreaded on rayon's threads
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

use super::{buffers, pool};
use crate::dtype::DType;
use crate::shape::View;

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
    fn run(&self, start: usize, len: usize, c: usize, acc: &mut Lanes);
    /// Adds consecutive channel-contiguous rows (inner = 1) starting at `start`, at most a
    /// row group: value `start + k` is channel `k % C`, its two terms go to `a0[k]`, `a1[k]`.
    fn rows(&self, start: usize, a0: &mut [f32], a1: &mut [f32]);
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
    fn add(&mut self, x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> (f32, f32)) {
        let per_block = LANES * F32_BLOCK;
        for (xb, yb) in x.chunks(per_block).zip(y.chunks(per_block)) {
            let (xc, yc) = (xb.chunks_exact(LANES), yb.chunks_exact(LANES));
            let (xr, yr) = (xc.remainder(), yc.remainder());
            for (xa, ya) in xc.zip(yc) {
                let xa: &[f32; LANES] = xa.try_into().expect("chunks_exact");
                let ya: &[f32; LANES] = ya.try_into().expect("chunks_exact");
                for l in 0..LANES {
                    let (p, q) = f(xa[l], ya[l]);
                    self.l0[l] += p;
                    self.l1[l] += q;
                }
            }
            for (l, (&xv, &yv)) in xr.iter().zip(yr).enumerate() {
                let (p, q) = f(xv, yv);
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

fn reduce_pairs(v: View, r: &impl PairSums) -> Vec<[f64; 2]> {
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
                r.rows(o * c_n, &mut a0[..len], &mut a1[..len]);
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
                        r.run((o * c_n + c) * v.inner, v.inner, c, &mut lanes);
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

/// Shifted moments: Σ (x − k_c), Σ (x − k_c)² with k_c one value of channel c, so that a
/// large common offset cancels exactly before anything is squared.
struct Moments<'a> {
    x: &'a [f32],
    shift: &'a [f32],
    /// `shift` tiled over a row group (inner = 1).
    shift_rows: &'a [f32],
}

impl PairSums for Moments<'_> {
    fn run(&self, start: usize, len: usize, c: usize, acc: &mut Lanes) {
        let xs = &self.x[start..start + len];
        let k = self.shift[c];
        acc.add(xs, xs, |v, _| {
            let d = v - k;
            (d, d * d)
        })
    }
    fn rows(&self, start: usize, a0: &mut [f32], a1: &mut [f32]) {
        let n = a0.len();
        let xs = &self.x[start..start + n];
        let ks = &self.shift_rows[..n];
        for (((p, q), &v), &k) in a0.iter_mut().zip(a1.iter_mut()).zip(xs).zip(ks) {
            let d = v - k;
            *p += d;
            *q += d * d;
        }
    }
}

struct GradSums<'a> {
    x: &'a [f32],
    dy: &'a [f32],
    mean: &'a [f32],
    /// `mean` tiled over a row group (inner = 1).
    mean_rows: &'a [f32],
}

impl PairSums for GradSums<'_> {
    fn run(&self, start: usize, len: usize, c: usize, acc: &mut Lanes) {
        let xs = &self.x[start..start + len];
        let gs = &self.dy[start..start + len];
        let m = self.mean[c];
        acc.add(xs, gs, |v, g| (g, g * (v - m)))
    }
    fn rows(&self, start: usize, a0: &mut [f32], a1: &mut [f32]) {
        let n = a0.len();
        let xs = &self.x[start..start + n];
        let gs = &self.dy[start..start + n];
        let ms = &self.mean_rows[..n];
        for ((((p, q), &v), &g), &m) in a0.iter_mut().zip(a1.iter_mut()).zip(xs).zip(gs).zip(ms) {
            *p += g;
            *q += g * (v - m);
        }
    }
}

/// Per-channel (mean, biased M2) of `x`, in f64.
pub fn stats(x: &[f32], v: View) -> Vec<(f64, f64)> {
    let n = v.per_channel() as f64;
    // Shift: the channel's first value, when finite (an infinite shift would turn every
    // difference into ±Inf or NaN; with 0 a +Inf value still gives a +Inf mean).
    let shift: Vec<f32> = (0..v.channels)
        .map(|c| if v.numel() == 0 { 0.0 } else { x[c * v.inner] })
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
fn channel_moments_f64(x: &[f32], v: View, c: usize) -> (f64, f64) {
    let values = || {
        (0..v.outer).flat_map(move |o| {
            let start = (o * v.channels + c) * v.inner;
            x[start..start + v.inner].iter().map(|&x| x as f64)
        })
    };
    let n = v.per_channel() as f64;
    let mean = values().sum::<f64>() / n;
    (mean, values().map(|x| (x - mean) * (x - mean)).sum())
}

/// Per-channel (Σ dy, Σ dy·(x − mean_c)), in f64.
pub fn grad_sums(x: &[f32], dy: &[f32], mean: &[f32], v: View) -> Vec<(f64, f64)> {
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

/// Builds an output row block by row block in parallel: `run(out_run, start, c)` writes
/// the run of channel `c` that starts at `start` (`inner` values), or with inner = 1
/// `rows(out, start)` writes whole channel-contiguous rows, at most a row group. Each must
/// write every value of its slice. The output is not zeroed first: that would be one more
/// pass over memory.
fn map_runs(
    v: View,
    run: impl Fn(&mut [MaybeUninit<f32>], usize, usize) + Sync,
    rows: impl Fn(&mut [MaybeUninit<f32>], usize) + Sync,
) -> Vec<f32> {
    let n = v.numel();
    let mut out: Vec<f32> = buffers::take(n);
    let row_len = v.channels * v.inner;
    if row_len == 0 || n == 0 {
        return out;
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
    let chunks: Vec<Mutex<&mut [MaybeUninit<f32>]>> = out.spare_capacity_mut()[..n]
        .chunks_mut(rows_per_task * row_len)
        .map(Mutex::new)
        .collect();
    pool::for_each(chunks.len(), |t| {
        let mut chunk = chunks[t].lock().expect("not poisoned");
        let chunk: &mut [MaybeUninit<f32>] = &mut chunk;
        let first = t * rows_per_task * row_len;
        if v.inner == 1 {
            for (r, block) in chunk.chunks_mut(g * row_len).enumerate() {
                rows(block, first + r * g * row_len);
            }
        } else {
            for (r, block) in chunk.chunks_mut(row_len).enumerate() {
                let base = first + r * row_len;
                for (c, out_run) in block.chunks_mut(v.inner).enumerate() {
                    run(out_run, base + c * v.inner, c);
                }
            }
        }
    });
    drop(chunks);
    // SAFETY: the chunks cover the first n slots exactly once, and every `run`/`rows` below
    // writes each slot of its slice (they zip the slice with input slices of its length).
    unsafe { out.set_len(n) };
    out
}

/// y = (x − m_c)·a_c + b_c with per-channel (m, a, b), then the epilogue: + z (`residual`,
/// x's shape) and the ReLU (`relu`), in the same pass.
pub fn affine_centered(
    x: &[f32],
    m: &[f32],
    a: &[f32],
    b: &[f32],
    residual: Option<&[f32]>,
    relu: bool,
    v: View,
) -> Vec<f32> {
    match (residual, relu) {
        (None, false) => affine_with::<false, false>(x, m, a, b, x, v),
        (None, true) => affine_with::<false, true>(x, m, a, b, x, v),
        (Some(z), false) => affine_with::<true, false>(x, m, a, b, z, v),
        (Some(z), true) => affine_with::<true, true>(x, m, a, b, z, v),
    }
}

/// The epilogue of one value: + z with `ADD`, then max(·, 0) keeping NaN with `RELU`.
#[inline(always)]
fn finish<const ADD: bool, const RELU: bool>(y: f32, z: f32) -> f32 {
    let y = if ADD { y + z } else { y };
    if RELU && y < 0.0 {
        0.0
    } else {
        y
    }
}

/// [`affine_centered`] for one epilogue (`z` is read only with `ADD`).
fn affine_with<const ADD: bool, const RELU: bool>(
    x: &[f32],
    m: &[f32],
    a: &[f32],
    b: &[f32],
    z: &[f32],
    v: View,
) -> Vec<f32> {
    let tiled = |p: &[f32]| {
        if v.inner == 1 {
            tile_rows(p)
        } else {
            Vec::new()
        }
    };
    let (mr, ar, br) = (tiled(m), tiled(a), tiled(b));
    map_runs(
        v,
        |out, start, c| {
            let (mc, ac, bc) = (m[c], a[c], b[c]);
            let n = out.len();
            let (xs, zs) = (&x[start..start + n], &z[start..start + n]);
            for ((o, &xv), &zv) in out.iter_mut().zip(xs).zip(zs) {
                o.write(finish::<ADD, RELU>((xv - mc) * ac + bc, zv));
            }
        },
        |out, start| {
            let n = out.len();
            let it = out.iter_mut().zip(&x[start..start + n]);
            let params = mr[..n].iter().zip(&ar[..n]).zip(&br[..n]);
            for (((o, &xv), ((&mc, &ac), &bc)), &zv) in it.zip(params).zip(&z[start..start + n]) {
                o.write(finish::<ADD, RELU>((xv - mc) * ac + bc, zv));
            }
        },
    )
}

/// Training: dx = a_c·dy + k_c·(x − m_c) − d_c with coef = [m, a, k, d]; eval: dx = a_c·dy.
pub fn grad_input(x: &[f32], dy: &[f32], coef: &[[f32; 4]], training: bool, v: View) -> Vec<f32> {
    let at = |start: usize, n: usize| (&x[start..start + n], &dy[start..start + n]);
    // Channel-contiguous rows: the coefficients as tiled arrays (struct of arrays).
    let column = |k: usize| -> Vec<f32> {
        if v.inner == 1 {
            tile_rows(&coef.iter().map(|c| c[k]).collect::<Vec<_>>())
        } else {
            Vec::new()
        }
    };
    let (mr, ar, kr, dr) = (column(0), column(1), column(2), column(3));
    map_runs(
        v,
        |out, start, c| {
            let [m, a, k, d] = coef[c];
            let (xs, gs) = at(start, out.len());
            if training {
                for ((o, &xv), &g) in out.iter_mut().zip(xs).zip(gs) {
                    o.write(a * g + k * (xv - m) - d);
                }
            } else {
                for (o, &g) in out.iter_mut().zip(gs) {
                    o.write(a * g);
                }
            }
        },
        |out, start| {
            let n = out.len();
            let (xs, gs) = at(start, n);
            if training {
                let it = out.iter_mut().zip(xs).zip(gs).zip(&mr[..n]).zip(&ar[..n]);
                for (((((o, &xv), &g), &m), &a), (&k, &d)) in it.zip(kr[..n].iter().zip(&dr[..n])) {
                    o.write(a * g + k * (xv - m) - d);
                }
            } else {
                for ((o, &g), &a) in out.iter_mut().zip(gs).zip(&ar[..n]) {
                    o.write(a * g);
                }
            }
        },
    )
}

/// ReLU's backward on the result (PyTorch's threshold_backward): dy where y > 0, else 0.
pub fn relu_grad(dy: &[f32], y: &[f32]) -> Vec<f32> {
    let n = dy.len();
    let mut out: Vec<f32> = buffers::take(n);
    let per_task = (n / (pool::threads().max(1) * 4)).max(TASK_ELEMS);
    let chunks: Vec<Mutex<&mut [MaybeUninit<f32>]>> = out.spare_capacity_mut()[..n]
        .chunks_mut(per_task)
        .map(Mutex::new)
        .collect();
    pool::for_each(chunks.len(), |t| {
        let mut chunk = chunks[t].lock().expect("not poisoned");
        let start = t * per_task;
        let len = chunk.len();
        let it = chunk.iter_mut().zip(&dy[start..start + len]);
        for ((o, &g), &yv) in it.zip(&y[start..start + len]) {
            o.write(if yv > 0.0 { g } else { 0.0 });
        }
    });
    drop(chunks);
    // SAFETY: the chunks cover the first n slots exactly once and each loop above writes
    // every slot of its chunk (dy and y have n values).
    unsafe { out.set_len(n) };
    out
}

/// Rounds `v` in place to `dtype` (a half type's outputs on the CPU path), in parallel.
pub fn round_to(dtype: DType, v: &mut [f32]) {
    if dtype == DType::F32 {
        return;
    }
    let per_task = (v.len() / (pool::threads().max(1) * 4)).max(TASK_ELEMS);
    let chunks: Vec<Mutex<&mut [f32]>> = v.chunks_mut(per_task).map(Mutex::new).collect();
    pool::for_each(chunks.len(), |t| {
        let mut chunk = chunks[t].lock().expect("not poisoned");
        // One loop per type, so that each is a straight-line body the compiler vectorizes.
        match dtype {
            DType::F16 => chunk
                .iter_mut()
                .for_each(|x| *x = crate::dtype::round_f16(*x)),
            _ => chunk
                .iter_mut()
                .for_each(|x| *x = crate::dtype::round_bf16(*x)),
        }
    });
}
