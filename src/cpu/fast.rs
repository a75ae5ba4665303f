//! The production CPU path: f32 data, f64 accumulation, multithreaded with rayon, inner loops
//! written over contiguous runs with independent lanes so that LLVM vectorizes them.
//!
//! Two passes over x for a training forward (statistics, then normalize), as on the GPU.
//! The statistics use sums shifted by one value of each channel: the shift removes any
//! large common offset exactly, short f32 blocks keep the lanes wide, and f64 totals keep
//! the long sums exact.

use std::mem::MaybeUninit;

use rayon::prelude::*;

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
    let threads = rayon::current_num_threads().max(1);
    let row = v.channels * v.inner;
    // Enough tasks to keep every thread busy, none smaller than TASK_ELEMS.
    let want = (v.numel() / TASK_ELEMS).clamp(1, threads * 4);
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

/// Values (per lane, or rows in the channel-contiguous case) summed in f32 before the
/// partial sum is added to an f64 total: short enough that f32 rounding stays ~1e-6
/// relative, long enough that the f64 adds cost little. f32 lanes are twice as wide as f64.
const F32_BLOCK: usize = 32;

/// A per-channel reduction to two sums, over contiguous slices (so that the loops
/// vectorize: no per-element index arithmetic or bounds checks).
trait PairSums: Sync {
    /// Sums over `len` values of channel `c` starting at `start`.
    fn run(&self, start: usize, len: usize, c: usize) -> [f64; 2];
    /// Adds a channel-contiguous row segment (inner = 1): value `start + k` is channel `c0 + k`.
    fn row(&self, start: usize, c0: usize, acc: &mut [[f32; 2]]);
}

/// Σ f(x[i], y[i]) over two equal-length slices, in `LANES` independent f32 lanes (fixed
/// size arrays, so no bounds checks and LLVM vectorizes), flushed to f64 every
/// `F32_BLOCK` values per lane.
#[inline(always)]
fn lanes2(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> (f32, f32)) -> [f64; 2] {
    let mut total = [0.0f64; 2];
    for (xb, yb) in x.chunks(LANES * F32_BLOCK).zip(y.chunks(LANES * F32_BLOCK)) {
        let mut l0 = [0.0f32; LANES];
        let mut l1 = [0.0f32; LANES];
        let (xc, yc) = (xb.chunks_exact(LANES), yb.chunks_exact(LANES));
        let (xr, yr) = (xc.remainder(), yc.remainder());
        for (xa, ya) in xc.zip(yc) {
            let xa: &[f32; LANES] = xa.try_into().expect("chunks_exact");
            let ya: &[f32; LANES] = ya.try_into().expect("chunks_exact");
            for l in 0..LANES {
                let (p, q) = f(xa[l], ya[l]);
                l0[l] += p;
                l1[l] += q;
            }
        }
        for (&xv, &yv) in xr.iter().zip(yr) {
            let (p, q) = f(xv, yv);
            l0[0] += p;
            l1[0] += q;
        }
        total[0] += l0.iter().map(|&v| v as f64).sum::<f64>();
        total[1] += l1.iter().map(|&v| v as f64).sum::<f64>();
    }
    total
}

fn reduce_pairs(v: View, r: &impl PairSums) -> Vec<[f64; 2]> {
    let c_n = v.channels;
    if v.numel() == 0 {
        return vec![[0.0; 2]; c_n];
    }
    let sp = split(v);
    let o_tasks = v.outer.div_ceil(sp.o_chunk);
    let c_tasks = c_n.div_ceil(sp.c_chunk);
    let parts: Vec<(usize, Vec<[f64; 2]>)> = (0..o_tasks * c_tasks)
        .into_par_iter()
        .map(|t| {
            let (ot, ct) = (t / c_tasks, t % c_tasks);
            let c0 = ct * sp.c_chunk;
            let c1 = (c0 + sp.c_chunk).min(c_n);
            let o0 = ot * sp.o_chunk;
            let o1 = (o0 + sp.o_chunk).min(v.outer);
            let mut acc = vec![[0.0f64; 2]; c1 - c0];
            if v.inner == 1 {
                let mut acc32 = vec![[0.0f32; 2]; c1 - c0];
                for (k, o) in (o0..o1).enumerate() {
                    r.row(o * c_n + c0, c0, &mut acc32);
                    if (k + 1) % F32_BLOCK == 0 || o + 1 == o1 {
                        for (a, b) in acc.iter_mut().zip(acc32.iter_mut()) {
                            a[0] += b[0] as f64;
                            a[1] += b[1] as f64;
                            *b = [0.0; 2];
                        }
                    }
                }
            } else {
                for o in o0..o1 {
                    for (k, a) in acc.iter_mut().enumerate() {
                        let c = c0 + k;
                        let [p, q] = r.run((o * c_n + c) * v.inner, v.inner, c);
                        a[0] += p;
                        a[1] += q;
                    }
                }
            }
            (c0, acc)
        })
        .collect();
    let mut out = vec![[0.0f64; 2]; c_n];
    for (c0, acc) in parts {
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
}

impl PairSums for Moments<'_> {
    fn run(&self, start: usize, len: usize, c: usize) -> [f64; 2] {
        let xs = &self.x[start..start + len];
        let k = self.shift[c];
        lanes2(xs, xs, |v, _| {
            let d = v - k;
            (d, d * d)
        })
    }
    fn row(&self, start: usize, c0: usize, acc: &mut [[f32; 2]]) {
        let xs = &self.x[start..start + acc.len()];
        let ks = &self.shift[c0..c0 + acc.len()];
        for ((a, &v), &k) in acc.iter_mut().zip(xs).zip(ks) {
            let d = v - k;
            a[0] += d;
            a[1] += d * d;
        }
    }
}

struct GradSums<'a> {
    x: &'a [f32],
    dy: &'a [f32],
    mean: &'a [f32],
}

impl PairSums for GradSums<'_> {
    fn run(&self, start: usize, len: usize, c: usize) -> [f64; 2] {
        let xs = &self.x[start..start + len];
        let gs = &self.dy[start..start + len];
        let m = self.mean[c];
        lanes2(xs, gs, |v, g| (g, g * (v - m)))
    }
    fn row(&self, start: usize, c0: usize, acc: &mut [[f32; 2]]) {
        let n = acc.len();
        let xs = &self.x[start..start + n];
        let gs = &self.dy[start..start + n];
        let ms = &self.mean[c0..c0 + n];
        for (((a, &v), &g), &m) in acc.iter_mut().zip(xs).zip(gs).zip(ms) {
            a[0] += g;
            a[1] += g * (v - m);
        }
    }
}

/// Per-channel (mean, biased M2) of `x`, in f64.
pub fn stats(x: &[f32], v: View) -> Vec<(f64, f64)> {
    let n = v.per_channel() as f64;
    // Shift: the channel's first value.
    let shift: Vec<f32> = (0..v.channels)
        .map(|c| if v.numel() == 0 { 0.0 } else { x[c * v.inner] })
        .collect();
    let sums = reduce_pairs(v, &Moments { x, shift: &shift });
    sums.iter()
        .zip(&shift)
        .map(|(s, &k)| {
            let k = k as f64;
            if n == 0.0 {
                (0.0, 0.0)
            } else {
                // Clamp rounding below zero, but let NaN through (f64::max would eat it).
                let m2 = s[1] - s[0] * s[0] / n;
                (k + s[0] / n, if m2 < 0.0 { 0.0 } else { m2 })
            }
        })
        .collect()
}

/// Per-channel (Σ dy, Σ dy·(x − mean_c)), in f64.
pub fn grad_sums(x: &[f32], dy: &[f32], mean: &[f32], v: View) -> Vec<(f64, f64)> {
    reduce_pairs(v, &GradSums { x, dy, mean })
        .into_iter()
        .map(|s| (s[0], s[1]))
        .collect()
}

/// Builds an output row block by row block in parallel: `run(out_run, start, c)` writes
/// the run of channel `c` that starts at `start` (`inner` values), or with inner = 1
/// `row(out_row, start)` writes a whole channel-contiguous row. Each must write every value
/// of its slice. The output is not zeroed first: that would be one more pass over memory.
fn map_runs(
    v: View,
    run: impl Fn(&mut [MaybeUninit<f32>], usize, usize) + Sync,
    row: impl Fn(&mut [MaybeUninit<f32>], usize) + Sync,
) -> Vec<f32> {
    let n = v.numel();
    let mut out: Vec<f32> = Vec::with_capacity(n);
    let row_len = v.channels * v.inner;
    if row_len == 0 || n == 0 {
        return out;
    }
    let rows_per_task = (TASK_ELEMS / row_len).max(1);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(rows_per_task * row_len)
        .enumerate()
        .for_each(|(t, chunk)| {
            let first = t * rows_per_task * row_len;
            for (r, block) in chunk.chunks_mut(row_len).enumerate() {
                let base = first + r * row_len;
                if v.inner == 1 {
                    row(block, base);
                } else {
                    for (c, out_run) in block.chunks_mut(v.inner).enumerate() {
                        run(out_run, base + c * v.inner, c);
                    }
                }
            }
        });
    // SAFETY: the chunks cover the first n slots exactly once, and every `run`/`row` below
    // writes each slot of its slice (they zip the slice with input slices of its length).
    unsafe { out.set_len(n) };
    out
}

/// y = (x − m_c)·a_c + b_c with per-channel (m, a, b).
pub fn affine_centered(x: &[f32], m: &[f32], a: &[f32], b: &[f32], v: View) -> Vec<f32> {
    map_runs(
        v,
        |out, start, c| {
            let (mc, ac, bc) = (m[c], a[c], b[c]);
            let xs = &x[start..start + out.len()];
            for (o, &xv) in out.iter_mut().zip(xs) {
                o.write((xv - mc) * ac + bc);
            }
        },
        |out, start| {
            let n = out.len();
            let it = out.iter_mut().zip(&x[start..start + n]);
            for ((((o, &xv), &mc), &ac), &bc) in it.zip(&m[..n]).zip(&a[..n]).zip(&b[..n]) {
                o.write((xv - mc) * ac + bc);
            }
        },
    )
}

/// Training: dx = a_c·dy + k_c·(x − m_c) − d_c with coef = [m, a, k, d]; eval: dx = a_c·dy.
pub fn grad_input(x: &[f32], dy: &[f32], coef: &[[f32; 4]], training: bool, v: View) -> Vec<f32> {
    let at = |start: usize, n: usize| (&x[start..start + n], &dy[start..start + n]);
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
            let (xs, gs) = at(start, out.len());
            for (((o, &xv), &g), cf) in out.iter_mut().zip(xs).zip(gs).zip(coef) {
                let [m, a, k, d] = *cf;
                o.write(if training {
                    a * g + k * (xv - m) - d
                } else {
                    a * g
                });
            }
        },
    )
}
