"""Data sources: each turns one on-disk format into records (see base.RECORD_COLUMNS)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agecls.data.sources.base import RECORD_COLUMNS, Source, SourceRecords
from agecls.data.sources.csv import CSVSource
from agecls.data.sources.imdb_wiki import IMDBWikiSource
from agecls.data.sources.synthetic import SyntheticSource
from agecls.data.sources.utkface import UTKFaceSource

SOURCES: dict[str, type[Source]] = {
    "utkface": UTKFaceSource,
    "csv": CSVSource,
    "imdb_wiki": IMDBWikiSource,
    "synthetic": SyntheticSource,
}


def make_source(name: str, root: str | Path, **options: Any) -> Source:
    """Instantiate source `name`; unknown names and options fail with what is accepted."""
    if name not in SOURCES:
        raise ValueError(f"data.source={name!r} is not a known source; choose one of {', '.join(sorted(SOURCES))}")
    cls = SOURCES[name]
    try:
        return cls(root, **options)
    except TypeError as err:
        raise TypeError(f"data source {name!r} does not take these options {sorted(options)}: {err}") from err


__all__ = ["RECORD_COLUMNS", "SOURCES", "Source", "SourceRecords", "make_source"]
