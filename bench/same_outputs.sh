#!/usr/bin/env bash
# Whether a change kept the outputs: the same commands on commit REV and on the working tree, compared file by file.
# ResNet-20 on scikit-learn's digits: train 2 epochs, compress hybrid 1 epoch and quant 0 epochs, export to ONNX
# Runtime; one thread each, same seed.
#
#   bench/same_outputs.sh REV [OUT]
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bench/same_outputs.sh REV [OUT]" >&2; exit 2; }
REV=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${2:-$(mktemp -d)}
PY=$ROOT/.venv/bin/python
git -C "$ROOT" rev-parse --verify -q "$REV^{commit}" > /dev/null || { echo "error: no commit $REV" >&2; exit 2; }
rm -rf "$OUT/src-old"
git -C "$ROOT" worktree add -f -q "$OUT/src-old" "$REV"
trap 'git -C "$ROOT" worktree remove -f "$OUT/src-old"' EXIT
export OMP_NUM_THREADS=1
for side in old new; do
  if [ $side = old ]; then export PYTHONPATH=$OUT/src-old; else unset PYTHONPATH; fi
  R=$OUT/$side; rm -rf "$R"; mkdir -p "$R"; cd "$R"
  "$PY" -m hpqdeploy train resnet20 --data digits -o base --epochs 2 --train-limit 512 --eval-limit 200 \
    --calib-size 128 --quiet --json > train.json
  "$PY" -m hpqdeploy compress base -o hybrid --epochs 1 --quiet --json > hybrid.json
  "$PY" -m hpqdeploy compress base -o quant --method quant --epochs 0 --quiet --json > quant.json
  "$PY" -m hpqdeploy export hybrid --target onnxruntime -o ort --quiet --json > ort.json
done
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
same = True
for f in ("base/model.safetensors", "hybrid/model.safetensors", "quant/model.safetensors", "hybrid/plan.json",
          "quant/plan.json", "ort/model.onnx"):
    equal = (out / "old" / f).read_bytes() == (out / "new" / f).read_bytes()
    same &= equal
    print(f"{f:28s} {'identical' if equal else 'differs'}")
keys = ("accuracy", "params", "macs", "bytes", "compression", "accuracy_pytorch", "top1_agreement", "bytes_on_disk")
for f in ("train.json", "hybrid.json", "quant.json", "ort.json"):
    a, b = (json.loads((out / s / f).read_text()) for s in ("old", "new"))
    diff = {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}
    same &= not diff
    print(f"{f:28s} {'same figures' if not diff else diff}")
print("outputs kept" if same else "outputs changed")
PY
