"""Writing into a run directory without losing what an earlier attempt wrote there; building caches
under temporary names; checking a cache's files against what its build wrote."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np

log = logging.getLogger(__name__)

T = TypeVar("T")


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


# ------------------------------------------------------------------------- checked cache files
# What agecls.data.pixel_cache, jpeg_cache and feature_cache share: a cache folder's files are
# written front to back by a BlockWriter, which records each file's size and the crc32 of every
# BLOCK_BYTES block; the build seals those records into meta.json (with a sha256 of meta.json's own
# content); open_cache checks it all before a byte of the cache is used. See the policy
# (data.verify=stat|full) and the measured cost in open_cache.
BLOCK_BYTES = 4 << 20  # 4 MiB: 0.40 s of crc32 per GB in the page cache against 0.49 s at 1 MiB
SEAL = "meta_sha256"  # the field of a sealed JSON file holding the sha256 of the rest
VERIFIED = "verified.json"  # data.verify=stat: the stat of each file when last verified in full


class CacheDamaged(Exception):
    """A cache folder's files disagree with the record its build wrote (or there is no record)."""


class NotEnoughSpace(OSError):
    """The free space of a folder is less than what a build is about to write there."""


def check_free_space(folder: str | Path, need: int, what: str, hint: str = "") -> None:
    """Refuse (NotEnoughSpace, naming the folder, the bytes needed and free) before writing `need`
    bytes of `what` into `folder` where the disk has less free."""
    folder = Path(folder)
    probe = next((p for p in (folder, *folder.parents) if p.exists()), folder)  # not created yet: its disk
    free = shutil.disk_usage(probe).free
    if need > free:
        raise NotEnoughSpace(
            errno.ENOSPC,
            f"not enough free space in {folder} for the {what}: it needs {need:,} bytes ({need / 1e9:.2f} GB), "
            f"{free:,} bytes ({free / 1e9:.2f} GB) are free. Free {need - free:,} bytes there"
            + (f", or {hint}" if hint else "") + ".")


class BlockWriter:
    """Writes one file front to back with plain writes (no sparse holes, no memory map: a full disk
    is an ENOSPC error naming the file, never a SIGBUS), recording its size and the crc32 of every
    BLOCK_BYTES block as it goes (`record`, once closed). `size`, when known, is reserved first
    with posix_fallocate, so a disk filled meanwhile by someone else fails here, at the start."""

    def __init__(self, path: str | Path, size: int | None = None) -> None:
        self.path = Path(path)
        self.size = 0
        self._crcs: list[int] = []
        self._crc = 0
        self._filled = 0  # bytes of the current block
        self.record: dict | None = None
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        if size and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(self._f.fileno(), 0, int(size))
            except OSError as err:
                if err.errno == errno.ENOSPC:
                    self._f.close()
                    raise self._no_space(int(size)) from err
                # EOPNOTSUPP, EINVAL (a file system without it): plain writes still allocate

    def _no_space(self, need: int) -> NotEnoughSpace:
        free = shutil.disk_usage(self.path.parent).free
        return NotEnoughSpace(errno.ENOSPC, f"the disk of {self.path.parent} filled up while writing {self.path.name}: "
                                            f"{need:,} bytes to write, {free:,} bytes free. Free space there and run again.")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        try:
            self._f.write(view)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise self._no_space(len(view)) from err
            raise
        pos = 0
        while pos < len(view):
            take = min(BLOCK_BYTES - self._filled, len(view) - pos)
            self._crc = zlib.crc32(view[pos: pos + take], self._crc)
            self._filled += take
            pos += take
            if self._filled == BLOCK_BYTES:
                self._crcs.append(self._crc)
                self._crc, self._filled = 0, 0
        self.size += len(view)
        return len(view)

    def close(self) -> dict:
        if self.record is None:
            try:
                self._f.close()  # flushes what is buffered
            except OSError as err:
                if err.errno == errno.ENOSPC:
                    raise self._no_space(0) from err
                raise
            if self._filled:
                self._crcs.append(self._crc)
            self.record = {"size": self.size, "block": BLOCK_BYTES, "crc32": self._crcs}
        return self.record

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._f.close()


def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_sealed_json(path: str | Path, obj: dict) -> None:
    """Write `obj` as JSON with the sha256 of its content in SEAL, atomically (tmp + rename)."""
    path = Path(path)
    body = {k: v for k, v in obj.items() if k != SEAL}
    body[SEAL] = hashlib.sha256(_canonical(body)).hexdigest()
    tmp = path.with_name(tmp_name(path.name))
    try:
        tmp.write_text(json.dumps(body, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_sealed_json(path: str | Path) -> dict:
    """What write_sealed_json wrote; CacheDamaged if the file is missing, not JSON, or its content
    does not match its seal (JSON only: nothing read here can run code)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CacheDamaged(f"{path} is unreadable ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict) or SEAL not in obj:
        raise CacheDamaged(f"{path} carries no checksum (written by an older agecls, or not by agecls)")
    seal = obj.pop(SEAL)
    if seal != hashlib.sha256(_canonical(obj)).hexdigest():
        raise CacheDamaged(f"{path} does not match its own checksum (edited or damaged)")
    obj[SEAL] = seal
    return obj


def _check_record(name: str, record: object) -> dict:
    """A file's record (BlockWriter.record) as read back from meta.json, checked field by field."""
    ok = (isinstance(record, dict) and isinstance(record.get("size"), int) and record["size"] >= 0
          and isinstance(record.get("block"), int) and record["block"] > 0
          and isinstance(record.get("crc32"), list) and all(isinstance(c, int) for c in record["crc32"])
          and len(record["crc32"]) == -(-record["size"] // record["block"]))
    if not ok:
        raise CacheDamaged(f"meta.json's record of {name} is malformed")
    return record  # type: ignore[return-value]


def _check_blocks(path: Path, record: dict, blocks: Iterable[int]) -> None:
    block = record["block"]
    buf = bytearray(block)
    with open(path, "rb", buffering=0) as f:
        for i in blocks:
            f.seek(i * block)
            got = f.readinto(buf)
            if zlib.crc32(memoryview(buf)[:got]) != record["crc32"][i]:
                end = min((i + 1) * block, record["size"])
                raise CacheDamaged(f"{path}: bytes {i * block:,}-{end:,} (block {i} of {len(record['crc32'])}) "
                                   "do not match the checksum recorded when it was built")


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def open_cache(folder: str | Path, names: Iterable[str], expect: Mapping[str, object], verify: str | None) -> dict:
    """Check the cache in `folder` and return its meta.json; CacheDamaged saying what is wrong.

    Always: meta.json matches its own sha256 and says what `expect` says (field by field), each file
    in `names` has a well-formed record there and exactly the size recorded (a truncated or grown
    file is named as such, before anything maps it). Then the crc32 of the blocks:

    - verify="full": every block of every file, every time.
    - verify="stat" (the default, data.verify's): every block of a file whose size, mtime, ctime or
      inode changed since it was last verified in full (recorded in verified.json, itself sealed),
      or whose ctime is not older than that record ("racy", as git calls it: changed within the
      same clock tick); the first and last block only of a file unchanged since. Writing into a
      file, by any means, moves its ctime, which no user can set back: noise written over a cache
      or bytes flipped in it are found either way. `full` is for what stat cannot see: the disk's
      own bit rot, a file system that does not keep ctime.
    - verify=None: sizes only (a cache this process has just written, its checksums from memory).

    Cost, measured on this project's 2-core VM (shared, load ~2): a 20,000 x 3 x 128 x 128 raw cache
    (983 MB of random bytes written by BlockWriter, sealed by seal_cache, then open_cache timed with
    time.perf_counter, three times): verify=full 0.35-0.42 s from the page cache, 0.75 s after
    evicting the file from it (posix_fadvise DONTNEED; a virtual disk, so a slower physical one reads
    at its own speed: 1 GB/s gives about 1 s); verify=stat on an unchanged file 3-5 ms (12 ms
    evicted); sizes only 0.2 ms. crc32 over 4 MiB blocks, against 0.49 s at 1 MiB, sha1 0.99 s and
    blake2b 1.98 s for the same file."""
    folder = Path(folder)
    meta = read_sealed_json(folder / "meta.json")
    for field_name, want in expect.items():
        if meta.get(field_name) != want:
            raise CacheDamaged(f"{folder / 'meta.json'} says {field_name}={meta.get(field_name)!r}, "
                               f"not {want!r}")
    files = meta.get("files")
    if not isinstance(files, dict):
        raise CacheDamaged(f"{folder / 'meta.json'} records no file checksums (written by an older agecls)")
    records, stats = {}, {}
    for name in names:
        records[name] = _check_record(name, files.get(name))
        path = folder / name
        try:
            st = os.stat(path)
        except OSError as err:
            raise CacheDamaged(f"{path} is missing ({err.strerror})") from err
        if st.st_size != records[name]["size"]:
            raise CacheDamaged(f"{path} is {st.st_size:,} bytes, but {records[name]['size']:,} were written when "
                               f"it was built ({'truncated' if st.st_size < records[name]['size'] else 'grown'})")
        stats[name] = st
    if verify is None:
        return meta
    trusted: dict = {}
    if verify == "stat":
        try:
            seen = read_sealed_json(folder / VERIFIED)
            verified_ns = os.stat(folder / VERIFIED).st_mtime_ns
        except (CacheDamaged, OSError):
            seen, verified_ns = {}, 0
        if seen.get("meta") == meta[SEAL]:
            trusted = {name: sig for name, sig in seen.get("files", {}).items()
                       if name in stats and sig == _signature(stats[name]) and stats[name].st_ctime_ns < verified_ns}
    for name, record in records.items():
        n_blocks = len(record["crc32"])
        blocks = sorted({0, n_blocks - 1}) if name in trusted and n_blocks else range(n_blocks)
        _check_blocks(folder / name, record, blocks)
    if verify == "stat" and len(trusted) < len(records):
        try:  # best effort: a read-only cache folder is verified in full each time instead
            write_sealed_json(folder / VERIFIED, {"meta": meta[SEAL],
                                                  "files": {n: _signature(s) for n, s in stats.items()}})
        except OSError as err:
            log.debug("Could not record the verification of %s: %s", folder, err)
    return meta


def load_npy(path: str | Path, shape: tuple[int, ...], dtype: np.dtype | type, mmap: bool = False) -> np.ndarray:
    """The .npy array at `path` (memory-mapped with `mmap`, never unpickled), which must hold
    `dtype` in `shape`; CacheDamaged otherwise."""
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as err:
        raise CacheDamaged(f"{path} is not a readable array: {err}") from err
    if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
        raise CacheDamaged(f"{path} holds {array.dtype} {array.shape}, not {np.dtype(dtype)} {tuple(shape)}")
    return array


def seal_cache(folder: str | Path, meta: dict, files: Mapping[str, dict]) -> dict:
    """Write a freshly built cache's meta.json (its fields, each file's BlockWriter record, sealed)
    and verified.json (the files as just written). Returns the meta as written."""
    folder = Path(folder)
    meta = {**meta, "files": dict(files)}
    write_sealed_json(folder / "meta.json", meta)
    meta = read_sealed_json(folder / "meta.json")
    write_sealed_json(folder / VERIFIED, {"meta": meta[SEAL],
                                          "files": {n: _signature(os.stat(folder / n)) for n in files}})
    return meta


def discard(folder: str | Path) -> None:
    """Remove a damaged cache folder: renamed out of the way first (a reader never sees half of it)."""
    folder = Path(folder)
    doomed = folder.with_name(tmp_name(f"{folder.name}-damaged"))
    try:
        os.replace(folder, doomed)
    except FileNotFoundError:
        return  # another process removed it first
    _remove(doomed)


def reuse_checked(final: str | Path, what: str, open_fn: Callable[[Path], T]) -> T | None:
    """The cache at `final`, opened by `open_fn` (which checks it: open_cache), or None when there is
    none to reuse. Leftovers of killed builds beside it are removed first. A cache that fails its
    checks is removed, with a warning saying why, so that the caller builds it again: agecls built
    it, and a damaged cache is never trained or tested on."""
    final = Path(final)
    reap_stale_tmp(final.parent)
    if not final.exists():
        return None
    try:
        return open_fn(final)
    except CacheDamaged as err:
        log.warning("The %s %s is damaged (or from an older agecls), building it again: %s", what, final, err)
        discard(final)
        return None
