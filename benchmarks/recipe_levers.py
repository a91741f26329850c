"""One table of training runs (or evaluations of them) side by side: what each lever of issue 20
costs in minutes and what it gives, with the seed, the split and where the errors fall.

    python benchmarks/recipe_levers.py \
        --run "best 128 px=outputs/best_s42" --run "160 px, EMA=outputs/px160_ema_s42" \
        --run "160 px, no EMA=outputs/px160_ema_s42/eval_current" \
        --csv benchmarks/results/cpu-amd-epyc-2cores-levers.csv

An ensemble of finished runs (the mean of their predicted ages per test image; the same test
images required), its fit minutes the sum of theirs:  --ensemble "160 + 128 px=DIR1,DIR2"

The spread of a lever over seeds, from rows of the CSV (this run's and earlier ones; the seeds must
differ and every other setting agree): --spread "best, raw, 3 seeds=best s42,best s1,best s2"
(a row of mean and standard deviation of each figure, the seeds listed; key `lever`; the rows
named must have labels without commas).

Each --run is LABEL=DIR, DIR holding a metrics.json written by agecls.train or agecls.eval (an
evaluation has no fit time of its own: the fit minutes are read from the training run two levels
up, `<run>/.../metrics.json`, when DIR lies inside it). The configuration (seed, image size,
epochs, EMA, sampler, augmentations, alignment, optimizer, test list) comes from
DIR/.hydra/config.yaml or the run's. A rerun with the same labels replaces their rows in the CSV
and keeps the others (benchmarks/results_csv.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from agecls.deploy import DEFAULT_CROP_PCT
from agecls.faces import DEFAULT_DETECTOR

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_csv import write_replacing  # noqa: E402


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _run_of(directory: Path) -> Path:
    """The training run a directory belongs to: itself, or the nearest parent with a metrics.json
    that has a fit time (an eval written inside the run)."""
    for d in (directory, *directory.parents):
        if "time/fit_s" in _read(d / "metrics.json"):
            return d
    return directory


def _config(directory: Path) -> dict[str, Any]:
    path = directory / ".hydra" / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def mae_over(metrics: dict[str, Any], lo: int, hi: int) -> float | None:
    """The MAE over the decades of true age starting from lo to hi, weighted by their images
    (`mae_by_decade/..` with `n_by_decade/..`; None where the counts are not recorded)."""
    keys = [k.split("/", 1)[1] for k in metrics if k.startswith("n_by_decade/")]
    keys = [k for k in keys if lo <= int(k.split("-")[0]) <= hi and f"mae_by_decade/{k}" in metrics]
    n = sum(metrics[f"n_by_decade/{k}"] for k in keys)
    return sum(metrics[f"mae_by_decade/{k}"] * metrics[f"n_by_decade/{k}"] for k in keys) / n if n else None


def row(label: str, directory: Path) -> dict[str, Any]:
    metrics = _read(directory / "metrics.json")
    if not metrics:
        raise SystemExit(f"--run {label}={directory}: no metrics.json there; give a run or eval directory")
    run = _run_of(directory)
    run_metrics, cfg = _read(run / "metrics.json"), _config(run)
    data, trainer = cfg.get("data") or {}, cfg.get("trainer") or {}
    ema = ((cfg.get("callbacks") or {}).get("ema") or {}).get("decay")
    weights = metrics.get("weights", "checkpoint")
    decades = {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith("mae_by_decade/")}
    return {
        "lever": label,
        "seed": cfg.get("seed"),
        "split": (data.get("test_list") or f"hash {data.get('splits')}") + f" ({metrics.get('split', 'test')})",
        "ages": f"{data.get('min_age', 0)}-{data.get('max_age', 100)}",
        "image_size": data.get("image_size"),
        "crop": _crop(cfg, metrics),
        "epochs": run_metrics.get("epochs", trainer.get("max_epochs")),
        "loss": str((cfg.get("loss") or {}).get("_target_", "")).rsplit(".", 1)[-1],
        "sampler": data.get("sampler", "shuffle"),
        "ema": (f"{ema}" if ema is not None else "none") + (" (raw weights)" if weights == "current" else ""),
        "mixup": _mixup(cfg),
        "augment": _augment(data),
        "align": str(data.get("align_detector", DEFAULT_DETECTOR)) if data.get("align") else "none",
        "optimizer": _optimizer(cfg),
        "tta": metrics.get("tta"),
        "n_test": metrics.get("test/n_images"),
        "mae": metrics.get("test/mae"),
        "pearson": metrics.get("test/pearson"),
        "spearman": metrics.get("test/spearman"),
        "cs5": metrics.get("test/cs5"),
        "val_mae": run_metrics.get("val/mae_best") if weights != "current" else None,  # the run's val: the average
        "fit_min": round(run_metrics["time/fit_s"] / 60, 1) if "time/fit_s" in run_metrics else None,
        "mae_0_9": decades.get("0-9"),
        "mae_10_19": decades.get("10-19"),
        "mae_60_plus": mae_over(metrics, 60, 200),
        "minors_predicted_adult": metrics.get("test/minors_predicted_adult"),
        "n_minors": metrics.get("test/n_minors"),
        "dir": str(directory),
    }


def _crop(cfg: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The centre crop the model was trained with (data.crop_pct, resolved: by default it follows
    the backbone's), and the one it was evaluated at where agecls.eval's eval.crop_pct replaced it,
    e.g. "0.875 (eval 0.95)"."""
    from omegaconf import OmegaConf

    trained = float(OmegaConf.select(OmegaConf.create(cfg), "data.crop_pct", default=None) or DEFAULT_CROP_PCT)
    evaluated = float(metrics.get("crop_pct") or trained)
    return f"{trained:g}" + (f" (eval {evaluated:g})" if evaluated != trained else "")


def _mixup(cfg: dict[str, Any]) -> str:
    mix = (cfg.get("model") or {}).get("mixup") or {}
    if not mix.get("alpha"):
        return "none"
    bandwidth = mix.get("bandwidth")
    return f"alpha {mix['alpha']}" + (f", C-Mixup {bandwidth} y" if bandwidth else ", uniform")


def _augment(data: dict[str, Any]) -> str:
    """The training augmentations a run had on, e.g. hflip+jitter+crop (the recipe's light set)."""
    aug = data.get("augment") or {}
    if not aug or not aug.get("enabled", True):
        return "none"
    on = {"hflip": bool(aug.get("hflip")), "jitter": any(aug.get("color_jitter") or []),
          "rotation": bool(aug.get("rotation")), "crop": aug.get("resized_crop_scale") is not None,
          "affine": any(aug.get(k) is not None for k in ("affine_translate", "affine_scale", "affine_shear"))}
    return "+".join(k for k, v in on.items() if v) or "none"


def _optimizer(cfg: dict[str, Any]) -> str:
    """The optimizer's class and its weight decay where it has one, e.g. AdamW wd 0.05."""
    opt = cfg.get("optimizer") or {}
    name = str(opt.get("_target_", "")).rsplit(".", 1)[-1] or "unset"
    decay = opt.get("weight_decay")
    return name + (f" wd {float(decay):g}" if isinstance(decay, (int, float)) and decay else "")


# the figures a spread row averages; the settings that must agree between its rows
SPREAD_FIGURES = ("mae", "pearson", "spearman", "cs5", "val_mae", "fit_min", "mae_0_9", "mae_10_19", "mae_60_plus",
                  "minors_predicted_adult")
# the value of a setting in rows written before its column was added (older CSV rows read it back empty)
# (no default for augment: rows before it had either set, so they read "unset" and spread only alike)
COLUMN_DEFAULTS = {"mixup": "none", "align": "none", "optimizer": "Adam"}
SPREAD_SETTINGS = ("split", "ages", "image_size", "crop", "epochs", "loss", "sampler", "ema", "mixup", "augment", "align",
                   "optimizer", "tta", "n_test")


def _setting(value: Any) -> str:
    """A setting as text, alike whether it came from a run (int) or back from the CSV (float, NaN)."""
    if value is None or (isinstance(value, float) and value != value):
        return "unset"
    if isinstance(value, (int, float)):
        return f"{float(value):g}"
    return str(value)


def spread_row(label: str, members: list[str], table: pd.DataFrame) -> dict[str, Any]:
    """Mean and standard deviation (n - 1) over seeds of the rows `members` of `table`."""
    rows = table.set_index("lever")
    missing = [m for m in members if m not in rows.index]
    if missing:
        raise SystemExit(f"--spread {label}: no rows {missing} in the table; measure them first (--run)")
    picked = rows.loc[members].reset_index()
    seeds = pd.to_numeric(picked["seed"], errors="coerce")
    if seeds.isna().any() or (seeds != seeds.round()).any():
        raise SystemExit(f"--spread {label}: rows {list(picked.loc[seeds.isna(), 'lever'])} have no single seed "
                         f"({list(picked['seed'])}); a spread is over single-seed runs")
    if seeds.nunique() != len(members):
        raise SystemExit(f"--spread {label}: the rows share seeds ({list(picked['seed'])}); a spread needs one row a seed")
    # rows written before a column existed read it back empty: what it records was then the default
    picked = picked.fillna({k: v for k, v in COLUMN_DEFAULTS.items() if k in picked})
    for key in SPREAD_SETTINGS:
        values = {_setting(v) for v in picked[key]} if key in picked else set()
        if len(values) > 1:
            raise SystemExit(f"--spread {label}: the rows differ in {key} ({sorted(values)}), not only in the seed")
    out: dict[str, Any] = {"lever": label, "seed": ",".join(str(int(s)) for s in seeds)}
    for key in SPREAD_SETTINGS:
        out[key] = picked[key].dropna().iloc[0] if key in picked and picked[key].notna().any() else None
    for key in SPREAD_FIGURES:
        values = pd.to_numeric(picked[key], errors="coerce").dropna() if key in picked else pd.Series(dtype=float)
        out[key] = float(values.mean()) if len(values) == len(members) else None
        out[f"{key}_sd"] = float(values.std(ddof=1)) if len(values) == len(members) else None
    out["dir"] = ",".join(members)
    return out


def ensemble_row(label: str, directories: list[Path]) -> dict[str, Any]:
    """The mean prediction of several runs on the same test images, scored by the metrics every
    run logs (agecls.models.metrics.stage_metrics, agecls.utils.outputs.metrics_by_decade)."""
    import torch

    from agecls.models.metrics import stage_metrics
    from agecls.utils.outputs import metrics_by_decade

    frames = [pd.read_csv(d / "predictions.csv").set_index("path") for d in directories]
    paths = frames[0].index
    for d, f in zip(directories[1:], frames[1:], strict=True):
        if set(f.index) != set(paths) or not (f.loc[paths, "age"].to_numpy() == frames[0]["age"].to_numpy()).all():
            raise SystemExit(f"--ensemble {label}: {d} did not predict the same test images as {directories[0]}")
    ages = frames[0]["age"].to_numpy(float)
    mean = sum(f.loc[paths, "predicted"].to_numpy(float) for f in frames) / len(frames)
    collection = stage_metrics("test")
    collection.update(torch.tensor(mean, dtype=torch.float32), torch.tensor(ages, dtype=torch.float32))
    metrics = {k: float(v) for k, v in collection.compute().items()}
    metrics.update(metrics_by_decade(pd.DataFrame({"age": ages, "predicted": mean})))
    members = [row(d.name, d) for d in directories]
    out = {**members[0], "lever": label, "n_test": len(paths), "mae": metrics["test/mae"],
           "pearson": metrics["test/pearson"], "spearman": metrics["test/spearman"], "cs5": metrics["test/cs5"],
           "val_mae": None, "mae_0_9": metrics.get("mae_by_decade/0-9"), "mae_10_19": metrics.get("mae_by_decade/10-19"),
           "minors_predicted_adult": metrics.get("test/minors_predicted_adult"), "n_minors": metrics.get("test/n_minors"),
           "dir": ",".join(map(str, directories))}
    for key in ("seed", "image_size", "crop", "epochs", "ema", "mixup", "augment", "align", "optimizer", "sampler", "tta", "loss"):
        out[key] = " + ".join(str(m[key]) for m in members)
    # each training run's fit once: evaluations of one run (e.g. at two crops) cost no second fit
    fits = list({str(_run_of(d)): m["fit_min"] for d, m in zip(directories, members, strict=True)}.values())
    out["fit_min"] = round(sum(fits), 1) if None not in fits else None
    out["mae_60_plus"] = mae_over(metrics, 60, 200)
    return out


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], metavar="LABEL=DIR")
    parser.add_argument("--ensemble", action="append", default=[], metavar="LABEL=DIR1,DIR2[,...]")
    parser.add_argument("--spread", action="append", default=[], metavar="LABEL=LEVER1,LEVER2[,...]")
    parser.add_argument("--csv", type=Path, default=None, help="write (or update) this CSV")
    args = parser.parse_args(argv)
    rows = []
    for item in args.run:
        label, sep, directory = item.partition("=")
        if not sep or not label or not directory:
            parser.error(f"--run {item!r}: give LABEL=DIR")
        rows.append(row(label, Path(directory)))
    for item in args.ensemble:
        label, sep, dirs = item.partition("=")
        members = [Path(d) for d in dirs.split(",") if d]
        if not sep or not label or len(members) < 2:
            parser.error(f"--ensemble {item!r}: give LABEL=DIR1,DIR2[,...] (at least two runs)")
        rows.append(ensemble_row(label, members))
    spreads = []
    for item in args.spread:
        label, sep, levers = item.partition("=")
        members = [m.strip() for m in levers.split(",") if m.strip()]
        if not sep or not label or len(members) < 2:
            parser.error(f"--spread {item!r}: give LABEL=LEVER1,LEVER2[,...] (at least two rows of the CSV)")
        spreads.append((label, members))
    if not rows and not spreads:
        parser.error("give at least one --run, --ensemble or --spread")
    table = pd.DataFrame(rows)
    if spreads:
        known = pd.concat([pd.read_csv(args.csv) if args.csv is not None and args.csv.is_file() else pd.DataFrame(),
                           table], ignore_index=True)
        if len(known):
            known = known.drop_duplicates("lever", keep="last")
        else:
            parser.error("--spread reads rows of --csv (or of this call's --run): there are none")
        table = pd.concat([table, pd.DataFrame([spread_row(label, m, known) for label, m in spreads])],
                          ignore_index=True)
    shown = table.drop(columns=["dir"])
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.csv is not None:
        write_replacing(args.csv, table, key=["lever"])
        print(f"wrote {args.csv}")
    return table


if __name__ == "__main__":
    main()
