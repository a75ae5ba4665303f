"""The CPU path against PyTorch's CPU batch norm, in several back-to-back pairs of runs.

Run from the repository root with a Python that has torch (see pytorch_cpu.py):

    ../venv-torch/bin/python benches/cpu_vs_pytorch.py [--pairs 3] [--threads 2]

Each pair runs benches/pytorch_cpu.py, then the report's CPU rows
(`cargo run --release --example bench_report -- --backends cpu --pytorch ...`), so the two
sides of a row are measured minutes apart at most. On a shared machine single runs move by
10-20 %, so the table gives, per row, both medians and the median, lowest and highest of
the per-pair ratios (PyTorch ms / ours ms; above 1 means ours is faster).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def one_pair(threads, min_time):
    torch_run = subprocess.run(
        [sys.executable, os.path.join(HERE, "pytorch_cpu.py"), "--threads", str(threads),
         "--json", "--min-time", str(min_time)],
        check=True, capture_output=True, text=True)
    lines = [l for l in torch_run.stdout.splitlines() if l.startswith("{")]
    torch_ms = {(r["shape"], r["op"]): r["median_ms"] for r in map(json.loads, lines)}
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("\n".join(lines) + "\n")
        path = f.name
    try:
        ours_run = subprocess.run(
            ["cargo", "run", "--quiet", "--release", "--example", "bench_report", "--",
             "--backends", "cpu", "--min-time", str(min_time), "--pytorch", path],
            check=True, capture_output=True, text=True, cwd=os.path.dirname(HERE))
    finally:
        os.unlink(path)
    ours_ms = {}
    for line in ours_run.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[2] == "cpu":
            ours_ms[(cells[0], cells[1])] = float(cells[3])
    return torch_ms, ours_ms


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=1.0)
    args = ap.parse_args()

    runs = [one_pair(args.threads, args.min_time) for _ in range(args.pairs)]
    keys = [k for k in runs[0][1] if all(k in t and k in o for t, o in runs)]
    print(f"{args.pairs} back-to-back pairs, {args.threads} threads\n")
    print("| shape | op | ours ms (median) | PyTorch ms (median) | PyTorch ÷ ours: median | lowest | highest |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for k in keys:
        ours = [o[k] for _, o in runs]
        torch = [t[k] for t, _ in runs]
        ratios = sorted(t / o for t, o in zip(torch, ours))
        print(f"| {k[0]} | {k[1]} | {statistics.median(ours):.3f} | {statistics.median(torch):.3f} "
              f"| {statistics.median(ratios):.2f}× | {ratios[0]:.2f}× | {ratios[-1]:.2f}× |")


if __name__ == "__main__":
    main()
