#!/usr/bin/env bash
# The GPU path, checked in one go on a fresh GPU machine that has only the checkout.
#
#   bash scripts/gpu_check.sh                 # builds .venv if missing, then the whole check (< 8 min on one GPU)
#   bash scripts/gpu_check.sh --dry-run       # on a CPU machine: every step, with the CUDA parts skipped
#   bash scripts/gpu_check.sh --dry-run --smoke --out DIR   # the same in seconds (the test suite runs this)
#
# Steps: (1) the venv (torch as the Makefile pins it, the package with its dev extras);
# (2) `pytest -m cuda` (CUDA detections against CPU float32 under fp16 and bf16 autocast, an AMP
# training step with the grad scaler, device-side uint8 scaling bit for bit, reader workers on CUDA,
# SyncBatchNorm keys, a one-process NCCL torchrun of `hem detect` against a plain run);
# (3) weights for small_fcos trained for real on the bundled samples (`hem train`, on the GPU);
# (4) scripts/bench_inference.py on CUDA for small_fcos (trained) and fasterrcnn_mobilenet_v3_large_fpn
# (random weights: no hub at run time), one setting changed at a time from batch 32 / AMP on /
# 4 reader workers: batch 8, 32, 64; AMP off; reader workers 0 and 8; (5) SAHI on the same weights
# where `pip install sahi` works. Every figure lands as JSON in one folder (default gpu_check_out/),
# with summary.json listing what ran, what was skipped and why.
set -uo pipefail

DRY=0
SMOKE=0
OUT=gpu_check_out
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --smoke) SMOKE=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (expected --dry-run, --smoke, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2
VENV="${VENV:-$ROOT/.venv}"
PYBIN="$VENV/bin/python"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
: > "$LOG"
STEPS=()
FAILED=0
T0=$(date +%s)

say() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
step() {  # step NAME COMMAND...: run it, log it, record ok / failed (a failed step does not stop the others)
  local name="$1"; shift
  say "$name: $*"
  if "$@" >> "$LOG" 2>&1; then STEPS+=("\"$name\": \"ok\""); else STEPS+=("\"$name\": \"failed\""); FAILED=1; say "$name failed (see $LOG)"; fi
}
skip() { STEPS+=("\"$1\": \"skipped: $2\""); say "$1 skipped: $2"; }

# (1) the venv
if [ ! -x "$PYBIN" ]; then  # with the system's packages: a CUDA torch already on the machine is used as it is
  step venv python3 -m venv --system-site-packages "$VENV"
fi
CHECK="import torch, torchvision, hem_bootstrap, pytest, onnxruntime; print(int(torch.cuda.is_available()))"
if [ "$DRY" = 1 ] && [ "$SMOKE" = 1 ]; then
  CUDA=0  # the test suite's own venv: torch's import (~10 s on a slow CPU) is left to the benchmark step
elif ! CUDA=$("$PYBIN" -c "$CHECK" 2>/dev/null); then
  if ! "$PYBIN" -c "import torch, torchvision" 2>/dev/null; then
    step torch "$VENV/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1"
  fi
  step install "$VENV/bin/pip" install -q -e ".[dev]"
  CUDA=$("$PYBIN" -c "$CHECK" 2>/dev/null || echo 0)
fi
if [ "$DRY" = 1 ]; then CUDA=0; export CUDA_VISIBLE_DEVICES=""; fi  # a dry run stays on the CPU even beside a GPU
if [ "$CUDA" = 1 ]; then
  command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  DEVICE=cuda
else
  DEVICE=cpu
  [ "$DRY" = 1 ] || say "no CUDA GPU visible: running as --dry-run"
  DRY=1
fi

# (2) the CUDA tests (they skip, with the reason, where no GPU is visible)
if [ "$SMOKE" = 1 ]; then
  skip pytest_cuda "smoke mode (the suite runs tests/test_cuda.py itself)"
else
  step pytest_cuda "$PYBIN" -m pytest -m cuda -q -rs -p no:cacheprovider --junitxml "$OUT/pytest_cuda.xml" tests/test_cuda.py
fi

# (3) trained weights for small_fcos
WEIGHTS=""
if [ "$DRY" = 1 ]; then
  skip train "dry run: the benchmarks use random weights"
else
  step train "$VENV/bin/hem" -q train configs/demo.yaml --set "rounds.out_dir=$OUT/runs" --set runtime.device=cuda
  [ -f "$OUT/runs/demo/round_000/model.pt" ] && WEIGHTS="$OUT/runs/demo/round_000/model.pt"
fi

# (4) the inference benchmark on the device, one setting changed at a time
if [ "$SMOKE" = 1 ]; then SIZE=512; SECS=0.2; FP=(--fast-path none); else SIZE=8192; SECS=3; FP=(); fi
DATA="$OUT/rasters"
bench() {  # bench NAME ARCH BATCH AMP WORKERS
  local name="$1" arch="$2" batch="$3" amp="$4" workers="$5" w=()
  if [ "$arch" = small_fcos ] && [ -n "$WEIGHTS" ]; then w=(--weights "$WEIGHTS"); fi
  step "bench_$name" "$PYBIN" scripts/bench_inference.py --sizes "$SIZE" --arch "$arch" --batch "$batch" \
    --amp "$amp" --workers "$workers" --model-seconds "$SECS" "${FP[@]}" --data-dir "$DATA" --out "$OUT/bench_$name.json" "${w[@]}"
}
if [ "$SMOKE" = 1 ]; then
  bench small_fcos_b8 small_fcos 8 on 0
else
  for arch in small_fcos fasterrcnn_mobilenet_v3_large_fpn; do
    for b in 8 32 64; do bench "${arch}_b${b}_amp_w4" "$arch" "$b" on 4; done
    bench "${arch}_b32_noamp_w4" "$arch" 32 off 4
    bench "${arch}_b32_amp_w0" "$arch" 32 on 0
    bench "${arch}_b32_amp_w8" "$arch" 32 on 8
  done
fi

# (5) SAHI on the same weights, where it installs
if [ "$DRY" = 1 ]; then
  skip sahi "dry run"
elif "$PYBIN" -c "import sahi" 2>/dev/null || "$VENV/bin/pip" install -q sahi >> "$LOG" 2>&1; then
  w=(); [ -n "$WEIGHTS" ] && w=(--weights "$WEIGHTS")
  step bench_sahi "$PYBIN" scripts/bench_inference.py --sizes 4096 --batch 32 --workers 4 --compare-sahi \
    --model-seconds "$SECS" --data-dir "$DATA" --out "$OUT/bench_sahi.json" "${w[@]}"
else
  skip sahi "pip install sahi failed"
fi

rm -rf "$DATA"  # the generated rasters are large; their figures are in the JSON
{
  echo "{"
  echo "  \"device\": \"$DEVICE\", \"dry_run\": $([ "$DRY" = 1 ] && echo true || echo false),"
  echo "  \"smoke\": $([ "$SMOKE" = 1 ] && echo true || echo false), \"seconds\": $(( $(date +%s) - T0 )),"
  echo "  \"steps\": {$(IFS=,; echo "${STEPS[*]}")}"
  echo "}"
} > "$OUT/summary.json"
say "done in $(( $(date +%s) - T0 )) s; figures in $OUT (summary.json)"
exit "$FAILED"
