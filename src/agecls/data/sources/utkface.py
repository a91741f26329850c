"""UTKFace: a folder of aligned crops named `age_gender_race_datetime.jpg.chip.jpg`."""

from __future__ import annotations

import logging
import re

import pandas as pd

from agecls.data.images import scan_images
from agecls.data.sources.base import Source, SourceRecords

log = logging.getLogger(__name__)

# The age is the first field. Real names break the rest of the pattern (a missing race field, a
# space before .jpg, a missing dot), so only the leading integer is required; gender and race are
# read where the name has them (UTKFace's codes: gender 0 male, 1 female; race 0 White, 1 Black,
# 2 Asian, 3 Indian, 4 Others).
_AGE = re.compile(r"^(\d{1,3})_")
_GROUPS = re.compile(r"^\d{1,3}_(?P<gender>[01])_(?:(?P<race>[0-4])_)?")
GENDERS = {"0": "male", "1": "female"}
RACES = {"0": "White", "1": "Black", "2": "Asian", "3": "Indian", "4": "Others"}


class UTKFaceSource(Source):
    name = "utkface"
    title = "UTKFace"
    how_to_get = (
        "Download UTKFace's aligned & cropped faces (UTKFace.tar.gz, https://susanqq.github.io/UTKFace/), "
        "unpack it and point data.root (or AGECLS_UTKFACE_DIR) at the folder of *.jpg.chip.jpg files."
    )

    def count(self) -> int | None:
        return len(scan_images(self.root).files)

    def load(self) -> SourceRecords:
        self.check_root()
        scan = scan_images(self.root)  # a FIFO, folder or broken link named x.jpg, a .gif: counted, not read
        scan.log_skipped(self.root)
        files = scan.files
        paths, ages, genders, races, bad = [], [], [], [], []
        for f in files:
            m = _AGE.match(f.name)
            if m is None:
                bad.append(f.name)
                continue
            paths.append(str(f))
            ages.append(float(m.group(1)))
            g = _GROUPS.match(f.name)
            genders.append(GENDERS.get(g["gender"]) if g else None)
            races.append(RACES.get(g["race"] or "") if g else None)
        if bad:
            log.warning("%d UTKFace names carry no leading age and were skipped, e.g. %s", len(bad), bad[:3])
        records = pd.DataFrame({"path": paths, "age": ages, "gender": genders, "race": races})
        return SourceRecords(records, removed={**scan.lost(), "unparseable_name": len(bad)}, root=self.root)
