"""Which base makes a label-distribution model's conformal age intervals narrowest at the same coverage.

    python benchmarks/interval_bases.py --ckpt RUN/checkpoints/epoch_008.ckpt --split RUN/split.csv \
        --root DATA_DIR [--weights current] [--coverage 0.9] [--label NAME] [--limit N] \
        [--out docs/results/interval_bases.csv]

agecls's per-face interval (agecls.intervals) is a *base* from the model widened by one margin,
chosen on the validation split so that a share c of it is covered (split-conformal CQR). Any base
keeps the coverage guarantee; the base decides how the width is spread over faces. Today's base
for the distribution losses is the central c-quantile range of the predicted age distribution,
which a flat floor of probability over far ages makes 50-76 years wide for faces of 40-69
(docs/results.md, "Why the intervals of some runs are 30 years wide"). This script predicts the
distribution of every validation and test face of a run (`split.csv`: path, age, split;
preprocessed as an exported model is, no TTA: label_distribution_tails.distributions), calibrates
each candidate base on the validation faces with agecls.intervals' own margin, and reports on the
test faces, overall and by decade of true age, the coverage and the mean width:

- central:    [q((1-c)/2), q((1+c)/2)] + margin (today's base)
- central50:  [q(0.25), q(0.75)] + margin: the width follows the distribution's middle, not its tails
- hpd:        the shortest run of ages holding mass c + margin (highest-density interval)
- point:      the expected age +- margin (one width for every face: classic split conformal)
- scaled:     the expected age +- k * (q(0.75) - q(0.25)), k the conformal quantile of
              |age - expected| / (q(0.75) - q(0.25)) (normalised conformal, Lei et al. 2018)

Quantiles take each class as uniform over its year [a - 0.5, a + 0.5], as AgeNet's do. The table
is printed and written to --out (a rerun replaces the rows of the same --label).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from label_distribution_tails import distributions  # benchmarks/ is on sys.path when a script runs
from results_csv import write_replacing

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

BASES = ("central", "central50", "hpd", "point", "scaled")


def quantiles(p: np.ndarray, ages: np.ndarray, level: float) -> np.ndarray:
    """(N,) the `level` quantile of each distribution p (N, K) over class ages (K,), each class
    uniform over [a - 0.5, a + 0.5]."""
    cdf = np.cumsum(p, axis=1)
    idx = np.minimum((cdf < level).sum(axis=1), p.shape[1] - 1)
    rows = np.arange(len(p))
    before = np.where(idx > 0, cdf[rows, np.maximum(idx - 1, 0)], 0.0)
    frac = np.clip((level - before) / np.maximum(p[rows, idx], 1e-12), 0.0, 1.0)
    return ages[idx] - 0.5 + frac


def hpd(p: np.ndarray, ages: np.ndarray, mass: float) -> tuple[np.ndarray, np.ndarray]:
    """(low, high): for each distribution the shortest run of consecutive classes holding `mass`,
    as [first age - 0.5, last age + 0.5]."""
    cdf = np.cumsum(p, axis=1)
    k = p.shape[1]
    best = np.full(len(p), np.inf)
    low, high = np.zeros(len(p)), np.zeros(len(p))
    for i in range(k):
        before = cdf[:, i - 1] if i else np.zeros(len(p))
        j = (cdf[:, i:] < before[:, None] + mass - 1e-12).sum(axis=1) + i  # the first class completing it
        ok = j < k
        width = np.where(ok, j - i + 1, np.inf)
        better = width < best
        best = np.where(better, width, best)
        low = np.where(better, ages[i] - 0.5, low)
        high = np.where(better, ages[np.minimum(j, k - 1)] + 0.5, high)
    return low, high


def base_intervals(p: np.ndarray, ages: np.ndarray, coverage: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The base (low, high) of each additive base at `coverage`; `scaled` gives (expected, spread)."""
    expected = p @ ages
    q25, q75 = quantiles(p, ages, 0.25), quantiles(p, ages, 0.75)
    return {"central": (quantiles(p, ages, (1 - coverage) / 2), quantiles(p, ages, (1 + coverage) / 2)),
            "central50": (q25, q75), "hpd": hpd(p, ages, coverage), "point": (expected, expected),
            "scaled": (expected, np.maximum(q75 - q25, 1e-6))}


def calibrated(val: dict, test: dict, age_val: np.ndarray, coverage: float,
               age_range: tuple[float, float]) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Each base's test intervals (low, high) and the margin (or scale k) fitted on the validation faces."""
    from agecls.intervals import Calibration, conformal_margin

    out = {}
    for name in BASES:
        if name == "scaled":
            centre, spread = val[name]
            k = conformal_margin(np.abs(age_val - centre) / spread, coverage)
            centre, spread = test[name]
            out[name] = (np.clip(centre - k * spread, *age_range), np.clip(centre + k * spread, *age_range), k)
            continue
        cal = Calibration.fit(age_val, {coverage: val[name][0]}, {coverage: val[name][1]}, base=name)
        low, high = cal.apply(*test[name], coverage, age_range)
        out[name] = (low, high, cal.margin(coverage))
    return out


def table(age: np.ndarray, intervals: dict, label: str, coverage: float) -> pd.DataFrame:
    decade = (age // 10 * 10).astype(int)
    rows = []
    for name, (low, high, margin) in intervals.items():
        inside, width = (age >= low) & (age <= high), high - low
        groups = [("all", np.ones(len(age), bool))] + [(f"{d}-{d + 9}", decade == d) for d in np.unique(decade)]
        for group, sel in groups:
            rows.append({"label": label, "base": name, "target": coverage, "group": group, "faces": int(sel.sum()),
                         "coverage": round(float(inside[sel].mean()), 4), "mean_width": round(float(width[sel].mean()), 2),
                         "median_width": round(float(np.median(width[sel])), 2), "margin_or_k": round(float(margin), 3)})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--split", type=Path, required=True, help="the run's split.csv (path, age, split)")
    parser.add_argument("--root", type=Path, required=True, help="the folder the paths of --split are in")
    parser.add_argument("--weights", default="checkpoint", choices=["checkpoint", "current"])
    parser.add_argument("--coverage", type=float, default=0.9)
    parser.add_argument("--label", default=None)
    parser.add_argument("--limit", type=int, default=None, help="only the first N faces of each split")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    for given in (args.ckpt, args.split):
        if not given.is_file():
            parser.error(f"{given}: no such file")
    if not 0 < args.coverage < 1:
        parser.error(f"--coverage {args.coverage}: must be in (0, 1), e.g. 0.9")
    split = pd.read_csv(args.split)
    if not {"path", "age", "split"} <= set(split.columns):
        parser.error(f"--split {args.split}: needs the columns path, age and split; it has {list(split.columns)}")
    chosen = {}
    for name in ("val", "test"):
        part = split[split["split"] == name]
        chosen[name] = part.head(args.limit) if args.limit else part
        if chosen[name].empty:
            parser.error(f"--split {args.split}: no {name} faces")
    faces = pd.concat(chosen.values())
    paths = [p if Path(p).is_absolute() else str(args.root / p) for p in faces["path"].astype(str)]
    p, ages = distributions(args.ckpt, paths, args.weights)  # the checkpoint read once, both splits at once
    n_val = len(chosen["val"])
    parts = {"val": (p[:n_val], chosen["val"]["age"].to_numpy(float)),
             "test": (p[n_val:], chosen["test"]["age"].to_numpy(float))}
    age_range = (float(ages[0]), float(ages[-1]))
    val = base_intervals(parts["val"][0], ages, args.coverage)
    test = base_intervals(parts["test"][0], ages, args.coverage)
    result = table(parts["test"][1], calibrated(val, test, parts["val"][1], args.coverage, age_range),
                   args.label or args.ckpt.parent.parent.name, args.coverage)
    shown = result.pivot_table(index="group", columns="base", values=["coverage", "mean_width"], sort=False)
    print(shown.to_string(float_format=lambda v: f"{v:.3f}"))
    if args.out is not None:
        write_replacing(args.out, result, key=["label", "base", "target", "group"])
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
