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

/// Per-channel pairs of f64 sums: for each channel `c`, over all its values at index `i`,
/// `(Σ f(i).0, Σ f(i).1)` where `pair(i, c)` gives the two terms. The lane loops are generic
/// so each caller's closure is inlined into vectorizable code.
fn reduce_pairs<F>(v: View, pair: F) -> Vec<[f64; 2]>
where
    F: Fn(usize, usize) -> (f64, f64) + Sync,
{
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
                // Channels are contiguous: one accumulator per channel, loop over channels.
                for o in o0..o1 {
                    let base = o * c_n;
                    for (k, a) in acc.iter_mut().enumerate() {
                        let (p, q) = pair(base + c0 + k, c0 + k);
                        a[0] += p;
                        a[1] += q;
                    }
                }
            } else {
                for o in o0..o1 {
                    for (k, a) in acc.iter_mut().enumerate() {
                        let c = c0 + k;
                        let base = (o * c_n + c) * v.inner;
                        let mut l0 = [0.0f64; LANES];
                        let mut l1 = [0.0f64; LANES];
                        let full = v.inner / LANES * LANES;
                        for s in (0..full).step_by(LANES) {
                            for l in 0..LANES {
                                let (p, q) = pair(base + s + l, c);
                                l0[l] += p;
                                l1[l] += q;
                            }
                        }
                        for s in full..v.inner {
                            let (p, q) = pair(base + s, c);
                            l0[0] += p;
                            l1[0] += q;
                        }
                        a[0] += l0.iter().sum::<f64>();
                        a[1] += l1.iter().sum::<f64>();
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
    let sums = reduce_pairs(v, |i, c| {
        let d = x[i] as f64 - shift[c];
        (d, d * d)
    });
    sums.iter()
        .zip(&shift)
        .map(|(s, &k)| {
            if n == 0.0 {
                (0.0, 0.0)
            } else {
                (k + s[0] / n, (s[1] - s[0] * s[0] / n).max(0.0))
            }
        })
        .collect()
}

/// Per-channel (Σ dy, Σ dy·(x − mean_c)), in f64.
pub fn grad_sums(x: &[f32], dy: &[f32], mean: &[f32], v: View) -> Vec<(f64, f64)> {
    reduce_pairs(v, |i, c| {
        let g = dy[i] as f64;
        (g, g * (x[i] as f64 - mean[c] as f64))
    })
    .into_iter()
    .map(|s| (s[0], s[1]))
    .collect()
}

/// out[i] = f(i, c) for every value, rows in parallel.
fn map_values<F>(v: View, f: F) -> Vec<f32>
where
    F: Fn(usize, usize) -> f32 + Sync,
{
    let mut out = vec![0f32; v.numel()];
    let row = v.channels * v.inner;
    if row == 0 {
        return out;
    }
    let rows_per_task = (TASK_ELEMS / row).max(1);
    out.par_chunks_mut(rows_per_task * row)
        .enumerate()
        .for_each(|(t, chunk)| {
            let first = t * rows_per_task * row;
            for (r, block) in chunk.chunks_mut(row).enumerate() {
                let base = first + r * row;
                for (c, run) in block.chunks_mut(v.inner).enumerate() {
                    let start = base + c * v.inner;
                    for (s, o) in run.iter_mut().enumerate() {
                        *o = f(start + s, c);
                    }
                }
            }
        });
    out
}

/// y = (x − m_c)·a_c + b_c with per-channel (m, a, b).
pub fn affine_centered(x: &[f32], m: &[f32], a: &[f32], b: &[f32], v: View) -> Vec<f32> {
    map_values(v, |i, c| (x[i] - m[c]) * a[c] + b[c])
}

/// dx = a_c·dy + k_c·(x − m_c) − d_c (the training backward), or a_c·dy when `k` is None.
pub fn grad_input(x: &[f32], dy: &[f32], coef: &[[f32; 4]], training: bool, v: View) -> Vec<f32> {
    if training {
        map_values(v, |i, c| {
            let [m, a, k, d] = coef[c];
            a * dy[i] + k * (x[i] - m) - d
        })
    } else {
        map_values(v, |i, c| coef[c][1] * dy[i])
    }
}
