"""The files a run leaves beside its checkpoints: metrics.json, predictions.csv, scatter.png, errors.png."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _plain(value: Any) -> Any:
    """JSON-safe scalars: tensors and numpy numbers become floats, NaN and inf become null."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write atomically (temp file, then rename): a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({k: _plain(v) for k, v in data.items()}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def predictions_frame(paths: list[str], ages: np.ndarray, predicted: np.ndarray,
                      predicted_raw: np.ndarray | None = None, predicted_low: np.ndarray | None = None,
                      predicted_high: np.ndarray | None = None) -> pd.DataFrame:
    """`predicted` is the age clipped to the model's range; `predicted_raw` the network's output;
    `predicted_low`, `predicted_high` the calibrated interval (agecls.intervals), where there is one."""
    frame = pd.DataFrame({"path": paths, "age": np.asarray(ages, dtype=float), "predicted": np.asarray(predicted, dtype=float)})
    for name, values in (("predicted_raw", predicted_raw), ("predicted_low", predicted_low),
                         ("predicted_high", predicted_high)):
        if values is not None:
            frame[name] = np.asarray(values, dtype=float)
    return frame


ADULT_AGE = 18.0  # the minors' metrics: true age under it, predicted at or over it


def metrics_by_decade(frame: pd.DataFrame) -> dict[str, float]:
    """MAE and image count per decade of true age, as flat keys `mae_by_decade/20-29` and
    `n_by_decade/20-29`; and where the faces are worst judged, at the legal line:
    `test/minors_predicted_adult` (share of true minors, under 18, predicted 18 or over),
    `test/adults_predicted_minor` (the reverse) with `test/n_minors`, `test/n_adults`."""
    out: dict[str, float] = {}
    decade = (frame["age"] // 10 * 10).astype(int)
    err = (frame["predicted"] - frame["age"]).abs()
    for d in sorted(decade.unique()):
        out[f"mae_by_decade/{d}-{d + 9}"] = float(err[decade == d].mean())
        out[f"n_by_decade/{d}-{d + 9}"] = int((decade == d).sum())
    minor = (frame["age"] < ADULT_AGE).to_numpy()
    adult_said = (frame["predicted"] >= ADULT_AGE).to_numpy()
    out["test/n_minors"] = int(minor.sum())
    out["test/n_adults"] = int((~minor).sum())
    if minor.any():
        out["test/minors_predicted_adult"] = float(adult_said[minor].mean())
    if (~minor).any():
        out["test/adults_predicted_minor"] = float((~adult_said[~minor]).mean())
    return out


def errors_figure(frame: pd.DataFrame, title: str, bin_width: int = 5):
    """Where the model fails: the signed error (predicted - true) per `bin_width`-year bin of true
    age as boxes (median, quartiles, 5th-95th percentile whiskers), the MAE per bin as a line and
    the images per bin along the top; the dotted line is 18 years."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ages, pred = frame["age"].to_numpy(float), frame["predicted"].to_numpy(float)
    keep = np.isfinite(ages) & np.isfinite(pred)
    ages, signed = ages[keep], (pred - ages)[keep]
    bins = (ages // bin_width * bin_width).astype(int)
    starts = sorted(set(bins.tolist()))
    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=100)
    if starts:
        data = [signed[bins == b] for b in starts]
        centres = [b + bin_width / 2 for b in starts]
        ax.boxplot(data, positions=centres, widths=bin_width * 0.7, whis=(5, 95), showfliers=False,
                   manage_ticks=False)
        ax.plot(centres, [np.abs(d).mean() for d in data], "o-", color="tab:red", ms=3, label="MAE per bin")
        top = ax.secondary_xaxis("top")
        top.set_xticks(centres, [str(len(d)) for d in data], fontsize=6)
        top.set_xlabel(f"images per {bin_width}-year bin", fontsize=8)
        ax.set_xlim(min(starts), max(starts) + bin_width)
    ax.axhline(0, color="black", lw=0.8)
    ax.axvline(ADULT_AGE, color="grey", lw=0.8, ls=":", label="18 years")
    ax.set_xlabel("true age (years)")
    ax.set_ylabel("predicted - true age (years)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def metrics_by_group(frame: pd.DataFrame, groups: Mapping[str, Sequence[Any]]) -> dict[str, float]:
    """MAE and image count per group of each grouping that has any value (`groups`: column ->
    one value per row of `frame`, None where unknown), as `test/mae_by_gender/female`,
    `test/n_by_gender/female`; images of unknown group are counted as `unknown`."""
    out: dict[str, float] = {}
    err = (frame["predicted"] - frame["age"]).abs().to_numpy()
    for grouping, values in groups.items():
        labels = pd.Series(list(values), dtype=object)
        if len(labels) != len(frame) or labels.isna().all():
            continue
        labels = labels.where(labels.notna(), "unknown").astype(str).to_numpy()
        for group in sorted(set(labels)):
            mask = labels == group
            out[f"test/mae_by_{grouping}/{group}"] = float(err[mask].mean())
            out[f"test/n_by_{grouping}/{group}"] = int(mask.sum())
    return out


def scatter_figure(frame: pd.DataFrame, title: str, metrics: Mapping[str, Any] | None = None):
    """Predicted against true age with the identity line (the study's Figures 1 and 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=100)
    ages, pred = frame["age"].to_numpy(float), frame["predicted"].to_numpy(float)
    alpha = 0.6 if len(frame) < 500 else max(0.08, 0.6 * 500 / len(frame))
    ax.scatter(ages, pred, s=6, alpha=alpha, edgecolors="none")
    finite = np.concatenate([ages, pred])
    finite = finite[np.isfinite(finite)]
    lo, hi = (0.0, 100.0) if finite.size == 0 else (min(0.0, finite.min()), max(finite.max(), 1.0) * 1.02)
    ax.plot([lo, hi], [lo, hi], color="black", lw=1, label="identity (perfect prediction)")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("true age (years)")
    ax.set_ylabel("predicted age (years)")
    if metrics:
        parts = [f"{k.split('/')[-1]} {_plain(v):.3f}" for k, v in metrics.items() if _plain(v) is not None]
        title = f"{title}\n" + ", ".join(parts) if parts else title
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_test_outputs(
    directory: str | Path,
    frame: pd.DataFrame,
    metrics: Mapping[str, Any],
    title: str,
    loggers: Any = (),
    step: int = 0,
) -> None:
    """predictions.csv and scatter.png into `directory`; the figure also goes to TensorBoard."""
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    frame.to_csv(directory / "predictions.csv", index=False)
    shown = {k: metrics[k] for k in ("test/mae", "test/pearson", "test/spearman") if k in metrics}
    fig = scatter_figure(frame, title, shown)
    fig.savefig(directory / "scatter.png")
    errors = errors_figure(frame, title)
    errors.savefig(directory / "errors.png")
    by_group = {k: float(v) for k, v in metrics.items() if k.startswith("test/mae_by_")}
    for lg in loggers or ():
        experiment = getattr(lg, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_figure"):
            experiment.add_figure("test/scatter", fig, global_step=step, close=False)
            experiment.add_figure("test/errors_by_age", errors, global_step=step, close=False)
        if by_group and hasattr(lg, "log_metrics"):
            lg.log_metrics(by_group, step=step)
    plt.close(fig)
    plt.close(errors)


def write_test_stage(
    directory: str | Path,
    test_results: Mapping[str, np.ndarray],
    test_paths: list[str],
    metrics: dict[str, Any],
    title: str,
    loggers: Any = (),
    step: int = 0,
    groups: Mapping[str, Sequence[Any]] | None = None,
) -> pd.DataFrame:
    """After trainer.test: predictions.csv and scatter.png (earlier copies kept numbered), and the
    MAE per decade of true age and per group (`groups`: column -> one value per test path, see
    metrics_by_group) added to `metrics`. Returns the predictions."""
    from agecls.utils.files import keep_previous

    directory = Path(directory)
    frame = predictions_frame([test_paths[i] for i in test_results["index"]], test_results["age"], test_results["predicted"],
                              test_results.get("predicted_raw"), test_results.get("predicted_low"),
                              test_results.get("predicted_high"))
    metrics.update(metrics_by_decade(frame))
    if groups:
        order = np.asarray(test_results["index"])
        metrics.update(metrics_by_group(frame, {k: np.asarray(list(v), dtype=object)[order] for k, v in groups.items()}))
    metrics["test/n_images"] = len(frame)
    for name in ("predictions.csv", "scatter.png", "errors.png"):
        keep_previous(directory / name)
    write_test_outputs(directory, frame, metrics, title, loggers, step)
    return frame
