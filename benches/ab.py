#!/usr/bin/env python3
"""A/B of two bench_report binaries: run them alternately for several rounds, keep each
row's fastest median (the machine is shared and noisy), print per row the before and after
milliseconds and speed = before / after (above 1: the second binary is faster).

    python3 benches/ab.py BEFORE AFTER [--rounds 3] [-- bench_report args...]

Example: build bench_report at two commits, copy each binary aside, then
    python3 benches/ab.py /tmp/bench_before /tmp/bench_after --rounds 3 -- --min-time 0.3
"""
import argparse
import subprocess
import sys


def run(binary, extra):
    out = subprocess.run([binary, *extra], check=True, capture_output=True, text=True).stdout
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or cells[0] in ("shape", "") or cells[0].startswith("---"):
            continue
        try:
            wall = float(cells[3])
        except ValueError:
            continue
        try:
            kernel = float(cells[4])
        except (ValueError, IndexError):
            kernel = None
        # Backend names with or without the driver's version details match.
        backend = cells[2].split(" (")[0]
        rows[(cells[0], cells[1], backend)] = (wall, kernel)
    return rows


def main():
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    best = [{}, {}]
    for r in range(args.rounds):
        for k, binary in enumerate((args.before, args.after)):
            for key, (wall, kernel) in run(binary, extra).items():
                old_wall, old_kernel = best[k].get(key, (float("inf"), None))
                if kernel is not None and old_kernel is not None:
                    kernel = min(kernel, old_kernel)
                best[k][key] = (min(wall, old_wall), kernel if kernel is not None else old_kernel)
            print(f"round {r + 1}/{args.rounds}: {binary} done", file=sys.stderr)
    print(f"fastest of {args.rounds} alternating rounds (median ms per run; kernel ms from timestamp queries)\n")
    print("| shape | op | backend | before ms | after ms | before ÷ after | before kernel ms | after kernel ms | kernel before ÷ after |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    worst = None
    for key in best[0]:
        if key not in best[1]:
            continue
        (a, ka), (b, kb) = best[0][key], best[1][key]
        ratio = a / b
        worst = ratio if worst is None else min(worst, ratio)
        kernel = f"{ka:.3f} | {kb:.3f} | {ka / kb:.2f}×" if ka and kb else "– | – | –"
        print(f"| {key[0]} | {key[1]} | {key[2]} | {a:.3f} | {b:.3f} | {ratio:.2f}× | {kernel} |")
    if worst is not None:
        print(f"\nslowest row (wall): {worst:.2f}×")


if __name__ == "__main__":
    main()
