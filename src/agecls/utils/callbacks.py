"""Lightning callbacks of agecls."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import numpy as np
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import EMAWeightAveraging, RichProgressBar, TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE


class RNGStateCallback(L.Callback):
    """Saves the process's RNG states (python, numpy, torch) in every checkpoint and restores them
    on resume, so randomness drawn in the main process (dropout, say) continues exactly where the
    interrupted run left it. Data order and augmentation are seeded per epoch and sample already
    (agecls.data.samplers).

    numpy's state holds an array, which torch.load(weights_only=True) refuses; it is stored as a list.
    """

    def state_dict(self) -> dict[str, Any]:
        states = _collect_rng_states(include_cuda=True)
        name, keys, pos, has_gauss, cached = states["numpy"]
        states["numpy"] = [name, keys.tolist(), pos, has_gauss, cached]
        return {"rng_states": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = dict(state_dict.get("rng_states") or {})
        if not states:
            return
        if "numpy" in states:
            name, keys, pos, has_gauss, cached = states["numpy"]
            states["numpy"] = (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
        _set_rng_states(states)


class WeightEMA(EMAWeightAveraging):
    """An exponential moving average of the weights (and BatchNorm buffers), updated after every
    optimizer step: `callbacks.ema.decay=0.997`. Validation, the checkpoints' `state_dict` (what
    eval, export, predict and the test stage load) and the interval calibration use the average;
    the training weights travel beside it in `current_model_state`, so a resumed run continues
    from them and `python -m agecls.eval ... eval.weights=current` measures the same run without
    the average.

    Lightning's callback reloads `current_model_state` into the model whenever a checkpoint is
    loaded, including the test stage after fit (`trainer.test(ckpt_path="best")`), which would then
    test the raw weights; here only a resumed fit does.
    """

    def __init__(self, decay: float = 0.997, **kwargs: Any) -> None:
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"callbacks.ema.decay={decay!r}; give a number between 0 and 1 (0.997 averages "
                             "over about 1/(1-decay) = 333 optimizer steps), or null for no average")
        super().__init__(decay=float(decay), **kwargs)
        self.decay = float(decay)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


def weight_ema(decay: float | None = None, **kwargs: Any) -> WeightEMA | None:
    """`callbacks.ema`: a WeightEMA with this decay, or no callback when decay is null (the default)."""
    return None if decay is None else WeightEMA(decay=decay, **kwargs)


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class EpochSummary(L.Callback):
    """One INFO line per training epoch, for the console and the run's log file, whether or not
    a progress bar runs (under nohup or SLURM there is none to read):

        Epoch 3/50: train loss 0.412, val MAE 6.84, val Pearson 0.871, 41.2 s (about 32 min 58 s left)

    The time left is the mean epoch time so far times the epochs left (an upper bound when early
    stopping or max_time ends the run sooner). Without a progress bar (no terminal), a long epoch
    also gets a line every `within_epoch_s` seconds (0: never):

        Epoch 1/50: batch 120/265 (45%), train loss 0.731, 1 min 40 s left in this epoch
    """

    def __init__(self, logger_name: str = __name__, within_epoch_s: float = 120.0) -> None:
        self._log = logging.getLogger(logger_name)
        self._start: float | None = None
        self._durations: list[float] = []
        self._validated = False
        self.within_epoch_s = float(within_epoch_s)
        self._last_line = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._last_line = self._start
        self._validated = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (self.within_epoch_s <= 0 or self._start is None or trainer.progress_bar_callback is not None
                or not trainer.is_global_zero):
            return
        now = time.perf_counter()
        if now - self._last_line < self.within_epoch_s:
            return
        self._last_line = now
        done, total = batch_idx + 1, trainer.num_training_batches
        text = f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: batch {done}"
        loss = trainer.callback_metrics.get("train/loss_step", trainer.callback_metrics.get("train/loss"))
        if isinstance(total, int) and total > 0:
            text += f"/{total} ({100 * done / total:.0f}%)"
        if loss is not None:
            text += f", train loss {float(loss):.4f}"
        if isinstance(total, int) and total > done:
            text += f", {_duration((now - self._start) / done * (total - done))} left in this epoch"
        self._log.info("%s", text)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is None:
            return
        took = time.perf_counter() - self._start
        self._start = None
        self._durations.append(took)
        if not trainer.is_global_zero:
            return
        self._log.info("%s", self.line(trainer, took))

    def line(self, trainer: L.Trainer, took: float) -> str:
        metrics = trainer.callback_metrics
        epoch = trainer.current_epoch + 1
        total = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
        parts = []
        loss = metrics.get("train/loss_epoch", metrics.get("train/loss"))
        if loss is not None:
            parts.append(f"train loss {float(loss):.4f}")
        if self._validated:
            for key, name, fmt in (("val/mae", "val MAE", ".2f"), ("val/pearson", "val Pearson", ".3f")):
                if key in metrics:
                    parts.append(f"{name} {float(metrics[key]):{fmt}}")
        parts.append(_duration(took))
        text = f"Epoch {epoch}/{total if total is not None else '?'}: " + ", ".join(parts)
        if total is not None and epoch < total:
            left = sum(self._durations) / len(self._durations) * (total - epoch)
            text += f" (about {_duration(left)} left)"
        return text


def epoch_progress_bar() -> L.Callback:
    """Lightning's progress bar (Rich's where rich is installed, as Lightning picks), its epochs
    counted from 1 as EpochSummary's lines count them ("Epoch 1/50", not Lightning's "Epoch 0/49")."""
    return RichEpochProgressBar() if _RICH_AVAILABLE else TQDMEpochProgressBar()


def _epoch_text(trainer: L.Trainer) -> str:
    total = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
    return f"Epoch {trainer.current_epoch + 1}" + (f"/{total}" if total is not None else "")


class RichEpochProgressBar(RichProgressBar):
    """Rich's bar with epochs counted from 1 (epoch_progress_bar)."""

    def _get_train_description(self, current_epoch: int) -> str:
        text = _epoch_text(self.trainer)
        if len(self.validation_description) > len(text):  # as Rich's: no flicker between the two bars
            text = f"{text:{len(self.validation_description)}}"
        return text


class TQDMEpochProgressBar(TQDMProgressBar):
    """tqdm's bar with epochs counted from 1 (epoch_progress_bar)."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(_epoch_text(trainer))
