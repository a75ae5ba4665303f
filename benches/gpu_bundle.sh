#!/usr/bin/env bash
# Builds, on a machine with Rust, everything a run on a GPU machine needs, into one folder
# that runs with a single command there (no Rust toolchain needed on the GPU machine, only
# its Vulkan loader and driver: `libvulkan1` and the vendor's ICD):
#
#   bash benches/gpu_bundle.sh [OUT_DIR]        # default: target/gpu-bundle
#   # copy OUT_DIR to the GPU machine, then there:
#   OUT_DIR/run.sh [RESULTS_DIR]                # default: ./gpu-results
#
# run.sh lists the adapters, runs the quickstart (errors against the f64 oracle, PASS/FAIL),
# the functional example (a split batch against one call), the bench report (median and
# kernel ms, GB/s, % of the copy ceiling, speed-up over the CPU path) and the test binaries
# that need no files (forward, backward, functional, large, properties, layer_state, fused,
# subgroups, half; each runs its bodies on every adapter with packed float16 and, where
# the GPU has SHADER_F16, again with native float16), then the report's float16 / bfloat16, native-float16,
# fused and subgroup A/B rows, saving each output.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/gpu-bundle}"
mkdir -p "$out/bin"

cargo build --release --example quickstart --example functional --example bench_report
for e in quickstart functional bench_report; do
    cp "target/release/examples/$e" "$out/bin/"
done
# The test executables, by name, from cargo's own report of what it built.
tests=(forward backward functional large properties layer_state fused subgroups half)
cargo test --release --no-run --message-format=json "${tests[@]/#/--test=}" 2>/dev/null |
    python3 -c '
import json, shutil, sys
out = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        shutil.copy(m["executable"], out + "/bin/test_" + m["target"]["name"])
' "$out"

cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the bundle built by benches/gpu_bundle.sh; outputs go to RESULTS_DIR (./gpu-results).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
res="${1:-gpu-results}"
mkdir -p "$res"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/xdg-runtime-$(id -u)}"
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
status=0
step() {
    local name="$1"; shift
    echo "== $name"
    if ! "$@" >"$res/$name.txt" 2>&1; then status=1; echo "   FAILED (see $res/$name.txt)"; fi
    tail -n 12 "$res/$name.txt"
}
step quickstart "$here/bin/quickstart"
step functional "$here/bin/functional"
for t in "$here"/bin/test_*; do
    step "$(basename "$t")" "$t" --test-threads=2
done
step bench_report "$here/bin/bench_report" --min-time 0.3
step bench_report_half_fused "$here/bin/bench_report" --min-time 0.3 --native-f16 --fused --tree
exit $status
RUN
chmod +x "$out/run.sh"
du -sh "$out"
echo "bundle ready: $out (run $out/run.sh on the GPU machine)"
