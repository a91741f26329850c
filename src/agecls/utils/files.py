"""Writing into a run directory without losing what an earlier attempt wrote there."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def numbered(path: Path, n: int) -> Path:
    """metrics.json -> metrics.1.json; .hydra -> .hydra.1"""
    if path.name.startswith(".") and path.suffix == path.name:
        return path.with_name(f"{path.name}.{n}")
    return path.with_name(f"{path.stem}.{n}{path.suffix}")


def keep_previous(path: str | Path) -> Path | None:
    """If `path` exists, rename it to the first free numbered name and return that name."""
    path = Path(path)
    if not path.exists():
        return None
    n = 1
    while numbered(path, n).exists():
        n += 1
    target = numbered(path, n)
    os.replace(path, target)
    log.info("Kept the previous %s as %s", path.name, target.name)
    return target


def write_bytes_keeping_previous(path: str | Path, data: bytes) -> None:
    """Write `data` to `path`; an existing different file is kept under a numbered name."""
    path = Path(path)
    if path.exists():
        if path.read_bytes() == data:
            return
        log.warning("%s differs from the one an earlier attempt wrote in this directory; keeping both", path.name)
        keep_previous(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
