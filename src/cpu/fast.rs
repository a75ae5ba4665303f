//! The production CPU path: f32 data, f64 accumulation, multithreaded with rayon, inner loops
//! written over contiguous runs with independent lanes so that LLVM vectorizes them.
//!
//! Two passes over x for a training forward (statistics, then normalize), as on the GPU.
//! The statistics use sums shifted by one value of each channel, accumulated in f64: the
//! shift removes any large common offset, and f64 leaves ~29 spare bits for the rest.

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

/// A per-channel reduction to two f64 sums, over contiguous slices (so that the loops
/// vectorize: no per-element index arithmetic or bounds checks).
trait PairSums: Sync {
    /// Sums over `len` values of channel `c` starting at `start`.
    fn run(&self, start: usize, len: usize, c: usize) -> [f64; 2];
    /// Adds a channel-contiguous row segment (inner = 1): value `start + k` is channel `c0 + k`.
    fn row(&self, start: usize, c0: usize, acc: &mut [[f64; 2]]);
}

/// Sums of `f(value)` in `LANES` independent lanes, then folded.
#[inline(always)]
fn lanes2(n: usize, f: impl Fn(usize) -> (f64, f64)) -> [f64; 2] {
    let mut l0 = [0.0f64; LANES];
    let mut l1 = [0.0f64; LANES];
    let full = n / LANES * LANES;
    for s in (0..full).step_by(LANES) {
        for l in 0..LANES {
            let (p, q) = f(s + l);
            l0[l] += p;
            l1[l] += q;
        }
    }
    for s in full..n {
        let (p, q) = f(s);
        l0[0] += p;
        l1[0] += q;
    }
    [l0.iter().sum(), l1.iter().sum()]
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
            for o in o0..o1 {
                if v.inner == 1 {
                    r.row(o * c_n + c0, c0, &mut acc);
                } else {
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

struct Moments<'a> {
    x: &'a [f32],
    shift: &'a [f64],
}

impl PairSums for Moments<'_> {
    fn run(&self, start: usize, len: usize, c: usize) -> [f64; 2] {
        let xs = &self.x[start..start + len];
        let k = self.shift[c];
        lanes2(len, |i| {
            let d = xs[i] as f64 - k;
            (d, d * d)
        })
    }
    fn row(&self, start: usize, c0: usize, acc: &mut [[f64; 2]]) {
        let xs = &self.x[start..start + acc.len()];
        let ks = &self.shift[c0..c0 + acc.len()];
        for ((a, &v), &k) in acc.iter_mut().zip(xs).zip(ks) {
            let d = v as f64 - k;
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
        let m = self.mean[c] as f64;
        lanes2(len, |i| {
            let g = gs[i] as f64;
            (g, g * (xs[i] as f64 - m))
        })
    }
    fn row(&self, start: usize, c0: usize, acc: &mut [[f64; 2]]) {
        let n = acc.len();
        let xs = &self.x[start..start + n];
        let gs = &self.dy[start..start + n];
        let ms = &self.mean[c0..c0 + n];
        for (((a, &v), &g), &m) in acc.iter_mut().zip(xs).zip(gs).zip(ms) {
            let g = g as f64;
            a[0] += g;
            a[1] += g * (v as f64 - m as f64);
        }
    }
}

/// Per-channel (mean, biased M2) of `x`, in f64.
pub fn stats(x: &[f32], v: View) -> Vec<(f64, f64)> {
    let n = v.per_channel() as f64;
    // Shift: the channel's first value.
    let shift: Vec<f64> = (0..v.channels)
        .map(|c| {
            if v.numel() == 0 {
                0.0
            } else {
                x[c * v.inner] as f64
            }
        })
        .collect();
    let sums = reduce_pairs(v, &Moments { x, shift: &shift });
    sums.iter()
        .zip(&shift)
        .map(|(s, &k)| {
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

/// Fills `out` row block by row block in parallel: `f(out_run, start, c)` writes the run of
/// channel `c` that starts at `start` (`inner` values), or with inner = 1 `g(out_row, start)`
/// writes a whole channel-contiguous row.
fn map_runs(
    v: View,
    run: impl Fn(&mut [f32], usize, usize) + Sync,
    row: impl Fn(&mut [f32], usize) + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; v.numel()];
    let row_len = v.channels * v.inner;
    if row_len == 0 {
        return out;
    }
    let rows_per_task = (TASK_ELEMS / row_len).max(1);
    out.par_chunks_mut(rows_per_task * row_len)
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
                *o = (xv - mc) * ac + bc;
            }
        },
        |out, start| {
            let n = out.len();
            let it = out.iter_mut().zip(&x[start..start + n]);
            for ((((o, &xv), &mc), &ac), &bc) in it.zip(&m[..n]).zip(&a[..n]).zip(&b[..n]) {
                *o = (xv - mc) * ac + bc;
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
                    *o = a * g + k * (xv - m) - d;
                }
            } else {
                for (o, &g) in out.iter_mut().zip(gs) {
                    *o = a * g;
                }
            }
        },
        |out, start| {
            let (xs, gs) = at(start, out.len());
            for (((o, &xv), &g), cf) in out.iter_mut().zip(xs).zip(gs).zip(coef) {
                let [m, a, k, d] = *cf;
                *o = if training {
                    a * g + k * (xv - m) - d
                } else {
                    a * g
                };
            }
        },
    )
}
