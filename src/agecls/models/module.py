"""The LightningModule: a pretrained backbone with a grafted MLP head, trained with a configurable
loss (agecls.models.losses; the study's L1 on the standardised age by default)."""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, MinMetric
from torchmetrics.utilities.distributed import gather_all_tensors

from agecls.data.transforms import DEFAULT_CROP_PCT
from agecls.intervals import (
    CHECKPOINT_KEY,
    DEFAULT_COVERAGE,
    LEVELS,
    Calibration,
    coverage_and_width,
)
from agecls.models.backbones import Backbone, build_backbone
from agecls.models.heads import MLPHead
from agecls.models.losses import AgeLoss, build_loss, loss_config, loss_name
from agecls.models.metrics import stage_metrics
from agecls.models.mixup import Mixup
from agecls.utils.checkpoint import CheckpointError, read_checkpoint
from agecls.utils.checks import check_tta

log = logging.getLogger(__name__)

DEFAULT_OPTIMIZER = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-4}

# The age range of a model whose checkpoint does not record one (the data config's default
# [min_age, max_age]); training sets the train split's youngest and oldest age instead.
DEFAULT_AGE_RANGE = (0.0, 100.0)


class AgeNet(nn.Module):
    """The model itself: pixels -> backbone features -> head -> the loss's readout -> age in years.
    A plain nn.Module (no training logic), which is what export and inference need: its forward
    returns years whatever the loss, so agecls.export, agecls.predict and the server need not know it.

    The output scale (`age_mean`, `age_std`) is held by the loss (regression losses rescale with it)
    and saved under this module's keys `age_mean` / `age_std`, the ones checkpoints have always had.
    """

    SCALE_KEYS = ("age_mean", "age_std")

    def __init__(self, backbone: Backbone, head: MLPHead, pixel_mean: list[float], pixel_std: list[float],
                 channels_last: bool = False, loss: AgeLoss | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.loss = loss if loss is not None else build_loss(None)
        if self.head.out_features != self.loss.out_features:
            raise ValueError(f"the head's output is {self.head.out_features} wide but loss {self.loss.name} "
                             f"reads {self.loss.out_features}")
        self.channels_last = channels_last
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1))
        # the range predictions are clipped to (AgeRegressor.set_age_range); not in the state_dict
        # (older checkpoints have no such entries): it travels as hyperparameters age_min/age_max
        self.register_buffer("age_min", torch.tensor(DEFAULT_AGE_RANGE[0]), persistent=False)
        self.register_buffer("age_max", torch.tensor(DEFAULT_AGE_RANGE[1]), persistent=False)

    @staticmethod
    def float_images(images: torch.Tensor) -> torch.Tensor:
        """uint8 (0..255) RGB images as float in [0, 1]; float images as they are."""
        return images.float().div(255.0) if images.dtype == torch.uint8 else images

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features of uint8 (0..255) or float ([0, 1]) RGB images."""
        x = (self.float_images(images) - self.pixel_mean) / self.pixel_std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    @property
    def age_mean(self) -> torch.Tensor:
        return self.loss.age_mean

    @property
    def age_std(self) -> torch.Tensor:
        return self.loss.age_std

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self.SCALE_KEYS:
            value = getattr(self.loss, name)
            destination[prefix + name] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        # the scale goes to the loss's buffers; the rest as nn.Module loads it
        keys = {prefix + name: name for name in self.SCALE_KEYS}
        with torch.no_grad():
            for key, name in keys.items():
                if key in state_dict:
                    getattr(self.loss, name).copy_(state_dict[key])
                elif strict:
                    missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k not in keys}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def from_features(self, features: torch.Tensor, head_output: bool = False) -> torch.Tensor:
        """Age in years from backbone features (the head and the loss's readout); with
        head_output=True the head's output itself, (B, loss.out_features), which the loss takes."""
        output = self.head(features)
        return output if head_output else self.loss.readout(output)

    def readout(self, output: torch.Tensor) -> torch.Tensor:
        """Age in years, (B,), from the head's output."""
        return self.loss.readout(output)

    def forward(self, images: torch.Tensor, head_output: bool = False) -> torch.Tensor:
        return self.from_features(self.features(images), head_output)

    @staticmethod
    def tta_views(images: torch.Tensor, tta: str = "none") -> list[torch.Tensor]:
        """The views of `images` that test-time augmentation `tta` predicts on: none, the images;
        flip, the images and their horizontal flips. The one implementation of TTA (test stage,
        agecls.eval, the AgeEstimator, predict_years, predict_interval), whose predictions are the
        mean over the views."""
        return [images, torch.flip(images, dims=[-1])] if check_tta(tta) == "flip" else [images]

    def predict_years(self, images: torch.Tensor, tta: str = "none", plain: torch.Tensor | None = None) -> torch.Tensor:
        """Age in years, (B,), unclipped, with test-time augmentation `tta` (tta_views). `plain`:
        the prediction on `images` where the caller has it already (it is not computed again)."""
        views = self.tta_views(images, tta)
        years = [plain if k == 0 and plain is not None else self(v) for k, v in enumerate(views)]
        return torch.stack(years).mean(dim=0)

    def interval_from_outputs(self, outputs: Sequence[torch.Tensor], coverages: Sequence[float],
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(age_raw (B,), low_raw (B, C), high_raw (B, C)): the age and the *base* interval at each
        of the C `coverages` (agecls.intervals: before its conformal margin), from the head's
        outputs on one or more views of the same images (TTA: the views' ages and interval ends
        are averaged, as an exported graph run once per view gives them). For a loss with a label
        distribution, its central quantiles, each class taken as uniform over its year
        [a - 0.5, a + 0.5]; for a point loss, the age itself (zero width)."""
        views = [self._base_interval(o, coverages) for o in outputs]
        raw, low, high = (torch.stack([v[k] for v in views]).mean(dim=0) for k in range(3))
        return raw, low, high

    def _base_interval(self, output: torch.Tensor, coverages: Sequence[float],
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raw = self.readout(output)
        p = self.loss.distribution(output)
        if p is None:
            base = raw.unsqueeze(1).expand(-1, len(coverages))
            return raw, base, base
        cdf = torch.cumsum(p, dim=-1)
        qs = [(1.0 - c) / 2.0 for c in coverages] + [(1.0 + c) / 2.0 for c in coverages]
        q = torch.tensor(qs, dtype=cdf.dtype, device=cdf.device).view(1, -1, 1)  # (1, 2C, 1)
        idx = (cdf.unsqueeze(1) < q).sum(dim=-1).clamp(max=p.shape[-1] - 1)  # (B, 2C): the class holding quantile q
        before = torch.cat([torch.zeros_like(cdf[:, :1]), cdf[:, :-1]], dim=-1)
        frac = (q.squeeze(-1) - before.gather(1, idx)) / p.gather(1, idx).clamp_min(1e-12)
        ages = self.loss.ages.to(cdf.dtype)[idx] - 0.5 + frac.clamp(0.0, 1.0)
        n = len(coverages)
        return raw, ages[:, :n], ages[:, n:]

    def predict_interval(self, images: torch.Tensor, coverage: float, tta: str = "none",
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(age_raw, low_raw, high_raw), each (B,), unclipped: the age as predict_years gives it and
        the base interval at `coverage` (interval_from_outputs), with test-time augmentation `tta`."""
        outputs = [self(v, head_output=True) for v in self.tta_views(images, tta)]
        raw, low, high = self.interval_from_outputs(outputs, [coverage])
        return raw, low[:, 0], high[:, 0]

    def clip(self, ages: torch.Tensor) -> torch.Tensor:
        """Ages clipped to the model's age range: the readout of every prediction a user sees
        (test metrics, predictions.csv, agecls.predict, the exported graph). Training and
        validation use the raw output, whose gradient does not vanish outside the range."""
        return torch.clamp(ages, self.age_min, self.age_max)


class ClippedAgeNet(nn.Module):
    """What agecls.export writes: images -> (age clipped to the model's range, raw age, and the
    base interval at `coverage`: age_low_raw, age_high_raw, before the conformal margin that the
    exported spec records; agecls.intervals)."""

    OUTPUTS = ("age", "age_raw", "age_low_raw", "age_high_raw")

    def __init__(self, net: AgeNet, coverage: float = 0.9) -> None:
        super().__init__()
        self.net = net
        self.coverage = float(coverage)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raw, low, high = self.net.interval_from_outputs([self.net(images, head_output=True)], [self.coverage])
        return self.net.clip(raw), raw, low[:, 0], high[:, 0]


class AgeRegressor(L.LightningModule):
    """Backbone -> features -> MLP head -> age in years.

    Inputs are RGB images, either uint8 (0..255) or float in [0, 1], already resized to
    `image_size`; the module applies the normalisation its backbone was pretrained with, so data
    pipelines, `predict` and exported models all feed plain pixels.

    `loss` (conf/loss/<name>.yaml, a plain dict; None = the study's l1) decides the width of the
    head's output layer and how that output is read as an age (agecls.models.losses). With l1 the
    head predicts a standardised age, rescaled by the train split's mean and standard deviation
    (`age_mean`, `age_std`: stored in the checkpoint), and the loss is L1 on that standardised age,
    i.e. MAE in years / age_std: the study's L1 loss, at a scale at which lr 1e-4 works. Every
    loss's metrics are those of the ages its readout gives.

    Every constructor argument is a plain value or dict and is saved with the checkpoint, so
    `AgeRegressor.load_from_checkpoint(path)` rebuilds the model with no other argument.
    """

    # Test-time augmentation of the test stage (AgeNet.predict_years): none | flip. Not a
    # hyperparameter (a checkpoint does not carry it): agecls.train and agecls.eval set it from
    # their config's `tta` before testing, and record it in metrics.json.
    tta: str = "none"
    # The coverage of the per-face intervals of the test stage (predictions.csv predicted_low /
    # predicted_high, test/interval_coverage): set by agecls.eval from its config like tta.
    coverage: float = DEFAULT_COVERAGE

    def __init__(
        self,
        backbone: dict[str, Any],
        head: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        freeze: bool | int | str = False,
        pretrained: bool = True,
        image_size: int = 128,
        crop_pct: float = DEFAULT_CROP_PCT,
        age_mean: float | None = None,
        age_std: float | None = None,
        age_min: float | None = None,
        age_max: float | None = None,
        head_dropout: float = 0.0,
        cs_threshold: float = 5.0,
        channels_last: bool = False,
        compile: bool = False,
        loss: dict[str, Any] | None = None,
        mixup: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not scheduler:  # conf/scheduler/none.yaml interpolates as {}: no scheduler, saved as before
            self.hparams.scheduler = None
        # every parameter of the loss, defaults filled in: a checkpoint says exactly what it trained
        # with (one from before losses were configurable has none, and is the study's l1)
        self.hparams.loss = loss_config(loss)
        loss_fn = build_loss(self.hparams.loss)
        self.mixup = Mixup.from_config(mixup)  # checked here, before any data is read
        trunk = build_backbone(pretrained=pretrained, **backbone)
        trunk.freeze(freeze)
        self.net = AgeNet(
            trunk,
            MLPHead(trunk.num_features, head["hidden"], dropout=head_dropout, output_layer=loss_fn.output_layer),
            pixel_mean=backbone.get("mean") or trunk.default_mean,
            pixel_std=backbone.get("std") or trunk.default_std,
            channels_last=channels_last,
            loss=loss_fn,
        )
        self.register_buffer("age_stats_set", torch.tensor(False))
        if age_mean is not None and age_std is not None:
            self.set_age_stats(age_mean, age_std)
        if age_min is not None and age_max is not None:
            self.set_age_range(age_min, age_max)

        self.train_mae = MeanAbsoluteError()
        self.val_metrics = stage_metrics("val", cs_threshold)
        self.test_metrics = stage_metrics("test", cs_threshold)
        self.val_mae_best = MinMetric()
        self._test_outputs: list[dict[str, torch.Tensor]] = []
        self._val_outputs: list[dict[str, torch.Tensor]] = []
        self.test_results: dict[str, Any] | None = None
        # the per-face intervals' margins (agecls.intervals), fitted on the validation split at the
        # end of every validation epoch and saved with the weights they belong to
        self.calibration: Calibration | None = None

    # ------------------------------------------------------------------------------ checkpoints
    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: Any = "cpu",
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> AgeRegressor:
        """The model of an agecls checkpoint, read safely (agecls.utils.checkpoint.read_checkpoint:
        tensors and plain values only; a file that is not an agecls checkpoint raises
        CheckpointError). `kwargs` override saved hyperparameters, as in Lightning. The weights
        are loaded on `map_location` (CPU by default)."""
        if weights_only is False:
            raise ValueError("AgeRegressor.load_from_checkpoint reads only tensors and plain values "
                             "(weights_only=True); drop weights_only=False")
        if hparams_file is not None:
            raise ValueError("AgeRegressor.load_from_checkpoint takes its hyperparameters from the checkpoint; "
                             "pass changed ones as keyword arguments instead of hparams_file")
        return cls.from_checkpoint(read_checkpoint(checkpoint_path, map_location=map_location),
                                   path=str(checkpoint_path), strict=strict, **kwargs)

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any], path: str = "<checkpoint>", strict: bool | None = None,
                        **overrides: Any) -> AgeRegressor:
        """Build the model from a checkpoint dict already read (`read_checkpoint`): the constructor
        from its hyper_parameters, then the same hooks and state_dict load as Lightning's
        load_from_checkpoint, with no second read of the file."""
        hp = {**dict(checkpoint["hyper_parameters"]), **overrides}
        names = set(inspect.signature(cls.__init__).parameters) - {"self"}
        model = cls(**{k: v for k, v in hp.items() if k in names})
        strict = model.strict_loading if strict is None else strict
        model.on_load_checkpoint(checkpoint)  # type: ignore[arg-type]
        try:
            model.load_state_dict(checkpoint["state_dict"], strict=strict)
        except RuntimeError as err:
            raise CheckpointError(path, f"its state_dict does not fit the model its hyper_parameters describe ({err})") from err
        return model

    # ----------------------------------------------------------------------------------- model
    @property
    def backbone(self) -> Backbone:
        return self.net.backbone

    @property
    def head(self) -> MLPHead:
        return self.net.head

    @property
    def loss_fn(self) -> AgeLoss:
        """The loss: loss_fn(head output, ages in years) -> scalar; loss_fn.readout(head output) -> years."""
        return self.net.loss

    @property
    def loss_name(self) -> str:
        return loss_name(self.hparams.loss)

    @property
    def age_std(self) -> torch.Tensor:
        return self.net.age_std

    @property
    def age_mean(self) -> torch.Tensor:
        return self.net.age_mean

    def set_age_stats(self, mean: float, std: float) -> None:
        """Set the output scale from the training ages (mean, standard deviation, in years)."""
        std = max(float(std), 1e-3)
        self.net.age_mean.fill_(float(mean))
        self.net.age_std.fill_(std)
        self.age_stats_set.fill_(True)
        self.hparams.age_mean, self.hparams.age_std = float(mean), std

    def set_age_range(self, low: float, high: float) -> None:
        """Set the range predictions are clipped to (years): the train split's youngest and oldest age."""
        low, high = float(low), float(high)
        if not high >= low:
            raise ValueError(f"age range [{low}, {high}] is empty")
        self.net.age_min.fill_(low)
        self.net.age_max.fill_(high)
        self.hparams.age_min, self.hparams.age_max = low, high

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted age in years, shape (B,)."""
        return self.net(images)

    def param_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"params/total": total, "params/trainable": trainable}

    # ------------------------------------------------------------------------------- lifecycle
    def setup(self, stage: str) -> None:
        if self.backbone._frozen:
            # frozen layers are in eval mode on purpose (see Backbone.train)
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if not bool(self.age_stats_set) and dm is not None and hasattr(dm, "age_stats"):
            mean, std = dm.age_stats()
            self.set_age_stats(mean, std)
            log.info("Output scale from the train split: age mean %.2f, std %.2f years", mean, std)
        if self.hparams.get("age_min") is None and dm is not None and hasattr(dm, "age_range"):
            low, high = dm.age_range()
            self.set_age_range(low, high)
            log.info("Predictions are clipped to the train split's ages: %g to %g years", low, high)
        if self.hparams.channels_last:
            self.to(memory_format=torch.channels_last)
        if self.hparams.compile and stage == "fit":
            # in place (nn.Module.compile): parameters and state_dict keys stay those of self.net
            self.net.compile()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The checkpoint holds every weight: rebuilding it must not fetch ImageNet weights again
        # (which would fail offline), so it records pretrained=false and keeps the original apart.
        hp = checkpoint.get("hyper_parameters")
        if hp is not None:
            checkpoint["agecls"] = {"imagenet_init": bool(hp.get("pretrained", False))}
            hp["pretrained"] = False
            hp["age_mean"], hp["age_std"] = float(self.age_mean), float(self.age_std)
            hp["age_min"], hp["age_max"] = float(self.net.age_min), float(self.net.age_max)
        if self.calibration is not None:
            checkpoint[CHECKPOINT_KEY] = self.calibration.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.calibration = Calibration.from_checkpoint(checkpoint)  # checked field by field; None if never made
        # A checkpoint from before age ranges were stored: the data config's [min_age, max_age].
        if self.hparams.get("age_min") is None:
            saved = dict(checkpoint.get("hyper_parameters") or {})
            if saved.get("age_min") is not None and saved.get("age_max") is not None:
                self.set_age_range(saved["age_min"], saved["age_max"])
            else:
                data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
                self.set_age_range(data.get("min_age", DEFAULT_AGE_RANGE[0]), data.get("max_age", DEFAULT_AGE_RANGE[1]))

    def on_train_start(self) -> None:
        # The sanity check ran validation on an untrained model; forget it.
        self.val_metrics.reset()
        self.val_mae_best.reset()

    # ----------------------------------------------------------------------------------- steps
    def training_loss(self, output: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        """The configured loss of head outputs against ages in years (what training minimises;
        agecls.bench times the same)."""
        return self.net.loss(output, age)

    def _head_output(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # cached backbone features (data.feature_cache) go straight to the head; images go through
        # self.net's forward (the compiled one with compile=true)
        if "features" in batch:
            return self.net.from_features(batch["features"], head_output=True)
        return self.net(batch["image"], head_output=True)

    def _predict(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(head output, the age in years it reads out as, unclipped)."""
        output = self._head_output(batch)
        return output, self.net.readout(output)

    def _for_metrics(self, pred: torch.Tensor, age: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # float64 (where the device has it): Pearson/Spearman of nearly constant predictions
        # (an untrained model) lose digits in float32
        if pred.device.type == "mps":
            return pred.detach().float(), age.float()
        return pred.detach().double(), age.double()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        age = batch["age"].float()
        if self.mixup.enabled:  # the mixed faces (or cached features) and their mixed ages
            key = "features" if "features" in batch else "image"
            inputs = batch[key] if key == "features" else self.net.float_images(batch[key])
            mixed, age, _ = self.mixup(inputs, age, self.current_epoch, batch_idx, self.global_rank)
            batch = {**batch, key: mixed}
        output, pred = self._predict(batch)
        loss = self.training_loss(output, age)
        self.train_mae(pred.detach(), age)
        bs = age.shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        self.log("train/mae", self.train_mae, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        age = batch["age"].float()
        output, pred = self._predict(batch)
        self.log("val/loss", self.training_loss(output, age), on_epoch=True, sync_dist=True, batch_size=age.shape[0])
        self.val_metrics.update(*self._for_metrics(pred, age))
        if not self.trainer.sanity_checking:  # the base intervals the calibration is fitted on
            _, low, high = self.net.interval_from_outputs([output.detach()], LEVELS)
            self._val_outputs.append({"age": age.detach(), "low": low.float(), "high": high.float()})

    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def fit_calibration(self) -> Calibration | None:
        """The intervals' margins at LEVELS from this validation epoch's outputs (every rank's), or
        None when there were none."""
        local = {k: torch.cat([o[k] for o in self._val_outputs]) if self._val_outputs else torch.empty(0, len(LEVELS))
                 for k in ("age", "low", "high")}
        local["age"] = local["age"].reshape(-1)
        self._val_outputs = []
        if self.trainer.world_size > 1:
            local = {k: torch.cat(gather_all_tensors(v.to(self.device))) for k, v in local.items()}
        age = local["age"].double().cpu().numpy()
        if age.size == 0:
            return None
        low, high = (local[k].double().cpu().numpy() for k in ("low", "high"))
        return Calibration.fit(age, {c: low[:, i] for i, c in enumerate(LEVELS)},
                               {c: high[:, i] for i, c in enumerate(LEVELS)}, self.net.loss.interval_base, split="val",
                               epoch=int(self.current_epoch) + 1, tta="none")

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        mae = values.pop("val/mae")
        self.log("val/mae", mae, prog_bar=True)
        self.log_dict(values)
        if not self.trainer.sanity_checking:
            self.val_mae_best(mae)
            self.log("val/mae_best", self.val_mae_best.compute(), prog_bar=True)
            calibration = self.fit_calibration()
            if calibration is not None:
                self.calibration = calibration
                margin = calibration.margin(DEFAULT_COVERAGE)
                if math.isfinite(margin):
                    self.log("val/interval_margin", margin)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        age = batch["age"].float()
        output = self._head_output(batch)
        if self.tta != "none":  # the mean with the prediction on the flipped images
            if "image" not in batch:
                raise RuntimeError(
                    f"tta={self.tta} needs the test images, but this test loader gives cached backbone features "
                    f"(data.feature_cache=true); test with tta=none, or evaluate the checkpoint with "
                    f"`python -m agecls.eval ckpt_path=PATH tta={self.tta}`")
            outputs = [output] + [self.net(v, head_output=True) for v in self.net.tta_views(batch["image"], self.tta)[1:]]
        else:
            outputs = [output]
        raw, low, high = self.net.interval_from_outputs([o.detach() for o in outputs], [self.coverage])
        pred = self.net.clip(raw)  # test metrics are those of the ages a user gets
        # the loss of the head's output, as val/loss (a class distribution has no clipped form);
        # with tta, of the unaugmented pass
        self.log("test/loss", self.training_loss(output, age), on_epoch=True, sync_dist=True, batch_size=age.shape[0])
        self.test_metrics.update(*self._for_metrics(pred, age))
        self._test_outputs.append({"index": batch["index"].detach(), "age": age.detach(), "pred": pred.detach().float(),
                                   "raw": raw.detach().float(), "low": low[:, 0].float(), "high": high[:, 0].float()})

    def on_test_epoch_start(self) -> None:
        self._test_outputs = []
        self.test_results = None

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute()
        self.test_metrics.reset()
        self.log_dict(values)
        local = {k: torch.cat([o[k] for o in self._test_outputs]) if self._test_outputs else torch.empty(0)
                 for k in ("index", "age", "pred", "raw", "low", "high")}
        # Every rank's predictions, so rank 0 can write one predictions.csv. Ranks may hold
        # different numbers of images (an unpadded distributed sampler): gather_all_tensors pads
        # and trims; any repeats a padded sampler adds are dropped by index.
        if self.trainer.world_size > 1:
            gathered = {k: torch.cat(gather_all_tensors(v.to(self.device))) for k, v in local.items()}
        else:
            gathered = local
        index = gathered["index"].reshape(-1).cpu().numpy()
        age = gathered["age"].reshape(-1).cpu().numpy()
        pred = gathered["pred"].reshape(-1).cpu().numpy()
        raw = gathered["raw"].reshape(-1).cpu().numpy()
        _, first = np.unique(index, return_index=True)
        self.test_results = {"index": index[first], "age": age[first], "predicted": pred[first], "predicted_raw": raw[first]}
        if self.calibration is not None:  # the calibrated interval of each face, and how often it holds the age
            low, high = self.calibration.apply(gathered["low"].reshape(-1).cpu().numpy()[first],
                                               gathered["high"].reshape(-1).cpu().numpy()[first], self.coverage,
                                               (float(self.net.age_min), float(self.net.age_max)))
            self.test_results.update(predicted_low=low, predicted_high=high)
            covered, width = coverage_and_width(age[first], low, high)
            self.log_dict({"test/interval_coverage": covered, "test/interval_width": width})
        self._test_outputs = []

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        _, raw = self._predict(batch)
        return {"index": batch["index"], "predicted": self.net.clip(raw), "predicted_raw": raw}

    # -------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = hydra.utils.instantiate(dict(self.hparams.optimizer or DEFAULT_OPTIMIZER))(params=params)
        sched_cfg = dict(self.hparams.scheduler or {})
        if not sched_cfg.get("_target_"):
            return optimizer
        interval = sched_cfg.pop("interval", "epoch")
        if sched_cfg["_target_"].endswith("OneCycleLR"):
            total = int(sched_cfg.setdefault("total_steps", int(self.trainer.estimated_stepping_batches)))
            interval = "step"
            # OneCycleLR divides by each phase's length: a very short run (a smoke test, a tiny data
            # set) needs each phase to keep at least a step, or has too few steps for a cycle at all
            if total < 3:
                log.warning("scheduler=onecycle: %d optimizer steps in all, too few for a cycle; training "
                            "at a constant lr=%s instead", total, self.hparams.optimizer.get("lr"))
                return optimizer
            pct = float(sched_cfg.get("pct_start", 0.3))
            fitted = min(max(pct, 2.0 / total), (total - 1.5) / total)
            if fitted != pct:
                log.warning("scheduler=onecycle: pct_start=%g leaves a phase without a step in a %d-step run; "
                            "using %.3f", pct, total, fitted)
                sched_cfg["pct_start"] = fitted
        scheduler = hydra.utils.instantiate(sched_cfg)(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}
