"""Age-estimation metrics that torchmetrics lacks, and the per-stage metric collections."""

from __future__ import annotations

import torch
from torchmetrics import (
    MeanAbsoluteError,
    Metric,
    MetricCollection,
    PearsonCorrCoef,
    SpearmanCorrCoef,
)


class CumulativeScore(Metric):
    """CS@k: the share of predictions within `threshold` years of the true age (higher is better)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, threshold: float = 5.0) -> None:
        super().__init__()
        self.threshold = float(threshold)
        self.add_state("hits", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.hits += ((preds - target).abs() <= self.threshold).sum().float()
        self.total += target.numel()

    def compute(self) -> torch.Tensor:
        return self.hits / self.total.clamp(min=1.0)


def cs_name(threshold: float) -> str:
    """Metric name for CS@threshold: cs5 for 5 years, cs2.5 for 2.5."""
    return f"cs{int(threshold)}" if float(threshold).is_integer() else f"cs{threshold}"


def stage_metrics(stage: str, cs_threshold: float = 5.0) -> MetricCollection:
    """MAE, Pearson, Spearman and CS@k logged as `<stage>/mae`, `<stage>/pearson`, ..."""
    return MetricCollection(
        {
            "mae": MeanAbsoluteError(),
            "pearson": PearsonCorrCoef(),
            "spearman": SpearmanCorrCoef(),
            cs_name(cs_threshold): CumulativeScore(cs_threshold),
        },
        prefix=f"{stage}/",
        # compute groups would share states between metrics of different kinds; keep them apart
        compute_groups=False,
    )
