#!/usr/bin/env bash
# The GPU check, for a machine with torch and CUDA but possibly no DVC, MLflow or network:
#
#   benchmarks/gpu_check.sh MNIST_DIR        # MNIST_DIR: the four MNIST files (IDX or .gz)
#
# 1. the whole pipeline, all stages of dvc.lock in order (benchmarks/pipeline.py) with
#    run.device: cuda, timed, every start-up included;
# 2. the same again, beside the CUDA tests (pytest -m cuda);
# 3. the GPU training benchmark (benchmarks/run.py --device cuda), which compares the two
#    pipeline runs byte for byte and writes benchmarks/results.json `gpu` and RESULTS.md.
# Python: $PYTHON, else python3. Work files: $WORK, else a new temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MNIST=$(realpath "${1:?usage: benchmarks/gpu_check.sh MNIST_DIR}")
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-http://127.0.0.1:9}  # no MLflow store: one warning a stage
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'gpu_check.sh: no CUDA device'; print('gpu_check:', torch.cuda.get_device_name(), 'torch', torch.__version__)"
"$PY" - "$MNIST" >"$WORK/params.yaml" <<'PYEOF'
import sys, yaml
p = yaml.safe_load(open("params.yaml"))
p["data"].update(source="local", local_dir=sys.argv[1])
p["run"]["device"] = "cuda"
print(yaml.safe_dump(p, sort_keys=False))
PYEOF
echo "gpu_check: pipeline run A (timed) in $WORK/a"
"$PY" benchmarks/pipeline.py --workdir "$WORK/a" --params "$WORK/params.yaml"
echo "gpu_check: pipeline run B in $WORK/b, beside the CUDA tests"
"$PY" benchmarks/pipeline.py --workdir "$WORK/b" --params "$WORK/params.yaml" >"$WORK/b.log" 2>&1 &
second=$!
parallel=$("$PY" -c "import xdist; print('-n 4')" 2>/dev/null || true)
tests=0
"$PY" -m pytest -q -m cuda tests/test_cuda.py $parallel -p no:cacheprovider 2>&1 | tee "$WORK/tests.log" || tests=$?
wait $second || { tail -30 "$WORK/b.log"; echo "gpu_check: pipeline run B failed"; exit 1; }
"$PY" benchmarks/run.py --device cuda --data "$WORK/a/data" --pipeline-runs "$WORK/a" "$WORK/b"
[ "$tests" = 0 ] || { echo "gpu_check: CUDA tests failed"; exit 1; }
echo "gpu_check: passed"
