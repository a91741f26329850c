#!/usr/bin/env bash
# The GPU part of benchmarks/README.md and docs/results.md, on one GPU:
#   AGECLS_UTKFACE_DIR=/path/to/utkface bash scripts/gpu_full_scale.sh OUTDIR
# 1. the input-pipeline benchmark at 224 px with bf16 and channels_last (ResNet-18),
# 2. full-scale unfrozen and frozen EfficientNet-Lite0 (224 px, bf16; unfrozen stops at
#    MAX_TIME, then tests its best checkpoint), 3. the same benchmark for EfficientNet-Lite0.
# Each stage adds its results to OUTDIR/gpu_results.tar.gz, so a stage cut short keeps the rest.
set -uo pipefail
OUT=$(realpath -m "${1:-outputs/gpu}")
mkdir -p "$OUT"
W=$(( $(nproc) - 2 ))
MAX_TIME=${MAX_TIME:-00:00:03:00}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/gpu.txt"

pack() {  # the small outputs (metrics, predictions, figures, CSVs, logs), not checkpoints
    (cd "$OUT" && find . -type f \( -name '*.json' -o -name '*.csv' -o -name '*.png' -o -name '*.log' -o -name '*.txt' -o -name '*.yaml' \) \
        -not -path '*/checkpoints/*' -print0 | tar czf gpu_results.tar.gz --null -T -)
}
stamp() { echo "$1,$(( $(date +%s) - $2 ))" >> "$OUT/times.csv"; pack; }

t=$(date +%s)
timeout 120 python -m agecls.bench backbone=resnet18 data.image_size=224 data.batch_size=256 precision=bf16 \
    channels_last=true data.num_workers=$W fast_workers=4 batches=10 rounds=2 max_images=8192 \
    output="$OUT/bench.csv" hydra.run.dir="$OUT/bench_resnet18" 2>&1 | tail -12
stamp bench_resnet18 $t

t=$(date +%s)
timeout 270 python -m agecls.train experiment=utkface_gpu_unfrozen trainer.max_time=$MAX_TIME \
    trainer.enable_progress_bar=false data.num_workers=$W hydra.run.dir="$OUT/gpu_unfrozen" 2>&1 | grep -E "Metrics|Error|error" | cut -c1-600
stamp gpu_unfrozen $t

t=$(date +%s)
timeout 90 python -m agecls.train experiment=utkface_gpu_frozen trainer.enable_progress_bar=false \
    data.num_workers=$W hydra.run.dir="$OUT/gpu_frozen" 2>&1 | grep -E "Metrics|Error|error" | cut -c1-600
stamp gpu_frozen $t

t=$(date +%s)
timeout 90 python -m agecls.bench backbone=efficientnet_lite0 data.image_size=224 data.batch_size=256 precision=bf16 \
    channels_last=true data.num_workers=$W fast_workers=4 batches=10 rounds=2 max_images=8192 \
    output="$OUT/bench.csv" hydra.run.dir="$OUT/bench_efficientnet_lite0" 2>&1 | tail -12
stamp bench_efficientnet_lite0 $t
ls -la "$OUT"
