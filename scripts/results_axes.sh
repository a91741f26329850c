#!/usr/bin/env bash
# The runs behind docs/results.md's "axes" sections (losses, test-time augmentation), on the real
# UTKFace folder, through agecls's own commands and committed experiment configs:
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
