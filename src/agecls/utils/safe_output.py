"""Output files a user names: checked before any work, written whole or not at all.

Every command that writes a file the user chose (`agecls.predict output=`, `agecls.export
output=`, annotated copies) goes through these two functions:

- `check_output` runs before any expensive work and refuses, naming the key and the path: a folder,
  one of the command's own inputs (the same file, however it is spelled or linked), an extension
  that does not fit the format, a folder that cannot be created or written, and an existing file
  unless `overwrite=true`;
- `atomic_write` writes to a temporary file beside the target and renames it over the target only
  when the writing completed, so an error or Ctrl-C never leaves half a file nor loses the old one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from agecls.utils.checks import ConfigValueError
from agecls.utils.files import tmp_name


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(path: str | Path, *, key: str = "output", suffixes: Sequence[str] = (),
                 inputs: Sequence[str | Path] = (), overwrite: bool = False) -> Path:
    """`path` checked as a file this command may write (see the module docstring); returns it as a Path.
    `suffixes`: the extensions that fit the format (lower case, with the dot; empty: any)."""
    out = Path(path).expanduser()
    shown = f"{key}={str(path)!r}"
    if str(path).endswith(("/", os.sep)) or out.is_dir():
        raise ConfigValueError(f"{shown} is a folder; name a file in it, e.g. {key}={str(out / ('out' + (suffixes[0] if suffixes else '')))!r}")
    for source in inputs:
        src = Path(source).expanduser()
        if _same_file(out, src) or out.resolve() == src.resolve():
            raise ConfigValueError(f"{shown} is this command's own input {str(source)!r}: it would be replaced; "
                                   f"name another output file")
    if suffixes and out.suffix.lower() not in suffixes:
        raise ConfigValueError(f"{shown}: this command writes {' or '.join(suffixes)} files; "
                               f"name one, e.g. {key}={str(out.with_suffix(suffixes[0]))!r}")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ConfigValueError(f"{shown} exists; name another file, or add overwrite=true to replace it")
        if not out.is_file():
            raise ConfigValueError(f"{shown} exists and is not a regular file; name another output file")
    parent = out.parent
    try:  # made now (it is where the output goes), and written to: os.access says yes to root everywhere
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".agecls-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigValueError(f"{shown}: the folder {str(parent)!r} cannot be created or written "
                               f"({err.strerror or err}); name a file in a folder you can write") from None
    return out


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write; renamed to `path` when the block completes,
    removed on any error (the previous `path`, if any, is then untouched)."""
    final = Path(path).expanduser()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name("." + tmp_name(final.name))
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
