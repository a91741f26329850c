"""Rebuild the summary of a past sweep and draw its figures.

    python -m agecls.report sweep_dir=outputs/multirun/2026-11-25_10-00-00
    python -m agecls.report outputs/multirun/2026-11-25_10-00-00      # the same

Writes, in that directory: summary.csv and summary.md (one row per job, best validation MAE
first), lr_vs_metric.png (validation MAE and test Pearson against learning rate, one line per
optimizer) and val_curves.png (validation MAE per epoch, one line per job). A job whose files
cannot be read (an unreadable or empty metrics.json or job.json, or "ok" without metrics) is
listed as `broken` with the reason, not as done.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agecls.utils.hydra_utils import entry_point
from agecls.utils.sweep import METRIC_COLUMNS, write_summary

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


def _json_problem(path: Path) -> tuple[str | None, Any]:
    """(what is wrong with a job's JSON file or None, its content); a missing file is no problem."""
    if not path.exists():
        return None, None
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        return f"{path.name} cannot be read ({type(err).__name__}: {err})", None
    except ValueError as err:
        return f"{path.name} is not valid JSON ({err})", None
    if not isinstance(value, dict):
        return f"{path.name} holds a {type(value).__name__}, not an object", None
    return None, value


def job_problem(job_dir: str | Path) -> str | None:
    """Why a job directory's files do not show a finished job, or None where they are sound (or it
    simply has not finished): an unreadable or empty metrics.json or job.json, or a job.json that
    says ok without a metrics.json holding any of the summary's metrics."""
    job_dir = Path(job_dir)
    problem, status = _json_problem(job_dir / "job.json")
    if problem:
        return problem
    problem, metrics = _json_problem(job_dir / "metrics.json")
    if problem:
        return problem
    if metrics is not None and not any(metrics.get(k) is not None for k in METRIC_COLUMNS):
        return "metrics.json holds none of the summary's metrics" + (" (it is empty)" if not metrics else "")
    if status and status.get("status") == "ok" and metrics is None:
        return "job.json says ok, but there is no metrics.json"
    return None


def mark_broken(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with each job whose files are broken (job_problem) as status `broken` and the
    reason as its error, after the jobs that are ok."""
    problems = [job_problem(d) for d in summary["dir"]]
    if not any(problems):
        return summary
    summary = summary.copy()
    for i, problem in enumerate(problems):
        if problem:
            summary.loc[i, "status"] = "broken"
            summary.loc[i, "error"] = problem
    order = summary["status"].ne("ok")
    return summary.assign(_late=order).sort_values("_late", kind="stable").drop(columns="_late").reset_index(drop=True)


def _rewrite_summary(sweep_dir: Path, summary: pd.DataFrame) -> None:
    """summary.csv, and summary.md's rows and counts, as mark_broken corrected them."""
    from agecls.utils.sweep import _fmt

    summary.to_csv(sweep_dir / "summary.csv", index=False)
    shown = [c for c in summary.columns if c != "dir"]
    counts = summary["status"].value_counts()
    lines = [f"# Sweep {sweep_dir.name}", "",
             f"{len(summary)} jobs: " + ", ".join(f"{int(counts.get(s, 0))} {s}" for s in ("ok", "failed", "broken"))
             + ". Sorted by best validation MAE (years); broken: files that cannot be read, see error.", "",
             "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_fmt(row[c])[:200] for c in shown) + " |" for _, row in summary.iterrows()]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")


def report(sweep_dir: str | Path) -> pd.DataFrame:
    sweep_dir = Path(sweep_dir)
    summary = write_summary(sweep_dir)
    if summary.empty:
        raise FileNotFoundError(f"{sweep_dir} holds no job directories (numbered folders with .hydra/ or metrics.json)")
    checked = mark_broken(summary)
    if checked is not summary:
        _rewrite_summary(sweep_dir, checked)
        summary = checked
    drawn = [name for name, fn in (("lr_vs_metric.png", plot_lr_vs_metric), ("val_curves.png", plot_val_curves))
             if fn(summary, sweep_dir / name)]
    log.info("Wrote summary.csv, summary.md%s in %s", "".join(f", {d}" for d in drawn), sweep_dir)
    return summary


# key=value options, as the other commands take them: {key: description}
OPTIONS = {"sweep_dir": "a multirun directory (outputs/multirun/<date>_<time>); also accepted as the first plain argument"}


def parse_args(argv: list[str] | None = None) -> dict[str, str]:
    """`key=value` arguments (the keys of OPTIONS), or the sweep directory as a plain argument."""
    parser = argparse.ArgumentParser(
        prog="python -m agecls.report", description=__doc__.split("\n\n")[0],
        epilog="options (key=value):\n" + "\n".join(f"  {k}=...  {v}" for k, v in OPTIONS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", metavar="key=value", help="sweep_dir=DIR, or DIR")
    given: dict[str, str] = {}
    for arg in parser.parse_args(argv).args:
        key, sep, value = arg.partition("=")
        if not sep:
            key, value = "sweep_dir", arg
        key = key.lstrip("+")
        if key not in OPTIONS:
            parser.error(f"{key}={value}: unknown option; options: {', '.join(OPTIONS)}")
        if key in given:
            parser.error(f"{key} given twice ({given[key]!r}, {value!r})")
        given[key] = value
    if "sweep_dir" not in given:
        parser.error("sweep_dir is required: python -m agecls.report sweep_dir=outputs/multirun/<date>_<time>")
    return given


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = report(args["sweep_dir"])
    with pd.option_context("display.width", 200, "display.max_colwidth", 50):
        cols = [c for c in summary.columns if c not in ("dir", "error")]
        print(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}" if np.isfinite(v) else ""))
    for _, row in summary[summary["status"].isin(["failed", "broken"])].iterrows():  # why, in one line each
        print(f"job {row['job']}: {row['status']}: {row['error'] or 'no reason recorded'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
