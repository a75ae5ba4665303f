"""Time PyTorch's CPU batch norm (float32) on the wgpu-batchnorm shape suite.

Run from the repository root with a Python that has torch (kept outside the
repo, e.g. `python3 -m venv ../venv-torch && ../venv-torch/bin/pip install torch numpy`):

    ../venv-torch/bin/python benches/pytorch_cpu.py [--threads N] [--json] [--min-time S]

--threads defaults to os.cpu_count() (torch.set_num_threads).  Each row is
warmed up, then timed repeatedly until at least 10 reps and at least
--min-time seconds (default 1.0) have run; the median is reported.

Ops:
  train_fwd  F.batch_norm(training=True) with running stats and affine
             weight/bias, under torch.no_grad() (running stats are updated).
  eval_fwd   F.batch_norm(training=False), same tensors, under torch.no_grad().
  train_bwd  backward only: torch.ops.aten.native_batch_norm_backward with
             train=True and output_mask=[True, True, True] (dx, dweight,
             dbias), fed the save_mean/save_invstd returned by a
             training-mode torch.ops.aten.native_batch_norm forward that runs
             once, outside the timed region.  This is the kernel autograd
             runs for batch norm's backward on CPU.

Effective bandwidth uses minimal bytes per element of the input:
train_fwd 12 B (read x twice, write y), eval_fwd 8 B (read x, write y),
train_bwd 20 B (read x, dy twice each, write dx).

Prints one markdown table; with --json also prints one JSON object per row
(fields: shape, op, backend="pytorch_cpu", median_ms, threads).
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [
    ("resnet_early", (32, 64, 56, 56), False),
    ("resnet_late", (32, 512, 7, 7), False),
    ("tall_2d", (100000, 32), False),
    ("mlp_2d", (256, 1024), False),
    ("video_3d", (4, 32, 16, 56, 56), False),
    ("resnet_early_nhwc", (32, 64, 56, 56), True),
    ("resnet_late_nhwc", (32, 512, 7, 7), True),
]

BYTES_PER_ELEM = {"train_fwd": 12, "eval_fwd": 8, "train_bwd": 20}
EPS = 1e-5
MOMENTUM = 0.1


def time_fn(fn, min_reps=10, min_time=1.0, warmup=3, max_reps=100000):
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start) < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= max_reps:
            break
    return statistics.median(times), len(times)


def make_inputs(shape, channels_last, gen):
    C = shape[1]
    x = torch.randn(shape, generator=gen)
    dy = torch.randn(shape, generator=gen)
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
        dy = dy.contiguous(memory_format=fmt)
    w = torch.rand(C, generator=gen) + 0.5
    b = torch.randn(C, generator=gen)
    rm = torch.zeros(C)
    rv = torch.ones(C)
    return x, dy, w, b, rm, rv


def bench_shape(shape, channels_last, min_time, gen):
    x, dy, w, b, rm, rv = make_inputs(shape, channels_last, gen)
    rows = {}
    with torch.no_grad():
        def train_fwd():
            return F.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS)

        def eval_fwd():
            return F.batch_norm(x, rm, rv, w, b, training=False, momentum=MOMENTUM, eps=EPS)

        rows["train_fwd"] = time_fn(train_fwd, min_time=min_time)
        rows["eval_fwd"] = time_fn(eval_fwd, min_time=min_time)

        _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            x, w, b, rm, rv, True, MOMENTUM, EPS)

        def train_bwd():
            return torch.ops.aten.native_batch_norm_backward(
                dy, x, w, rm, rv, save_mean, save_invstd, True, EPS, [True, True, True])

        rows["train_bwd"] = time_fn(train_bwd, min_time=min_time)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true", help="also print JSON lines")
    ap.add_argument("--min-time", type=float, default=1.0,
                    help="minimum seconds of timed reps per row (default 1.0)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)

    results = []
    for name, shape, cl in SHAPES:
        numel = 1
        for d in shape:
            numel *= d
        rows = bench_shape(shape, cl, args.min_time, gen)
        for op in ("train_fwd", "eval_fwd", "train_bwd"):
            med, reps = rows[op]
            gbs = BYTES_PER_ELEM[op] * numel / med / 1e9
            results.append((name, shape, op, med * 1e3, gbs, reps))

    print(f"PyTorch {torch.__version__} CPU batch norm, float32, "
          f"threads={torch.get_num_threads()}, min_time={args.min_time}s\n")
    print("| shape | dims | op | median ms | GB/s | reps |")
    print("|---|---|---|---:|---:|---:|")
    for name, shape, op, ms, gbs, reps in results:
        dims = "x".join(str(d) for d in shape)
        print(f"| {name} | {dims} | {op} | {ms:.3f} | {gbs:.2f} | {reps} |")
    if args.json:
        print()
        for name, shape, op, ms, gbs, reps in results:
            print(json.dumps({"shape": name, "op": op, "backend": "pytorch_cpu",
                              "median_ms": round(ms, 6), "threads": args.threads}))


if __name__ == "__main__":
    main()
