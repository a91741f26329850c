#!/usr/bin/env bash
# The gain of test-time augmentation: each checkpoint evaluated on its own test split with tta=none
# and tta=flip (agecls.eval), then one row per checkpoint in OUT/tta_gain.csv (printed too).
#   bash scripts/tta_gain.sh OUT CKPT [CKPT ...]
#   EVAL_ARGS="eval.batch_size=32 eval.num_workers=2" bash scripts/tta_gain.sh outputs/tta runs/*/checkpoints/epoch_*.ckpt
# Evaluations already in OUT are reused. gain = MAE(none) - MAE(flip): positive when flip helps.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n 2,6p "$0"; exit 2; fi
OUT=$1; shift
mkdir -p "$OUT"
for ckpt in "$@"; do
    name=$(basename "$(dirname "$(dirname "$ckpt")")")_$(basename "$ckpt" .ckpt)
    for tta in none flip; do
        if [ -f "$OUT/$name/$tta/metrics.json" ]; then echo "skip $name tta=$tta (done)"; continue; fi
        # shellcheck disable=SC2086  # EVAL_ARGS: several overrides
        python -m agecls.eval ckpt_path="$ckpt" tta=$tta hydra.run.dir="$OUT/$name/$tta" ${EVAL_ARGS:-}
    done
done
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

import pandas as pd

out = Path(sys.argv[1])
rows = []
for run in sorted(p for p in out.iterdir() if (p / "none" / "metrics.json").exists() and (p / "flip" / "metrics.json").exists()):
    none, flip = (json.loads((run / t / "metrics.json").read_text()) for t in ("none", "flip"))
    assert none.get("tta", "none") == "none" and flip["tta"] == "flip", run
    row = {"run": run.name, "checkpoint": flip["checkpoint"], "split": flip["split"], "n_images": int(flip["test/n_images"])}
    for key in ("mae", "pearson", "spearman", "cs5"):
        row[f"{key}_none"], row[f"{key}_flip"] = none.get(f"test/{key}"), flip.get(f"test/{key}")
    row["mae_gain"] = row["mae_none"] - row["mae_flip"]
    row["test_s_none"], row["test_s_flip"] = none.get("time/test_s"), flip.get("time/test_s")
    rows.append(row)
table = pd.DataFrame(rows)
table.to_csv(out / "tta_gain.csv", index=False)
print(table.drop(columns=["checkpoint"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
print(f"written: {out / 'tta_gain.csv'}")
PY
