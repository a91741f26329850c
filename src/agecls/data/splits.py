"""Seeded, stable splits: each group of records goes to train, val or test by a seeded hash of
its key, so adding or removing images never moves another image between splits."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agecls.utils.checks import check_splits

SPLITS = ("train", "val", "test")

# The method that assigns splits, recorded in cleaning.json and split.csv's run: results made on
# one version are only comparable with runs on the same version.
#   1: one seeded permutation per age bin (agecls <= 0.1; moved images when the data changed)
#   2: a seeded hash per group (identity, else content hash, else relative path)
SPLIT_VERSION = 2


class SplitError(ValueError):
    """The data set cannot be divided into the requested splits."""


def group_keys(records: pd.DataFrame, keys: Sequence[str] | None = None) -> np.ndarray:
    """The key that decides each record's split.

    A record's identity where known (all photos of one person go to one split), else its content
    hash (`sha1`, from the image index: a renamed or moved copy of the data set splits the same),
    else its name in `keys` (paths relative to the data root) or its path.
    """
    names = np.asarray(list(keys) if keys is not None else records["path"].astype(str).tolist(), dtype=object)
    out = np.array(["path:" + str(n) for n in names], dtype=object)
    if "sha1" in records.columns:
        sha1 = records["sha1"].fillna("").astype(str).to_numpy()
        has = sha1 != ""
        out[has] = np.array(["sha1:" + s for s in sha1[has]], dtype=object)
    if "identity" in records.columns:
        ident = records["identity"]
        has = ident.notna().to_numpy()
        out[has] = np.array(["id:" + str(i) for i in ident[has]], dtype=object)
    return out


def group_position(group: str, seed: int) -> float:
    """A group's seeded place in [0, 1): the same for the same (group, seed) on every machine."""
    digest = hashlib.sha1(f"agecls-split|{int(seed)}|{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(
    records: pd.DataFrame,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    keys: Sequence[str] | None = None,
) -> np.ndarray:
    """Return 'train' / 'val' / 'test' for each record.

    Each group (`group_keys`: an identity, else an image's content) gets a seeded position in
    [0, 1) from a hash of its key, and the shares cut [0, 1) into train, val and test. A group's
    split therefore depends on nothing but its key and the seed: adding or removing images moves
    no other image, and the order of `records` does not matter. No person is in two splits.

    Age stratification is statistical: the hash is independent of age, so each split's age
    distribution matches the whole within sampling noise (measured in docs/results.md: on UTKFace,
    each decade's share differs between splits by under 2 points).

    Small data sets: with at least 3 groups, every split with a positive share gets at least one
    group (the group whose position lies nearest its interval moves there; only then can a change
    of data move a group); with fewer, a SplitError names the counts.
    """
    fractions = np.asarray(check_splits(fractions), dtype=float)
    if len(records) == 0:
        return np.array([], dtype=object)
    group = group_keys(records, keys)
    unique = sorted(set(group.tolist()))
    position = {g: group_position(g, seed) for g in unique}
    edges = np.concatenate([[0.0], np.cumsum(fractions)])
    edges[-1] = 1.0
    choice = {g: SPLITS[min(int(np.searchsorted(edges, p, side="right")) - 1, 2)] for g, p in position.items()}

    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if len(unique) < len(wanted):
        raise SplitError(
            f"{len(records)} images of {len(unique)} distinct people/images cannot fill "
            f"{len(wanted)} splits (data.splits={[float(f) for f in fractions]}): every split needs at "
            "least one group. Add images of more people, or give fewer splits a non-zero share: e.g. "
            "data.splits=[0.5,0.5,0.0] with test=false (train and validate only)."
        )
    for i in wanted:
        name = SPLITS[i]
        if name in choice.values():
            continue
        counts = pd.Series(list(choice.values())).value_counts()
        lo, hi = edges[i], edges[i + 1]
        # take a group from a split that keeps at least one, nearest to this split's interval
        donors = [g for g in unique if counts.get(choice[g], 0) > 1]
        nearest = min(donors, key=lambda g: (max(lo - position[g], position[g] - hi, 0.0), g))
        choice[nearest] = name
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


# ------------------------------------------------------------------- published test splits
# Test splits published with a paper, shipped in agecls/data/protocols (each with its licence), so
# `data.test_list=<name>` tests on exactly their images: name -> (file, what it is).
PROTOCOLS_DIR = Path(__file__).parent / "protocols"
PROTOCOLS = {
    "coral_utkface": ("coral_utkface_test.csv",
                      "the UTKFace test split of CORAL (Cao, Mirjalili and Raschka, 2020; coral-cnn, MIT licence): "
                      "3,287 aligned crops aged 21-60"),
}


def read_test_list(value: str | Path) -> tuple[str, set[str]]:
    """The file names (no folders) of a test split: a packaged protocol by name (PROTOCOLS), or a
    file - a CSV with a `file` or `path` column (its base names are used), or plain text with one
    name per line. Returns (a label for cleaning.json, the names)."""
    name = str(value)
    if name in PROTOCOLS:
        path, label = PROTOCOLS_DIR / PROTOCOLS[name][0], f"{name} ({PROTOCOLS[name][0]})"
    else:
        path, label = Path(name).expanduser(), Path(name).name
        if not path.is_file():
            raise FileNotFoundError(
                f"data.test_list={name!r} is neither a published split agecls ships ({', '.join(PROTOCOLS)}) nor a "
                "file; give one of those names, or a CSV with a file (or path) column, or a text file of one "
                "image name per line")
    if path.suffix.lower() == ".csv":
        table = pd.read_csv(path, dtype=str)
        column = next((c for c in ("file", "path") if c in table.columns), None)
        if column is None:
            raise ValueError(f"data.test_list={name!r}: {path} has no file or path column (columns: "
                             f"{', '.join(map(str, table.columns))})")
        names = table[column].dropna().astype(str)
    else:
        names = pd.Series([line.strip() for line in path.read_text().splitlines() if line.strip()])
    names = {Path(n).name for n in names}
    if not names:
        raise ValueError(f"data.test_list={name!r}: {path} lists no images")
    return label, names


def assign_with_test_list(records: pd.DataFrame, test_names: set[str], fractions: Sequence[float], seed: int,
                          keys: Sequence[str] | None = None) -> np.ndarray:
    """'test' for each record whose file name is in `test_names`; the others go to train and val
    by `assign_splits` with the train and val shares of `fractions` (the test share is the list's)."""
    train, val, _ = check_splits(fractions)
    if train + val <= 0:
        raise SplitError(f"data.splits={list(fractions)} with data.test_list: the train and val shares decide how "
                         "the images outside the test list are split, and both are 0")
    is_test = np.array([Path(str(p)).name in test_names for p in records["path"]], dtype=bool)
    out = np.full(len(records), "test", dtype=object)
    rest = ~is_test
    if rest.any():
        rest_keys = None if keys is None else [k for k, t in zip(keys, is_test, strict=True) if not t]
        out[rest] = assign_splits(records[rest].reset_index(drop=True),
                                  (train / (train + val), val / (train + val), 0.0), seed, keys=rest_keys)
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


# ------------------------------------------------------------------- a checkpoint's membership
class SplitMembershipError(ValueError):
    """Images of a checkpoint's saved split are missing from the data now, or their content changed."""


# The split membership a checkpoint carries (AgeDataModule.state_dict): per split, the paths
# (relative to the data root, as in split.csv) as one JSON array in a string, and one bytes of their
# 20-byte sha1 digests, zeros where the image was not indexed. JSON encodes any path (a newline, a
# quote, a name that is not valid UTF-8), so every data set's membership is recorded. Compact
# (500k images: ~30 MB) and plain data, which torch.load(weights_only=True) reads.
#   1: the paths joined by newlines (agecls <= 0.1: a path with a newline left the membership out)
#   2: the paths as a JSON array
MEMBERSHIP_VERSION = 2
READABLE_MEMBERSHIP_VERSIONS = (1, 2)
NO_SHA1 = bytes(20)


def encode_membership(table: pd.DataFrame) -> dict[str, Any]:
    """split.csv's table (path, split and, where indexed, sha1) as a checkpoint entry."""
    paths = table["path"].astype(str)
    sha1 = table["sha1"].fillna("").astype(str) if "sha1" in table.columns else pd.Series([""] * len(table))
    splits = {}
    for name in SPLITS:
        part = (table["split"] == name).to_numpy()
        digests = b"".join(bytes.fromhex(h) if len(h) == 40 else NO_SHA1 for h in sha1[part])
        # ensure_ascii: a name that is not valid UTF-8 (Python's surrogate escapes) survives the round trip
        splits[name] = {"paths": json.dumps(paths[part].tolist(), ensure_ascii=True), "sha1": digests}
    return {"version": MEMBERSHIP_VERSION, "splits": splits}


def decode_membership(membership: Mapping[str, Any], split: str) -> dict[str, bytes]:
    """{relative path: sha1 digest (NO_SHA1 where unknown)} of one split of an encoded membership;
    SplitMembershipError where it cannot be read."""
    version = membership.get("version") if isinstance(membership, Mapping) else None
    if version not in READABLE_MEMBERSHIP_VERSIONS or split not in membership.get("splits", {}):
        raise SplitMembershipError(
            f"split membership version {version!r} without split {split!r}: this agecls reads versions "
            f"{', '.join(map(str, READABLE_MEMBERSHIP_VERSIONS))} (train, val, test); was the checkpoint written by a "
            "newer agecls? Evaluate it with that version, or name the data and its split: data=... "
            "data.split_file=<the run's split.csv>")
    entry = membership["splits"][split]
    if version == 1:
        paths = entry["paths"].split("\n") if entry["paths"] else []
    else:
        paths = json.loads(entry["paths"])
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise SplitMembershipError(f"split membership of {split!r}: its paths are not a JSON list of strings")
    digests = bytes(entry["sha1"])
    if len(digests) != 20 * len(paths):
        raise SplitMembershipError(f"split membership of {split!r}: {len(paths)} paths but {len(digests)} bytes "
                                   "of sha1 digests")
    return {p: digests[20 * i:20 * i + 20] for i, p in enumerate(paths)}
