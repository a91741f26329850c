"""Seeded splits, stratified by age and disjoint by identity wherever identities are known."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


def assign_splits(
    records: pd.DataFrame,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    bin_width: float = 5.0,
    keys: Sequence[str] | None = None,
) -> np.ndarray:
    """Return 'train' / 'val' / 'test' for each record.

    Records of one identity (where the `identity` column exists) form a group that goes to one
    split, so no person is in both training and test data; without identities each record is its
    own group. Groups are binned by their median age and each bin is divided in the given
    fractions, so every split sees the same age distribution. The result depends only on the
    records' paths, ages and identities and the seed, not on the order of `records`.

    `keys` name the records where their paths would tie the split to one machine: agecls passes
    paths relative to the data root, so a copy of the data set elsewhere gets the same split.
    """
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"data.splits={list(fractions)} must be three non-negative shares (train, val, test) summing to 1")
    if len(records) == 0:
        return np.array([], dtype=object)
    names = pd.Series(list(keys) if keys is not None else records["path"].astype(str).tolist(), index=records.index)
    if "identity" in records.columns and records["identity"].notna().any():
        ident = records["identity"].astype(str)
        # records without an identity stand alone
        missing = records["identity"].isna()
        group = np.where(missing, "path:" + names, "id:" + ident)
    else:
        group = ("path:" + names).to_numpy()
    frame = pd.DataFrame({"group": group, "age": records["age"].to_numpy(dtype=float)})
    groups = frame.groupby("group", sort=True).agg(age=("age", "median"), size=("age", "size"))
    groups["bin"] = np.floor(groups["age"] / float(bin_width)).astype(int)

    rng = np.random.default_rng(seed)
    cut = np.cumsum(fractions)[:2]
    choice: dict[str, str] = {}
    for _, members in groups.groupby("bin", sort=True):
        order = rng.permutation(len(members))
        sizes = members["size"].to_numpy()[order]
        names = members.index.to_numpy()[order]
        total = sizes.sum()
        # a group's position is the middle of the records it covers, so one big identity cannot
        # push every later group of the bin into the wrong split
        middle = (np.cumsum(sizes) - sizes / 2.0) / total
        which = np.searchsorted(cut, middle, side="right")
        for name, w in zip(names, which, strict=True):
            choice[name] = SPLITS[int(w)]
    return np.array([choice[g] for g in group], dtype=object)


def relative_paths(paths: pd.Series, base: Path) -> list[str]:
    base = base.resolve()
    out = []
    for p in paths:
        p = Path(p)
        try:
            out.append(p.resolve().relative_to(base).as_posix())
        except ValueError:
            out.append(str(p))
    return out


def read_split_file(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data.split_file={str(path)!r} does not exist; give the split.csv of an earlier run")
    table = pd.read_csv(path, dtype={"path": str, "split": str})
    missing = {"path", "split"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: a split file needs columns path,age,split; missing {sorted(missing)}")
    bad = sorted(set(table["split"]) - set(SPLITS))
    if bad:
        raise ValueError(f"{path}: unknown split names {bad}; use train, val, test")
    return table
