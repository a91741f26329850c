#!/usr/bin/env bash
# Every run behind docs/results.md, on the real UTKFace folder, through agecls's own commands.
# About 61 minutes on 2 CPU cores for the main set (EfficientNet-Lite0 trains at ~67 images/s at
# 128 px there, channels_last), plus 39 minutes for the two ablations (measured: docs/results.md).
#   AGECLS_UTKFACE_DIR=/path/to/utkface bash scripts/results.sh [outputs/results]
# Then: python scripts/results_tables.py outputs/results   (tables and figures for docs/results.md)
set -euo pipefail
OUT=${1:-outputs/results}
mkdir -p "$OUT"
EPOCHS=${EPOCHS:-3}   # the CPU budget of each unfrozen/scratch run: the reference script's 3 epochs

run() {  # run NAME OVERRIDES...: one training run in $OUT/NAME, its wall time in $OUT/times.csv
    local name=$1; shift
    if [ -f "$OUT/$name/metrics.json" ]; then echo "skip $name (done)"; return; fi
    local start; start=$(date +%s)
    python -m agecls.train "$@" hydra.run.dir="$OUT/$name"
    echo "$name,$(( $(date +%s) - start ))" >> "$OUT/times.csv"
}

# 1. frozen against unfrozen (and 4. spread: seeds 42, 1, 2), one fixed split (data.split_seed=42)
for seed in 42 1 2; do
    run "unfrozen_s$seed" experiment=utkface_unfrozen seed=$seed trainer.max_epochs=$EPOCHS
    run "frozen_s$seed" experiment=utkface_frozen seed=$seed
done
# 3. the value of transfer: the same network from random initialisation, same budget
run scratch_s42 experiment=utkface_scratch seed=42 trainer.max_epochs=$EPOCHS
# ablations: what the study's strong augmentation and the short budget cost the unfrozen run
run unfrozen_light_s42 experiment=utkface_unfrozen_light seed=42 trainer.max_epochs=$EPOCHS
# 2. the study's sweep: optimizer x learning rate, unfrozen, constant lr, smaller budget
if [ ! -f "$OUT/sweep/summary.csv" ] || [ "$(grep -c ',ok,' "$OUT/sweep/summary.csv")" -lt 6 ]; then
    start=$(date +%s)
    python -m agecls.train -m experiment=utkface_sweep optimizer=sgd,adam lr=1e-4,1e-3,1e-2 \
        hydra.sweep.dir="$OUT/sweep" || true   # a diverging job is recorded as failed; keep going
    echo "sweep,$(( $(date +%s) - start ))" >> "$OUT/times.csv"
    python -m agecls.report "$OUT/sweep"
fi
# the reference script's wall-clock budget (28 minutes on this machine) rather than its 3 epochs
run unfrozen_7ep_s42 experiment=utkface_unfrozen seed=42 trainer.max_epochs=7
