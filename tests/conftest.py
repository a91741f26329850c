"""Shared fixtures: the real Hydra config composed for tests (CPU, tiny, offline, tmp outputs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from agecls.utils.hydra_utils import config_dir

# The default data set (synthetic), small: 120 images of 48 px.
SYNTHETIC = ["data.num_samples=120", "data.synthetic_size=48"]

# Tests never download: no ImageNet weights, no data (an unset TORCH_HOME would read ~/.cache).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
UTKFACE_DIR = Path(os.environ.get("AGECLS_UTKFACE_DIR", REPO.parent / "shared" / "data" / "utkface"))

# Overrides that make any run tiny: 32 px images, a few batches, CPU, no workers.
TINY = [
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "data.image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "pretrained=false",
]


def utkface_dir() -> Path:
    if not UTKFACE_DIR.is_dir():
        pytest.fail(
            f"The real UTKFace folder is missing at {UTKFACE_DIR}; set AGECLS_UTKFACE_DIR "
            "(the Makefile and .ci/run default it to ../shared/data/utkface)."
        )
    return UTKFACE_DIR


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache (image indexes, synthetic data) for the whole session: indexing happens once."""
    path = Path(os.environ.get("AGECLS_TEST_CACHE_DIR") or tmp_path_factory.mktemp("agecls-cache"))
    os.environ["AGECLS_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(autouse=True)
def _isolated_torch_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty TORCH_HOME: no test can pick up weights someone cached on this machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))


def compose_cfg(overrides: list[str], output_dir: Path, config_name: str = "train") -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=False)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path, cache_dir: Path):
    """make_cfg(*overrides) -> a composed train config writing into tmp_path/run."""

    def _make(*overrides: str, tiny: bool = True, config_name: str = "train") -> DictConfig:
        synthetic = not any(o.startswith("data=") for o in overrides)
        over = [*(TINY if tiny else []), *(SYNTHETIC if synthetic and tiny else []), f"paths.cache_dir={cache_dir}", *overrides]
        given = [o.split("=", 1)[1] for o in overrides if o.startswith("paths.output_dir=")]
        return compose_cfg(over, Path(given[-1]) if given else tmp_path / "run", config_name)

    return _make
