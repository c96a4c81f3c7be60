#!/usr/bin/env bash
# The prepared GPU check of issue 13 (run on a machine with a CUDA GPU; nothing here runs without one):
#   1. `raylearn run` of two rounds on the GPU: the resource plan puts one pool shard (0.5 GPU: scoring and
#      evaluation) and one Ray Train worker (0.5 GPU, NCCL) on the device; nvidia-smi is sampled every second
#      so the figures show which processes held GPU memory;
#   2. benchmarks/serve_latency.py --preset full --device cuda.
# Usage: benchmarks/gpu_check.sh [OUT_DIR]   (default $OUT, else runs/gpu_check). Budget: about 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$OUT"
PY="${PY:-.venv/bin/python}"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
"$PY" - <<'PY' | tee "$OUT/env.txt"
import torch, ray
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("ray", ray.__version__)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
nvidia-smi --query-compute-apps=timestamp,pid,process_name,used_memory --format=csv -l 1 > "$OUT/nvidia_smi_apps.csv" &
SMI=$!
trap 'kill $SMI 2>/dev/null || true' EXIT
cat > "$OUT/experiment.yaml" <<YAML
name: gpu-check
seed: 0
output_dir: $OUT/run
data: {dataset: "demo:msd_hippocampus_60", store: $OUT/store, n_test: 10}
cold_start: {size: 4}
strategy: {name: least_confidence}
schedule: {rounds: 1, batch_size: 4}
model: {backend: monai_unet, channels: [16, 32, 64, 128], strides: [2, 2, 2], patch_size: auto}
train: {first_round_steps: 200, steps: 100, use_gpu: true}
cluster: {gpus: auto, gpus_per_shard: 0.5, train_workers: auto}
pool: {progress: false}
YAML
start=$(date +%s)
timeout 420 "$(dirname "$PY")/raylearn" run "$OUT/experiment.yaml" 2>&1 | tee "$OUT/run.log"
echo "run_wall_s $(( $(date +%s) - start ))" | tee -a "$OUT/figures.txt"
"$PY" - "$OUT" <<'PY' | tee -a "$OUT/figures.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for line in (out / "run" / "ledger.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if "metrics" in rec and "timings" in rec:
        t, i = rec["timings"], rec.get("train_info", {})
        print(f"round {rec['round']}: dice {rec['metrics'].get('dice_mean', float('nan')):.3f} "
              f"train_s {t.get('train_s', 0):.1f} (steps {t.get('train_step_s', 0):.1f}) score_s {t.get('score_s', 0):.1f} "
              f"eval_s {t.get('eval_s', 0):.1f} workers_spread {i.get('ddp_param_spread')}")
apps = (out / "nvidia_smi_apps.csv").read_text().splitlines()[1:]
print("gpu processes seen:", len({a.split(",")[1].strip() for a in apps if a.strip()}))
PY
kill $SMI 2>/dev/null || true
timeout 240 "$PY" benchmarks/serve_latency.py --preset full --device cuda --out "$OUT/serve_latency.json" 2>&1 | tail -30 | tee "$OUT/serve_latency.log"
echo "figures: $OUT/figures.txt, $OUT/serve_latency.json, $OUT/nvidia_smi_apps.csv"
