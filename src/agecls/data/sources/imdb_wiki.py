"""IMDB-WIKI (Rothe, Timofte, Van Gool 2015) read from its metadata exactly as released.

`root` holds `imdb.mat` or `wiki.mat` and the images at the relative paths of `full_path`.
`scipy.io.loadmat(file)[subset][0, 0]` has, per photo: full_path, dob (MATLAB serial date number),
gender, photo_taken (year), face_location (x1, y1, x2, y2), face_score (-inf: no face found),
second_face_score (NaN: only one face found), name, and for imdb celeb_names and celeb_id.
"""

from __future__ import annotations

import logging
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from agecls.data.download import download, extract_tar
from agecls.data.sources.base import Source, SourceRecords, check_inside

log = logging.getLogger(__name__)

URLS = {
    "wiki": "https://data.vision.ee.ethz.ch/cvl/rrothe/imdb-wiki/static/wiki_crop.tar",
    "imdb": "https://data.vision.ee.ethz.ch/cvl/rrothe/imdb-wiki/static/imdb_crop.tar",
}
# A photo year outside this range is not a date (the first photograph is from 1826).
FIRST_PHOTO_YEAR = 1826
# MATLAB's day 1 is 1 January of year 0; Python's ordinal 1 is 1 January of year 1 (366 days later).
MATLAB_ORDINAL_OFFSET = 366


def matlab_datenum_to_date(value: float) -> date | None:
    """The calendar date of a MATLAB serial date number, or None if it is not a valid date."""
    if not np.isfinite(value) or value <= MATLAB_ORDINAL_OFFSET:
        return None
    try:
        return date.fromordinal(int(value) - MATLAB_ORDINAL_OFFSET) + timedelta(days=float(value) % 1)
    except (ValueError, OverflowError):
        return None


def age_at_photo(dob: float, photo_taken: float) -> float:
    """Age in years, taking the photo as taken in the middle of its year (1 July): one year less
    for people born from July on. NaN where either date is invalid."""
    born = matlab_datenum_to_date(dob)
    if born is None or not np.isfinite(photo_taken):
        return float("nan")
    return float(photo_taken) - born.year - (1 if born.month >= 7 else 0)


def _cell_strings(cell: np.ndarray) -> list[str]:
    """A MATLAB cell array of strings (as loadmat returns it) as Python strings."""
    out = []
    for item in np.asarray(cell).ravel():
        while isinstance(item, np.ndarray):
            item = item.ravel()[0] if item.size else ""
        out.append(str(item))
    return out


def _vector(struct: np.void, field: str, n: int) -> np.ndarray:
    if field not in struct.dtype.names:
        return np.full(n, np.nan)
    return np.asarray(struct[field], dtype=float).ravel()


class IMDBWikiSource(Source):
    name = "imdb_wiki"
    title = "IMDB-WIKI"

    def __init__(
        self,
        root: str | Path,
        subset: str = "wiki",
        cropped: bool = True,
        download: bool = False,
        download_url: str | None = None,
        download_sha256: str | None = None,
        allow_outside_root: bool = False,
    ) -> None:
        super().__init__(root)
        check_inside([], self.root, allow_outside_root, str(self.root))  # the option's value, now
        self.allow_outside_root = allow_outside_root
        if subset not in URLS:
            raise ValueError(f"data.subset={subset!r}; choose wiki or imdb")
        self.subset = subset
        self.cropped = bool(cropped)
        self.download = bool(download)
        self.download_url = download_url or URLS[subset]
        self.download_sha256 = download_sha256

    def describe(self) -> str:
        kind = "cropped faces" if self.cropped else "full photos, cropped to face_location"
        where = "" if self.mat_file.exists() else f" (no {self.mat_file.name} yet)"
        return f"data: IMDB-WIKI, {self.subset} subset ({kind}) from {self.root}{where}"

    @property
    def mat_file(self) -> Path:
        return self.root / f"{self.subset}.mat"

    @property
    def how_to_get(self) -> str:  # type: ignore[override]
        return (
            f"Download {self.download_url} (or run with data.download=true) and unpack it so that "
            f"{self.mat_file} and the image folders 00/ ... 99/ are in data.root."
        )

    def prepare(self) -> None:
        if self.mat_file.exists() or not self.download:
            return
        archive = self.root.parent / Path(self.download_url).name
        download(self.download_url, archive, sha256=self.download_sha256)
        extract_tar(archive, self.root, strip_prefix=f"{self.subset}_crop")
        if not self.mat_file.exists():
            raise FileNotFoundError(f"{archive} unpacked into {self.root} but holds no {self.mat_file.name}")

    def load(self) -> SourceRecords:
        if not self.mat_file.exists():
            if self.download:
                self.prepare()
            else:
                raise FileNotFoundError(f"No {self.mat_file.name} in data.root={str(self.root)!r}. {self.how_to_get}")
        from scipy.io import loadmat

        meta = loadmat(self.mat_file)
        if self.subset not in meta:
            raise ValueError(f"{self.mat_file} has no '{self.subset}' struct (keys: {[k for k in meta if not k.startswith('__')]})")
        s = meta[self.subset][0, 0]
        paths = _cell_strings(s["full_path"])
        check_inside(paths, self.root, self.allow_outside_root, str(self.mat_file))  # a full_path of ../x.jpg
        n = len(paths)
        dob = _vector(s, "dob", n)
        taken = _vector(s, "photo_taken", n)
        taken = np.where((taken >= FIRST_PHOTO_YEAR) & (taken <= date.today().year), taken, np.nan)
        records = pd.DataFrame(
            {
                "path": [str(self.root / p) for p in paths],
                "age": [age_at_photo(d, t) for d, t in zip(dob, taken, strict=True)],
                "photo_taken": taken,
                "dob": dob,
                "dob_valid": [matlab_datenum_to_date(d) is not None for d in dob],
                "face_score": _vector(s, "face_score", n),
                "second_face_score": _vector(s, "second_face_score", n),
                # IMDB-WIKI's gender: 1 male, 0 female, NaN unknown
                "gender": [{1.0: "male", 0.0: "female"}.get(float(v)) for v in _vector(s, "gender", n)],
            }
        )
        if self.subset == "imdb" and "celeb_id" in s.dtype.names:
            records["identity"] = [f"imdb:{int(v)}" for v in np.asarray(s["celeb_id"]).ravel()]
        elif "name" in s.dtype.names:
            names = _cell_strings(s["name"])
            # an empty name is no identity: such photos stand alone in the split
            records["identity"] = [f"wiki:{v}" if v else None for v in names]
        if not self.cropped and "face_location" in s.dtype.names:
            records["face_box"] = [tuple(np.asarray(b, dtype=float).ravel()[:4]) if np.size(b) >= 4 else None
                                   for b in np.asarray(s["face_location"]).ravel()]
        return SourceRecords(records, root=self.root, info={"subset": self.subset})
