//! Lists the adapters, then on the CPU path and on every GPU adapter runs a 32×64×56×56
//! training forward, an inference forward and a training backward, checks each against the
//! f64 reference and prints: backend, op, time, max error, and PASS or FAIL against the
//! tolerance of each row (exit status 1 when any row fails).
//!
//! cargo run --release --example quickstart

use std::time::Instant;

use wgpu_batchnorm::cpu::reference::ReferenceBatchNorm;
use wgpu_batchnorm::{BatchNorm, BatchNormConfig, Context, Shape};

const DIMS: [usize; 4] = [32, 64, 56, 56];

/// Deterministic pseudo-normal data (sum of uniforms), offset per channel.
fn data(len: usize, seed: u64, offset: f32) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|i| {
            let mut u = 0.0;
            for _ in 0..4 {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                u += (s >> 40) as f32 / (1u64 << 24) as f32;
            }
            (u - 2.0) * 1.7 + offset + (i / (56 * 56) % 64) as f32 * 0.1
        })
        .collect()
}

fn max_err(got: &[f32], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs())
        .fold(0.0, f64::max)
}

/// Median wall time of `reps` runs of `f`, each followed by a device wait.
fn time<T>(
    ctx: &Context,
    reps: usize,
    mut f: impl FnMut() -> T,
) -> Result<f64, wgpu_batchnorm::Error> {
    let mut times = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let out = f();
        ctx.synchronize()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        drop(out);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn main() -> Result<(), wgpu_batchnorm::Error> {
    let n: usize = DIMS.iter().product();
    let xs = data(n, 1, 3.0);
    let dys = data(n, 2, 0.0);
    let shape = Shape::new(&DIMS)?;
    let config = BatchNormConfig::new(DIMS[1]);

    // The oracle: one training step, then inference and backward.
    let mut reference = ReferenceBatchNorm::new(config);
    let ref_train = reference.forward_train(&xs, &shape)?;
    let ref_grads = reference.backward(&dys, &xs, &shape, &ref_train);
    let ref_eval = reference.forward_eval(&xs, &shape)?;
    // Σ|dy·x̂| and Σ|dy| per channel: the scale of dγ's and dβ's rounding.
    let (mut scale_dw, mut scale_db) = (vec![0.0f64; DIMS[1]], vec![0.0f64; DIMS[1]]);
    let spatial = DIMS[2] * DIMS[3];
    for (i, (&x, &g)) in xs.iter().zip(&dys).enumerate() {
        let c = i / spatial % DIMS[1];
        let xhat = (x as f64 - ref_train.mean[c]) * ref_train.invstd[c];
        scale_dw[c] += (g as f64 * xhat).abs();
        scale_db[c] += (g as f64).abs();
    }

    let mut contexts = vec![Context::cpu()];
    println!("adapters:");
    for ctx in Context::all_gpus() {
        match ctx {
            Ok(ctx) => {
                println!("  {}", ctx.name());
                contexts.push(ctx);
            }
            Err(e) => println!("  (unusable) {e}"),
        }
    }
    if contexts.len() == 1 {
        println!("  none found: only the CPU path runs");
    }

    println!("\ninput {DIMS:?} f32, max |error| against the f64 reference\n");
    // Tolerances: y and dx are O(1) values from a handful of f32 roundings after f32
    // reductions of 1e5 values (observed ~1e-6 to 1e-5); dγ, dβ relative to Σ|term|.
    const TOL_Y: f64 = 1e-4;
    const TOL_DX: f64 = 1e-4;
    const TOL_DPARAM: f64 = 1e-5;
    let verdict = |e: f64, tol: f64| if e <= tol { "PASS" } else { "FAIL" };
    let mut failed = false;
    println!("| backend | op | median ms | max error | tolerance | |");
    println!("|---|---|---:|---:|---:|---|");
    for ctx in &contexts {
        let x = ctx.tensor_from_slice(&xs, &DIMS)?;
        let dy = ctx.tensor_from_slice(&dys, &DIMS)?;

        // Checked step first (fresh layer, so its running stats match the reference's).
        let mut bn = BatchNorm::new(ctx, config)?;
        let out = bn.forward_train(&x)?;
        let e_train = max_err(&out.y.to_vec()?, &ref_train.y);
        let grads = bn.backward(&dy, &x, &out.saved)?;
        let dx = grads.dx.as_ref().expect("dx requested").to_vec()?;
        let dw = grads.dweight.as_ref().expect("affine").to_vec()?;
        let db = grads.dbias.as_ref().expect("affine").to_vec()?;
        // dγ, dβ are sums of n = 100352 terms that largely cancel: the error is relative to
        // the sum of the terms' magnitudes (what f32 summation can promise).
        let rel = |got: &[f32], want: &[f64], scale: &[f64]| {
            got.iter()
                .zip(want)
                .zip(scale)
                .map(|((&g, &w), &s)| (g as f64 - w).abs() / s.max(f64::MIN_POSITIVE))
                .fold(0.0, f64::max)
        };
        let e_bwd = max_err(&dx, &ref_grads.dx);
        let e_dw = rel(&dw, &ref_grads.dweight, &scale_dw);
        let e_db = rel(&db, &ref_grads.dbias, &scale_db);
        let mut eval_bn = BatchNorm::new(ctx, config)?;
        eval_bn.set_running_mean(&bn.running_mean()?.unwrap_or_default())?;
        eval_bn.set_running_var(&bn.running_var()?.unwrap_or_default())?;
        eval_bn.eval();
        let e_eval = max_err(&eval_bn.forward(&x)?.y.to_vec()?, &ref_eval.y);

        let reps = 7;
        let t_train = time(ctx, reps, || bn.forward_train(&x))?;
        let t_eval = time(ctx, reps, || eval_bn.forward(&x))?;
        let t_bwd = time(ctx, reps, || bn.backward(&dy, &x, &out.saved))?;
        let name = ctx.name();
        let e_params = e_dw.max(e_db);
        failed |= e_train > TOL_Y || e_eval > TOL_Y || e_bwd > TOL_DX || e_params > TOL_DPARAM;
        let v = |e, tol| verdict(e, tol);
        println!(
            "| {name} | train forward | {t_train:.2} | {e_train:.2e} | {TOL_Y:.0e} | {} |",
            v(e_train, TOL_Y)
        );
        println!(
            "| {name} | inference forward | {t_eval:.2} | {e_eval:.2e} | {TOL_Y:.0e} | {} |",
            v(e_eval, TOL_Y)
        );
        println!(
            "| {name} | train backward: dx | {t_bwd:.2} | {e_bwd:.2e} | {TOL_DX:.0e} | {} |",
            v(e_bwd, TOL_DX)
        );
        println!(
            "| {name} | train backward: dγ, dβ (÷ Σ abs(term)) | | {e_dw:.2e}, {e_db:.2e} | {TOL_DPARAM:.0e} | {} |",
            v(e_params, TOL_DPARAM)
        );
    }
    if failed {
        println!("\nFAIL: a row is outside its tolerance");
        std::process::exit(1);
    }
    println!("\nPASS: every row within its tolerance");
    Ok(())
}
