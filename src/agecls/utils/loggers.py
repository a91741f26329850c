"""Experiment loggers of agecls."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger, writing each scalar tag at most once per step.

    Lightning adds an `epoch` scalar to every batch of metrics it logs. At an epoch's end the
    validation and the training metrics are logged at the same step, so `epoch` got two points
    at one step; TensorBoard's server keeps one point per step (and drops the later points of a
    tag whose step goes back). The repeated `epoch` (same value, same step) is left out here.
    `default_hp_metric` is off: its placeholder `hp_metric=-1` is no measurement.
    """

    def __init__(self, *args: Any, default_hp_metric: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, default_hp_metric=default_hp_metric, **kwargs)
        self._epoch_step: int | None = None

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if "epoch" in metrics and step is not None:
            if step == self._epoch_step:
                metrics = {k: v for k, v in metrics.items() if k != "epoch"}
            else:
                self._epoch_step = step
        if metrics:
            super().log_metrics(metrics, step)
