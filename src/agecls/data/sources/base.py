"""What every data source returns: a table of records, one per image, and what it dropped itself."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from agecls.utils.checks import fail

# Columns a source may fill; `path` and `age` always, the rest where the data set knows them.
RECORD_COLUMNS = [
    "path",               # absolute path of the image file
    "age",                # age in years at the time of the photo (float; NaN if unknown)
    "identity",           # who is in the photo, for identity-disjoint splits
    "photo_taken",        # year the photo was taken
    "dob",                # date of birth as a MATLAB serial date number (IMDB-WIKI)
    "face_score",         # face detector score; -inf where no face was found
    "second_face_score",  # score of a second face; NaN where only one face was found
    "face_box",           # (x1, y1, x2, y2) of the face in the image, or None
    "gender",             # a group for metrics by group (e.g. "female"), or None
    "race",               # a group for metrics by group (UTKFace's five), or None
]

# Columns that name groups of people: test metrics are also given per group of each
# (test/mae_by_gender/female, with test/n_by_gender/female images), where a source fills them.
GROUP_COLUMNS = ("gender", "race")


@dataclass
class SourceRecords:
    """Records of a data set before cleaning, plus counts of what the source itself could not use."""

    records: pd.DataFrame
    removed: dict[str, int] = field(default_factory=dict)
    root: Path | None = None
    # Extra per-source facts for the cleaning report (e.g. the subset read).
    info: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "path" not in self.records or "age" not in self.records:
            raise ValueError("a source must give at least the columns path and age")
        self.records["age"] = pd.to_numeric(self.records["age"], errors="coerce").astype(float)


class Source:
    """A data set format. Subclasses implement `load()` and, where they can fetch or make the
    data, `prepare()`. Cleaning, de-duplication and splitting know nothing of formats."""

    name = "source"
    #: the data set in words, for describe()
    title = "data"
    #: help shown when `root` does not exist
    how_to_get = ""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def prepare(self) -> None:
        """Download or generate the data if the source can (called once, on rank 0)."""

    def load(self) -> SourceRecords:
        raise NotImplementedError

    def describe(self) -> str:
        """The data set in words, one line for the console ("data: UTKFace, 20,709 faces from /path"):
        cheap (a folder listing, a CSV's rows), and never an error (a missing root is said so)."""
        if not self.root.exists():
            return f"data: {self.title} from {self.root} (not found)"
        count = self.count()
        return f"data: {self.title}, {count:,} faces from {self.root}" if count is not None else \
            f"data: {self.title} from {self.root}"

    def count(self) -> int | None:
        """How many images the data set lists, where that is cheap to tell (before cleaning)."""
        return None

    def check_root(self) -> None:
        if not self.root.exists():
            raise FileNotFoundError(
                f"data.root={str(self.root)!r} does not exist (source {self.name}). {self.how_to_get}"
            )

    @property
    def relative_to(self) -> Path:
        """The folder split.csv paths are written relative to."""
        return self.root if self.root.is_dir() else self.root.parent


def empty_float(n: int) -> np.ndarray:
    return np.full(n, np.nan, dtype=float)


def paths_outside(paths: list[str], base: Path) -> list[str]:
    """The `paths` (relative to `base`, or absolute) that lead outside the folder `base`, as written:
    `../x.jpg`, `a/../../x.jpg`, `/etc/x.jpg`. Judged on the names (no file is touched)."""
    top = os.path.normpath(os.path.abspath(base))
    prefix = top.rstrip(os.sep) + os.sep
    return [p for p in paths if not os.path.normpath(os.path.join(top, p)).startswith(prefix)]


def check_inside(paths: list[str], base: Path, allow_outside_root: bool, listed_in: str) -> None:
    """Refuse (ConfigValueError) a list of image paths that lead outside `base` (paths_outside),
    unless data.allow_outside_root=true: a data set's metadata (`listed_in`) reads only its own folder."""
    if not isinstance(allow_outside_root, bool):
        fail("data.allow_outside_root", allow_outside_root, "must be true or false")
    away = paths_outside(paths, base)
    if away and not allow_outside_root:
        shown = ", ".join(repr(p) for p in away[:3]) + (", ..." if len(away) > 3 else "")
        fail("data.root", str(listed_in), f"{len(away):,} of its {len(paths):,} paths lead outside {base} ({shown}); "
                                          "a data set reads only images in or below its own folder. Move the images "
                                          "there, or add data.allow_outside_root=true if these files are meant to be read")
