"""A CSV of `path,age` (or `path,dob,photo_date`), with optional `identity` and `face_count`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from agecls.data.sources.base import GROUP_COLUMNS, Source, SourceRecords, check_inside


def age_from_dates(dob: pd.Series, taken: pd.Series) -> pd.Series:
    """Whole years between birth date and photo date (NaN where either is missing or invalid)."""
    b = pd.to_datetime(dob, errors="coerce")
    t = pd.to_datetime(taken, errors="coerce")
    years = t.dt.year - b.dt.year
    before_birthday = (t.dt.month < b.dt.month) | ((t.dt.month == b.dt.month) & (t.dt.day < b.dt.day))
    return (years - before_birthday.astype(float)).astype(float)


class CSVSource(Source):
    name = "csv"
    title = "CSV"
    how_to_get = "Point data.root at a CSV file with columns path,age (or path,dob,photo_date)."

    def __init__(self, root: str | Path, allow_outside_root: bool = False) -> None:
        super().__init__(root)
        check_inside([], self.root.parent, allow_outside_root, str(self.root))  # the option's value, now
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
        check_inside(names, base, self.allow_outside_root, str(self.root))
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
