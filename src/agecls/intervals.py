"""Per-face age intervals: conformalised on the validation split, for every loss.

A model's interval at coverage c (say 0.9) is meant to hold the true age of 90 % of faces like
those it was validated on. It is built in two steps:

1. a *base* interval per face, from the model itself (`AgeNet.interval_from_outputs`): for the
   label-distribution losses (ce, dldl, dldl_v2, mean_variance) the central c-quantiles of the
   predicted age distribution, [q((1-c)/2), q((1+c)/2)]; for the point losses (l1, mse,
   smooth_l1, ordinal) the prediction itself (a zero-width base);
2. a *margin* m(c) added on both sides, chosen on the validation split so the widened interval
   covers a share c of it: split-conformal quantile regression (CQR, Romano et al. 2019) with the
   score s = max(low - age, age - high), m = the ceil((n+1)c)-th smallest of the n scores. For a
   zero-width base this is the classic split-conformal interval, prediction +- the c-quantile of
   |error|. The margin may be negative: a distribution that is too wide is narrowed.

Under exchangeability (the faces predicted come from the validation split's distribution) the
coverage is at least c; on other photos it is what `benchmarks/interval_coverage.py` measures.

The calibration is computed at the end of every validation epoch (AgeRegressor), saved in the
checkpoint under CHECKPOINT_KEY with the weights it belongs to, and written into an exported
model's spec (`interval`, at the export's coverage). It is plain data (floats, strings) and
checked field by field whenever it is read: nothing in it is trusted unchecked.

This module imports only numpy (agecls.deploy uses it where torch is not installed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The coverages every model is calibrated at (python -m agecls.calibrate can add others).
LEVELS = (0.5, 0.8, 0.9, 0.95)
DEFAULT_COVERAGE = 0.9
CHECKPOINT_KEY = "agecls_calibration"
METHOD = "split-conformal CQR"
BASES = ("distribution", "point")  # central quantiles of the label distribution | the prediction itself


class CalibrationError(ValueError):
    """A stored calibration is malformed, or a coverage it was not calibrated at was asked for."""


def level_key(coverage: float) -> str:
    """The key a coverage is stored under: '0.9', '0.95'."""
    return f"{float(coverage):g}"


def conformal_margin(scores: np.ndarray, coverage: float) -> float:
    """The split-conformal quantile of `scores`: the ceil((n+1)c)-th smallest (n: their number),
    +inf when n is too small for coverage c (the guarantee then needs an unbounded interval)."""
    s = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    n = len(s)
    k = math.ceil((n + 1) * float(coverage))
    return float(s[k - 1]) if 1 <= k <= n else math.inf


def scores(age: np.ndarray, low_raw: np.ndarray, high_raw: np.ndarray) -> np.ndarray:
    """CQR conformity scores: how far each true age lies outside its base interval (negative: inside)."""
    age = np.asarray(age, dtype=np.float64)
    return np.maximum(np.asarray(low_raw, dtype=np.float64) - age, age - np.asarray(high_raw, dtype=np.float64))


@dataclass
class Calibration:
    """Margins per coverage (`margins`: level_key(c) -> years), from `n` validation faces."""

    margins: dict[str, float]
    n: int
    base: str
    method: str = METHOD
    split: str = "val"
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. tta used, epoch

    @classmethod
    def fit(cls, age: np.ndarray, low_raw: Mapping[float, np.ndarray], high_raw: Mapping[float, np.ndarray],
            base: str, split: str = "val", **extra: Any) -> Calibration:
        """The margins at each coverage of `low_raw` (coverage -> base lows, one per face) from the
        true ages `age` of the calibration split."""
        n = int(np.asarray(age).size)
        if n == 0:
            raise CalibrationError("no faces to calibrate on")
        margins = {level_key(c): conformal_margin(scores(age, low_raw[c], high_raw[c]), c) for c in low_raw}
        return cls(margins, n, base, split=split, extra=dict(extra))

    @property
    def levels(self) -> tuple[float, ...]:
        return tuple(sorted(float(k) for k in self.margins))

    def margin(self, coverage: float) -> float:
        """The margin at `coverage`; CalibrationError listing the levels it has if not one of them."""
        key = level_key(coverage)
        if key not in self.margins:
            have = ", ".join(level_key(c) for c in self.levels)
            raise CalibrationError(f"coverage={key}: this model is calibrated at coverage {have}; choose one of "
                                   f"them, or calibrate it at {key} with python -m agecls.calibrate "
                                   f"ckpt_path=... 'levels=[{key}]'")
        return self.margins[key]

    def apply(self, low_raw: np.ndarray, high_raw: np.ndarray, coverage: float,
              age_range: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The calibrated interval (low, high) of base intervals, clipped to `age_range`. A
        negative margin never makes low > high: such an interval shrinks to its midpoint."""
        m = self.margin(coverage)
        low = np.asarray(low_raw, dtype=np.float64) - m
        high = np.asarray(high_raw, dtype=np.float64) + m
        if math.isfinite(m):  # an infinite margin (too few validation faces) is the whole age range
            mid = (low + high) / 2
            low, high = np.minimum(low, mid), np.maximum(high, mid)
        if age_range is not None:
            low, high = np.clip(low, *age_range), np.clip(high, *age_range)
        return low, high

    def to_dict(self) -> dict[str, Any]:
        return {"margins": {k: float(v) for k, v in self.margins.items()}, "n": int(self.n), "base": self.base,
                "method": self.method, "split": self.split, "extra": dict(self.extra)}

    def at(self, coverage: float) -> dict[str, Any]:
        """What an exported spec records (`interval`): one coverage, its margin, how it was made."""
        return {"coverage": float(coverage), "margin": self.margin(coverage), "base": self.base, "n": int(self.n),
                "method": self.method, "split": self.split}

    @classmethod
    def from_dict(cls, data: Any, source: str = "the checkpoint", prefix: str = CHECKPOINT_KEY,
                  remedy: str = "calibrate the model again (python -m agecls.calibrate ckpt_path=...)") -> Calibration:
        """A calibration read back, checked field by field (CalibrationError naming `source` and the key)."""
        def bad(key: str, value: Any, allowed: str) -> CalibrationError:
            return CalibrationError(f"{source}: {prefix}.{key}={value!r}: {allowed}; {remedy}")

        if not isinstance(data, Mapping):
            raise bad("", type(data).__name__, "must be a dict")
        margins = data.get("margins")
        if not isinstance(margins, Mapping) or not margins:
            raise bad("margins", margins, "must be a non-empty dict of coverage -> margin (years)")
        checked = {}
        for key, value in margins.items():
            try:
                c = float(key)
            except (TypeError, ValueError):
                raise bad("margins", key, "each key must be a coverage in (0, 1)") from None
            if not 0 < c < 1:
                raise bad("margins", key, "each key must be a coverage in (0, 1)")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value == -math.inf:
                raise bad(f"margins[{key}]", value, "must be a number of years (or inf)")
            checked[level_key(c)] = float(value)
        n = data.get("n")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise bad("n", n, "must be a positive integer")
        base = data.get("base")
        if base not in BASES:
            raise bad("base", base, f"must be one of {', '.join(BASES)}")
        method = data.get("method", METHOD)
        if method != METHOD:
            raise bad("method", method, f"this agecls applies {METHOD!r} only")
        split = data.get("split", "val")
        if not isinstance(split, str):
            raise bad("split", split, "must be a string")
        extra = data.get("extra") or {}
        if not isinstance(extra, Mapping):
            raise bad("extra", extra, "must be a dict")
        return cls(checked, n, base, method, split, dict(extra))

    @classmethod
    def from_spec(cls, interval: Any, source: str) -> Calibration:
        """The calibration of an exported model, from its spec's `interval` (Calibration.at)."""
        if not isinstance(interval, Mapping):
            raise CalibrationError(f"{source}: interval={interval!r}: must be a JSON object")
        remedy = "export the model again (python -m agecls.export)"
        coverage, margin = interval.get("coverage"), interval.get("margin")
        if isinstance(coverage, bool) or not isinstance(coverage, (int, float)) or not 0 < coverage < 1:
            raise CalibrationError(f"{source}: interval.coverage={coverage!r}: must be a number in (0, 1); {remedy}")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or math.isnan(margin) or margin == -math.inf:
            raise CalibrationError(f"{source}: interval.margin={margin!r}: must be a number of years (or inf); {remedy}")
        data = {**{k: interval[k] for k in ("n", "base", "method", "split") if k in interval},
                "margins": {level_key(coverage): margin}}
        return cls.from_dict(data, source, "interval", remedy)

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any], source: str = "the checkpoint") -> Calibration | None:
        """The checkpoint's calibration, checked; None when it has none (trained before agecls made one)."""
        data = checkpoint.get(CHECKPOINT_KEY)
        return None if data is None else cls.from_dict(data, source)


def coverage_and_width(age: np.ndarray, low: np.ndarray, high: np.ndarray) -> tuple[float, float]:
    """(share of true ages inside [low, high], mean width in years) of finite intervals."""
    age, low, high = (np.asarray(v, dtype=np.float64) for v in (age, low, high))
    ok = np.isfinite(low) & np.isfinite(high)
    if not ok.any():
        return math.nan, math.nan
    inside = (age[ok] >= low[ok]) & (age[ok] <= high[ok])
    return float(inside.mean()), float((high[ok] - low[ok]).mean())
