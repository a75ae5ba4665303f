//! The functional API in one page: a batch split into parts (one of them empty) goes
//! through the pieces synchronized batch norm is made of — stats → gather → elemt, and
//! backward_reduce → sum → backward_elemt — and agrees with one `batch_norm` call on the
//! whole batch. Prints each difference and PASS or FAIL against a stated tolerance.
//!
//! cargo run --release --example functional [-- --cpu]

use wgpu_batchnorm::ops::{self, RunningStats};
use wgpu_batchnorm::{Context, GradMask, GradSums, Result, Tensor};

/// Deterministic data in [-2, 2) plus an offset.
fn data(len: usize, seed: u32, offset: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).max(1);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            offset + (s as f32 / u32::MAX as f32) * 4.0 - 2.0
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn main() -> Result<()> {
    let ctx = if std::env::args().any(|a| a == "--cpu") {
        Context::cpu()
    } else {
        Context::new().unwrap_or_else(|_| Context::cpu())
    };
    println!("context: {}", ctx.name());
    let (n, c, hw) = (12, 8, 9 * 9);
    let dims = [n, c, 9, 9];
    let xs = data(n * c * hw, 1, 5.0);
    let dys = data(n * c * hw, 2, 0.0);
    let weight = ctx.tensor_from_slice(&data(c, 3, 1.0), &[c])?;
    let bias = ctx.tensor_from_slice(&data(c, 4, 0.0), &[c])?;
    let running = |v: f32| ctx.tensor_from_slice(&vec![v; c], &[c]);

    // One call on the whole batch.
    let x = ctx.tensor_from_slice(&xs, &dims)?;
    let dy = ctx.tensor_from_slice(&dys, &dims)?;
    let (mut rm, mut rv) = (running(0.0)?, running(1.0)?);
    let whole = ops::batch_norm(
        &x,
        Some(&mut rm),
        Some(&mut rv),
        Some(&weight),
        Some(&bias),
        true,
        0.1,
        1e-5,
    )?;
    let grads = ops::batch_norm_backward(&dy, &x, &whole.saved, Some(&weight), GradMask::ALL)?;

    // The same batch as parts of 5, 0 and 7 samples (as if on three devices).
    let sizes = [5, 0, 7];
    let mut parts: Vec<(Tensor, Tensor)> = Vec::new();
    let mut start = 0;
    for &s in &sizes {
        let range = start * c * hw..(start + s) * c * hw;
        parts.push((
            ctx.tensor_from_slice(&xs[range.clone()], &[s, c, 9, 9])?,
            ctx.tensor_from_slice(&dys[range], &[s, c, 9, 9])?,
        ));
        start += s;
    }
    let moments = parts
        .iter()
        .map(|(x, _)| ops::batch_norm_stats(x))
        .collect::<Result<Vec<_>>>()?;
    let (mut rm_parts, mut rv_parts) = (running(0.0)?, running(1.0)?);
    let running = RunningStats {
        mean: &mut rm_parts,
        var: &mut rv_parts,
        momentum: 0.1,
    };
    let saved = ops::batch_norm_gather_stats(&moments, 1e-5, Some(running))?;
    let mut y_parts = Vec::new();
    let mut total = None;
    let (mut dw, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
    for (x, dy) in &parts {
        y_parts.extend(ops::batch_norm_elemt(x, &saved, Some(&weight), Some(&bias))?.to_vec()?);
        let sums = ops::batch_norm_backward_reduce(dy, x, &saved, GradMask::ALL)?;
        for (acc, t) in [(&mut dw, sums.dweight()), (&mut db, sums.dbias())] {
            for (a, v) in acc.iter_mut().zip(t.expect("asked for").to_vec()?) {
                *a += v;
            }
        }
        // The all-reduce of a distributed run: here, a sum of host forms.
        let host = sums.to_host()?;
        match &mut total {
            None => total = Some(host),
            Some(t) => t.add(&host)?,
        }
    }
    let summed = GradSums::from_host(&ctx, &total.expect("three parts"))?;
    let mut dx_parts = Vec::new();
    for (x, dy) in &parts {
        let dx =
            ops::batch_norm_backward_elemt(dy, x, &saved, Some(&weight), &summed, (n * hw) as u64)?;
        dx_parts.extend(dx.to_vec()?);
    }

    // f32 rounding of O(1) values: y and dx to 1e-4; running statistics and dγ, dβ (sums of
    // ~1000 terms) to 1e-3.
    let checks = [
        ("y", max_diff(&y_parts, &whole.y.to_vec()?), 1e-4),
        (
            "running_mean",
            max_diff(&rm_parts.to_vec()?, &rm.to_vec()?),
            1e-3,
        ),
        (
            "running_var",
            max_diff(&rv_parts.to_vec()?, &rv.to_vec()?),
            1e-3,
        ),
        (
            "dx",
            max_diff(&dx_parts, &grads.dx.expect("asked for").to_vec()?),
            1e-4,
        ),
        (
            "dweight",
            max_diff(&dw, &grads.dweight.expect("asked for").to_vec()?),
            1e-3,
        ),
        (
            "dbias",
            max_diff(&db, &grads.dbias.expect("asked for").to_vec()?),
            1e-3,
        ),
    ];
    let mut ok = true;
    for (name, diff, tol) in checks {
        let pass = diff <= tol;
        ok &= pass;
        println!(
            "{name:>13}: parts vs whole max |diff| {diff:.2e} (tolerance {tol:.0e}) {}",
            if pass { "PASS" } else { "FAIL" }
        );
    }
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
