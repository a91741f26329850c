#!/usr/bin/env bash
# The runs behind docs/results.md's "axes" sections (losses frozen and unfrozen, test-time
# augmentation, backbones), on the real UTKFace folder, through agecls's own commands and committed
# experiment configs. Done runs are skipped, so an interrupted script picks up where it stopped.
# On 2 CPU cores: losses frozen ~30 min, backbones ~60 min, unfrozen losses ~2.5 h, best recipe ~40 min a run.
#   AGECLS_UTKFACE_DIR=/path/to/utkface bash scripts/results_axes.sh [OUT] [CKPT...]
# OUT defaults to outputs/axes. CKPT...: checkpoints to measure flip TTA on (e.g. the best
# checkpoints of scripts/results.sh's runs). Then: python scripts/results_tables.py --axes OUT
set -euo pipefail
OUT=${1:-outputs/axes}
shift || true
mkdir -p "$OUT"

# 1. losses: each of the eight at one budget, frozen EfficientNet-Lite0 on cached features, 3 seeds
LOSSES=l1,mse,smooth_l1,ce,dldl,dldl_v2,mean_variance,ordinal
if [ ! -f "$OUT/losses/summary.csv" ] || [ "$(grep -c ',ok,' "$OUT/losses/summary.csv")" -lt 24 ]; then
    python -m agecls.train -m experiment=utkface_losses loss=$LOSSES seed=42,1,2 \
        hydra.sweep.dir="$OUT/losses" || true   # a failed job is recorded in summary.csv; keep going
    python -m agecls.report "$OUT/losses"
fi

# 2. test-time augmentation: each checkpoint tested with and without the horizontal flip
if [ "$#" -gt 0 ]; then
    bash scripts/tta_gain.sh "$OUT/tta" "$@"
fi

run() {  # run NAME OVERRIDES...: one training run in $OUT/NAME unless it is done; wall time in $OUT/times.csv
    local name=$1; shift
    if [ -f "$OUT/$name/metrics.json" ]; then echo "skip $name (done)"; return; fi
    local start; start=$(date +%s)
    python -m agecls.train "$@" hydra.run.dir="$OUT/$name" || { echo "$name failed" >&2; return 0; }
    echo "$name,$(( $(date +%s) - start ))" >> "$OUT/times.csv"
}

# 3. backbones: EfficientNet-Lite0/1/2 pretrained and Lite0 from random initialisation, unfrozen (3 epochs)
#    and frozen (head on cached features, 30 epochs), all at 128 px with the same crop (data.crop_pct=0.875)
#    so only the network differs; validation MAE per epoch against wall-clock (run each alone).
for net in lite0 lite1 lite2; do
    run "backbones/${net}_unfrozen" experiment=utkface_unfrozen backbone=efficientnet_$net data.crop_pct=0.875 seed=42
done
for net in lite0 lite1 lite2; do
    run "backbones/${net}_frozen" experiment=utkface_frozen backbone=efficientnet_$net data.crop_pct=0.875 seed=42
done
run backbones/scratch_frozen experiment=utkface_frozen pretrained=false seed=42

# 4. the three best losses of section 1 unfrozen: Lite0, 3 epochs, seeds 42, 1, 2 (l1 at seed 42:
#    backbones/lite0_unfrozen, the same command with the default loss)
for loss in ce dldl_v2 dldl; do
    run "losses_unfrozen/$loss" experiment=utkface_unfrozen loss=$loss seed=42
done
for seed in 1 2; do
    for loss in l1 ce dldl_v2 dldl; do
        run "losses_unfrozen/${loss}_s$seed" experiment=utkface_unfrozen loss=$loss seed=$seed
    done
done
run backbones/scratch_unfrozen experiment=utkface_scratch seed=42

# 5. the best recipe found on this CPU within 45 minutes (conf/experiment/utkface_best9.yaml; issue 13)
run best/best_s42 experiment=utkface_best9 seed=42
# and the same recipe with plain DLDL, the best loss of section 4 (unfrozen, one seed)
run best/best_dldl_s42 experiment=utkface_best9 loss=dldl seed=42
