"""The exported model's spec is checked against the graph (issue 18.5): a `.json` with a wrong
short side, an age range the graph was not exported with, an unknown spec version, no
preprocessing steps or values of the wrong type is refused, naming the key and the file; the
`.onnx` carries the spec in its metadata, so it predicts the same ages without its `.json`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from agecls.deploy import METADATA_KEY, OnnxAgeModel, SpecError, read_spec
from agecls.export import export_model
from agecls.models.module import AgeRegressor


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model (resnet18, 32 px, no ImageNet weights, ages clipped to [1, 90]) exported to ONNX."""
    torch.manual_seed(0)
    model = AgeRegressor(backbone={"name": "resnet18", "source": "torchvision"}, head={"name": "small", "hidden": [16]},
                         pretrained=False, image_size=32, age_mean=33.0, age_std=19.0, age_min=1.0, age_max=90.0)
    return export_model(model.eval(), "onnx", tmp_path_factory.mktemp("export") / "model.onnx")


def _copy(exported: Path, dest: Path, edit: Any = None, with_json: bool = True) -> Path:
    """The exported .onnx copied into `dest`, with its .json (edited by `edit(spec)`) or without."""
    dest.mkdir(parents=True, exist_ok=True)
    onnx = dest / exported.name
    shutil.copy(exported, onnx)
    if with_json:
        spec = json.loads(exported.with_suffix(".json").read_text())
        if edit is not None:
            edit(spec)
        onnx.with_suffix(".json").write_text(json.dumps(spec))
    return onnx


def _resize(spec: dict[str, Any]) -> dict[str, Any]:
    return next(s for s in spec["preprocess"] if s["op"] == "resize")


def _batch() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)


# The cases: each edit of the .json, and the key its error must name.
BAD_SPECS = {
    "short_side": (lambda s: _resize(s).update(short_side=200), "preprocess[2].short_side"),
    "age_range": (lambda s: s.update(age_range=[0.0, 10.0]), "age_range"),
    "spec_version": (lambda s: s.update(spec_version=99), "spec_version"),
    "preprocess": (lambda s: s.update(preprocess=[]), "preprocess"),
    "image_size_type": (lambda s: s.update(image_size="32"), "image_size"),
    "crop_pct_type": (lambda s: s.update(crop_pct=None), "crop_pct"),
    "short_side_type": (lambda s: _resize(s).update(short_side="36"), "preprocess[2].short_side"),
    "age_range_type": (lambda s: s.update(age_range="1-90"), "age_range"),
    "input_type": (lambda s: s.update(input=[1, 3, 32, 32]), "input"),
    "interval_margin": (lambda s: s.update(interval={"coverage": 0.9, "margin": "wide", "n": 10,
                                                     "base": "point"}), "interval.margin"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_a_bad_json_is_refused_naming_the_key_and_the_file(exported, tmp_path, case) -> None:
    edit, key = BAD_SPECS[case]
    onnx = _copy(exported, tmp_path, edit)
    for load in (read_spec, OnnxAgeModel):
        with pytest.raises(SpecError) as err:
            load(onnx)
        message = str(err.value)
        assert f"{key}=" in message or f"{key} differs" in message, message
        assert str(onnx.with_suffix(".json")) in message, message


def test_an_age_range_the_graph_was_not_exported_with_names_both_values_and_both_files(exported, tmp_path) -> None:
    onnx = _copy(exported, tmp_path, lambda s: s.update(age_range=[0.0, 10.0]))
    with pytest.raises(SpecError, match=r"age_range differs") as err:
        read_spec(onnx)
    message = str(err.value)
    assert "[0.0, 10.0]" in message and "[1.0, 90.0]" in message, message
    assert str(onnx.with_suffix(".json")) in message and f"{onnx} (metadata_props" in message, message


def test_a_json_alone_is_checked_as_well(exported, tmp_path) -> None:
    """Without the graph's copy (a TorchScript export, an .onnx from before the metadata), the .json's own checks."""
    spec = json.loads(exported.with_suffix(".json").read_text())
    spec.update(format="torchscript", age_range=[50.0, 10.0])
    (tmp_path / "m.json").write_text(json.dumps(spec))
    with pytest.raises(SpecError, match=r"age_range=\[50.0, 10.0\]: must be \[low, high\] with low < high"):
        read_spec(tmp_path / "m.pt")
    spec.update(age_range=[0.0, float("inf")])
    (tmp_path / "m.json").write_text(json.dumps(spec))
    with pytest.raises(SpecError, match=r"age_range=.*must be a finite number"):
        read_spec(tmp_path / "m.pt")


def test_the_onnx_alone_predicts_what_it_does_with_its_json(exported, tmp_path) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    stored = json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])
    assert stored == json.loads(exported.with_suffix(".json").read_text())

    alone = _copy(exported, tmp_path / "alone", with_json=False)
    assert not alone.with_suffix(".json").exists()
    assert read_spec(alone) == read_spec(exported) == stored
    with_json, without = OnnxAgeModel(exported), OnnxAgeModel(alone)
    assert without.age_range == with_json.age_range == (1.0, 90.0)
    assert without.image_size == with_json.image_size == 32
    np.testing.assert_array_equal(without.raw(_batch()), with_json.raw(_batch()))


def test_a_json_of_another_model_is_refused(exported, tmp_path) -> None:
    onnx = _copy(exported, tmp_path, lambda s: s.update(backbone="resnet50"))
    with pytest.raises(SpecError, match=r"backbone differs: \"resnet50\" in .*model.json, but \"resnet18\" in .*model.onnx"):
        OnnxAgeModel(onnx)
