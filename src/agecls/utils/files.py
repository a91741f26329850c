"""Writing into a run directory without losing what an earlier attempt wrote there."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
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


# ------------------------------------------------------------------- temporary build outputs
# A cache is built under a temporary name next to its final one and renamed when complete. The
# temporary name carries the host and process id of its builder, `<name>.tmp-<host>-<pid>`, so that
# a later build can tell the leftovers of a killed build (same host, process gone) from one still
# running, here or on another machine sharing the folder.
_TMP_RE = re.compile(r"^(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)$")
# before the host was recorded: `<key>.tmp-<pid>` folders, `.<name>.<pid>.tmp` files
_LEGACY_TMP_RES = (re.compile(r"^(?P<name>[^.]+)\.tmp-(?P<pid>\d+)$"), re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$"))


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "localhost"


def tmp_name(name: str) -> str:
    """The temporary name this process builds `name` under: `<name>.tmp-<host>-<pid>`."""
    return f"{name}.tmp-{_host()}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return True  # cannot tell: keep its files
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def reap_stale_tmp(folder: str | Path) -> list[Path]:
    """Remove the temporary outputs in `folder` of builds that died: those of this host whose process
    no longer exists. Another host's are left alone (its process ids mean nothing here)."""
    folder = Path(folder)
    removed = []
    host = _host()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if m is not None:
            if m["host"] != host:
                continue
        else:
            m = next((m for r in _LEGACY_TMP_RES if (m := r.match(entry.name))), None)
            if m is None:
                continue
        if pid_alive(int(m["pid"])):
            continue
        _remove(entry)
        removed.append(entry)
    if removed:
        log.info("Removed %d leftover(s) of interrupted builds in %s: %s", len(removed), folder,
                 ", ".join(p.name for p in removed))
    return removed


@contextmanager
def building(final: str | Path, directory: bool = True) -> Iterator[Path]:
    """Build `final` under a temporary name next to it: yields that path (an empty folder, or a file
    path not yet created), renamed to `final` when the block completes. On any error, Ctrl-C
    included, the temporary output is removed; leftovers of builds killed outright (SIGKILL, power
    loss) are removed by the next build in the same folder. If another process completed `final`
    first, its result is kept and ours discarded."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    reap_stale_tmp(final.parent)
    tmp = final.with_name(tmp_name(final.name))
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        try:
            os.replace(tmp, final)
        except OSError:  # a folder cannot replace a non-empty one: another process finished first
            if not final.exists():
                raise
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
