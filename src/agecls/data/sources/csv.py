"""A CSV of `path,age` (or `path,dob,photo_date`), with optional `identity` and `face_count`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from agecls.data.sources.base import GROUP_COLUMNS, Source, SourceRecords
from agecls.utils.checks import fail


def age_from_dates(dob: pd.Series, taken: pd.Series) -> pd.Series:
    """Whole years between birth date and photo date (NaN where either is missing or invalid)."""
    b = pd.to_datetime(dob, errors="coerce")
    t = pd.to_datetime(taken, errors="coerce")
    years = t.dt.year - b.dt.year
    before_birthday = (t.dt.month < b.dt.month) | ((t.dt.month == b.dt.month) & (t.dt.day < b.dt.day))
    return (years - before_birthday.astype(float)).astype(float)


def outside(paths: list[str], base: Path) -> list[str]:
    """The `paths` (relative to `base`, or absolute) that lead outside the folder `base`, as written:
    `../x.jpg`, `a/../../x.jpg`, `/etc/x.jpg`. Judged on the names (no file is touched)."""
    top = os.path.normpath(os.path.abspath(base))
    prefix = top.rstrip(os.sep) + os.sep
    return [p for p in paths if not os.path.normpath(os.path.join(top, p)).startswith(prefix)]


class CSVSource(Source):
    name = "csv"
    title = "CSV"
    how_to_get = "Point data.root at a CSV file with columns path,age (or path,dob,photo_date)."

    def __init__(self, root: str | Path, allow_outside_root: bool = False) -> None:
        super().__init__(root)
        if not isinstance(allow_outside_root, bool):
            fail("data.allow_outside_root", allow_outside_root, "must be true or false")
        self.allow_outside_root = allow_outside_root

    def describe(self) -> str:
        if not self.root.is_file():
            return f"data: CSV {self.root} ({'a folder, not a CSV file' if self.root.is_dir() else 'not found'})"
        try:
            rows = f"{len(pd.read_csv(self.root, usecols=['path'])):,} rows"
        except Exception as err:  # a one-line description, never an error: load() says what is wrong
            rows = f"unreadable: {type(err).__name__}"
        return f"data: CSV {self.root}, {rows} (images in {self.root.parent})"

    def load(self) -> SourceRecords:
        self.check_root()
        if self.root.is_dir():
            raise ValueError(f"data.root={str(self.root)!r} is a folder; the csv source wants the CSV file itself")
        table = pd.read_csv(self.root)
        if "path" not in table.columns:
            raise ValueError(f"{self.root}: no `path` column (columns: {', '.join(table.columns)})")
        base = self.root.parent
        names = [str(p) for p in table["path"]]
        away = outside(names, base)
        if away and not self.allow_outside_root:
            shown = ", ".join(repr(p) for p in away[:3]) + (", ..." if len(away) > 3 else "")
            fail("data.root", str(self.root), f"{len(away):,} of its {len(names):,} paths lead outside the CSV's folder "
                                              f"{base} ({shown}); a CSV reads only images in or below its own folder. "
                                              "Move the images there, or add data.allow_outside_root=true if these "
                                              "files are meant to be read")
        out = pd.DataFrame({"path": [str((base / p).resolve()) if not Path(p).is_absolute() else p for p in names]})
        if "age" in table.columns:
            out["age"] = pd.to_numeric(table["age"], errors="coerce")
        elif {"dob", "photo_date"} <= set(table.columns):
            out["age"] = age_from_dates(table["dob"], table["photo_date"])
            out["photo_taken"] = pd.to_datetime(table["photo_date"], errors="coerce").dt.year.astype(float)
            # an unparseable date of birth is reported by the invalid_dob rule
            out["dob_valid"] = pd.to_datetime(table["dob"], errors="coerce").notna()
        else:
            raise ValueError(
                f"{self.root}: needs an `age` column, or `dob` and `photo_date` columns "
                f"(columns: {', '.join(table.columns)})"
            )
        if "identity" in table.columns:
            out["identity"] = table["identity"].astype(str)
        for group in GROUP_COLUMNS:  # optional groups for metrics by group
            if group in table.columns:
                out[group] = table[group].where(table[group].notna(), None).astype(object)
        if "face_count" in table.columns:
            # more than one face in the photo: the same rule as IMDB-WIKI's second face
            count = pd.to_numeric(table["face_count"], errors="coerce")
            out["second_face_score"] = np.where(count > 1, 1.0, np.nan)
        return SourceRecords(out, root=base)

    @property
    def relative_to(self) -> Path:
        return self.root.parent
