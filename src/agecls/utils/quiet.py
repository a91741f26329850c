"""Silence known third-party noise at its source: messages that tell a person running agecls
nothing about their run. Called once when the `agecls` package is imported (before torch or
Lightning are), so it also covers what those print while being imported; idempotent.

What is silenced, and why it is noise here:
- Lightning's "💡 Tip: ... litlogger / litmodels" advertisements (logged at INFO through
  `lightning.pytorch.utilities.rank_zero`, unconditionally; Lightning has no switch for them, see
  Lightning-AI/pytorch-lightning#21294): dropped by a filter on that logger, which keeps its other
  messages (GPU available, checkpoint restored, ...).
- torchmetrics' "SpearmanCorrcoef will save all targets and predictions" (agecls keeps one
  epoch's predictions on purpose: a few thousand numbers).
- torch's FutureWarning "`isinstance(treespec, LeafSpec)` is deprecated", raised inside
  Lightning's own code, not agecls's.
- torch.utils.cpp_extension's "No CUDA runtime is found, using CUDA_HOME=..." (a CPU machine with
  a CUDA toolkit; torch.compile imports it).
- the INFO chatter of onnx_ir / onnxscript (80+ lines per ONNX export: every pass it runs).
(The Optuna sweeper's `alembic` "setup plugin" lines are set to WARNING in conf/hydra/default.yaml,
where Hydra's own logging is configured.)
"""

from __future__ import annotations

import logging
import warnings

QUIET_LOGGERS = {
    "torch.utils.cpp_extension": logging.ERROR,
    "onnx_ir": logging.WARNING,
    "onnxscript": logging.WARNING,
}

IGNORED_WARNINGS = (
    (r"Metric `SpearmanCorrcoef` will save all targets", UserWarning),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)


class _DropLightningTips(logging.Filter):
    """Drops Lightning's "💡 Tip:" advertisements (litlogger, litmodels)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        return not (msg.startswith("💡 Tip:") and ("litlogger" in msg or "litmodels" in msg))


def quiet_third_party() -> None:
    """Safe to call again: warning filters can be reset by whoever runs agecls (pytest restores
    its own after every test), so the entry points call this once more when they start."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "pytorch_lightning.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in logger.filters):
            logger.addFilter(_DropLightningTips())
    for message, category in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)  # replaces an equal one
