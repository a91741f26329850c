"""The losses a model can train with (`loss=` in conf/loss/), behind one small interface.

Each loss decides three things, so the rest of agecls need not know which one is in use:

- `out_features`: the width of the head's output layer (1 for regression, K age classes, or K-1
  ordinal thresholds); `output_layer(width)` builds that layer (a Linear, or CORAL's CoralLayer);
- `forward(output, age)`: the scalar training loss of a batch of head outputs against ages in years;
- `readout(output)`: the predicted age in years, (B,). Every metric (MAE, Pearson, Spearman, CS@5),
  predictions.csv, agecls.predict, the exported graph and the server read ages through it, so
  every loss is measured the same way.

Regression losses predict a standardised age, rescaled by the train split's mean and standard
deviation (`age_mean`, `age_std`: buffers every loss carries, which AgeNet saves in checkpoints
under its own keys). The study's `l1` is L1 on that standardised age, i.e. MAE in years / age_std,
at a scale at which lr 1e-4 works.

The class-based losses use K = max_age - min_age + 1 classes, one per whole year of
[min_age, max_age] (by default data.min_age..data.max_age: 0..100, K = 101), and read out the
expected age under the predicted distribution (not the most likely class: the expectation is what
DLDL-v2 and mean-variance train, and it gives continuous ages for Pearson and Spearman).

Nothing here is built from a file by import path: `build_loss` only accepts the `_target_`s of
LOSSES, so a checkpoint's hyperparameters cannot name arbitrary code.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from agecls.models.heads import CoralLayer


class AgeLoss(nn.Module):
    """A loss with the head width it needs and the readout from the head's output to years."""

    name: ClassVar[str] = ""
    out_features: int = 1
    # what a per-face interval is built around (agecls.intervals.BASES): the prediction itself, or
    # the central quantiles of a predicted label distribution (AgeClassLoss)
    interval_base: ClassVar[str] = "point"

    def __init__(self) -> None:
        super().__init__()
        # The regression scale (years = output * age_std + age_mean), set from the train split.
        # Not persistent here: AgeNet writes them to the state_dict under the keys checkpoints
        # have always had (net.age_mean, net.age_std), whatever the loss.
        self.register_buffer("age_mean", torch.tensor(0.0), persistent=False)
        self.register_buffer("age_std", torch.tensor(1.0), persistent=False)

    def forward(self, output: torch.Tensor, age: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The batch's loss (a scalar) of head outputs (B, out_features) against ages in years (B,)."""
        raise NotImplementedError

    def readout(self, output: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Predicted ages in years, (B,), float32, from head outputs (B, out_features)."""
        raise NotImplementedError

    def distribution(self, output: torch.Tensor) -> torch.Tensor | None:
        """(B, K) the predicted distribution over the class ages `ages`, for losses that predict
        one (the base of a per-face interval: agecls.intervals); None for point predictions."""
        return None

    def output_layer(self, in_features: int) -> nn.Module:
        """The head's last layer for this loss."""
        return nn.Linear(in_features, self.out_features)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}"


# ------------------------------------------------------------------------------------ regression
class RegressionLoss(AgeLoss):
    """One output, a standardised age; the loss compares the rescaled prediction with the age in
    years and divides by age_std (so its scale is that of a standardised age)."""

    out_features = 1

    def readout(self, output: torch.Tensor) -> torch.Tensor:
        z = output.squeeze(-1) if output.dim() > 1 else output
        return z.float() * self.age_std + self.age_mean

    def forward(self, output: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.readout(output), age.float())

    def criterion(self, pred: torch.Tensor, age: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class L1AgeLoss(RegressionLoss):
    """The study's loss: L1 on the standardised age, |pred - age| / age_std, batch mean."""

    name = "l1"

    def criterion(self, pred: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(pred, age) / self.age_std


class MSEAgeLoss(RegressionLoss):
    """L2: ((pred - age) / age_std)^2, batch mean."""

    name = "mse"

    def criterion(self, pred: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred, age) / self.age_std**2


class SmoothL1AgeLoss(RegressionLoss):
    """Huber: quadratic within `beta` years of the age, linear (as l1) beyond; divided by age_std,
    so large errors weigh exactly as in l1 and small ones do not pull as hard."""

    name = "smooth_l1"

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = float(beta)

    def criterion(self, pred: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        return F.smooth_l1_loss(pred, age, beta=self.beta) / self.age_std

    def extra_repr(self) -> str:
        return f"out_features=1, beta={self.beta:g}"


# ---------------------------------------------------------------------------------- age classes
class AgeClassLoss(AgeLoss):
    """K classes, one per whole year of [min_age, max_age]; readout = the expected age."""

    interval_base: ClassVar[str] = "distribution"

    def __init__(self, min_age: int = 0, max_age: int = 100) -> None:
        super().__init__()
        self.min_age, self.max_age = int(min_age), int(max_age)
        self.num_classes = self.max_age - self.min_age + 1
        self.out_features = self.num_classes
        # the class ages; computed from the config, so not in the state_dict
        self.register_buffer("ages", torch.arange(self.min_age, self.max_age + 1, dtype=torch.float32), persistent=False)

    def target_class(self, age: torch.Tensor) -> torch.Tensor:
        """The class of each age: the nearest whole year, ages outside the range at its ends."""
        return (torch.round(age.float()) - self.min_age).clamp(0, self.num_classes - 1).long()

    def expected_age(self, p: torch.Tensor) -> torch.Tensor:
        """(B,) float32: the mean age of class distributions p (B, K). A product and a sum, not a
        matmul: autocast runs matmuls in bf16, which would round ages to 0.25-0.5 years."""
        return (p.float() * self.ages).sum(dim=-1)

    def readout(self, output: torch.Tensor) -> torch.Tensor:
        return self.expected_age(torch.softmax(output.float(), dim=-1))

    def distribution(self, output: torch.Tensor) -> torch.Tensor:
        return torch.softmax(output.float(), dim=-1)

    def extra_repr(self) -> str:
        return f"classes={self.num_classes} (ages {self.min_age} to {self.max_age})"


class CrossEntropyAgeLoss(AgeClassLoss):
    """Softmax cross-entropy over the age classes (the age rounded to a whole year)."""

    name = "ce"

    def forward(self, output: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.float(), self.target_class(age))


class DLDLLoss(AgeClassLoss):
    """Deep label distribution learning (Gao et al. 2017): the target is a Gaussian over the age
    classes centred on the age (standard deviation `sigma` years, normalised over the classes);
    the loss is KL(target || softmax(output)), batch mean."""

    name = "dldl"

    def __init__(self, min_age: int = 0, max_age: int = 100, sigma: float = 2.0) -> None:
        super().__init__(min_age, max_age)
        self.sigma = float(sigma)

    def label_distribution(self, age: torch.Tensor) -> torch.Tensor:
        """(B, K): the Gaussian label distribution of each age."""
        d = self.ages.unsqueeze(0) - age.float().unsqueeze(1)
        return torch.softmax(-(d**2) / (2 * self.sigma**2), dim=1)

    def kl(self, output: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(output.float(), dim=-1), self.label_distribution(age), reduction="batchmean")

    def forward(self, output: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        return self.kl(output, age)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sigma={self.sigma:g}"


class DLDLv2Loss(DLDLLoss):
    """DLDL-v2 (Gao et al. 2018): the label distribution's KL plus `l1_weight` times the L1 error
    (years) of the expected age, so the distribution and the age read from it are learned jointly."""

    name = "dldl_v2"

    def __init__(self, min_age: int = 0, max_age: int = 100, sigma: float = 2.0, l1_weight: float = 1.0) -> None:
        super().__init__(min_age, max_age, sigma)
        self.l1_weight = float(l1_weight)

    def forward(self, output: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        return self.kl(output, age) + self.l1_weight * F.l1_loss(self.readout(output), age.float())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, l1_weight={self.l1_weight:g}"


class MeanVarianceLoss(AgeClassLoss):
    """Mean-variance loss (Pan et al. 2018): softmax cross-entropy + lambda_mean * (m - y)^2 / 2 +
    lambda_variance * sum_k p_k (a_k - m)^2, where p is the softmax over the age classes a_k and m
    its mean (batch means; the paper's lambda_1 = 0.2, lambda_2 = 0.05). The mean term pulls the
    expected age to the label, the variance term makes the distribution concentrated."""

    name = "mean_variance"

    def __init__(self, min_age: int = 0, max_age: int = 100, lambda_mean: float = 0.2,
                 lambda_variance: float = 0.05) -> None:
        super().__init__(min_age, max_age)
        self.lambda_mean, self.lambda_variance = float(lambda_mean), float(lambda_variance)

    def forward(self, output: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        logits = output.float()
        p = torch.softmax(logits, dim=-1)
        mean = self.expected_age(p)
        variance = (p * (self.ages.unsqueeze(0) - mean.unsqueeze(1)) ** 2).sum(dim=1)
        ce = F.cross_entropy(logits, self.target_class(age))
        return ce + self.lambda_mean * 0.5 * ((mean - age.float()) ** 2).mean() + self.lambda_variance * variance.mean()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lambda_mean={self.lambda_mean:g}, lambda_variance={self.lambda_variance:g}"


# -------------------------------------------------------------------------------------- ordinal
ORDINAL_VARIANTS = ("coral", "orcnn")
ORDINAL_READOUTS = ("sum", "threshold")


class OrdinalLoss(AgeLoss):
    """Ordinal regression: K-1 binary tasks "age > min_age + k" (k = 0 .. K-2; an age counts as its
    nearest whole year), each a sigmoid output, trained with binary cross-entropy summed over the
    tasks and averaged over the batch.

    variant: `coral` (Cao et al. 2020: one weight vector shared by all tasks and K-1 biases, which
    keeps the probabilities rank-consistent; head output layer in_features + K-1 parameters) or
    `orcnn` (Niu et al. 2016: K-1 independent outputs, a Linear of width K-1).
    readout: `sum` = min_age + sum_k P(age > a_k), the expected age when the probabilities are
    rank-consistent (continuous, as the other losses' expected values), or `threshold` = min_age +
    the number of tasks with P > 0.5 (the papers' rule; whole years).
    """

    name = "ordinal"

    def __init__(self, min_age: int = 0, max_age: int = 100, variant: str = "coral", readout: str = "sum") -> None:
        super().__init__()
        self.min_age, self.max_age = int(min_age), int(max_age)
        self.num_classes = self.max_age - self.min_age + 1
        self.out_features = self.num_classes - 1
        self.variant, self.readout_rule = str(variant), str(readout)
        # age > min_age + k + 0.5 <=> the age's nearest whole year is above min_age + k
        self.register_buffer("thresholds", self.min_age + 0.5 + torch.arange(self.out_features, dtype=torch.float32),
                             persistent=False)

    def output_layer(self, in_features: int) -> nn.Module:
        if self.variant == "coral":
            return CoralLayer(in_features, self.out_features)
        return nn.Linear(in_features, self.out_features)

    def levels(self, age: torch.Tensor) -> torch.Tensor:
        """(B, K-1) binary targets: 1 where the age is above the task's threshold."""
        return (age.float().unsqueeze(1) > self.thresholds.unsqueeze(0)).float()

    def forward(self, output: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(output.float(), self.levels(age), reduction="none")
        return bce.sum(dim=1).mean()

    def readout(self, output: torch.Tensor) -> torch.Tensor:
        logits = output.float()
        if self.readout_rule == "threshold":
            return self.min_age + (logits > 0).float().sum(dim=-1)
        return self.min_age + torch.sigmoid(logits).sum(dim=-1)

    def extra_repr(self) -> str:
        return (f"thresholds={self.out_features} (ages {self.min_age} to {self.max_age}), variant={self.variant}, "
                f"readout={self.readout_rule}")


# -------------------------------------------------------------------------------------- registry
# loss=<name> (conf/loss/<name>.yaml) -> its class; the only classes build_loss instantiates
LOSSES: dict[str, type[AgeLoss]] = {
    cls.name: cls
    for cls in (L1AgeLoss, MSEAgeLoss, SmoothL1AgeLoss, CrossEntropyAgeLoss, DLDLLoss, DLDLv2Loss,
                MeanVarianceLoss, OrdinalLoss)
}


def target_of(cls: type[AgeLoss]) -> str:
    """The `_target_` a config names `cls` by."""
    return f"{cls.__module__}.{cls.__qualname__}"


# The loss of a model whose checkpoint names none (saved before losses were configurable): the study's.
DEFAULT_LOSS: dict[str, Any] = {"_target_": target_of(L1AgeLoss)}


def loss_parameters(cls: type[AgeLoss]) -> dict[str, Any]:
    """A loss class's parameters and their defaults."""
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}


def loss_name(config: Mapping[str, Any] | None) -> str:
    """loss=<name> of a loss config (its `_target_`); the target itself if agecls does not know it."""
    target = (dict(config or DEFAULT_LOSS)).get("_target_")
    by_target = {target_of(cls): name for name, cls in LOSSES.items()}
    return by_target.get(str(target), str(target))


def loss_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """A loss config as a plain dict with every parameter (defaults filled in), checked: what a
    model saves in its hyperparameters. None (a checkpoint from before losses were configurable)
    is the study's l1."""
    from agecls.utils.checks import check_loss_config

    if OmegaConf.is_config(config):
        config = OmegaConf.to_container(config, resolve=True)  # type: ignore[assignment]
    name, params = check_loss_config(config if config is not None else DEFAULT_LOSS)
    return {"_target_": target_of(LOSSES[name]), **params}


def build_loss(config: Mapping[str, Any] | None) -> AgeLoss:
    """The loss a config describes (None: l1). Only LOSSES' classes are built; a bad value raises
    agecls.utils.checks.ConfigValueError naming it."""
    full = loss_config(config)
    cls = LOSSES[loss_name(full)]
    return cls(**{k: v for k, v in full.items() if k != "_target_"})
