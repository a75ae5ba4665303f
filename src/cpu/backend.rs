//! The [`Backend`] on the CPU: the op layer's kernel families over host memory, on the
//! multithreaded loops of [`fast`](super::fast). Statistics accumulate in f64; summaries are
//! (mean, M2) in f64 and merge with Chan's formula.

use std::sync::Arc;

use super::elem::{self, Bf16, Elem, F16};
use super::fast;
use crate::backend::{Backend, Batch, Epilogue, EpilogueGrad, Grads, Reduced, Running, Summaries};
use crate::context::{Data, Tensor};
use crate::dtype::DType;
use crate::error::Result;

/// The CPU backend (stateless: the data lives in the tensors).
pub(crate) struct CpuBackend;

fn host(t: &Tensor) -> &[f32] {
    match &t.data {
        Data::Cpu(v) => v,
        Data::Gpu(_) => unreachable!("the op layer checks contexts: GPU data on the CPU backend"),
    }
}

/// A tensor's values as its storage type `T` (the op layer has checked the dtypes).
fn elems<T: Elem>(t: &Tensor) -> &[T] {
    debug_assert_eq!(t.dtype(), T::DTYPE);
    elem::view(host(t), t.numel())
}

/// `$body` with `$t` the storage type ([`Elem`]) of `$dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F16 => {
                type $t = F16;
                $body
            }
            DType::BF16 => {
                type $t = Bf16;
                $body
            }
        }
    };
}

fn saved_pairs(saved: &Data) -> &[f32] {
    match saved {
        Data::Cpu(v) => v,
        Data::Gpu(_) => unreachable!("the op layer checks contexts"),
    }
}

fn pairs(s: &Summaries) -> &[[f64; 2]] {
    match s {
        Summaries::Cpu(v) => v,
        Summaries::Gpu(_) => unreachable!("the op layer checks contexts"),
    }
}

/// Chan's merge of (count, mean, M2) summaries, in order.
fn merge(parts: &[(&[[f64; 2]], u64)], channels: usize) -> (u64, Vec<[f64; 2]>) {
    let mut n = 0u64;
    let mut acc = vec![[0.0f64; 2]; channels];
    for &(part, count) in parts {
        if count == 0 {
            continue;
        }
        let total = n + count;
        let wb = count as f64 / total as f64;
        for (a, b) in acc.iter_mut().zip(part) {
            if n == 0 {
                *a = *b;
                continue;
            }
            let d = b[0] - a[0];
            let mean = if d.is_finite() {
                a[0] + d * wb
            } else {
                // ±Inf in a part: the plain weighted mean keeps +Inf (and +Inf − Inf = NaN).
                a[0] * (1.0 - wb) + b[0] * wb
            };
            *a = [mean, a[1] + b[1] + d * d * n as f64 * wb];
        }
        n = total;
    }
    (n, acc)
}

/// Updates the running statistics in place (copy-on-write) with (mean, M2) of n values.
fn update_running(running: Running<'_>, n: u64, stats: &[[f64; 2]]) {
    let m = running.momentum as f64;
    let nf = n as f64;
    let rm = running_values(running.mean);
    for (r, s) in rm.iter_mut().zip(stats) {
        *r = (m * s[0] + (1.0 - m) * *r as f64) as f32;
    }
    let rv = running_values(running.var);
    for (r, s) in rv.iter_mut().zip(stats) {
        *r = (m * s[1] / (nf - 1.0) + (1.0 - m) * *r as f64) as f32;
    }
}

fn running_values(t: &mut Tensor) -> &mut Vec<f32> {
    match &mut t.data {
        Data::Cpu(v) => &mut *Arc::make_mut(v),
        Data::Gpu(_) => unreachable!("the op layer checks contexts"),
    }
}

/// Saved (mean, invstd) from (mean, M2) of n values.
fn saved_from(n: u64, stats: &[[f64; 2]], eps: f32) -> Data {
    let saved: Vec<f32> = if n == 0 {
        // An empty batch: nothing to normalize; saved as zeros (as the GPU does).
        vec![0.0; 2 * stats.len()]
    } else {
        let nf = n as f64;
        stats
            .iter()
            .flat_map(|s| [s[0] as f32, (1.0 / (s[1] / nf + eps as f64).sqrt()) as f32])
            .collect()
    };
    Data::cpu(saved)
}

/// dx coefficients [μ, a, b, a·mean(dy)] per channel (see `fast::grad_input`).
fn dx_coefficients(
    saved: &[f32],
    weight: Option<&[f32]>,
    sums: Option<(&[[f64; 2]], u64)>,
) -> Vec<[f32; 4]> {
    let c = saved.len() / 2;
    (0..c)
        .map(|ch| {
            let (mu, is) = (saved[2 * ch] as f64, saved[2 * ch + 1] as f64);
            let a = weight.map_or(1.0, |w| w[ch] as f64) * is;
            match sums {
                Some((s, n)) => {
                    let n = n as f64;
                    let [sdy, sdyx] = s[ch];
                    [
                        mu as f32,
                        a as f32,
                        (-a * is * is * sdyx / n) as f32,
                        (a * sdy / n) as f32,
                    ]
                }
                None => [mu as f32, a as f32, 0.0, 0.0],
            }
        })
        .collect()
}

impl Backend for CpuBackend {
    fn begin(&self) -> Result<Batch> {
        Ok(Batch::default())
    }

    fn moments(&self, _: &mut Batch, x: &Tensor) -> Result<Summaries> {
        let view = x.shape().view();
        let stats = by_dtype!(x.dtype(), T => fast::stats(elems::<T>(x), view));
        Ok(Summaries::Cpu(Arc::new(
            stats.into_iter().map(|(m, m2)| [m, m2]).collect(),
        )))
    }

    fn gather(
        &self,
        _: &mut Batch,
        parts: &[(&Summaries, u64)],
        channels: usize,
        eps: f32,
        running: Option<Running<'_>>,
    ) -> Result<Data> {
        let parts: Vec<_> = parts.iter().map(|&(s, n)| (pairs(s), n)).collect();
        let (n, stats) = merge(&parts, channels);
        if let (Some(r), true) = (running, n > 0) {
            update_running(r, n, &stats);
        }
        Ok(saved_from(n, &stats, eps))
    }

    fn batch_stats(
        &self,
        batch: &mut Batch,
        x: &Tensor,
        eps: f32,
        running: Option<Running<'_>>,
    ) -> Result<Data> {
        let moments = self.moments(batch, x)?;
        let n = x.shape().view().per_channel() as u64;
        self.gather(batch, &[(&moments, n)], x.shape().channels(), eps, running)
    }

    fn running_stats(&self, _: &mut Batch, mean: &Tensor, var: &Tensor, eps: f32) -> Result<Data> {
        let saved: Vec<f32> = host(mean)
            .iter()
            .zip(host(var))
            .flat_map(|(&rm, &rv)| [rm, (1.0 / (rv as f64 + eps as f64).sqrt()) as f32])
            .collect();
        Ok(Data::cpu(saved))
    }

    fn elemt(
        &self,
        _: &mut Batch,
        x: &Tensor,
        saved: &Data,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        epi: Epilogue<'_>,
    ) -> Result<Data> {
        let sv = saved_pairs(saved);
        let c = sv.len() / 2;
        let mean: Vec<f32> = sv.chunks(2).map(|p| p[0]).collect();
        let scale: Vec<f32> = match weight {
            Some(w) => host(w)
                .iter()
                .zip(sv.chunks(2))
                .map(|(g, p)| g * p[1])
                .collect(),
            None => sv.chunks(2).map(|p| p[1]).collect(),
        };
        let zeros;
        let shift: &[f32] = match bias {
            Some(b) => host(b),
            None => {
                zeros = vec![0.0; c];
                &zeros
            }
        };
        let view = x.shape().view();
        let (z, relu) = (epi.residual, epi.relu);
        let y = by_dtype!(x.dtype(), T => {
            let z = z.map(elems::<T>);
            fast::affine_centered(elems::<T>(x), &mean, &scale, shift, z, relu, view)
        });
        Ok(Data::cpu(y))
    }

    fn backward_reduce(
        &self,
        _: &mut Batch,
        dy: &Tensor,
        x: &Tensor,
        saved: &Data,
        dweight: bool,
        dbias: bool,
    ) -> Result<Reduced> {
        let sv = saved_pairs(saved);
        let view = x.shape().view();
        let mean: Vec<f32> = sv.chunks(2).map(|p| p[0]).collect();
        let sums = by_dtype!(x.dtype(), T => {
            fast::grad_sums(elems::<T>(x), elems::<T>(dy), &mean, view)
        });
        let empty = view.per_channel() == 0;
        // An empty batch has zero gradients, whatever the statistics (0·NaN).
        let dw = dweight.then(|| {
            let dw: Vec<f32> = sums
                .iter()
                .zip(sv.chunks(2))
                .map(|(s, p)| {
                    if empty {
                        0.0
                    } else {
                        (s.1 * p[1] as f64) as f32
                    }
                })
                .collect();
            Data::cpu(dw)
        });
        let db = dbias.then(|| Data::cpu(sums.iter().map(|s| s.0 as f32).collect::<Vec<_>>()));
        Ok(Reduced {
            sums: Summaries::Cpu(Arc::new(sums.iter().map(|&(a, b)| [a, b]).collect())),
            dweight: dw,
            dbias: db,
        })
    }

    fn backward_elemt(
        &self,
        _: &mut Batch,
        dy: &Tensor,
        x: &Tensor,
        saved: &Data,
        weight: Option<&Tensor>,
        sums: Option<(&Summaries, u64)>,
    ) -> Result<Data> {
        let coef = dx_coefficients(
            saved_pairs(saved),
            weight.map(host),
            sums.map(|(s, n)| (pairs(s), n)),
        );
        let (training, view) = (sums.is_some(), x.shape().view());
        let dx = by_dtype!(x.dtype(), T => {
            fast::grad_input(elems::<T>(x), elems::<T>(dy), &coef, training, view)
        });
        Ok(Data::cpu(dx))
    }

    fn backward(
        &self,
        batch: &mut Batch,
        dy: &Tensor,
        x: &Tensor,
        saved: &Data,
        weight: Option<&Tensor>,
        training: bool,
        (want_dx, want_dw, want_db): (bool, bool, bool),
        epi: EpilogueGrad<'_>,
    ) -> Result<Grads> {
        // The ReLU's mask applied once, as its own pass (memory is cheap to stream on the
        // CPU, and with a residual the masked dy is dz anyway).
        let masked;
        let dy = match epi.relu_y {
            Some(y) => {
                let g = by_dtype!(x.dtype(), T => fast::relu_grad(elems::<T>(dy), elems::<T>(y)));
                masked = Tensor::typed(x.context(), x.shape().clone(), Data::cpu(g), x.dtype());
                &masked
            }
            None => dy,
        };
        let dz = epi.dz.then(|| dy.data.clone());
        let reduce = want_dw || want_db || (want_dx && training);
        let reduced = if reduce {
            Some(self.backward_reduce(batch, dy, x, saved, want_dw, want_db)?)
        } else {
            None
        };
        let n = x.shape().view().per_channel() as u64;
        let dx = if want_dx {
            let sums = match (&reduced, training) {
                (Some(r), true) => Some((&r.sums, n)),
                _ => None,
            };
            Some(self.backward_elemt(batch, dy, x, saved, weight, sums)?)
        } else {
            None
        };
        let (dweight, dbias) = reduced.map_or((None, None), |r| (r.dweight, r.dbias));
        Ok(Grads {
            dx,
            dweight,
            dbias,
            dz,
        })
    }

    fn submit(&self, _: Batch) -> Result<()> {
        Ok(())
    }

    fn download_summaries(
        &self,
        s: &Summaries,
        _: usize,
        _: u64,
        _: bool,
    ) -> Result<Vec<[f64; 2]>> {
        Ok(pairs(s).to_vec())
    }

    fn upload_summaries(&self, pairs: &[[f64; 2]], _: u64, _: bool) -> Result<Summaries> {
        Ok(Summaries::Cpu(Arc::new(pairs.to_vec())))
    }
}
