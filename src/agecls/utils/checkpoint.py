"""Reading checkpoints safely: tensors and plain values only, never code.

A `.ckpt` is a pickle, and a pickle can name any function to call while it loads. Every place
agecls reads a checkpoint (eval, predict, export, resume, `AgeRegressor.load_from_checkpoint`)
goes through `read_checkpoint`, which loads with `torch.load(weights_only=True)`: tensors, numbers,
strings, lists and dicts, nothing else, and no allow-list of other globals. Whatever goes wrong
(not a file, not a checkpoint, something that is not plain data, no agecls model in it) ends as
one `CheckpointError` that names the path and what was expected.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

EXPECTED = "an agecls checkpoint written by agecls.train (a .ckpt with hyper_parameters.backbone and state_dict)"


class CheckpointError(ValueError):
    """A file given as a checkpoint is not one agecls can load (safely)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"ckpt_path={str(path)!r} is not {EXPECTED}: {reason}")


def _load_failure(path: Path, err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, pickle.UnpicklingError) and "weights only" in text.lower():
        # torch's message: "Weights only load failed ... Unsupported global: GLOBAL module.name ..."
        detail = next((line.strip() for line in text.splitlines() if "Unsupported" in line or "global" in line.lower()), "")
        return ("it holds objects other than tensors and plain values, which could run code when loaded; "
                f"it was refused (torch.load weights_only=True{': ' + detail if detail else ''})")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(16)
        if not head.startswith(b"\x80"):  # neither torch.save's zip archive nor a (legacy) pickle
            return f"it is not a file torch.save wrote (it starts with {head!r})"
    first = text.splitlines()[0] if text else ""
    return f"torch.load cannot read it ({type(err).__name__}: {first[:200]})"


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint dict at `path`, loaded with weights_only=True and checked to be an agecls
    checkpoint (a `state_dict` and `hyper_parameters` with `backbone` and `head`).

    Raises FileNotFoundError for a path that does not exist and CheckpointError for anything else.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path={str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(path, "it is not a file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - every way a file can fail to unpickle ends here
        # from None: torch's own advice ("re-run with weights_only=False") is wrong for such a file
        raise CheckpointError(path, _load_failure(path, err)) from None
    check_checkpoint(ckpt, path)
    return ckpt


def check_checkpoint(ckpt: Any, path: str | Path) -> None:
    """Raise CheckpointError unless `ckpt` (a loaded dict) holds an agecls model."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(path, f"it holds a {type(ckpt).__name__}, not a dict")
    missing = [k for k in ("state_dict", "hyper_parameters") if k not in ckpt]
    if missing:
        raise CheckpointError(path, f"it has no {' and no '.join(missing)} (keys: {', '.join(map(str, ckpt)) or 'none'})")
    if not isinstance(ckpt["state_dict"], Mapping):
        raise CheckpointError(path, f"its state_dict is a {type(ckpt['state_dict']).__name__}, not a dict of tensors")
    hp = ckpt["hyper_parameters"]
    if not isinstance(hp, Mapping):
        raise CheckpointError(path, f"its hyper_parameters is a {type(hp).__name__}, not a dict")
    for key in ("backbone", "head"):
        if not isinstance(hp.get(key), Mapping):
            raise CheckpointError(path, f"its hyper_parameters has no {key} dict (another model's checkpoint?)")
