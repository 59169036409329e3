#!/usr/bin/env bash
# The GPU check: on a machine with one NVIDIA GPU and no network (its own Python and torch preinstalled; this
# project and the wheels it lacks carried in beside it), install the project, run the GPU-marked tests, then the
# ResNet-20 / CIFAR-10 matched table (baseline, hybrid, prune, quant) fine-tuned on the one GPU, side by side, and
# write everything to OUT. Sized to finish within 10 minutes on an H200.
#
#   bench/gpu_check.sh OUT [--wheels DIR] [--shared DIR] [--epochs 40] [--dry-run]
#
# --dry-run prints every step it would run on the device and executes the CPU parts here: the install check, the
# collection of the GPU-marked tests, and the matched table at 1 epoch on a small slice with --device cpu.
set -euo pipefail

usage() { echo "usage: bench/gpu_check.sh OUT [--wheels DIR] [--shared DIR] [--epochs N] [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=$ROOT/../wheels
SHARED=$ROOT/../shared
EPOCHS=40
DRY=0
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) WHEELS=$2; shift 2 ;;
    --shared) SHARED=$2; shift 2 ;;
    --epochs) EPOCHS=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) usage ;;
  esac
done
case $EPOCHS in ''|*[!0-9]*) echo "error: --epochs must be a whole number, got $EPOCHS" >&2; exit 2 ;; esac
[ -d "$SHARED/data/cifar10-jpeg" ] || { echo "error: no CIFAR-10 at $SHARED/data/cifar10-jpeg (give --shared)" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
: > "$LOG"

step() {  # step NAME CMD...: on the device run it (output in the log); in a dry run print it
  local name=$1; shift
  echo "== $name: $*" | tee -a "$LOG"
  if [ $DRY = 1 ]; then return 0; fi
  "$@" >> "$LOG" 2>&1
}
cpu() {  # cpu NAME CMD...: a part that runs here too in a dry run
  local name=$1; shift
  echo "== $name: $*" | tee -a "$LOG"
  "$@" >> "$LOG" 2>&1
}

PY=${PYTHON:-python3}
VENV=$OUT/venv
if [ $DRY = 1 ]; then PYBIN=$ROOT/.venv/bin/python; else PYBIN=$VENV/bin/python; fi
HPQ=("$PYBIN" -m hpqdeploy)
TEST=("$PYBIN" -m pytest)

# 1. the machine, and the project installed over the machine's own torch (nothing is fetched)
step "machine" bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > '$OUT/gpu.csv'"
step "venv" "$PY" -m venv --system-site-packages "$VENV"
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then  # what the machine's image lacks (torch-pruning, ...)
  step "wheels" bash -c "'$VENV/bin/pip' install --no-index --no-deps -q '$WHEELS'/*.whl"
fi
step "project" "$VENV/bin/pip" install --no-index --no-deps --no-build-isolation -q -e "$ROOT"
step "torch sees the GPU" "$VENV/bin/python" -c "import torch; assert torch.cuda.is_available(); print(torch.__version__, torch.cuda.get_device_name())"
cpu "install check (here)" "${HPQ[@]}" --help

# 2. the GPU-marked tests (collected here in a dry run: they are skipped without CUDA)
if [ $DRY = 1 ]; then
  cpu "gpu tests (collected)" "${TEST[@]}" -q -m gpu --collect-only "$ROOT/tests"
else
  step "gpu tests" "${TEST[@]}" -q -m gpu -rs "$ROOT/tests"
fi

# 3. the matched table: one baseline, three methods fine-tuned side by side on the one GPU
RUNS=$OUT/runs
mkdir -p "$RUNS"
DATA=(--data-dir "$SHARED/data/cifar10-jpeg")
if [ $DRY = 1 ]; then
  DEV=(--device cpu --precision bf16)
  SLICE=(--train-limit 128 --eval-limit 128)
  CSLICE=(--calib-batches 1)
  EP=1
else
  DEV=(--device cuda --precision bf16 --channels-last --workers 4)
  SLICE=()
  CSLICE=()
  EP=$EPOCHS
fi
# the shared pretrained weights, evaluated on the shared JPEG test set: the baseline every method starts from
cpu "baseline" "${HPQ[@]}" train resnet20 --weights "$SHARED/models/cifar10-resnet/resnet20-12fca82f.th" \
  --data cifar10 "${DATA[@]}" --epochs 0 ${SLICE[@]+"${SLICE[@]}"} "${DEV[@]}" -o "$RUNS/baseline" --quiet
pids=()
for method in hybrid prune quant; do
  echo "== $method: hpqdeploy compress $RUNS/baseline --method $method --epochs $EP ${DEV[*]} ${SLICE[*]}" | tee -a "$LOG"
  "${HPQ[@]}" compress "$RUNS/baseline" -o "$RUNS/$method" --method $method --epochs "$EP" --lr 1e-3 \
    "${DEV[@]}" ${SLICE[@]+"${SLICE[@]}"} ${CSLICE[@]+"${CSLICE[@]}"} --quiet > "$RUNS/$method.log" 2>&1 &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
[ $failed = 0 ] || { echo "error: a compress run failed (see $RUNS/*.log)" >&2; exit 1; }

# 4. the results, with the machine they came from
"${HPQ[@]}" report "$RUNS" -o "$OUT/report" --json > /dev/null 2>>"$LOG" || echo "(report: matplotlib missing)" >> "$LOG"
"$PYBIN" - "$RUNS" "$OUT/results.json" "$DRY" "$EP" <<'PY'
import json, platform, sys
from pathlib import Path
runs, out, dry, epochs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
import torch
rows = {}
for name in ("baseline", "hybrid", "prune", "quant"):
    m = json.loads((runs / name / "metrics.json").read_text())
    p = json.loads((runs / name / "provenance.json").read_text())
    rows[name] = {k: m.get(k) for k in ("accuracy", "params", "macs", "bytes_ratio", "macs_ratio", "finetune_seconds",
                                        "global_batch")} | {"compute": p.get("compute")}
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
blob = {"dry_run": dry, "epochs": epochs, "gpu": gpu, "torch": torch.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "rows": rows}
out.write_text(json.dumps(blob, indent=2) + "\n")
for name, r in rows.items():
    print(f"{name:9s} acc {r['accuracy']:.4f}  params {r['params']}  finetune {r['finetune_seconds']} s")
PY
echo "wrote $OUT/results.json (log: $LOG)"
