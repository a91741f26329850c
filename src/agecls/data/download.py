"""Resumable, verified downloads of data set archives, with a progress bar."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from agecls.utils.progress import progress

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read per step


class DownloadError(RuntimeError):
    """The archive could not be fetched or did not verify."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: str | Path, sha256: str | None = None, timeout: float = 30.0) -> Path:
    """Fetch `url` to `dest`, resuming a `.part` file left by an interrupted attempt.

    The file only takes its final name once complete: its size matches the server's
    Content-Length and, where given, its SHA-256 matches `sha256`.
    """
    dest = Path(dest)
    if dest.exists():
        if sha256 and _sha256(dest) != sha256:
            raise DownloadError(f"{dest} exists but its SHA-256 is not {sha256}; delete it and download again")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the part file is already complete
            response = None
        else:
            raise DownloadError(f"downloading {url} failed: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(
            f"cannot download {url} ({err}). With no network, fetch it on a machine that has one and "
            f"put it at {dest} (or unpack it into {dest.parent})."
        ) from err

    if response is not None:
        with response:
            resumed = response.status == 206
            if have and not resumed:
                log.info("Server ignored the resume request; starting %s again", dest.name)
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with part.open("ab" if resumed else "wb") as out, progress(
                total=total, initial=have, unit="B", unit_scale=True, desc=f"Downloading {dest.name}"
            ) as bar:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    bar.update(len(block))
        size = part.stat().st_size
        if total is not None and size != total:
            raise DownloadError(f"{url}: got {size} of {total} bytes; run again to resume from {part}")
    if sha256:
        digest = _sha256(part)
        if digest != sha256:
            part.unlink()
            raise DownloadError(f"{url}: SHA-256 {digest} is not the expected {sha256}; the partial file was removed")
    os.replace(part, dest)
    return dest


def extract_tar(archive: str | Path, into: str | Path, strip_prefix: str | None = None) -> None:
    """Unpack `archive` into `into`, dropping a leading `strip_prefix/` folder from member names.

    Unpacks into a temporary folder first and moves it into place, so an interrupted extraction
    never looks complete.
    """
    into = Path(into)
    tmp = into.with_name(f".{into.name}.extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:
            members = []
            for m in tar.getmembers():
                name = m.name
                if strip_prefix and (name == strip_prefix or name.startswith(strip_prefix.rstrip("/") + "/")):
                    name = name[len(strip_prefix.rstrip("/")) + 1:]
                if not name:
                    continue
                m.name = name
                members.append(m)
            tar.extractall(tmp, members=members, filter="data")
    except (tarfile.TarError, OSError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(f"{archive} is not a readable tar archive ({err}); delete it and download again") from err
    into.mkdir(parents=True, exist_ok=True)
    # metadata files (.mat, .csv) move last: their presence is what marks the data set complete
    for item in sorted(tmp.iterdir(), key=lambda p: (p.suffix in (".mat", ".csv"), p.name)):
        target = into / item.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        shutil.move(str(item), target)
    tmp.rmdir()
