//! Prints one markdown table: shape, op, backend, median ms (submit + wait, data resident),
//! kernel-only ms where the adapter has timestamp queries, effective GB/s (minimal bytes:
//! train forward 12 B/element, inference 8, backward 20), % of that backend's copy ceiling
//! (a vec4 copy kernel of x's size on a GPU, memcpy on the CPU, timed in the same run),
//! and speed-up against the CPU path.
//!
//! cargo run --release --example bench_report -- [--shapes a,b] [--backends cpu,vulkan,gl]
//!     [--min-time SECONDS]
//!     [--pytorch FILE]   JSON lines from `benches/pytorch_cpu.py --json`, shown beside
//!                        our CPU path (measure them back to back on the same machine)

use std::collections::HashMap;
use std::time::Duration;

#[path = "../benches/support.rs"]
mod support;
use support::{contexts, median_ms, prepare, Copier, Op, SUITE};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let shapes: Option<Vec<String>> =
        arg("--shapes").map(|s| s.split(',').map(str::to_string).collect());
    let min_time = Duration::from_secs_f64(
        arg("--min-time")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.5),
    );
    let pytorch = arg("--pytorch")
        .map(|f| read_pytorch(&f))
        .unwrap_or_default();

    let backends: Option<Vec<String>> =
        arg("--backends").map(|s| s.split(',').map(str::to_string).collect());
    let ctxs: Vec<_> = contexts()
        .into_iter()
        .filter(|c| {
            backends
                .as_ref()
                .is_none_or(|b| b.iter().any(|k| k == c.backend_kind()))
        })
        .collect();
    println!(
        "| shape | op | backend | median ms | kernel ms | GB/s | % of copy | vs CPU path |{}",
        if pytorch.is_empty() {
            ""
        } else {
            " PyTorch CPU ms | ours vs PyTorch |"
        }
    );
    println!(
        "|---|---|---|---:|---:|---:|---:|---:|{}",
        if pytorch.is_empty() { "" } else { "---:|---:|" }
    );
    for case in SUITE {
        if let Some(s) = &shapes {
            if !s.iter().any(|n| n == case.name) {
                continue;
            }
        }
        let numel: usize = case.dims.iter().product();
        let mut rows = Vec::new();
        for ctx in &ctxs {
            let mut p = match prepare(ctx, case) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("{} on {}: {e}", case.name, ctx.name());
                    continue;
                }
            };
            let mut copier = Copier::new(ctx, numel * 4);
            let copy_ms = median_ms(|i| copier.time(i), 5, min_time);
            let copy_gbs = (numel * 8) as f64 / copy_ms / 1e6;
            for op in Op::ALL {
                let ms = median_ms(|i| p.time(op, i), 5, min_time);
                let kernel = p.kernel_ms(op, 5);
                rows.push((op, ctx.name(), ms, copy_gbs, kernel));
            }
        }
        for op in Op::ALL {
            let cpu_ms = rows.iter().find(|r| r.0 == op && r.1 == "cpu").map(|r| r.2);
            for (_, backend, ms, copy_gbs, kernel) in rows.iter().filter(|r| r.0 == op) {
                let gbs = (numel * op.bytes_per_element()) as f64 / ms / 1e6;
                let speedup = cpu_ms
                    .map(|c| format!("{:.2}×", c / ms))
                    .unwrap_or_default();
                let torch = if pytorch.is_empty() {
                    String::new()
                } else if backend == "cpu" {
                    match pytorch.get(&(case.name.to_string(), op.name().to_string())) {
                        Some(t) => format!(" {t:.3} | {:.2}× |", t / ms),
                        None => " | |".into(),
                    }
                } else {
                    " | |".into()
                };
                let kernel = kernel
                    .map(|k| format!("{k:.3}"))
                    .unwrap_or_else(|| "–".into());
                println!(
                    "| {} | {} | {} | {:.3} | {} | {:.1} | {:.0} % | {} |{}",
                    case.name,
                    op.name(),
                    backend,
                    ms,
                    kernel,
                    gbs,
                    100.0 * gbs / copy_gbs,
                    speedup,
                    torch
                );
            }
        }
    }
}

/// (shape, op) → median ms from the PyTorch script's JSON lines.
fn read_pytorch(path: &str) -> HashMap<(String, String), f64> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let mut out = HashMap::new();
    for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
        let field = |name: &str| -> Option<String> {
            let key = format!("\"{name}\":");
            let rest = line[line.find(&key)? + key.len()..].trim_start();
            let end = rest.find([',', '}'])?;
            Some(rest[..end].trim().trim_matches('"').to_string())
        };
        if let (Some(shape), Some(op), Some(ms)) = (field("shape"), field("op"), field("median_ms"))
        {
            if let Ok(ms) = ms.parse() {
                out.insert((shape, op), ms);
            }
        }
    }
    out
}
