"""Tables and figures of docs/results.md from the run directories scripts/results.sh leaves.

    python scripts/results_tables.py outputs/results [docs/results]

Prints the markdown tables (and writes them to <dest>/tables.md with a CSV per table) and copies
the scatter plots and the sweep figure as small PNGs into <dest>.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd

METRICS = {"test/mae": "MAE", "test/pearson": "Pearson", "test/spearman": "Spearman", "test/cs5": "CS@5"}


def load(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    return {"run": run.name, **m}


def fmt(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def minutes(times: dict, name: str) -> str:
    return f"{times[name] / 60:.1f}" if name in times else ""


def main(src: str, dest: str = "docs/results") -> None:
    src_dir, dest_dir = Path(src), Path(dest)
    dest_dir.mkdir(parents=True, exist_ok=True)
    times = {}
    if (src_dir / "times.csv").exists():
        t = pd.read_csv(src_dir / "times.csv", header=None, names=["run", "seconds"])
        times = dict(zip(t["run"], t["seconds"], strict=True))
    out = []

    def table_of(runs: tuple[tuple[str, str], ...]) -> pd.DataFrame:
        rows = []
        for name, label in runs:
            if (src_dir / name / "metrics.json").exists():
                m = load(src_dir / name)
                rows.append({"setting": label, **{v: m.get(k) for k, v in METRICS.items()},
                             "epochs": m["epochs"], "trainable params": f"{m['params/trainable']:,}",
                             "wall min": minutes(times, name)})
        return pd.DataFrame(rows)

    # 1. frozen against unfrozen, seed 42, and 3. scratch
    main_table = table_of((("frozen_s42", "frozen (head only, features once)"), ("unfrozen_s42", "unfrozen (all layers)"),
                           ("scratch_s42", "unfrozen, random init (no transfer)")))
    out += ["### Frozen against unfrozen, and the value of transfer (seed 42)", "", fmt(main_table), ""]
    main_table.to_csv(dest_dir / "frozen_unfrozen_scratch.csv", index=False)
    for name in ("frozen_s42", "unfrozen_s42", "scratch_s42"):
        png = src_dir / name / "scatter.png"
        if png.exists():
            shutil.copy(png, dest_dir / f"scatter_{name.split('_')[0]}.png")

    # ablations of the unfrozen run: the study's strong augmentation, the 3-epoch budget
    ablations = table_of((("unfrozen_s42", "unfrozen, 3 epochs (as above)"),
                          ("unfrozen_light_s42", "unfrozen, 3 epochs, flip + colour jitter + crop only"),
                          ("unfrozen_7ep_s42", "unfrozen, 7 epochs (the reference script's 28 minutes)")))
    if len(ablations):
        out += ["### Ablations of the unfrozen run (seed 42)", "", fmt(ablations), ""]
        ablations.to_csv(dest_dir / "ablations.csv", index=False)
    if (src_dir / "unfrozen_7ep_s42" / "scatter.png").exists():
        shutil.copy(src_dir / "unfrozen_7ep_s42" / "scatter.png", dest_dir / "scatter_unfrozen_7ep.png")

    # 4. spread over seeds
    rows = []
    for kind in ("frozen", "unfrozen"):
        runs = [load(p) for p in sorted(src_dir.glob(f"{kind}_s*")) if (p / "metrics.json").exists()]
        if not runs:
            continue
        frame = pd.DataFrame(runs)
        row = {"setting": kind, "seeds": ", ".join(r["run"].split("_s")[1] for r in runs)}
        for k, v in METRICS.items():
            row[v] = f"{frame[k].mean():.3f} ± {frame[k].std(ddof=1):.3f}" if len(frame) > 1 else f"{frame[k].mean():.3f}"
        rows.append(row)
    spread = pd.DataFrame(rows)
    out += ["### Spread over seeds (mean ± standard deviation; one fixed split)", "", fmt(spread), ""]
    spread.to_csv(dest_dir / "spread.csv", index=False)

    # 2. the sweep
    summary = src_dir / "sweep" / "summary.csv"
    if summary.exists():
        s = pd.read_csv(summary)
        table = s[["optimizer", "lr", "status", "val/mae_best", "test/mae", "test/pearson", "test/spearman"]].copy()
        table = table.sort_values(["optimizer", "lr"]).rename(columns={"val/mae_best": "val MAE", "test/mae": "test MAE",
                                                                       "test/pearson": "Pearson", "test/spearman": "Spearman"})
        table["lr"] = table["lr"].map(lambda v: f"{v:g}")
        out += ["### The study's sweep (unfrozen, constant lr, 50 batches of 64)", "", fmt(table), ""]
        table.to_csv(dest_dir / "sweep.csv", index=False)
        for png in ("lr_vs_metric.png", "val_curves.png"):
            if (src_dir / "sweep" / png).exists():
                shutil.copy(src_dir / "sweep" / png, dest_dir / f"sweep_{png}")
    if times:
        out += ["Wall-clock minutes per run: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items()),
                f"(total {sum(times.values()) / 60:.0f} minutes)", ""]
    text = "\n".join(out)
    (dest_dir / "tables.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:])
