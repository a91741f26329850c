"""A cached index of image files: content hash and whether each decodes, computed once per file.

Checking 20,000 JPEGs takes tens of seconds; the index keeps, per file, what `stat` says of it (size,
modification time, inode-change time, inode number) with the result, so the next run re-checks only
files that changed. The change time and inode are what git's index also compares: `touch -r` can
restore a replaced file's modification time, but not its change time, and a file replaced by a
rename gets a new inode. `verify="full"` re-hashes (and re-decodes) every file regardless. The index
is written to a temp file and renamed, so a run killed mid-write never leaves a half index behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from agecls.data.images import CHECK_VERSION, check_image
from agecls.utils.files import building
from agecls.utils.progress import progress

log = logging.getLogger(__name__)

STAT_COLUMNS = ["size", "mtime_ns", "ctime_ns", "inode"]
INDEX_COLUMNS = ["path", *STAT_COLUMNS, "sha1", "ok", "error", "width", "height", "decoded", "checks"]
VERIFY_MODES = ("stat", "full")


def _stat(path: str) -> tuple[int, int, int, int]:
    """(size, mtime_ns, ctime_ns, inode); all -1 for a file that cannot be stat'ed."""
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino
    except OSError:
        return -1, -1, -1, -1


def check_verify(verify: str) -> str:
    if verify not in VERIFY_MODES:
        raise ValueError(f"data.verify={verify!r}; choose one of {', '.join(VERIFY_MODES)} "
                         "(stat: re-check files whose size, times or inode changed; full: re-check every file)")
    return verify


def _same_stat(old: dict, stat: tuple[int, int, int, int]) -> bool:
    """The file is as indexed, and was checked by this version of check_image (CHECK_VERSION)."""
    try:
        return (tuple(int(old[c]) for c in STAT_COLUMNS) == stat and stat[0] >= 0
                and int(old["checks"]) == CHECK_VERSION)
    except (KeyError, TypeError, ValueError):
        return False


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
    verify: str = "stat",
) -> pd.DataFrame:
    """Return one row per path (INDEX_COLUMNS), re-checking only files new or changed since the cache
    (`verify="stat"`), or every file (`verify="full"`)."""
    check_verify(verify)
    paths = [str(p) for p in paths]
    stats = [_stat(p) for p in paths]  # before hashing: a file changed meanwhile looks changed next time
    cached: dict[str, dict] = {}
    if cache_file is not None and Path(cache_file).exists() and verify == "stat":
        try:
            old = pd.read_csv(cache_file, keep_default_na=False, dtype={"sha1": str, "error": str})
            missing = [c for c in INDEX_COLUMNS if c not in old.columns]
            if missing:  # written by an older version: its entries cannot tell a replaced file
                log.info("Image index %s lacks %s (an older version's): re-checking every file",
                         cache_file, ", ".join(missing))
            else:
                for col in ("ok", "decoded"):
                    old[col] = _as_bool(old[col])
                cached = {r["path"]: r for r in old.to_dict("records")}
        except Exception as err:  # a corrupt cache is rebuilt, never trusted
            log.warning("Ignoring unreadable image index %s (%s)", cache_file, err)

    rows: list[dict | None] = []
    todo: list[int] = []
    for i, (p, stat) in enumerate(zip(paths, stats, strict=True)):
        old = cached.get(p)
        if old is not None and _same_stat(old, stat) and (bool(old["decoded"]) or not decode):
            rows.append(old)
        else:
            rows.append(None)
            todo.append(i)

    if todo:
        jobs = [(paths[i], decode) for i in todo]
        if workers > 1 and len(jobs) > 256:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = list(progress(pool.map(_check, jobs, chunksize=64), total=len(jobs), desc=desc, mininterval=2))
        else:
            results = [_check(j) for j in progress(jobs, desc=desc, mininterval=2, disable=len(jobs) < 256)]
        for i, res in zip(todo, results, strict=True):
            rows[i] = {"path": paths[i], **dict(zip(STAT_COLUMNS, stats[i], strict=True)), "decoded": decode,
                       "checks": CHECK_VERSION, **res}
        what = "every image (data.verify=full)" if verify == "full" else "new or changed images"
        log.info("Indexed %d %s (%d reused from the cache)", len(todo), what, len(paths) - len(todo))
        if cache_file is not None:
            _write_atomic(pd.DataFrame(rows, columns=INDEX_COLUMNS), Path(cache_file))
    frame = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    frame["ok"] = _as_bool(frame["ok"])
    return frame


def _as_bool(col: pd.Series) -> pd.Series:
    return col.astype(str).str.lower().isin(["true", "1"])


def _write_atomic(frame: pd.DataFrame, path: Path) -> None:
    with building(path, directory=False) as tmp:  # removed if the write fails
        frame.to_csv(tmp, index=False)
