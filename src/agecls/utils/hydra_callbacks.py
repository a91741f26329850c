"""Hydra callbacks: keep a reused run directory's history; keep a sweep's summary up to date."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from agecls.utils.files import keep_previous
from agecls.utils.sweep import describe_error, write_job_status, write_summary

log = logging.getLogger(__name__)


def _is_rank_zero() -> bool:
    # DDP processes started by Lightning re-run the command with LOCAL_RANK (and maybe RANK) set
    return all(os.environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "RANK", "NODE_RANK"))


class KeepRunHistoryCallback(Callback):
    """A run started again in the same directory (resume: hydra.run.dir=<dir> ckpt_path=last)
    would overwrite the first attempt's `.hydra/` config; keep it as `.hydra.1`, `.hydra.2`, ..."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        subdir = config.hydra.output_subdir
        if subdir is None or not _is_rank_zero():
            return
        previous = Path(config.hydra.run.dir) / subdir
        if (previous / "config.yaml").exists():
            keep_previous(previous)


class SweepSummaryCallback(Callback):
    """Records each job's status (job.json) and rewrites the sweep's summary after every job."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _is_rank_zero():
            return
        try:
            job_dir = Path(config.hydra.runtime.output_dir)
            ok = job_return.status == JobStatus.COMPLETED
            error = None if ok else describe_error(job_return._return_value)
            write_job_status(job_dir, list(job_return.overrides or []), "ok" if ok else "failed", error)
            if config.hydra.mode == RunMode.MULTIRUN:
                write_summary(config.hydra.sweep.dir)
        except Exception as err:  # a summary must never take a job down with it
            log.warning("Could not update the sweep summary: %s", err)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        frame = write_summary(config.hydra.sweep.dir)
        log.info("Sweep summary (%s):\n%s", Path(config.hydra.sweep.dir) / "summary.md",
                 frame.drop(columns=["dir", "error"]).to_string(index=False))
