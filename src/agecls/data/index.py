"""A cached index of image files: content hash and whether each decodes, computed once per file.

Checking 20,000 JPEGs takes tens of seconds; the index keeps, per file, its size and modification
time with the result, so the next run re-checks only files that changed. It is written to a temp
file and renamed, so a run killed mid-write never leaves a half index behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from agecls.data.images import check_image

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["path", "size", "mtime_ns", "sha1", "ok", "error", "width", "height", "decoded"]


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def _check(args: tuple[str, bool]) -> dict[str, object]:
    path, decode = args
    return check_image(path, decode=decode)


def index_file_for(cache_dir: str | Path, root: str | Path, name: str) -> Path:
    key = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir) / "index" / f"{name}-{key}.csv"


def build_index(
    paths: Sequence[str],
    cache_file: str | Path | None,
    decode: bool = True,
    workers: int = 0,
    desc: str = "Indexing images",
) -> pd.DataFrame:
    """Return one row per path (INDEX_COLUMNS), re-checking only files new or changed since the cache."""
    paths = [str(p) for p in paths]
    stats = [_stat(p) for p in paths]
    cached: dict[str, dict] = {}
    if cache_file is not None and Path(cache_file).exists():
        try:
            old = pd.read_csv(cache_file, keep_default_na=False, dtype={"sha1": str, "error": str})
            for col in ("ok", "decoded"):
                old[col] = _as_bool(old[col])
            cached = {r["path"]: r for r in old.to_dict("records")}
        except Exception as err:  # a corrupt cache is rebuilt, never trusted
            log.warning("Ignoring unreadable image index %s (%s)", cache_file, err)

    rows: list[dict | None] = []
    todo: list[int] = []
    for i, (p, (size, mtime)) in enumerate(zip(paths, stats, strict=True)):
        old = cached.get(p)
        if (
            old is not None
            and int(old["size"]) == size
            and int(old["mtime_ns"]) == mtime
            and (bool(old["decoded"]) or not decode)
        ):
            rows.append(old)
        else:
            rows.append(None)
            todo.append(i)

    if todo:
        jobs = [(paths[i], decode) for i in todo]
        if workers > 1 and len(jobs) > 256:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = list(tqdm(pool.map(_check, jobs, chunksize=64), total=len(jobs), desc=desc, mininterval=2))
        else:
            results = [_check(j) for j in tqdm(jobs, desc=desc, mininterval=2, disable=len(jobs) < 256)]
        for i, res in zip(todo, results, strict=True):
            size, mtime = stats[i]
            rows[i] = {"path": paths[i], "size": size, "mtime_ns": mtime, "decoded": decode, **res}
        log.info("Indexed %d new or changed images (%d reused from the cache)", len(todo), len(paths) - len(todo))
        if cache_file is not None:
            _write_atomic(pd.DataFrame(rows, columns=INDEX_COLUMNS), Path(cache_file))
    frame = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    frame["ok"] = _as_bool(frame["ok"])
    return frame


def _as_bool(col: pd.Series) -> pd.Series:
    return col.astype(str).str.lower().isin(["true", "1"])


def _write_atomic(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)
