//! [`Engine`] in plain Rust loops, beside the library's CPU context. Products of more than
//! about a million multiply-adds split their rows over rayon's threads; each output is
//! still summed by one thread in one order, so results do not depend on the thread count.

use std::borrow::Cow;

use rayon::prelude::*;
use wgpu_batchnorm::{Context, Tensor};

use crate::data::CLASSES;
use crate::engine::{Act, Engine, Gemm, Result};

/// The CPU engine.
pub struct CpuEngine {
    ctx: Context,
}

impl CpuEngine {
    /// An engine on [`Context::cpu`].
    pub fn new() -> Self {
        Self {
            ctx: Context::cpu(),
        }
    }
}

/// `x` (rows × cols, row-major) transposed.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

impl Engine for CpuEngine {
    type Buf = Vec<f32>;

    fn context(&self) -> &Context {
        &self.ctx
    }

    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }

    fn download(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn gemm(
        &self,
        g: Gemm,
        a: &Vec<f32>,
        b: &Vec<f32>,
        bias: Option<&Vec<f32>>,
        act: Act,
        aux: Option<&Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let Gemm { m, n, k, a_t, b_t } = g;
        if a.len() < m * k || b.len() < k * n || bias.is_some_and(|v| v.len() < n) {
            return Err(
                format!("gemm {g:?}: operands of {} and {} values", a.len(), b.len()).into(),
            );
        }
        let aux = match (act, aux) {
            (Act::SigmoidGrad, Some(h)) if h.len() >= m * n => Some(h.as_slice()),
            (Act::SigmoidGrad, _) => return Err("gemm: SigmoidGrad needs an m × n aux".into()),
            _ => None,
        };
        // One layout for the loop: op(A) row-major m × k, op(B) row-major k × n.
        let a: Cow<[f32]> = if a_t {
            Cow::Owned(transpose(a, k, m))
        } else {
            Cow::Borrowed(a)
        };
        let b: Cow<[f32]> = if b_t {
            Cow::Owned(transpose(b, n, k))
        } else {
            Cow::Borrowed(b)
        };
        let mut c = vec![0.0f32; m * n];
        let row = |i: usize, out: &mut [f32]| {
            if let Some(bias) = bias {
                out.copy_from_slice(&bias[..n]);
            }
            // Row i of C accumulates a[i][kk] · (row kk of B): contiguous, vectorizable.
            for (kk, &av) in a[i * k..(i + 1) * k].iter().enumerate() {
                if av != 0.0 {
                    for (o, &bv) in out.iter_mut().zip(&b[kk * n..(kk + 1) * n]) {
                        *o += av * bv;
                    }
                }
            }
            match act {
                Act::None => {}
                Act::Sigmoid => out.iter_mut().for_each(|v| *v = sigmoid(*v)),
                Act::SigmoidGrad => {
                    let h = &aux.expect("checked above")[i * n..(i + 1) * n];
                    for (v, &h) in out.iter_mut().zip(h) {
                        *v *= h * (1.0 - h);
                    }
                }
            }
        };
        if m * n * k > 1 << 20 && n > 0 {
            c.par_chunks_mut(n)
                .enumerate()
                .for_each(|(i, out)| row(i, out));
        } else if n > 0 {
            c.chunks_mut(n).enumerate().for_each(|(i, out)| row(i, out));
        }
        Ok(c)
    }

    fn sigmoid(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.iter().map(|&v| sigmoid(v)).collect())
    }

    fn softmax_xent(
        &self,
        logits: &Vec<f32>,
        labels: &Vec<f32>,
        rows: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        if logits.len() < rows * CLASSES || labels.len() < rows {
            return Err("softmax_xent: fewer logits or labels than rows".into());
        }
        let mut grad = vec![0.0f32; rows * CLASSES];
        let mut stats = vec![0.0f32; rows * 2];
        let scale = 1.0 / rows as f32;
        for r in 0..rows {
            let z = &logits[r * CLASSES..(r + 1) * CLASSES];
            let label = labels[r] as usize;
            let (mut best, mut max) = (0, z[0]);
            for (c, &v) in z.iter().enumerate() {
                if v > max {
                    (best, max) = (c, v);
                }
            }
            let sum: f32 = z.iter().map(|&v| (v - max).exp()).sum();
            stats[2 * r] = sum.ln() + max - z[label];
            stats[2 * r + 1] = (best == label) as u32 as f32;
            for (c, (g, &v)) in grad[r * CLASSES..(r + 1) * CLASSES]
                .iter_mut()
                .zip(z)
                .enumerate()
            {
                let p = (v - max).exp() / sum;
                *g = (p - (c == label) as u32 as f32) * scale;
            }
        }
        Ok((grad, stats))
    }

    fn axpy(&self, y: &mut Vec<f32>, alpha: f32, x: &Vec<f32>) -> Result<()> {
        if x.len() != y.len() {
            return Err(format!("axpy: lengths {} and {}", y.len(), x.len()).into());
        }
        for (y, &x) in y.iter_mut().zip(x) {
            *y += alpha * x;
        }
        Ok(())
    }

    fn copy(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn wrap_tensor(&self, t: Tensor) -> Result<Vec<f32>> {
        Ok(t.to_vec()?)
    }
}
