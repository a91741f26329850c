"""How often the per-face age interval holds the true age, and how wide it is, on a test split.

    python benchmarks/interval_coverage.py --predictions RUN/predictions.csv [--label NAME]
        [--out benchmarks/results/interval_coverage.csv]

`--predictions`: the predictions.csv that agecls.train (test split) or agecls.eval writes, with the
columns age, predicted, predicted_low, predicted_high (agecls.intervals: split-conformal on the
validation split, at the coverage the run's metrics.json records). For UTKFace file names the
gender and race are read from the name (agecls.data.sources.utkface).

Reported, overall, by decade of true age, by gender and by race: the faces, the empirical
coverage (share of true ages inside [low, high]), the mean width in years, and the MAE; and for the
faces under 18, the share whose whole interval lies at or above 18 (low >= 18: a minor the
interval calls an adult), next to the share whose point prediction is 18 or over. The table is
printed and written to --out (a rerun replaces the rows of the same --label).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from results_csv import write_replacing  # benchmarks/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def groups_of(paths: pd.Series) -> pd.DataFrame:
    from agecls.data.sources.utkface import _GROUPS, GENDERS, RACES

    found = [_GROUPS.match(Path(p).name) for p in paths]
    return pd.DataFrame({"gender": [GENDERS.get(m["gender"]) if m else None for m in found],
                         "race": [RACES.get(m["race"] or "") if m else None for m in found]}, index=paths.index)


def summarise(frame: pd.DataFrame, label: str) -> pd.DataFrame:
    frame = frame.copy()
    frame = frame.join(groups_of(frame["path"]))
    frame["decade"] = (frame["age"] // 10 * 10).astype(int)
    frame["inside"] = (frame["age"] >= frame["predicted_low"]) & (frame["age"] <= frame["predicted_high"])
    frame["width"] = frame["predicted_high"] - frame["predicted_low"]
    frame["error"] = (frame["predicted"] - frame["age"]).abs()
    rows = []

    def row(by: str, value: str, part: pd.DataFrame) -> None:
        rows.append({"label": label, "by": by, "group": value, "faces": len(part),
                     "coverage": round(float(part["inside"].mean()), 4), "mean_width": round(float(part["width"].mean()), 2),
                     "median_width": round(float(part["width"].median()), 2), "mae": round(float(part["error"].mean()), 2)})

    row("all", "all", frame)
    for by in ("decade", "gender", "race"):
        for value, part in frame.groupby(by, sort=True):  # decades in numeric order
            row(by, f"{value}-{value + 9}" if by == "decade" else str(value), part)
    minors = frame[frame["age"] < 18]
    if len(minors):
        rows.append({"label": label, "by": "under 18", "group": "interval wholly >= 18", "faces": len(minors),
                     "share": round(float((minors["predicted_low"] >= 18).mean()), 4)})
        rows.append({"label": label, "by": "under 18", "group": "predicted >= 18", "faces": len(minors),
                     "share": round(float((minors["predicted"] >= 18).mean()), 4)})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", required=True)
    parser.add_argument("--label", default=None, help="the run's name in the table (default: its folder's name)")
    parser.add_argument("--out", default=str(HERE / "results" / "interval_coverage.csv"))
    args = parser.parse_args()
    frame = pd.read_csv(args.predictions)
    missing = [c for c in ("path", "age", "predicted", "predicted_low", "predicted_high") if c not in frame]
    if missing:
        raise SystemExit(f"{args.predictions} has no {', '.join(missing)}: predictions of a calibrated model are needed "
                         f"(agecls.eval ckpt_path=..., or python -m agecls.calibrate first)")
    frame = frame[np.isfinite(frame["predicted_low"]) & np.isfinite(frame["predicted_high"])]
    label = args.label or Path(args.predictions).parent.name
    table = summarise(frame, label)
    table = write_replacing(args.out, table, ["label"])
    print(table[table["label"] == label].to_string(index=False, na_rep=""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
