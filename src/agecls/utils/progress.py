"""Progress of long jobs (indexing, cache builds, feature extraction, prediction) on a terminal
and in the log.

On a terminal, `progress(...)` is a tqdm bar. Without one (nohup, SLURM, a pipe), a redrawn bar
would reach the log as one line of carriage returns, or only its last frame; there it writes one
INFO line through `logging` (so to the console and to the run's .log file) every `log_every`
seconds and one when done: "Indexing images: 42% 8,700/20,709 [00:21<00:29, 410 img/s]".
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("agecls.progress")

LOG_EVERY_S = 30.0


class _NullWriter(io.StringIO):
    def write(self, s: str) -> int:
        return len(s)


class LoggedProgress(tqdm):
    """A tqdm whose every display is one log line instead of a redraw (no terminal needed)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["file"] = _NullWriter()
        kwargs["mininterval"] = max(float(kwargs.get("mininterval") or 0.0), LOG_EVERY_S)
        kwargs["maxinterval"] = max(float(kwargs.get("maxinterval") or 0.0), kwargs["mininterval"])
        kwargs.setdefault("ascii", True)
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "" or (msg is None and self.n == 0):  # nothing done yet, or a clear: no line
            return True
        log.info("%s", (msg if msg is not None else self.__str__()).strip())
        return True


def on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """tqdm(iterable, **kwargs) on a terminal; a LoggedProgress otherwise (same interface)."""
    if kwargs.get("disable"):
        return tqdm(iterable, **kwargs)
    return tqdm(iterable, **kwargs) if on_terminal() else LoggedProgress(iterable, **kwargs)
