"""Per-sample transforms: the study's augmentation for training, resize + centre crop for evaluation.

They work on PIL images, as torchvision's transforms are usually used (Pillow's C kernels for
resize, rotation and affine warps are faster than the same ops on single tensors), and end in
uint8 CHW tensors: pixels stay 8-bit until the model (which knows its backbone's normalisation)
converts them, so batches are 4x smaller to collate, pin and copy to the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torchvision.transforms import InterpolationMode, v2

from agecls.deploy import DEFAULT_CROP_PCT


def eval_resize(image_size: int, crop_pct: float) -> int:
    """Side to resize to before the centre crop (timm's convention: image_size / crop_pct)."""
    return int(math.floor(image_size / float(crop_pct or 1.0)))


def eval_transform(image_size: int, crop_pct: float = DEFAULT_CROP_PCT) -> v2.Compose:
    return v2.Compose(
        [
            v2.Resize(eval_resize(image_size, crop_pct), interpolation=InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(image_size),
            v2.PILToTensor(),
        ]
    )


def train_transform(image_size: int, augment: Mapping[str, Any] | None, crop_pct: float = DEFAULT_CROP_PCT) -> v2.Compose:
    """The study's augmentation, in its order: flip, colour jitter, rotation, random resized crop,
    affine. Every sample gets its own draw, a new one every epoch. A null option is skipped."""
    if not augment or not augment.get("enabled", True):
        return eval_transform(image_size, crop_pct)
    steps: list[Any] = []
    if augment.get("hflip"):
        steps.append(v2.RandomHorizontalFlip(p=float(augment["hflip"])))
    if augment.get("color_jitter"):
        b, c, s, h = (float(v) for v in augment["color_jitter"])
        steps.append(v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h))
    if augment.get("rotation"):
        steps.append(v2.RandomRotation(degrees=float(augment["rotation"]), interpolation=InterpolationMode.BILINEAR))
    if augment.get("resized_crop_scale"):
        steps.append(
            v2.RandomResizedCrop(
                image_size,
                scale=tuple(float(v) for v in augment["resized_crop_scale"]),
                ratio=tuple(float(v) for v in augment.get("resized_crop_ratio") or (3 / 4, 4 / 3)),
                antialias=True,
            )
        )
    else:
        steps.append(v2.Resize(image_size, antialias=True))
        steps.append(v2.CenterCrop(image_size))
    translate, scale, shear = augment.get("affine_translate"), augment.get("affine_scale"), augment.get("affine_shear")
    if translate or scale or shear:
        steps.append(
            v2.RandomAffine(
                degrees=0,
                translate=tuple(float(v) for v in translate) if translate else None,
                scale=tuple(float(v) for v in scale) if scale else None,
                shear=float(shear) if shear else None,
                interpolation=InterpolationMode.BILINEAR,
            )
        )
    steps.append(v2.PILToTensor())
    return v2.Compose(steps)
