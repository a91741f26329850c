"""Cleaning rules: each drops records for one stated reason and is counted in cleaning.json.

Rules run in a fixed order and a record is counted under the first rule that removes it. A rule
runs only when the records carry the field it reads (UTKFace has no photo dates, so
`no_photo_date` does not run on it and has no key in the report). Rules that need the image
files (unreadable, duplicate, age_conflict) run last, on what the metadata rules kept, so no time
is spent decoding images that were dropped anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

RULES = (
    "no_photo_date",     # photo year missing or invalid (the study's "no acquisition date")
    "multiple_faces",    # a second face was found (the study's "more than one person")
    "no_face",           # the detector found no face (face_score = -inf)
    "low_face_score",    # face_score below min_face_score
    "invalid_dob",       # date of birth missing, zero, or after the photo was taken
    "age_out_of_range",  # age unknown or outside [min_age, max_age]
    "unreadable",        # missing, empty, truncated or non-image file
    "duplicate",         # byte-identical copy of a kept image with the same age
    "age_conflict",      # byte-identical copies that disagree on the age: all dropped
)


@dataclass
class CleaningOptions:
    min_face_score: float = 1.0
    min_age: float = 0.0
    max_age: float = 100.0
    check_images: bool = True
    deduplicate: bool = True


@dataclass
class CleaningReport:
    records_in: int
    removed: dict[str, int] = field(default_factory=dict)
    records_out: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    split_version: str = ""        # how the splits were made: agecls.data.splits.SPLIT_VERSION or a split file
    unreadable_examples: list[tuple[str, str]] = field(default_factory=list)
    test_list: dict[str, int] = field(default_factory=dict)  # data.test_list: names listed, found among the records

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "records_in": self.records_in,
            "removed": dict(self.removed),
            "records_out": self.records_out,
            "splits": dict(self.splits),
            "split_version": self.split_version,
        }
        if self.test_list:
            out["test_list"] = dict(self.test_list)
        return out

    def summary_table(self) -> str:
        lines = ["cleaning", f"  {'records in':<22}{self.records_in:>9,}"]
        for rule, n in self.removed.items():
            lines.append(f"  - {rule:<20}{n:>9,}")
        lines.append(f"  {'records out':<22}{self.records_out:>9,}")
        for split, n in self.splits.items():
            lines.append(f"    {split:<20}{n:>9,}")
        return "\n".join(lines)


def _numeric(records: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(records[col], errors="coerce").astype(float)


def _metadata_rules(opts: CleaningOptions) -> list[tuple[str, str, Callable[[pd.DataFrame], pd.Series]]]:
    """(rule, column it needs, mask of records it removes)."""

    def no_photo_date(r: pd.DataFrame) -> pd.Series:
        y = _numeric(r, "photo_taken")
        return ~np.isfinite(y) | (y <= 0)

    def multiple_faces(r: pd.DataFrame) -> pd.Series:
        return _numeric(r, "second_face_score").notna()

    def no_face(r: pd.DataFrame) -> pd.Series:
        s = _numeric(r, "face_score")
        return s.isna() | np.isneginf(s)

    def low_face_score(r: pd.DataFrame) -> pd.Series:
        return _numeric(r, "face_score") < float(opts.min_face_score)

    def invalid_dob(r: pd.DataFrame) -> pd.Series:
        valid = r["dob_valid"].astype(bool)
        return ~valid | (_numeric(r, "age") < 0)

    def age_out_of_range(r: pd.DataFrame) -> pd.Series:
        a = _numeric(r, "age")
        return ~np.isfinite(a) | (a < float(opts.min_age)) | (a > float(opts.max_age))

    return [
        ("no_photo_date", "photo_taken", no_photo_date),
        ("multiple_faces", "second_face_score", multiple_faces),
        ("no_face", "face_score", no_face),
        ("low_face_score", "face_score", low_face_score),
        ("invalid_dob", "dob_valid", invalid_dob),
        ("age_out_of_range", "age", age_out_of_range),
    ]


def clean_records(
    records: pd.DataFrame,
    opts: CleaningOptions,
    index_images: Callable[[list[str]], pd.DataFrame] | None = None,
    source_removed: dict[str, int] | None = None,
) -> tuple[pd.DataFrame, CleaningReport]:
    """Apply the rules in order; return the kept records (sorted by path) and the report.

    `index_images(paths)` returns, per path, its content hash `sha1` and whether it decoded (`ok`)
    with the `error`: see agecls.data.index. Without it the file rules are skipped.
    """
    source_removed = {k: int(v) for k, v in (source_removed or {}).items()}
    report = CleaningReport(records_in=len(records) + sum(source_removed.values()), removed=dict(source_removed))
    # Sorting first makes every later choice (which copy of a duplicate is kept, the split)
    # independent of the order the file system listed the files in.
    kept = records.sort_values("path", kind="stable").reset_index(drop=True)

    for rule, column, mask_fn in _metadata_rules(opts):
        if column not in kept.columns:
            continue
        mask = mask_fn(kept).to_numpy(dtype=bool)
        report.removed[rule] = int(mask.sum())
        kept = kept[~mask].reset_index(drop=True)

    if index_images is not None and (opts.check_images or opts.deduplicate) and len(kept):
        index = index_images(kept["path"].tolist())
        kept = kept.assign(sha1=index["sha1"].to_numpy(), _ok=index["ok"].to_numpy(), _error=index["error"].to_numpy())
        if opts.check_images:
            bad = ~kept["_ok"].to_numpy(dtype=bool)
            report.removed["unreadable"] = int(bad.sum())
            report.unreadable_examples = list(zip(kept.loc[bad, "path"], kept.loc[bad, "_error"], strict=True))[:20]
            if bad.any():
                shown = "\n".join(f"    {p}: {e}" for p, e in report.unreadable_examples[:5])
                log.warning("Skipping %d unreadable image(s), e.g.:\n%s", int(bad.sum()), shown)
            kept = kept[~bad].reset_index(drop=True)
        if opts.deduplicate:
            kept, dup, conflict = _deduplicate(kept)
            report.removed["duplicate"] = dup
            report.removed["age_conflict"] = conflict
        kept = kept.drop(columns=["_ok", "_error"])

    report.records_out = len(kept)
    return kept, report


def _deduplicate(records: pd.DataFrame) -> tuple[pd.DataFrame, int, int]:
    """Keep one file per content hash; drop every copy of an image whose copies disagree on age.

    Within a group of identical files, copies that repeat an (image, age) pair count as
    `duplicate`; if more than one age remains, those remaining copies count as `age_conflict`.
    """
    has_hash = records["sha1"].astype(str).str.len() > 0
    first_of_pair = ~records.duplicated(subset=["sha1", "age"], keep="first") | ~has_hash
    n_dup = int((~first_of_pair).sum())
    unique = records[first_of_pair]
    ages_per_hash = unique[has_hash[first_of_pair]].groupby("sha1")["age"].nunique()
    conflicted = set(ages_per_hash[ages_per_hash > 1].index)
    conflict_mask = unique["sha1"].isin(conflicted) & has_hash[first_of_pair]
    n_conflict = int(conflict_mask.sum())
    return unique[~conflict_mask].reset_index(drop=True), n_dup, n_conflict


def age_histogram(ages_by_split: dict[str, pd.Series], width: int = 10) -> str:
    """A text table of ages per decade (rows) and split (columns), for the log."""
    top = max((int(s.max()) for s in ages_by_split.values() if len(s)), default=0)
    edges = list(range(0, top + width + 1, width))
    header = f"  {'age':>9}" + "".join(f"{name:>9}" for name in ages_by_split)
    rows = ["age histogram", header]
    for lo in edges[:-1]:
        counts = [int(((s >= lo) & (s < lo + width)).sum()) for s in ages_by_split.values()]
        if sum(counts):
            rows.append(f"  {f'{lo}-{lo + width - 1}':>9}" + "".join(f"{c:>9,}" for c in counts))
    return "\n".join(rows)
