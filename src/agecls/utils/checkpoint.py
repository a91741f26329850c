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


# --------------------------------------------------------------------------------------- resume
# What a resumed run must share with the checkpoint it continues, as (where the checkpoint keeps
# it, the config key a person sets). The network: another one cannot take the checkpoint's weights
# or optimizer state at all (Lightning would list every state-dict key it could not place).
NETWORK_KEYS = (
    ("backbone.name", "backbone.name"), ("backbone.source", "backbone.source"),
    ("backbone.weights", "backbone.weights"), ("backbone.num_features", "backbone.num_features"),
    ("head.hidden", "head.hidden"), ("loss", "loss"), ("freeze", "freeze"),
)
# What it is trained on: resuming on other data or another image size continues a different run;
# allowed with resume.allow_changed=true (with a warning).
DATA_KEYS = (
    ("image_size", "data.image_size"), ("crop_pct", "data.crop_pct"),
    ("data.source", "data.source"), ("data.root", "data.root"), ("data.splits", "data.splits"),
    ("data.split_seed", "data.split_seed"), ("data.split_file", "data.split_file"),
    ("data.test_list", "data.test_list"),
    ("data.min_age", "data.min_age"), ("data.max_age", "data.max_age"),
    ("data.min_face_score", "data.min_face_score"), ("data.deduplicate", "data.deduplicate"),
    ("data.num_samples", "data.num_samples"), ("data.synthetic_size", "data.synthetic_size"),
    ("data.subset", "data.subset"), ("data.align", "data.align"),
)
_MISSING = object()


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _same(key: str, old: Any, new: Any) -> bool:
    if key == "data.root" and old is not None and new is not None:
        return Path(str(old)).expanduser().resolve() == Path(str(new)).expanduser().resolve()
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(_same(key, a, b) for a, b in zip(old, new, strict=True))
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
        return float(old) == float(new)
    return old == new


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def resume_changes(ckpt: Mapping[str, Any], run: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(network changes, data changes) between a checkpoint and the run that would resume it, each
    `key: old -> new`. `run` holds the run's model arguments (backbone, head, loss, freeze,
    image_size, ...) with the data module's under `data`; a key either side lacks is not compared."""
    saved = dict(ckpt.get("hyper_parameters") or {})
    saved["data"] = dict(ckpt.get("datamodule_hyper_parameters") or {})
    found: tuple[list[str], list[str]] = ([], [])
    for out, keys in zip(found, (NETWORK_KEYS, DATA_KEYS), strict=True):
        for where, name in keys:
            old, new = _lookup(saved, where), _lookup(run, where)
            if old is _MISSING or new is _MISSING or _same(name, old, new):
                continue
            out.append(f"{name}: {_show(old)} -> {_show(new)}")
    return found


def check_resume(path: str | Path, ckpt: Mapping[str, Any], run: Mapping[str, Any], allow_changed: bool) -> list[str]:
    """Raise ConfigValueError where the run differs from the checkpoint it resumes: always for
    another network; for other data or image size unless `allow_changed` (then the differences are
    returned, for a warning)."""
    from agecls.utils.checks import ConfigValueError

    network, data = resume_changes(ckpt, run)
    name = Path(path).name
    if network:
        raise ConfigValueError(
            f"ckpt_path={str(path)!r} cannot be resumed by this run: its network differs "
            f"({'; '.join(network)}). A run resumes with the backbone, head, loss and freeze it was "
            f"trained with: add those of the checkpoint (its run's .hydra/config.yaml), or start a "
            "new run without ckpt_path."
        )
    if data and not allow_changed:
        raise ConfigValueError(
            f"ckpt_path={str(path)!r} was trained on other data than this run would resume on "
            f"({'; '.join(data)}). Resume with the checkpoint's values (its run's .hydra/config.yaml), "
            f"or add resume.allow_changed=true to continue {name} on the new ones."
        )
    return data
