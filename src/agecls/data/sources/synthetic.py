"""Synthetic faces whose age can be seen: the offline data set of the demo and the fast tests.

Each image is a cartoon face on a random background. Age shows in ways that survive the study's
augmentation (flips, colour jitter, rotation, crops): the face grows and lengthens through
childhood, hair greys from 35 on, forehead wrinkles multiply and the eyes narrow with age. Skin,
hair colour, background, position and size vary at random, so a model must learn the cues.
The images are written once to `root` (JPEG, like real data) with a `labels.csv`; the folder is
rebuilt when its parameters change, and built in a temp folder then renamed, so concurrent or
interrupted runs never see half a data set.

`root` is under the cache folder by default (conf/data/synthetic.yaml). A root that holds anything
but generated data sets (a user's folder of photos, given as data.root without data=) is refused
before anything is written: generated faces never land among, or are trained on instead of, real ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from agecls.data.images import is_image_name
from agecls.data.sources.base import Source, SourceRecords
from agecls.utils.checks import fail
from agecls.utils.progress import progress

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
MAX_AGE = 90


def draw_face(age: float, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """One synthetic face of the given age (years)."""
    s = size / 96.0
    bg = tuple(int(v) for v in rng.integers(40, 220, size=3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)

    growth = min(age, 18.0) / 18.0                      # 0 at birth, 1 from 18 on
    cx = size / 2 + rng.uniform(-4, 4) * s
    cy = size / 2 + rng.uniform(-3, 5) * s
    half_w = (20 + 6 * growth + rng.uniform(-2, 2)) * s
    half_h = half_w * (1.0 + 0.35 * growth)            # a child's face is round, an adult's long

    tone = rng.uniform(0, 1)                            # from dark to light skin
    skin_base = (1 - tone) * np.array([95, 60, 40]) + tone * np.array([245, 210, 180]) + rng.normal(0, 8, 3)
    skin = tuple(int(v) for v in skin_base)
    young_hair = np.array(
        [(40, 25, 15), (90, 60, 30), (180, 150, 90), (20, 20, 20), (120, 50, 20)][int(rng.integers(0, 5))],
        dtype=float,
    )
    grey = np.clip((age - 35.0) / 45.0, 0.0, 1.0)       # hair greys from 35 to 80
    hair = tuple(int(v) for v in (1 - grey) * young_hair + grey * np.array([225, 225, 225]))
    if age > 55 and rng.random() < 0.5:                  # some older faces go bald on top
        hair_top = cy - half_h * 0.75
    else:
        hair_top = cy - half_h * 1.15
    d.ellipse([cx - half_w * 1.08, hair_top, cx + half_w * 1.08, cy + half_h * 0.2], fill=hair)
    d.ellipse([cx - half_w, cy - half_h * 0.8, cx + half_w, cy + half_h], fill=skin)

    dark = tuple(int(v * 0.55) for v in skin_base)
    # forehead wrinkles: one line per 12 years after 20
    n_lines = int(np.clip((age - 20.0) / 12.0, 0, 5))
    for i in range(n_lines):
        y = cy - half_h * 0.6 + i * 3.2 * s
        d.line([cx - half_w * 0.55, y, cx + half_w * 0.55, y], fill=dark, width=max(1, int(s)))
    # eyes: wide and round for children, narrower with age
    eye_h = (5.5 - 3.5 * min(age, 80.0) / 80.0) * s
    for side in (-1, 1):
        ex = cx + side * half_w * 0.42
        ey = cy - half_h * 0.1
        d.ellipse([ex - 4 * s, ey - eye_h / 2, ex + 4 * s, ey + eye_h / 2], fill=(250, 250, 250))
        d.ellipse([ex - 1.8 * s, ey - 1.8 * s, ex + 1.8 * s, ey + 1.8 * s], fill=(30, 30, 30))
        if age > 45:  # crow's feet
            d.line([ex + side * 5 * s, ey - 2 * s, ex + side * 8 * s, ey - 4 * s], fill=dark, width=1)
            d.line([ex + side * 5 * s, ey + 2 * s, ex + side * 8 * s, ey + 4 * s], fill=dark, width=1)
    mouth_y = cy + half_h * 0.5
    d.line([cx - half_w * 0.35, mouth_y, cx + half_w * 0.35, mouth_y], fill=(150, 40, 40), width=max(1, int(2 * s)))
    if age > 60:  # nasolabial folds
        for side in (-1, 1):
            d.line([cx + side * half_w * 0.3, cy + half_h * 0.15, cx + side * half_w * 0.45, mouth_y],
                   fill=dark, width=1)
    # sensor noise, so no two images share exact pixels
    arr = np.asarray(im, dtype=np.int16) + rng.normal(0, 4, size=(size, size, 3)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


# What SyntheticSource writes into its root: one folder per data set (SyntheticSource.folder) and,
# while one is built, its temp folder.
_GENERATED = re.compile(r"^(\.tmp-)?n\d+_s\d+_seed-?\d+_v\d+(-\d+)?$")


def check_generated_root(root: Path) -> None:
    """Refuse (ConfigValueError) a root that is a file or holds anything but generated data sets."""
    if root.exists() and not root.is_dir():
        fail("data.root", str(root), "is a file, and the synthetic data set (the default when no data= is given) "
                                     "is generated into a folder: to train on a CSV of images add data=csv")
    if not root.is_dir():
        return
    foreign = sorted(e.name for e in os.scandir(root) if not _GENERATED.match(e.name))
    if foreign:
        images = sum(map(is_image_name, foreign))
        parts = [f"{images:,} images" if images else "", f"{len(foreign) - images:,} other entries" if
                 len(foreign) > images else ""]
        what = " and ".join(p for p in parts if p) + " that agecls did not generate"
        fail("data.root", str(root), f"holds {what} (e.g. {', '.join(foreign[:3])}), but data is the synthetic data "
                                     "set (the default when no data= is given), which would write generated faces "
                                     "there and train on them. To train on these images add data=utkface (a folder "
                                     "of UTKFace crops) or data=csv data.root=<your labels.csv>; for synthetic data "
                                     "leave data.root unset (it is generated under paths.cache_dir) or name an empty "
                                     "folder")


class SyntheticSource(Source):
    name = "synthetic"
    title = "synthetic"

    def __init__(self, root: str | Path, num_samples: int = 2000, synthetic_size: int = 96, seed: int = 0) -> None:
        super().__init__(root)
        self.num_samples = int(num_samples)
        self.size = int(synthetic_size)
        self.seed = int(seed)
        check_generated_root(self.root)

    def describe(self) -> str:
        return f"data: {self.num_samples:,} generated (synthetic) faces in {self.folder}; not real photos"

    @property
    def folder(self) -> Path:
        return self.root / f"n{self.num_samples}_s{self.size}_seed{self.seed}_v{GENERATOR_VERSION}"

    def _params(self) -> dict[str, int]:
        return {"num_samples": self.num_samples, "size": self.size, "seed": self.seed, "version": GENERATOR_VERSION}

    def _complete(self) -> bool:
        meta = self.folder / "meta.json"
        return meta.exists() and json.loads(meta.read_text()) == self._params()

    def prepare(self) -> None:
        if self._complete():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{self.folder.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "images").mkdir(parents=True)
        rng = np.random.default_rng(self.seed)
        ages = rng.integers(1, MAX_AGE + 1, size=self.num_samples)
        rows = []
        for i, age in enumerate(progress(ages, desc="Generating synthetic faces", mininterval=2)):
            img = draw_face(float(age), np.random.default_rng([self.seed, i]), self.size)
            name = f"images/{i:06d}_{int(age)}.jpg"
            img.save(tmp / name, quality=95)
            rows.append((name, int(age)))
        pd.DataFrame(rows, columns=["path", "age"]).to_csv(tmp / "labels.csv", index=False)
        (tmp / "meta.json").write_text(json.dumps(self._params()))
        try:
            os.replace(tmp, self.folder)
        except OSError:  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("Wrote %d synthetic faces to %s", self.num_samples, self.folder)

    def load(self) -> SourceRecords:
        if not self._complete():
            self.prepare()
        table = pd.read_csv(self.folder / "labels.csv")
        records = pd.DataFrame({"path": [str(self.folder / p) for p in table["path"]], "age": table["age"].astype(float)})
        return SourceRecords(records, root=self.folder)

    @property
    def relative_to(self) -> Path:
        return self.folder
