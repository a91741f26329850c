"""Checks of configured values, in one place: a bad value fails before any work, naming its key,
the value and what is allowed.

`check_train_config` runs first thing in `agecls.train.train` (before the model, the data module
or any indexing); `check_data_options` is also what `AgeDataModule.__init__` runs, so a data
module built by hand gets the same checks and the same messages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

from omegaconf import OmegaConf

from agecls.deploy import DEFAULT_CROP_PCT


class ConfigValueError(ValueError):
    """A configured value is out of its allowed range."""


def _show(value: Any) -> str:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def fail(key: str, value: Any, allowed: str) -> None:
    """Raise ConfigValueError("key=value: allowed")."""
    raise ConfigValueError(f"{key}={_show(value)}: {allowed}")


def check_number(
    key: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    integer: bool = False,
    why: str = "",
) -> float | int:
    """`value` as a number within the bounds (minimum/maximum inclusive, above/below exclusive)."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, Integral) if integer else isinstance(value, Real)
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(float(value))):
        fail(key, value, f"must be {kind}{why}")
    bounds = []
    if minimum is not None:
        bounds.append(f">= {minimum:g}")
    if above is not None:
        bounds.append(f"> {above:g}")
    if maximum is not None:
        bounds.append(f"<= {maximum:g}")
    if below is not None:
        bounds.append(f"< {below:g}")
    if ((minimum is not None and value < minimum) or (above is not None and value <= above)
            or (maximum is not None and value > maximum) or (below is not None and value >= below)):
        fail(key, value, f"must be {kind} {' and '.join(bounds)}{why}")
    return value


def check_splits(splits: Any, key: str = "data.splits") -> list[float]:
    """Three non-negative shares (train, val, test) summing to 1, as floats."""
    if OmegaConf.is_config(splits):
        splits = OmegaConf.to_container(splits, resolve=True)
    allowed = "must be three non-negative shares (train, val, test) summing to 1, e.g. [0.8, 0.1, 0.1]"
    if isinstance(splits, (str, bytes)) or not isinstance(splits, Sequence) or len(splits) != 3:
        fail(key, splits, allowed)
    if any(isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v)) or v < 0 for v in splits):
        fail(key, splits, allowed)
    if not math.isclose(sum(float(v) for v in splits), 1.0, abs_tol=1e-6):
        fail(key, splits, f"{allowed} (they sum to {sum(float(v) for v in splits):g})")
    return [float(v) for v in splits]


SEED_MAX = 2**32 - 1  # numpy's and Lightning's seed_everything's upper bound


def check_seed(key: str, value: Any, allow_none: bool = False) -> int | None:
    """A seed: a whole number from 0 to 2**32 - 1 (null too where `allow_none`: a random seed, logged)."""
    if value is None and allow_none:
        return None
    check_number(key, value, minimum=0, maximum=SEED_MAX, integer=True,
                 why=" (a seed" + ("; null draws one and logs it)" if allow_none else ")"))
    return int(value)


def _numbers(key: str, value: Any, count: int, allowed: str) -> list[float]:
    """`value` as `count` finite numbers, else ConfigValueError("key=value: allowed")."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != count
            or any(isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v)) for v in value)):
        fail(key, value, allowed)
    return [float(v) for v in value]


def _range_pair(key: str, value: Any, low: float, high: float | None, what: str) -> None:
    """[lo, hi] with low < lo <= hi (<= high where given)."""
    top = f" <= {high:g}" if high is not None else ""
    allowed = f"must be null or two numbers [lo, hi] with {low:g} < lo <= hi{top} ({what})"
    lo, hi = _numbers(key, value, 2, allowed)
    if not (low < lo <= hi and (high is None or hi <= high)):
        fail(key, value, allowed)


# data.augment's options (conf/data/_base.yaml), each null (off) or within these bounds: the
# per-sample (agecls.data.transforms) and the batched (agecls.data.batch_augment) paths read the same.
AUGMENT_KEYS = ("enabled", "hflip", "color_jitter", "rotation", "resized_crop_scale", "resized_crop_ratio",
                "affine_translate", "affine_scale", "affine_shear", "compile")


def check_augment(augment: Any, key: str = "data.augment") -> None:
    """data.augment: null (no augmentation) or a mapping of AUGMENT_KEYS, each value in its range."""
    if OmegaConf.is_config(augment):
        augment = OmegaConf.to_container(augment, resolve=True)
    if augment is None:
        return
    if not isinstance(augment, Mapping):
        fail(key, augment, f"must be null or a mapping of {', '.join(AUGMENT_KEYS)} (conf/data/_base.yaml)")
    for name, value in augment.items():
        if name not in AUGMENT_KEYS:
            fail(f"{key}.{name}", value, f"is not an augmentation option; choose among {', '.join(AUGMENT_KEYS)}")
    for name in ("enabled", "compile"):
        if name in augment and not isinstance(augment[name], bool):
            fail(f"{key}.{name}", augment[name], "must be true or false")
    a = {k: v for k, v in augment.items() if v is not None}
    if "hflip" in a:
        check_number(f"{key}.hflip", a["hflip"], minimum=0, maximum=1, why=" (the probability of a horizontal flip)")
    if "color_jitter" in a:
        allowed = ("must be null or four numbers [brightness, contrast, saturation, hue]: the first three from 0 "
                   "to 1 (a factor drawn from [1 - x, 1 + x]), hue from 0 to 0.5 (a shift of the hue circle)")
        b, c, sat, hue = _numbers(f"{key}.color_jitter", a["color_jitter"], 4, allowed)
        if not (0 <= b <= 1 and 0 <= c <= 1 and 0 <= sat <= 1 and 0 <= hue <= 0.5):
            fail(f"{key}.color_jitter", a["color_jitter"], allowed)
    if "rotation" in a:
        check_number(f"{key}.rotation", a["rotation"], minimum=0, maximum=180,
                     why=" (degrees: the angle is drawn from [-rotation, rotation])")
    if "resized_crop_scale" in a:
        _range_pair(f"{key}.resized_crop_scale", a["resized_crop_scale"], 0, 1, "the share of the area kept")
    if "resized_crop_ratio" in a:
        _range_pair(f"{key}.resized_crop_ratio", a["resized_crop_ratio"], 0, None, "the crop's aspect ratio range")
    if "affine_translate" in a:
        allowed = "must be null or two numbers [x, y] from 0 to 1 (the largest shift, as a share of width and height)"
        tx, ty = _numbers(f"{key}.affine_translate", a["affine_translate"], 2, allowed)
        if not (0 <= tx <= 1 and 0 <= ty <= 1):
            fail(f"{key}.affine_translate", a["affine_translate"], allowed)
    if "affine_scale" in a:
        _range_pair(f"{key}.affine_scale", a["affine_scale"], 0, None, "the zoom range")
    if "affine_shear" in a:
        check_number(f"{key}.affine_shear", a["affine_shear"], minimum=0, below=90,
                     why=" (degrees: the shear is drawn from [-shear, shear])")


TTA_MODES = ("none", "flip")  # tta: test-time augmentation (AgeNet.predict_years)


def check_tta(value: Any, key: str = "tta") -> str:
    """The test-time augmentation `value` names: none, or flip (the mean of the predictions on each
    image and on its horizontal flip)."""
    if isinstance(value, str) and value in TTA_MODES:
        return value
    hint = " (agecls.predict's tta=true is tta=flip here)" if isinstance(value, bool) else ""
    fail(key, value, f"choose one of {', '.join(TTA_MODES)}: none predicts each image once, flip averages the "
                     f"prediction on the image and on its horizontal flip{hint}")
    raise AssertionError  # unreachable: fail raises


def min_image_size(backbone: Mapping[str, Any] | None) -> int:
    """The smallest input side a backbone takes: its config's `min_image_size` (conf/backbone/*.yaml)."""
    value = (backbone or {}).get("min_image_size")
    return int(value) if value else 1


def cache_formats() -> tuple[str, ...]:
    """data.cache_format's values: the cached input pipelines (agecls.data.pipelines.PIPELINES), or auto."""
    # imported here: the pipelines need torch, these checks do not
    from agecls.data.pipelines import PIPELINES

    return (*(name for name in PIPELINES if name != "per_sample"), "auto")


def check_data_options(
    *,
    image_size: Any,
    batch_size: Any,
    splits: Any,
    num_workers: Any = 0,
    cache_num_workers: Any = 0,
    cache_format: Any = "raw",
    cache_memory_budget_gb: Any = 8,
    min_age: Any = 0,
    max_age: Any = 100,
    age_bin_width: Any = 5,
    crop_pct: Any = DEFAULT_CROP_PCT,
    augment: Any = None,
    seed: Any = None,
    split_seed: Any = 0,
    min_size: int = 1,
    backbone_name: str | None = None,
    prefix: str = "data.",
) -> list[float]:
    """The data options every data module needs; returns the splits as floats."""
    why = f" (the smallest input {backbone_name} takes; conf/backbone/*.yaml min_image_size)" if backbone_name else ""
    check_number(f"{prefix}image_size", image_size, minimum=max(1, min_size), integer=True, why=why)
    check_number(f"{prefix}batch_size", batch_size, minimum=1, integer=True)
    check_number(f"{prefix}num_workers", num_workers, minimum=0, integer=True)
    check_number(f"{prefix}cache_num_workers", cache_num_workers, minimum=0, integer=True)
    if cache_format not in cache_formats():
        fail(f"{prefix}cache_format", cache_format, f"choose one of {', '.join(cache_formats())}")
    check_number(f"{prefix}cache_memory_budget_gb", cache_memory_budget_gb, above=0)
    check_number(f"{prefix}min_age", min_age, minimum=0)
    check_number(f"{prefix}max_age", max_age, above=float(min_age), why=f" (above {prefix}min_age={min_age})")
    check_number(f"{prefix}age_bin_width", age_bin_width, above=0)
    # no null: it reaches the model and every exported graph's preprocessing (1.0 means no margin)
    check_number(f"{prefix}crop_pct", crop_pct, above=0, maximum=1,
                 why=" (1.0: the evaluation resize is the input size, no crop margin)")
    check_augment(augment, f"{prefix}augment")
    check_seed(f"{prefix}seed", seed, allow_none=True)
    if split_seed is None:
        fail(f"{prefix}split_seed", split_seed, "the split needs a fixed seed (a whole number from 0 to 2**32 - 1); "
                                                f"with seed=null give {prefix}split_seed=N")
    check_seed(f"{prefix}split_seed", split_seed)
    return check_splits(splits, f"{prefix}splits")


def check_loss_config(loss: Any, key: str = "loss") -> tuple[str, dict[str, Any]]:
    """A loss config (conf/loss/<name>.yaml: a `_target_` and the loss's parameters), checked:
    returns its loss= name and all its parameters (defaults filled in) as plain values. An unknown
    loss, a parameter the loss does not take or a value out of range raises ConfigValueError naming
    it and what to do.
    Only the classes of agecls.models.losses.LOSSES are accepted, so a `_target_` read from a file
    (a checkpoint's hyperparameters) cannot name other code."""
    # imported here: it needs torch; these checks do not
    from agecls.models import losses

    if OmegaConf.is_config(loss):
        loss = OmegaConf.to_container(loss, resolve=True)
    names = ", ".join(losses.LOSSES)
    if not isinstance(loss, Mapping):
        fail(key, loss, f"must be a loss config with a _target_: choose loss=<name>, name one of {names} (conf/loss/)")
    target = loss.get("_target_")
    by_target = {losses.target_of(cls): name for name, cls in losses.LOSSES.items()}
    if target not in by_target:
        fail(f"{key}._target_", target, f"is not a loss agecls knows: choose loss=<name>, name one of {names} "
                                        "(conf/loss/<name>.yaml gives its _target_)")
    name = by_target[target]
    params = {k: v for k, v in loss.items() if k != "_target_"}
    allowed = losses.loss_parameters(losses.LOSSES[name])
    for k, v in params.items():
        if k not in allowed:
            fail(f"{key}.{k}", v, f"is not a parameter of loss={name}; its parameters: {', '.join(allowed) or 'none'}")
    value = {**allowed, **params}
    if "min_age" in allowed:
        why = " (the age classes are the whole years from min_age to max_age)"
        low = check_number(f"{key}.min_age", value["min_age"], minimum=0, why=why)
        high = check_number(f"{key}.max_age", value["max_age"], why=why)
        for k, v in (("min_age", low), ("max_age", high)):
            if float(v) != int(v):
                fail(f"{key}.{k}", v, f"must be a whole number of years{why}")
        if high <= low:
            fail(f"{key}.max_age", high, f"must be above {key}.min_age={low:g}: the age range [{low:g}, {high:g}] "
                                         f"is empty{why}; raise {key}.max_age or lower {key}.min_age")
    if "sigma" in allowed:
        check_number(f"{key}.sigma", value["sigma"], above=0, why=" (years: the spread of the label distribution)")
    if "beta" in allowed:
        check_number(f"{key}.beta", value["beta"], above=0, why=" (years: where the loss turns from quadratic to linear)")
    for k in ("l1_weight", "lambda_mean", "lambda_variance"):
        if k in allowed:
            check_number(f"{key}.{k}", value[k], minimum=0, why=" (a weight of one term of the loss)")
    if "variant" in allowed and value["variant"] not in losses.ORDINAL_VARIANTS:
        fail(f"{key}.variant", value["variant"], f"choose one of {', '.join(losses.ORDINAL_VARIANTS)}")
    if "readout" in allowed and value["readout"] not in losses.ORDINAL_READOUTS:
        fail(f"{key}.readout", value["readout"], f"choose one of {', '.join(losses.ORDINAL_READOUTS)}")
    return name, value


def _get(cfg: Any, dotted: str, default: Any = None) -> Any:
    """cfg's value at `dotted`; `default` where it is absent or missing (???)."""
    if not OmegaConf.is_config(cfg):
        return default
    return OmegaConf.select(cfg, dotted, default=default, throw_on_missing=False)


def _check_loss_covers_data(name: str, params: Mapping[str, Any], data_min: Any, data_max: Any) -> None:
    """A loss over age classes must have a class for every age the data keeps ([data.min_age,
    data.max_age]); an age outside would silently train towards the nearest end."""
    if "min_age" not in params or data_min is None or data_max is None:
        return
    if params["min_age"] > data_min:
        fail("loss.min_age", params["min_age"], f"must be <= data.min_age={data_min} (loss={name} needs a class for "
                                                "every age the data keeps); lower loss.min_age or raise data.min_age")
    if params["max_age"] < data_max:
        fail("loss.max_age", params["max_age"], f"must be >= data.max_age={data_max} (loss={name} needs a class for "
                                                "every age the data keeps); raise loss.max_age or lower data.max_age")


def check_train_config(cfg: Any) -> None:
    """Every value `agecls.train` can check without building anything; raises ConfigValueError."""
    training = bool(_get(cfg, "train", True))
    testing = bool(_get(cfg, "test", True))

    if training:
        check_number("lr", _get(cfg, "lr"), above=0)
        opt_lr = _get(cfg, "optimizer.lr")
        if opt_lr is not None:
            check_number("optimizer.lr", opt_lr, above=0)
        wd = _get(cfg, "optimizer.weight_decay")
        if wd is not None:
            check_number("optimizer.weight_decay", wd, minimum=0)

        max_epochs = _get(cfg, "trainer.max_epochs")
        if max_epochs is not None and max_epochs != -1:
            check_number("trainer.max_epochs", max_epochs, minimum=1, integer=True,
                         why=" with train=true (-1 = no limit; add train=false to only test)")
        max_steps = _get(cfg, "trainer.max_steps")
        if max_steps is not None and max_steps != -1:
            check_number("trainer.max_steps", max_steps, minimum=1, integer=True, why=" (-1 = no limit)")
        for name in ("limit_train_batches", "limit_val_batches"):
            limit = _get(cfg, f"trainer.{name}")
            if limit is not None:
                check_number(f"trainer.{name}", limit, above=0,
                             why=" with train=true (a share in (0, 1] or a number of batches; null = all)")

    check_seed("seed", _get(cfg, "seed"), allow_none=True)  # before data.seed=${seed} names it

    # model
    for i, width in enumerate(_get(cfg, "head.hidden", []) or []):
        check_number(f"head.hidden[{i}]", width, minimum=1, integer=True)
    dropout = _get(cfg, "model.head_dropout")
    if dropout is not None:
        check_number("model.head_dropout", dropout, minimum=0, below=1)
    mixup = _get(cfg, "model.mixup")
    if mixup is not None:
        from agecls.models.mixup import Mixup  # (torch: only when a config has the option)

        Mixup.from_config(mixup)
    age_std = _get(cfg, "model.age_std")
    if age_std is not None:
        check_number("model.age_std", age_std, above=0)
    loss = _get(cfg, "loss")
    if loss is not None:  # (a config without the loss group: the study's l1)
        name, params = check_loss_config(loss)
        _check_loss_covers_data(name, params, _get(cfg, "data.min_age"), _get(cfg, "data.max_age"))
    tta = check_tta(_get(cfg, "tta", "none"))
    if tta != "none" and testing and _get(cfg, "data.feature_cache"):
        fail("tta", tta, "needs the test images, but data.feature_cache=true tests on cached backbone features; "
                         "train with tta=none (or data.feature_cache=false), then evaluate the checkpoint with "
                         "`python -m agecls.eval ckpt_path=PATH tta=flip`")

    # data
    data = _get(cfg, "data")
    if data is None:
        return
    if data.get("source") == "synthetic" and _get(cfg, "data.root"):
        # a synthetic data.root that holds photos (data.root=... without data=): refused before anything is built
        from pathlib import Path

        from agecls.data.sources.synthetic import check_generated_root

        check_generated_root(Path(str(_get(cfg, "data.root"))).expanduser())
    backbone = _get(cfg, "backbone") or {}
    backbone_name = _get(cfg, "backbone.name")
    splits = check_data_options(
        image_size=data.get("image_size"),
        batch_size=data.get("batch_size"),
        splits=data.get("splits", [0.8, 0.1, 0.1]),
        num_workers=data.get("num_workers", 0),
        cache_num_workers=data.get("cache_num_workers", 0),
        cache_format=data.get("cache_format", "raw"),
        cache_memory_budget_gb=data.get("cache_memory_budget_gb", 8),
        min_age=data.get("min_age", 0),
        max_age=data.get("max_age", 100),
        age_bin_width=data.get("age_bin_width", 5),
        crop_pct=data.get("crop_pct", DEFAULT_CROP_PCT),
        augment=data.get("augment"),
        seed=data.get("seed"),
        split_seed=data.get("split_seed", 0),
        min_size=min_image_size(backbone),
        backbone_name=str(backbone_name) if backbone_name else None,
    )
    if not data.get("split_file"):  # a split file decides the splits itself
        train, val, test = splits
        if training and train == 0:
            fail("data.splits", splits, "the train share must be above 0 with train=true")
        if training and val == 0:
            fail("data.splits", splits, "the val share must be above 0 with train=true (the best checkpoint "
                                         "and early stopping follow val/mae)")
        if testing and data.get("test_on", "test") == "test" and test == 0 and not data.get("test_list"):
            fail("data.splits", splits, "the test share must be above 0 with test=true and data.test_on=test")
