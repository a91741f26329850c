"""Rebuild the summary of a past sweep and draw its figures.

    python -m agecls.report outputs/multirun/2026-11-25_10-00-00

Writes, in that directory: summary.csv and summary.md (one row per job, best validation MAE
first), lr_vs_metric.png (validation MAE and test Pearson against learning rate, one line per
optimizer) and val_curves.png (validation MAE per epoch, one line per job).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from agecls.utils.sweep import write_summary

log = logging.getLogger(__name__)


def validation_curve(job_dir: Path, tag: str = "val/mae") -> pd.Series:
    """`tag` per epoch from a job's TensorBoard event files (or its CSV logger's metrics.csv)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for f in sorted(job_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"] and "epoch" in acc.Tags()["scalars"]:
            epochs = {e.step: e.value for e in acc.Scalars("epoch")}
            for e in acc.Scalars(tag):
                values[int(epochs.get(e.step, e.step))] = e.value
    if not values:
        for csv in job_dir.glob("csv/**/metrics.csv"):
            table = pd.read_csv(csv)
            if tag in table.columns:
                rows = table.dropna(subset=[tag])
                values.update(dict(zip(rows["epoch"].astype(int), rows[tag], strict=True)))
    return pd.Series(values, dtype=float).sort_index()


def plot_lr_vs_metric(summary: pd.DataFrame, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = summary[(summary["status"] == "ok") & summary["lr"].notna()]
    if ok.empty:
        return False
    metrics = [m for m in ("val/mae_best", "test/pearson") if ok[m].notna().any()]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), dpi=100, squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for opt, rows in ok.groupby("optimizer"):
            rows = rows.groupby("lr")[metric].mean().sort_index()
            ax.plot(rows.index, rows.to_numpy(), marker="o", label=str(opt))
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(path.parent.name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_val_curves(summary: pd.DataFrame, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    drawn = 0
    for _, row in summary.iterrows():
        curve = validation_curve(Path(row["dir"]))
        if curve.empty:
            continue
        ax.plot(curve.index, curve.to_numpy(), marker=".", label=f"{row['job']}: {row['overrides']}"[:60])
        drawn += 1
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation MAE (years)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def report(sweep_dir: str | Path) -> pd.DataFrame:
    sweep_dir = Path(sweep_dir)
    summary = write_summary(sweep_dir)
    if summary.empty:
        raise FileNotFoundError(f"{sweep_dir} holds no job directories (numbered folders with .hydra/ or metrics.json)")
    drawn = [name for name, fn in (("lr_vs_metric.png", plot_lr_vs_metric), ("val_curves.png", plot_val_curves))
             if fn(summary, sweep_dir / name)]
    log.info("Wrote summary.csv, summary.md%s in %s", "".join(f", {d}" for d in drawn), sweep_dir)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agecls.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a multirun directory (outputs/multirun/<date>_<time>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = report(args.sweep_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with pd.option_context("display.width", 200, "display.max_colwidth", 50):
        cols = [c for c in summary.columns if c not in ("dir", "error")]
        print(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}" if np.isfinite(v) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
