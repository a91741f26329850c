"""The study's augmentation applied to a whole batch on its device, each image with its own draw.

torchvision's v2 transforms applied to a batch draw one set of parameters for the whole batch;
the study augments per sample. Here every sample's parameters are drawn exactly as torchvision's
per-sample transforms draw them (RandomHorizontalFlip, ColorJitter with its random order,
RandomRotation, RandomResizedCrop with its ten attempts and fallback, RandomAffine with integer
translations), then applied to the batch at once:

* colour: per-sample factors, in each sample's own order, before the geometry as in the study.
  Brightness and contrast are Kornia's torchvision-compatible kernels; saturation and hue are
  written here because Kornia's measured 10x and 3.5x slower on the CPU (see `saturation`,
  `hue_shift`); Kornia's ColorJitter would also draw one order for the whole batch;
* geometry: flip, rotation, resized crop and affine are all affine maps, so their inverse
  matrices (torchvision's `_get_inverse_affine_matrix` conventions, centre-origin pixel
  coordinates) are composed per sample and the batch is resampled once with `grid_sample`.
  One bilinear interpolation instead of three: sharper, and measured faster than Kornia's
  sequential RandomRotation -> RandomResizedCrop -> RandomAffine (see benchmarks/README.md).

Parameters are drawn on the CPU from a generator the caller seeds (agecls seeds it per batch
from (seed, epoch, first sample)), so runs repeat and resume exactly; only the pixel work runs on
the batch's device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from kornia.enhance import adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction

log = logging.getLogger(__name__)


@dataclass
class AugmentParams:
    """Per-sample parameters (CPU tensors, first dimension N)."""

    flip: torch.Tensor        # bool: horizontal flip
    jitter: torch.Tensor      # (N, 4): brightness, contrast, saturation factors; hue shift in turns
    order: torch.Tensor       # (N, 4) long: each sample's order of the four colour adjustments
    angle: torch.Tensor       # rotation, degrees (counter-clockwise)
    crop: torch.Tensor        # (N, 4): top, left, height, width of the resized crop, source pixels
    translate: torch.Tensor   # (N, 2): affine shift, whole output pixels
    scale: torch.Tensor       # affine zoom
    shear: torch.Tensor       # (N, 2): affine shear, degrees

    def take(self, rows: slice) -> AugmentParams:
        return AugmentParams(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo


class BatchAugment:
    """Per-sample augmentation of uint8 or float batches (N, 3, H, W) -> float (N, 3, S, S) in [0, 1].

    Options are those of `data.augment` (see conf/data/_base.yaml); a missing or null option is
    skipped, as in the per-sample pipeline.
    """

    def __init__(self, out_size: int, augment: Mapping[str, Any], chunk: int | None = None) -> None:
        self.size = int(out_size)
        # torch.compile fuses the colour jitter (`jitter_fused`) into a few loops: the whole
        # augmentation measured 29 ms per 64 images on 2 CPU cores against 53 ms eager
        # (benchmarks/augment_speed.py), for a one-off compile of a few seconds. Falls back to eager where compiling fails (no C++ compiler).
        self.compile = bool((augment or {}).get("compile", True))
        self._compiled_jitter: Any = None
        # Samples processed together. On the CPU the pixel work is memory-bound: chunks of 8
        # images (a few MB) stay in cache and run 1.8x faster than whole batches (measured);
        # on a GPU the whole batch goes at once.
        self.chunk = chunk
        a = dict(augment or {})
        self.hflip = float(a.get("hflip") or 0.0)
        cj = a.get("color_jitter")
        self.jitter = tuple(float(v) for v in cj) if cj else None
        self.rotation = float(a.get("rotation") or 0.0)
        self.crop_scale = tuple(float(v) for v in a["resized_crop_scale"]) if a.get("resized_crop_scale") else None
        self.crop_ratio = tuple(float(v) for v in (a.get("resized_crop_ratio") or (3 / 4, 4 / 3)))
        self.translate = tuple(float(v) for v in a["affine_translate"]) if a.get("affine_translate") else None
        self.affine_scale = tuple(float(v) for v in a["affine_scale"]) if a.get("affine_scale") else None
        self.shear = float(a.get("affine_shear") or 0.0)

    # ------------------------------------------------------------------------------- parameters
    def sample(self, n: int, height: int, width: int, g: torch.Generator) -> AugmentParams:
        """Draw n samples' parameters, each distributed as torchvision's per-sample transforms."""
        flip = torch.rand(n, generator=g) < self.hflip if self.hflip > 0 else torch.zeros(n, dtype=torch.bool)
        jitter = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64).repeat(n, 1)
        order = torch.arange(4).repeat(n, 1)
        if self.jitter:
            b, c, s, h = self.jitter
            # ColorJitter.get_params: a random order of the four, then each factor
            order = torch.argsort(torch.rand(n, 4, generator=g), dim=1)
            jitter[:, 0] = _uniform(n, max(0.0, 1 - b), 1 + b, g)
            jitter[:, 1] = _uniform(n, max(0.0, 1 - c), 1 + c, g)
            jitter[:, 2] = _uniform(n, max(0.0, 1 - s), 1 + s, g)
            jitter[:, 3] = _uniform(n, -h, h, g)
        angle = _uniform(n, -self.rotation, self.rotation, g) if self.rotation else torch.zeros(n, dtype=torch.float64)
        crop = self._sample_crops(n, height, width, g)
        out = float(self.size)
        if self.translate:
            # RandomAffine.get_params: uniform shifts up to translate * size, rounded to pixels
            tx = torch.round(_uniform(n, -self.translate[0] * out, self.translate[0] * out, g))
            ty = torch.round(_uniform(n, -self.translate[1] * out, self.translate[1] * out, g))
            translate = torch.stack([tx, ty], dim=1)
        else:
            translate = torch.zeros(n, 2, dtype=torch.float64)
        scale = _uniform(n, *self.affine_scale, g) if self.affine_scale else torch.ones(n, dtype=torch.float64)
        shear = torch.zeros(n, 2, dtype=torch.float64)
        if self.shear:
            shear[:, 0] = _uniform(n, -self.shear, self.shear, g)  # a number: x shear only
        return AugmentParams(flip, jitter, order, angle, crop, translate, scale, shear)

    def _sample_crops(self, n: int, height: int, width: int, g: torch.Generator) -> torch.Tensor:
        """RandomResizedCrop.get_params for n samples: ten attempts each, then the central fallback."""
        if self.crop_scale is None:  # resize + centre crop
            side = min(height, width)
            top, left = (height - side) // 2, (width - side) // 2
            return torch.tensor([[top, left, side, side]], dtype=torch.float64).repeat(n, 1)
        area = float(height * width)
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        attempts = 10
        target = area * (torch.rand(n, attempts, generator=g, dtype=torch.float64)
                         * (self.crop_scale[1] - self.crop_scale[0]) + self.crop_scale[0])
        aspect = torch.exp(torch.rand(n, attempts, generator=g, dtype=torch.float64) * (log_hi - log_lo) + log_lo)
        w = torch.round(torch.sqrt(target * aspect))
        h = torch.round(torch.sqrt(target / aspect))
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
        u_i = torch.rand(n, generator=g, dtype=torch.float64)
        u_j = torch.rand(n, generator=g, dtype=torch.float64)
        # fallback (no attempt fits): the largest central crop within the ratio range
        in_ratio = width / height
        if in_ratio < self.crop_ratio[0]:
            fw, fh = width, int(round(width / self.crop_ratio[0]))
        elif in_ratio > self.crop_ratio[1]:
            fh, fw = height, int(round(height * self.crop_ratio[1]))
        else:
            fw, fh = width, height
        rows = torch.arange(n)
        pick = first.clamp(min=0)
        cw = torch.where(first >= 0, w[rows, pick], torch.full((n,), float(fw), dtype=torch.float64))
        ch = torch.where(first >= 0, h[rows, pick], torch.full((n,), float(fh), dtype=torch.float64))
        top = torch.where(first >= 0, torch.floor(u_i * (height - ch + 1)), torch.full((n,), float((height - fh) // 2), dtype=torch.float64))
        left = torch.where(first >= 0, torch.floor(u_j * (width - cw + 1)), torch.full((n,), float((width - fw) // 2), dtype=torch.float64))
        return torch.stack([top, left, ch, cw], dim=1)

    # -------------------------------------------------------------------------------- geometry
    @staticmethod
    def _inverse_affine(angle: torch.Tensor, translate: torch.Tensor, scale: torch.Tensor,
                        shear: torch.Tensor) -> torch.Tensor:
        """torchvision's _get_inverse_affine_matrix (centre (0, 0)), batched: (N, 3, 3)."""
        rot = torch.deg2rad(angle)
        sx, sy = torch.deg2rad(shear[:, 0]), torch.deg2rad(shear[:, 1])
        a = torch.cos(rot - sy) / torch.cos(sy)
        b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
        c = torch.sin(rot - sy) / torch.cos(sy)
        d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
        m = torch.zeros(angle.shape[0], 3, 3, dtype=torch.float64)
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = d / scale, -b / scale, -c / scale, a / scale
        m[:, 0, 2] = m[:, 0, 0] * -translate[:, 0] + m[:, 0, 1] * -translate[:, 1]
        m[:, 1, 2] = m[:, 1, 0] * -translate[:, 0] + m[:, 1, 1] * -translate[:, 1]
        m[:, 2, 2] = 1.0
        return m

    def source_matrix(self, p: AugmentParams, height: int, width: int) -> torch.Tensor:
        """(N, 3, 3): output pixel (centre origin) -> source pixel (centre origin), i.e.
        flip^-1 . rotation^-1 . resized_crop^-1 . affine^-1 composed."""
        n = p.angle.shape[0]
        zeros = torch.zeros(n, dtype=torch.float64)
        affine = self._inverse_affine(zeros, p.translate, p.scale, p.shear)
        top, left, ch, cw = p.crop.unbind(1)
        crop = torch.zeros(n, 3, 3, dtype=torch.float64)
        crop[:, 0, 0] = cw / self.size
        crop[:, 1, 1] = ch / self.size
        crop[:, 0, 2] = left + cw / 2 - width / 2
        crop[:, 1, 2] = top + ch / 2 - height / 2
        crop[:, 2, 2] = 1.0
        # RandomRotation rotates by -angle in the inverse matrix (torchvision's rotate convention)
        rotation = self._inverse_affine(-p.angle, torch.zeros(n, 2, dtype=torch.float64),
                                        torch.ones(n, dtype=torch.float64), torch.zeros(n, 2, dtype=torch.float64))
        flip = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
        flip[:, 0, 0] = torch.where(p.flip, -1.0, 1.0)
        return flip @ rotation @ crop @ affine

    def warp(self, images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        s = self.size
        dev = images.device
        lin = torch.linspace((1.0 - s) * 0.5, (s - 1.0) * 0.5, s, device=dev, dtype=torch.float32)
        base = torch.stack([lin.view(1, s).expand(s, s), lin.view(s, 1).expand(s, s), torch.ones(s, s, device=dev)], -1)
        theta = matrix[:, :2, :].to(device=dev, dtype=torch.float32)
        theta = theta / torch.tensor([0.5 * w, 0.5 * h], device=dev).view(1, 2, 1)
        grid = base.view(1, s * s, 3) @ theta.transpose(1, 2)
        return F.grid_sample(images, grid.view(n, s, s, 2), mode="bilinear", padding_mode="zeros", align_corners=False)

    # ---------------------------------------------------------------------------------- colour
    def color(self, x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """Each sample's four adjustments in its own order.

        Compiled (`data.augment.compile`): `jitter_fused`, measured 2.3x faster than the masked
        form on 2 CPU cores. Eager: a masked pass per step and kind, which gathers and scatters
        the samples of each kind."""
        if not self.jitter:
            return x
        factors = p.jitter.to(device=x.device, dtype=x.dtype)
        order = p.order.to(x.device)
        if self.compile:
            try:
                if self._compiled_jitter is None:
                    self._compiled_jitter = torch.compile(jitter_fused, dynamic=True)
                return self._compiled_jitter(x, factors, order)
            except Exception as err:  # no compiler, unsupported platform: eager is correct, only slower
                log.warning("torch.compile of the colour jitter failed (%s); using eager mode", type(err).__name__)
                self.compile = False
        for step in range(4):
            for kind in range(4):
                idx = torch.nonzero(order[:, step] == kind).flatten()
                if idx.numel() == 0:
                    continue
                x[idx] = _ADJUST[kind](x[idx], factors[idx, kind])
        return x

    def __call__(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, h, w = images.shape
        p = self.sample(n, h, w, g)
        matrix = self.source_matrix(p, h, w)
        chunk = self.chunk or (n if images.device.type != "cpu" else 8)
        out = torch.empty(n, 3, self.size, self.size, device=images.device, dtype=torch.float32)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            x = images[rows].to(torch.float32)
            if images.dtype == torch.uint8:
                x.mul_(1.0 / 255.0)
            x = self.color(x, p.take(rows))
            out[rows] = self.warp(x, matrix[rows]).clamp_(0.0, 1.0)
        return out


_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as kornia's rgb_to_grayscale


def saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the per-pixel grey by a per-sample factor: kornia's
    adjust_saturation_with_gray_subtraction (= torchvision's adjust_saturation), 10x faster on the
    CPU (1.5 against 16 ms for 64 images of 146 px)."""
    r, g, b = x.unbind(-3)
    gray = (r * _GRAY[0]).add_(g, alpha=_GRAY[1]).add_(b, alpha=_GRAY[2]).unsqueeze(-3)
    return torch.lerp(gray, x, factor.view(-1, 1, 1, 1).to(x.dtype)).clamp_(0.0, 1.0)


def hue_shift(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue for float RGB in [0, 1] with a per-sample shift `delta` (turns).

    The same HSV arithmetic (hue from the largest channel, the hexcone back to RGB) written
    directly on RGB, without materialising HSV: 3.5x faster than kornia.enhance.adjust_hue and
    torchvision's adjust_hue on the CPU (23 ms against 81 ms for 64 images of 146 px, 2 cores)
    and equal to torchvision's to 2e-6.
    """
    r, g, b = x.unbind(-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    div = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    # hue in sixths of a turn, [0, 6)
    h = torch.where(maxc == r, (g - b) / div, torch.where(maxc == g, 2.0 + (b - r) / div, 4.0 + (r - g) / div))
    h = torch.remainder(h + delta.view(-1, *([1] * (h.dim() - 1))) * 6.0, 6.0)

    def channel(offset: float) -> torch.Tensor:
        k = torch.remainder(h + offset, 6.0)
        return maxc - chroma * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)

    return torch.stack([channel(5.0), channel(3.0), channel(1.0)], dim=-3)


# ColorJitter's four adjustments, in the order of its factors (brightness, contrast, saturation, hue)
_ADJUST = (adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction, saturation, hue_shift)


def jitter_fused(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The four adjustments in each sample's order, written for torch.compile: no data-dependent
    control flow, no gathers or scatters.

    The hue shift costs several times the other three together, so it runs once for the whole
    batch: first the adjustments each sample's order puts before its hue shift (steps 0-2; a
    sample whose hue comes earlier is left as it is), then the hue shift, then the adjustments
    after it (steps 1-3). Each of those six steps evaluates brightness, contrast and saturation
    for every sample and keeps the one the sample's order names; torch.compile fuses them."""
    brightness, contrast, saturate, hue = _ADJUST
    hue_at = (order == 3).to(torch.int64).argmax(dim=1)

    def cheap(x: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:  # kind 3: leave as it is
        kind = kind.view(-1, 1, 1, 1)
        return torch.where(kind == 0, brightness(x, factors[:, 0]),
                           torch.where(kind == 1, contrast(x, factors[:, 1]),
                                       torch.where(kind == 2, saturate(x, factors[:, 2]), x)))

    for step in range(3):
        x = cheap(x, torch.where(hue_at > step, order[:, step], 3))
    x = hue(x, factors[:, 3])
    for step in range(1, 4):
        x = cheap(x, torch.where(hue_at < step, order[:, step], 3))
    return x


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The evaluation view of cached images: a centre crop (the cache already holds the resize)."""
    h, w = images.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top: top + size, left: left + size]

