#!/usr/bin/env bash
# The CUDA checks, for a session lent a GPU machine (its image has torch; the rest comes as wheels in .whl/):
# train() vs the sample loop on the GPU, K trials per GPU (issue 20), then search -> predict -> status end to end
# through the CLI.
#   bash bench/gpu_smoke.sh [OUT_DIR]
set -uo pipefail
out=${1:-/tmp/gpu_smoke}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
python3 -m bench.bench_sample_loop --device cuda --steps 300 --rounds 1 2>&1 | tee "$out/throughput.txt"
python3 -m bench.bench_gpu_packing --seconds 4 2>&1 | tee "$out/packing.txt"  # ~4 min: K = 1..8 per GPU, 3 models
run() { echo "+ run-study $*"; /usr/bin/time -f "  %e s wall" python3 run_study.py "$@"; }
run search studies/quickstart.toml -q 2>&1 | tee "$out/search.txt"
run status studies/quickstart.toml 2>&1 | tee "$out/status.txt"
run predict studies/quickstart.toml --data datasets/quickstart --top-k 3 --out "$out/submission.csv" \
  --labels datasets/quickstart/test_labels.csv 2>&1 | tee "$out/predict.txt"
run train studies/quickstart.toml --set train.max_steps=2000 --out "$out/final.pt" 2>&1 | tee "$out/train.txt"
run predict "$out/final.pt" --data datasets/quickstart --out "$out/final.csv" \
  --labels datasets/quickstart/test_labels.csv 2>&1 | tee -a "$out/predict.txt"
python3 - <<'PY'
import optuna
study = optuna.load_study(study_name="quickstart", storage="sqlite:///studies/quickstart.db")
done = [t for t in study.trials if "device" in t.user_attrs]
print("devices:", sorted({t.user_attrs["device"] for t in done}),
      "steps/s:", [round(t.user_attrs["steps_per_s"], 1) for t in done])
PY
