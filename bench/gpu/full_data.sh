#!/usr/bin/env bash
# Full-data CIFAR-10 accuracy runs (DeepShare vs SNL at equal optimizer steps) on a GPU machine.
#
#   DEVICE=cuda OUT=DIR bash bench/gpu/full_data.sh        # from the repository root
#
# Needs: torch with CUDA, the package's dependencies (wheels in .whl/ are installed to /tmp/site if present),
# and the shared data: $DEEPSHARE_SHARED/data/cifar10-jpg.tar.gz and $DEEPSHARE_SHARED/models/resnet20-*.th
# (default ../shared; .devdata/shared when the data travelled with the checkout).  Budgets run as parallel
# processes on the one GPU (ResNet-20 leaves it mostly idle); each writes its rows, and the rows are merged
# into $OUT/accuracy_vs_budget_fulldata.json.  Re-make the table, plots and the docs section here with
#   python bench/accuracy_vs_budget.py --models resnet20 --budgets 8%,4%,2% --full-data --device cuda \
#       --rows-from $OUT/accuracy_vs_budget_fulldata.json
set -u
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to a results directory}"
DEVICE=${DEVICE:-cuda}
BUDGETS=${BUDGETS:-"8% 4% 2%"}
RUN_LIMIT=${RUN_LIMIT:-470}   # seconds for the parallel runs (a run cut off here is simply missing from the rows)
SMOKE=${SMOKE:-1}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
if ! $PY -c "import pydantic" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then  # e.g. pydantic, missing there
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
[ -d .devdata/shared ] && export DEEPSHARE_SHARED=${DEEPSHARE_SHARED:-$PWD/.devdata/shared}
RUNS=${RUNS:-/tmp/deepshare_runs}
{ date; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"; } >> "$LOG" 2>&1
if [ "$SMOKE" = 1 ]; then  # every code path of the bench on the device, in about a minute
  t0=$(date +%s)
  timeout 240 $PY bench/accuracy_vs_budget.py --quick --device "$DEVICE" --out /tmp/smoke --runs "$RUNS/smoke" \
    >> "$LOG" 2>&1 || { echo "SMOKE FAILED"; tail -40 "$LOG"; exit 1; }
  echo "smoke ok in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
fi
$PY -c "from deepshare_convert.data import load_dataset; load_dataset('cifar10-jpg')" >> "$LOG" 2>&1  # decode once
t0=$(date +%s)
for b in $BUDGETS; do
  timeout "$RUN_LIMIT" $PY bench/accuracy_vs_budget.py --models resnet20 --budgets "$b" --full-data \
    --device "$DEVICE" --runs "$RUNS" --out "/tmp/rows_${b%\%}" --no-docs > "/tmp/run_${b%\%}.log" 2>&1 &
done
wait
echo "runs done in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
for b in $BUDGETS; do echo "== $b"; tail -25 "/tmp/run_${b%\%}.log"; done >> "$LOG"
$PY - "$OUT" $BUDGETS <<'PYEOF'
import json, sys
from pathlib import Path
out, budgets = Path(sys.argv[1]), sys.argv[2:]
merged, seen = None, set()
for b in budgets:
    f = Path(f"/tmp/rows_{b.rstrip('%')}") / "accuracy_vs_budget_fulldata.json"
    if not f.is_file():
        print(f"budget {b}: no rows (run cut off or failed)")
        continue
    data = json.loads(f.read_text())
    if merged is None:
        merged = dict(data, rows=[])
    for r in data["rows"]:
        key = (r["model"], r["method"], r["budget"])
        if key not in seen:
            seen.add(key)
            merged["rows"].append(r)
if merged:
    (out / "accuracy_vs_budget_fulldata.json").write_text(json.dumps(merged, indent=2) + "\n")
    for r in merged["rows"]:
        print(r["method"], r["budget"], r.get("relus"), r.get("acc"), r.get("steps"))
PYEOF
# the learning curves and results of every run (no weights), for the record
tar czf "$OUT/runs.tgz" --exclude='*.pt' --exclude='*.safetensors' -C "$RUNS" . 2>/dev/null
date >> "$LOG"
