//! Criterion benches: for each suite shape × op, one group holding the CPU path and every
//! adapter found, named by backend, and for the plain ops their float16 and bfloat16 rows
//! ("<backend> float16", "<backend> bfloat16", half the bytes); plus the copy ceiling of each
//! backend per shape.
//! GPU timing is submit + wait with resident data and no readback (`iter_custom`).
//!
//! cargo bench --bench batchnorm [-- FILTER]
//!
//! HTML reports with charts: target/criterion/report/index.html.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[path = "support.rs"]
mod support;
use support::{
    bench_name, contexts, prepare, prepare_typed, register_chart_font, Copier, Op, SUITE,
};
use wgpu_batchnorm::DType;

fn benches(c: &mut Criterion) {
    let ctxs = contexts();
    for case in SUITE {
        let numel: usize = case.dims.iter().product();
        let mut prepared: Vec<_> = ctxs
            .iter()
            .map(|ctx| prepare(ctx, case).expect("prepare"))
            .collect();
        // The half rows, where the backend stores the shape in that type (a GPU refuses
        // rows of odd length: said, not silent).
        let mut halves = Vec::new();
        for dtype in [DType::F16, DType::BF16] {
            for ctx in &ctxs {
                match prepare_typed(ctx, case, dtype) {
                    Ok(p) => halves.push((dtype, p)),
                    Err(e) => eprintln!("{} {dtype} on {}: {e}", case.name, ctx.name()),
                }
            }
        }
        for op in Op::ALL.into_iter().chain(Op::FUSED) {
            let mut group = c.benchmark_group(format!("{}/{}", case.name, op.name()));
            group.throughput(Throughput::Bytes((numel * op.bytes_per_element()) as u64));
            group.sample_size(10);
            for p in prepared.iter_mut() {
                let name = bench_name(&p.ctx);
                group.bench_function(name, |b| b.iter_custom(|iters| p.time(op, iters)));
            }
            if Op::ALL.contains(&op) {
                group.throughput(Throughput::Bytes(
                    (numel * op.bytes_per_element() / 2) as u64,
                ));
                for (dtype, p) in halves.iter_mut() {
                    let name = format!("{} {dtype}", bench_name(&p.ctx));
                    group.bench_function(name, |b| b.iter_custom(|iters| p.time(op, iters)));
                }
            }
            group.finish();
        }
        let mut group = c.benchmark_group(format!("{}/copy", case.name));
        group.throughput(Throughput::Bytes((numel * 8) as u64));
        group.sample_size(10);
        for ctx in &ctxs {
            let mut copier = Copier::new(ctx, numel * 4);
            group.bench_function(bench_name(ctx), |b| {
                b.iter_custom(|iters| copier.time(iters))
            });
        }
        group.finish();
    }
}

/// Criterion's defaults, with its HTML charts when their font is there (a loud warning and
/// no charts when it is not).
fn config() -> Criterion {
    match register_chart_font() {
        Ok(()) => Criterion::default(),
        Err(e) => {
            eprintln!("!!! criterion's HTML charts are off: {e}");
            Criterion::default().without_plots()
        }
    }
}

criterion_group! {
    name = batchnorm;
    config = config();
    targets = benches
}
criterion_main!(batchnorm);
