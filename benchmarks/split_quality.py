"""How well the seeded hash split keeps its shares and age strata, and that it is stable.

    python benchmarks/split_quality.py [--root ../shared/data/utkface] [--out benchmarks/results/split_quality.csv]

For random subsets of the real UTKFace crops (1,000 / 5,000 images, 20 draws each) and the whole
cleaned folder, it splits with agecls's `assign_splits` and reports each split's share, the
largest difference of a decade's share between any split and the whole data set (points), and the
mean age per split. Stability: one image removed, then one added; how many other images changed
split (must be 0).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd

from agecls.data.datamodule import AgeDataModule
from agecls.data.splits import SPLITS, assign_splits


def quality(recs: pd.DataFrame, seed: int) -> dict[str, float]:
    split = assign_splits(recs, (0.8, 0.1, 0.1), seed)
    decade = (recs["age"].to_numpy() // 10).clip(max=8)
    whole = pd.Series(decade).value_counts(normalize=True)
    out: dict[str, float] = {}
    worst = 0.0
    for s in SPLITS:
        mask = split == s
        out[f"share_{s}"] = float(mask.mean())
        out[f"mean_age_{s}"] = float(recs["age"].to_numpy()[mask].mean())
        part = pd.Series(decade[mask]).value_counts(normalize=True).reindex(whole.index, fill_value=0.0)
        worst = max(worst, float((part - whole).abs().max()))
    out["max_decade_diff_pts"] = 100 * worst
    return out


def moved(recs: pd.DataFrame, seed: int, rng: np.random.Generator) -> tuple[int, int]:
    base = pd.Series(assign_splits(recs, (0.8, 0.1, 0.1), seed), index=recs["path"].to_numpy())
    drop = int(rng.integers(len(recs)))
    fewer = recs.drop(index=recs.index[drop])
    after = pd.Series(assign_splits(fewer, (0.8, 0.1, 0.1), seed), index=fewer["path"].to_numpy())
    removed = int((base.loc[after.index] != after).sum())
    extra = recs.iloc[[drop]].assign(path="/added.jpg", sha1="0" * 40)
    more = pd.concat([recs, extra], ignore_index=True)
    after = pd.Series(assign_splits(more, (0.8, 0.1, 0.1), seed), index=more["path"].to_numpy())
    added = int((base != after.loc[base.index]).sum())
    return removed, added


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.environ.get("AGECLS_UTKFACE_DIR", "../shared/data/utkface"))
    ap.add_argument("--out", default="benchmarks/results/split_quality.csv")
    ap.add_argument("--draws", type=int, default=20)
    args = ap.parse_args()
    cache = os.environ.get("AGECLS_CACHE_DIR", str(Path.home() / ".cache" / "agecls"))
    dm = AgeDataModule(source="utkface", root=args.root, cache_dir=cache, num_workers=2, seed=0)
    recs = dm._prepare().records[["path", "age", "sha1"]].reset_index(drop=True)
    rng = np.random.default_rng(0)
    rows = []
    for n in (1000, 5000, len(recs)):
        draws = args.draws if n < len(recs) else 1
        for d in range(draws):
            sub = recs.sample(n=n, random_state=int(rng.integers(2**31))) if n < len(recs) else recs
            seed = 42 + d
            row = {"n_images": n, "draw": d, "seed": seed, **quality(sub, seed)}
            row["moved_on_removal"], row["moved_on_addition"] = moved(sub, seed, rng)
            rows.append(row)
    table = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    cols = ["share_train", "share_val", "share_test", "max_decade_diff_pts", "moved_on_removal", "moved_on_addition"]
    summary = table.groupby("n_images")[cols].agg(["mean", "max"])
    summary.columns = [f"{a}_{b}" for a, b in summary.columns]
    keep = ["share_val_mean", "share_test_mean", "share_test_max", "max_decade_diff_pts_mean",
            "max_decade_diff_pts_max", "moved_on_removal_max", "moved_on_addition_max"]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary[keep].round(4))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
