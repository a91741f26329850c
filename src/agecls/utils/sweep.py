"""Sweep summaries: one row per job of a multirun, best validation MAE first.

Each job records `job.json` (its overrides, status and error) in its directory when it ends; the
summary is then rebuilt from the job directories on disk. So it is up to date after every job,
survives a sweep that is killed, covers failed jobs, and `python -m agecls.report DIR` can rebuild
it for any past sweep.
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import Any

import pandas as pd

from agecls.utils.outputs import write_json

log = logging.getLogger(__name__)

# Columns of the summary, in order; metrics missing from a job stay empty.
METRIC_COLUMNS = [
    "val/mae_best", "test/mae", "test/pearson", "test/spearman", "test/cs5", "epochs", "params/trainable", "time/fit_s",
]


def write_job_status(job_dir: str | Path, overrides: list[str], status: str, error: str | None = None) -> None:
    write_json(Path(job_dir) / "job.json", {"overrides": " ".join(overrides), "status": status, "error": error})


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _job_dirs(sweep_dir: Path) -> list[Path]:
    dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and ((p / "job.json").exists() or (p / "metrics.json").exists()
                                                            or (p / ".hydra").exists())]
    return sorted(dirs, key=lambda p: (0, int(p.name)) if p.name.isdigit() else (1, p.name))


def collect_jobs(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per job directory of `sweep_dir`: job, overrides, status, error, metrics, dir."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a sweep directory")
    rows = []
    for job in _job_dirs(sweep_dir):
        status = _read_json(job / "job.json")
        metrics = _read_json(job / "metrics.json")
        overrides = status.get("overrides")
        if overrides is None:
            over_file = job / ".hydra" / "overrides.yaml"
            overrides = " ".join(_read_overrides(over_file)) if over_file.exists() else ""
        state = status.get("status") or ("ok" if metrics else "unfinished")
        row = {"job": job.name, "overrides": overrides, "status": state, "error": status.get("error") or "",
               **_job_knobs(job)}
        for col in METRIC_COLUMNS:
            row[col] = metrics.get(col)
        row["dir"] = str(job)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["job", "overrides", "status", "error", *KNOB_COLUMNS, *METRIC_COLUMNS, "dir"])
    if len(frame) > 1:
        # show what the jobs vary; what they share is in the sweep's multirun.yaml
        tokens = [set(str(o).split()) for o in frame["overrides"]]
        common = set.intersection(*tokens)
        frame["overrides"] = [" ".join(t for t in str(o).split() if t not in common) for o in frame["overrides"]]
    if len(frame):
        frame["_ok"] = frame["status"] != "ok"
        frame = frame.sort_values(["_ok", "val/mae_best", "job"], na_position="last", kind="stable").drop(columns="_ok")
    return frame.reset_index(drop=True)


KNOB_COLUMNS = ["backbone", "freeze", "optimizer", "lr"]


def _job_knobs(job: Path) -> dict[str, Any]:
    """The knobs a sweep varies, read from the job's composed config."""
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    except Exception:
        return {}
    target = OmegaConf.select(cfg, "optimizer._target_", default="") or ""
    lr = OmegaConf.select(cfg, "lr", default=None)
    return {
        "backbone": OmegaConf.select(cfg, "backbone.name", default=None),
        "freeze": str(OmegaConf.select(cfg, "freeze", default="")).lower(),
        "optimizer": target.rsplit(".", 1)[-1].lower() or None,
        "lr": float(lr) if isinstance(lr, (int, float)) else None,
    }


def _read_overrides(path: Path) -> list[str]:
    from omegaconf import OmegaConf

    try:
        return [str(o) for o in OmegaConf.load(path)]
    except Exception:
        return []


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_summary(sweep_dir: str | Path) -> pd.DataFrame:
    """Write summary.csv and summary.md at the sweep's root; return the table."""
    sweep_dir = Path(sweep_dir)
    frame = collect_jobs(sweep_dir)
    frame.to_csv(sweep_dir / "summary.csv", index=False)
    shown = [c for c in frame.columns if c != "dir"]
    lines = [f"# Sweep {sweep_dir.name}", "",
             f"{len(frame)} jobs: {int((frame['status'] == 'ok').sum())} ok, {int((frame['status'] == 'failed').sum())} failed. "
             "Sorted by best validation MAE (years).", "",
             "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c])[:200] for c in shown) + " |")
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return frame


def describe_error(err: BaseException) -> str:
    last = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" (at {Path(last.filename).name}:{last.lineno})" if last else ""
    return f"{type(err).__name__}: {err}{where}"
