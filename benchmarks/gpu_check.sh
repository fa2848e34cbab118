#!/usr/bin/env bash
# The CUDA path, checked in one command on a machine with an NVIDIA GPU and medae installed:
#
#     bash benchmarks/gpu_check.sh [OUT]            # default OUT: runs/gpu-check
#
# It keeps the CUDA torch the machine has (never installs torch) and writes, under OUT:
#   environment.txt    torch / CUDA / GPU / opacus versions; whether bf16 is supported
#   dp_throughput-*.md DP (bk, hooks, ghost) against non-DP step throughput at 64, 128 and 256 px,
#                      AE and VAE, with peak GPU memory (benchmarks/dp_throughput.py --device cuda)
#   train-local-*/     `medae train-local --device cuda` end to end, DP and --no-dp, same site
#   simulate/          `medae simulate --device cuda` with federation.client_gpus = 0.5 (two sites per GPU)
#   summary.txt        every step's exit status and seconds
# Each step runs even when an earlier one failed; the script exits non-zero if any did.
# MEDAE_GPU_CHECK_DEVICE=cpu runs the same steps on the CPU (to check the script itself).
set -uo pipefail

OUT=${1:-runs/gpu-check}
DEVICE=${MEDAE_GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python}
MEDAE=("$PY" -m medae)
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
: > "$OUT/summary.txt"
failed=0

step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, record status and time
    local name=$1; shift
    local start=$SECONDS
    echo "== $name: $*"
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%-28s rc=%s %5ss\n' "$name" "$rc" "$((SECONDS - start))" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || { failed=1; tail -n 20 "$OUT/$name.log"; }
}

step environment "$PY" - "$DEVICE" <<'EOF'
import sys
import torch, opacus, flwr
device = sys.argv[1]
print("torch", torch.__version__, "cuda build", torch.version.cuda, "opacus", opacus.__version__, "flwr", flwr.__version__)
if device.startswith("cuda"):
    assert torch.cuda.is_available(), "torch.cuda.is_available() is False: a CPU build of torch, or no driver"
    print("GPU", torch.cuda.get_device_name(0), "count", torch.cuda.device_count(),
          "bf16", torch.cuda.is_bf16_supported())
from medae_core.devices import resolve_device
print("medae train.device = auto ->", resolve_device("auto"))
EOF
cp "$OUT/environment.log" "$OUT/environment.txt" 2>/dev/null

for size in 64 128 256; do
    step "dp_throughput-$size" "$PY" benchmarks/dp_throughput.py --device "$DEVICE" --kinds ae,vae \
        --modes nondp,bk,hooks,ghost --image-size "$size" --reps 5 --steps 5 --out "$OUT/dp_throughput-$size.md"
done

DATA="$OUT/data"
[ -f "$DATA/benchmark.json" ] || step benchmark "${MEDAE[@]}" make-benchmark --out "$DATA" --sites 3 --patients 165
for mode in dp nodp; do
    flag=(); [ "$mode" = nodp ] && flag=(--no-dp)
    rm -rf "$OUT/train-local-$mode"
    step "train-local-$mode" "${MEDAE[@]}" train-local --data "$DATA/site-1" --out "$OUT/train-local-$mode" \
        --device "$DEVICE" --epochs 4 --ledger "$OUT/ledger-$mode.jsonl" "${flag[@]}"
done

printf '[federation]\nclient_gpus = %s\n' "$([ "$DEVICE" = cpu ] && echo 0 || echo 0.5)" > "$OUT/simulate.toml"
rm -rf "$OUT/simulate"
step simulate "${MEDAE[@]}" simulate --config "$OUT/simulate.toml" --data "$DATA" --device "$DEVICE" \
    --rounds 3 --out "$OUT/simulate"

echo "results in $OUT (summary.txt)"
exit $failed
