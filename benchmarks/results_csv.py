"""The one way benchmarks write their CSV: a rerun replaces the rows it measured again (same key
columns) and keeps every other row."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd


def write_replacing(out: str | Path, table: pd.DataFrame, key: Sequence[str]) -> pd.DataFrame:
    """`table` written to `out` with the rows of an existing `out` whose `key` values it does not
    hold; returns what was written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and len(table):
        old = pd.read_csv(out)
        keep = ~old.set_index(list(key)).index.isin(table.set_index(list(key)).index)
        table = pd.concat([old[keep], table], ignore_index=True)
    table.to_csv(out, index=False)
    return table
