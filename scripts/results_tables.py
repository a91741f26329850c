"""Tables and figures of docs/results.md from the run directories scripts/results.sh leaves.

    python scripts/results_tables.py outputs/results [docs/results]
    python scripts/results_tables.py --axes outputs/axes [docs/results]   (scripts/results_axes.sh)

Prints the markdown tables (and writes them to <dest>/tables.md, or axes.md, with a CSV per table)
and copies the scatter plots and the sweep figure as small PNGs into <dest>.
"""

from __future__ import annotations

import json
import shutil
import sys
from datetime import datetime
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


def mean_sd(values: pd.Series) -> str:
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values.mean():.3f}"


def by_loss(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per loss from one row per run (columns loss, seed, val MAE, METRICS' names, trainable
    params): mean ± sd over its seeds, best test MAE first."""
    rows = []
    for loss, g in runs.groupby("loss"):
        row = {"loss": loss, "seeds": ", ".join(g["seed"].astype(str)), "val MAE": mean_sd(g["val MAE"])}
        row.update({v: mean_sd(g[v]) for v in METRICS.values()})
        row["trainable params"] = f"{int(g['trainable params'].iloc[0]):,}"
        row["_order"] = g["MAE"].mean()
        rows.append(row)
    return pd.DataFrame(rows).sort_values("_order").drop(columns="_order")


def group_rows(metrics: dict, column: str) -> pd.DataFrame:
    """MAE and count per group of `column` (gender, race) from a metrics.json."""
    prefix = f"test/mae_by_{column}/"
    rows = [{column: k[len(prefix):], "images": int(metrics.get(f"test/n_by_{column}/{k[len(prefix):]}", 0)), "MAE": v}
            for k, v in metrics.items() if k.startswith(prefix)]
    return pd.DataFrame(rows).sort_values("images", ascending=False) if rows else pd.DataFrame()


def age_adjusted(predictions: Path) -> dict[str, pd.DataFrame] | None:
    """Per gender and race of UTKFace test predictions: mean age, and the MAE the group's age mix
    alone would give (each image's decade's MAE over the whole test set), and MAE / that: a ratio
    above 1 means worse than the ages of the group explain."""
    from agecls.data.sources import make_source

    p = pd.read_csv(predictions)
    if not len(p):
        return None
    groups = make_source("utkface", str(Path(p["path"].iloc[0]).parent)).load().records[["path", "gender", "race"]]
    p = p.merge(groups, on="path", how="left")
    p["error"] = (p["predicted"] - p["age"]).abs()
    decade = (p["age"] // 10).clip(upper=9)
    p["expected"] = decade.map(p.groupby(decade)["error"].mean())
    out = {}
    for column in ("gender", "race"):
        g = p.groupby(column).agg(**{"mean age": ("age", "mean"), "MAE from age mix": ("expected", "mean"),
                                     "_mae": ("error", "mean")}).reset_index()
        g["MAE / age-mix MAE"] = g["_mae"] / g["MAE from age mix"]
        out[column] = g.drop(columns="_mae")
    return out


def val_curve(run: Path) -> pd.DataFrame:
    """Validation MAE after each epoch of a run, with the minutes since the run started (its
    train.log's first line) at which TensorBoard recorded it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = (run / "train.log").read_text().split("\n", 1)[0]
    start = datetime.strptime(first[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # logging's local time
    rows = []
    for events in sorted(run.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "val/mae" in acc.Tags()["scalars"]:
            rows += [{"val MAE": e.value, "minutes": (e.wall_time - start) / 60} for e in acc.Scalars("val/mae")]
    frame = pd.DataFrame(rows).sort_values("minutes").reset_index(drop=True)
    frame.insert(0, "epoch", frame.index + 1)
    return frame


def backbones(src_dir: Path, dest_dir: Path) -> list[str]:
    """scripts/results_axes.sh section 3: a table per run and one figure, validation MAE against
    epoch and against wall-clock minutes (frozen dashed, unfrozen solid)."""
    runs = sorted(p for p in (src_dir / "backbones").glob("*_*") if (p / "metrics.json").exists())
    if not runs:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"lite0": "Lite0", "lite1": "Lite1", "lite2": "Lite2", "scratch": "Lite0, random init"}
    colours = {"lite0": "tab:blue", "lite1": "tab:orange", "lite2": "tab:green", "scratch": "tab:grey"}
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 5), sharey=True)
    rows, curves = [], []
    for run in runs:
        net, mode = run.name.rsplit("_", 1)
        m = load(run)
        curve = val_curve(run)
        curves.append(curve.assign(backbone=names[net], freeze=mode))
        best = curve.loc[curve["val MAE"].idxmin()]
        rows.append({"backbone": names[net], "freeze": mode, "trainable params": f"{m['params/trainable']:,}",
                     "epochs": len(curve), "val MAE epoch 1": curve["val MAE"].iloc[0],
                     "minutes to epoch 1": curve["minutes"].iloc[0],
                     "best val MAE": best["val MAE"], "minutes to best": best["minutes"],
                     "min / epoch": (curve["minutes"].iloc[-1] - curve["minutes"].iloc[0]) / max(len(curve) - 1, 1)
                     if len(curve) > 1 else curve["minutes"].iloc[0],
                     "test MAE": m["test/mae"], "Pearson": m["test/pearson"]})
        style = {"color": colours[net], "linestyle": "-" if mode == "unfrozen" else "--", "marker": "o",
                 "markersize": 3, "label": f"{names[net]}, {mode}"}
        by_epoch.plot(curve["epoch"], curve["val MAE"], **style)
        by_time.plot(curve["minutes"], curve["val MAE"], **style)
    by_epoch.set(xscale="log", xlabel="epoch", ylabel="validation MAE (years)")
    by_time.set(xscale="log", xlabel="minutes since the run started (2 CPU cores)")
    from matplotlib.ticker import NullFormatter

    for ax, ticks in ((by_epoch, [1, 2, 3, 5, 10, 20, 30]), (by_time, [1, 2, 3, 5, 10, 20, 40])):
        ax.grid(alpha=0.3, which="both")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.legend(*by_epoch.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("Backbones at 128 px: validation MAE per epoch (frozen: head on cached features)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(dest_dir / "backbones_val_mae.png", dpi=90)
    plt.close(fig)
    table = pd.DataFrame(rows)
    table.to_csv(dest_dir / "backbones.csv", index=False)
    pd.concat(curves).to_csv(dest_dir / "backbones_curves.csv", index=False)
    return ["### Backbones (128 px, crop 0.875, seed 42; unfrozen 3 epochs, frozen 30 head epochs on cached features)",
            "", fmt(table), "", "![validation MAE against epoch and wall-clock](results/backbones_val_mae.png)", ""]


def unfrozen_losses(src_dir: Path, dest_dir: Path) -> list[str]:
    """scripts/results_axes.sh section 4: the frozen ranking's best three losses unfrozen, beside l1,
    mean ± sd over the seeds there are (losses_unfrozen/LOSS is seed 42, LOSS_sN seed N)."""
    runs = [("l1", "42", src_dir / "backbones" / "lite0_unfrozen")]
    for p in sorted((src_dir / "losses_unfrozen").glob("*")):
        name, _, seed = p.name.rpartition("_s")
        runs.append((name, seed, p) if name and seed.isdigit() else (p.name, "42", p))
    rows = []
    for loss, seed, p in runs:
        if (p / "metrics.json").exists():
            m = load(p)
            rows.append({"loss": loss, "seed": seed, "val MAE": m["val/mae_best"],
                         **{v: m.get(k) for k, v in METRICS.items()}, "trainable params": m["params/trainable"]})
    if len({row["loss"] for row in rows}) < 2:
        return []
    per_seed = pd.DataFrame(rows)
    per_seed.to_csv(dest_dir / "losses_unfrozen_runs.csv", index=False)
    table = by_loss(per_seed)
    table.to_csv(dest_dir / "losses_unfrozen.csv", index=False)
    seeds = sorted(set(per_seed["seed"]), key=lambda s: (s != "42", int(s)))
    return [f"### Losses unfrozen (EfficientNet-Lite0, 128 px, 3 epochs; mean ± sd over seeds {', '.join(seeds)})",
            "", fmt(table), ""]


def loss_name(run: Path) -> str:
    """The `loss=` option a run trained with: its hparams' loss target matched to conf/loss/*.yaml."""
    import yaml

    target = (yaml.safe_load((run / "hparams.yaml").read_text()).get("loss") or {}).get("_target_")
    for option in sorted((Path(__file__).resolve().parents[1] / "conf" / "loss").glob("*.yaml")):
        if (yaml.safe_load(option.read_text()) or {}).get("_target_") == target:
            return option.stem
    return str(target)


def best_recipe(src_dir: Path, dest_dir: Path) -> list[str]:
    """scripts/results_axes.sh section 5: the best recipe's runs against issue 13's targets."""
    times = {}
    if (src_dir / "times.csv").exists():
        t = pd.read_csv(src_dir / "times.csv", header=None, names=["run", "seconds"])
        times = dict(zip(t["run"], t["seconds"], strict=False))
    rows = []
    for run in sorted((src_dir / "best").glob("*")):
        if not (run / "metrics.json").exists():
            continue
        m = load(run)
        rows.append({"run": run.name, "loss": loss_name(run), "tta": m.get("tta", "none"), **{v: m.get(k) for k, v in METRICS.items()},
                     "val MAE": m["val/mae_best"], "epochs": m["epochs"],
                     "fit + test min": (m["time/fit_s"] + m.get("time/test_s", 0.0)) / 60,
                     "wall min": minutes(times, f"best/{run.name}"),
                     "MAE <= 4.9": m["test/mae"] <= 4.9, "Pearson >= 0.93": m["test/pearson"] >= 0.93})
        wall = times.get(f"best/{run.name}")
        rows[-1]["wall <= 45 min"] = "" if wall is None else wall / 60 <= 45
        if (run / "scatter.png").exists():
            shutil.copy(run / "scatter.png", dest_dir / f"scatter_{run.name}.png")
    if not rows:
        return []
    table = pd.DataFrame(rows)
    table.to_csv(dest_dir / "best_recipe.csv", index=False)
    return ["### The best recipe of issue 13 (experiment=utkface_best9: unfrozen Lite0, 128 px, light augmentation, DLDL-v2 "
            "unless `loss` says otherwise, 9 one-cycle epochs, flip TTA)", "", fmt(table), ""]


def axes(src: str, dest: str = "docs/results") -> None:
    """The tables of scripts/results_axes.sh's runs: losses, flip TTA, MAE by group, backbones."""
    src_dir, dest_dir = Path(src), Path(dest)
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = []
    summary = src_dir / "losses" / "summary.csv"
    if summary.exists():
        s = pd.read_csv(summary)
        for key in ("loss", "seed"):  # the sweep's own overrides (summary.csv keeps them as text)
            s[key] = s["overrides"].str.extract(rf"(?:^| ){key}=(\S+)", expand=False)
        failed = s[s["status"] != "ok"]
        s = s[s["status"] == "ok"]
        table = by_loss(s.rename(columns={"val/mae_best": "val MAE", "params/trainable": "trainable params", **METRICS}))
        out += ["### Losses (frozen EfficientNet-Lite0, head on cached features, 10 epochs; mean ± sd over seeds 42, 1, 2)",
                "", fmt(table), ""]
        if len(failed):
            out += [f"Failed jobs: {', '.join(failed['overrides'])}", ""]
        table.to_csv(dest_dir / "losses.csv", index=False)
    group_source = None
    gain = src_dir / "tta" / "tta_gain.csv"
    if gain.exists():
        g = pd.read_csv(gain)
        table = pd.DataFrame({"checkpoint": g["run"], "images": g["n_images"], "MAE": g["mae_none"],
                              "MAE flip": g["mae_flip"], "gain (years)": g["mae_gain"],
                              "Pearson": g["pearson_none"], "Pearson flip": g["pearson_flip"]})
        out += ["### Test-time augmentation (horizontal flip)", "", fmt(table), ""]
        table.to_csv(dest_dir / "tta.csv", index=False)
        # MAE by group of the best checkpoint (lowest MAE with flip), from its evaluation, unless
        # the best recipe's run (section 5, tested with flip) is there: then of that model
        best = g.loc[g["mae_flip"].idxmin(), "run"]
        group_source = (src_dir / "tta" / best / "flip", f"{best} (tta=flip)")
    best_run = src_dir / "best" / "best_s42"
    if (best_run / "metrics.json").exists():
        group_source = (best_run, "the best recipe, best_s42 (tta=flip)")
        out += best_recipe(src_dir, dest_dir)
    if group_source is not None:
        run, label = group_source
        metrics = json.loads((run / "metrics.json").read_text())
        adjusted = age_adjusted(run / "predictions.csv")
        for column in ("gender", "race"):
            frame = group_rows(metrics, column)
            if len(frame) and adjusted is not None:
                frame = frame.merge(adjusted[column], on=column, how="left")
            if len(frame):
                out += [f"### MAE by {column}: {label}", "", fmt(frame), ""]
                frame.to_csv(dest_dir / f"mae_by_{column}.csv", index=False)
    out += unfrozen_losses(src_dir, dest_dir)
    out += backbones(src_dir, dest_dir)
    text = "\n".join(out)
    (dest_dir / "axes.md").write_text(text)
    print(text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--axes"]:
        axes(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
