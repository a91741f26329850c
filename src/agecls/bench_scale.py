"""Scaling benchmark (issue 12): how each data stage's cost grows with the number of images.

    python -m agecls.bench suite=scale                          # N = 10k, 50k, 200k
    python -m agecls.bench suite=scale "scale.sizes=[10000,50000]" "scale.formats=[jpeg]"

For each N it generates (once; reused from `scale.root` on later runs) an IMDB-WIKI-style data set:
an `imdb.mat` (or `wiki.mat`) in the released layout, read by the real `imdb_wiki` source, and one
JPEG crop per record, of varying size (median ~190 px, ~7 KB) with face-like, textured content, plus
a fixed share of dirty records of each kind the cleaning rules remove (`DIRTY_KINDS`). Then it runs
each stage in a fresh (forked) process and measures seconds, peak memory and bytes on disk:

    generate     writing the data set (cached: the time of the run that made it)
    load         the imdb_wiki source reading the .mat (agecls.data.sources)
    index        hashing and decoding every image the metadata rules keep, cold (data.index.build_index)
    clean        every cleaning rule, with the index warm, as a second run does (data.cleaning.clean_records)
    split        the seeded hash split and split.csv (data.splits.assign_splits)
    cache_build  the preprocessing cache, per format (data.pixel_cache.PixelCache, data.jpeg_cache.JpegCache)
    epoch_load   one training epoch of batches from AgeDataModule's own loader, without the model

Memory (`peak_rss_mb`): the peak, sampled every 50 ms or so, of the anonymous and shared-memory pages
of the stage's process and its workers (Pss_Anon + Pss_Shmem of /proc/<pid>/smaps_rollup: a page
shared by several processes counted once in all): what the stage holds in RAM outside any memory-
mapped file. `vmhwm_mb` is the main process's exact peak RSS (VmHWM), file-backed pages included.
`cpu_seconds`: CPU time of the stage's process and workers, which other load on a shared machine
changes far less than the wall time; the summary gives the growth of both.
"""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from agecls.utils.files import building

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
STAGES = ("load", "index", "clean", "split", "cache_build", "epoch_load")
CACHE_STAGES = ("cache_build", "epoch_load")
COLUMNS = ["n_images", "stage", "seconds", "peak_rss_mb", "bytes_on_disk", "cache_format"]
GROWTH_TARGET = 1.5  # seconds per image at the largest N over the smallest

# Each dirty kind and the cleaning rule (agecls.data.cleaning.RULES) that removes it. Every dirty
# record has exactly one defect, so each rule removes exactly its kinds' records; an age_conflict
# record is a byte-identical copy of a clean record with another age: both copies are removed.
DIRTY_KINDS = {
    "no_photo_date": "no_photo_date",    # photo_taken 0 or before the first photograph
    "two_faces": "multiple_faces",       # second_face_score found
    "no_face": "no_face",                # face_score -inf
    "low_face_score": "low_face_score",  # 0 < face_score < 1
    "invalid_dob": "invalid_dob",        # dob 0 (no date) or after the photo was taken
    "age_out_of_range": "age_out_of_range",  # born in the 19th century: age over 100
    "missing_file": "unreadable",        # listed in the .mat, no file
    "truncated_file": "unreadable",      # a JPEG cut in half
    "duplicate": "duplicate",            # a byte-identical copy of a clean record, same age
    "age_conflict": "age_conflict",      # a byte-identical copy of a clean record, another age
}
DEFAULT_RATES = {
    "no_photo_date": 0.01, "two_faces": 0.08, "no_face": 0.10, "low_face_score": 0.04, "invalid_dob": 0.01,
    "age_out_of_range": 0.005, "missing_file": 0.003, "truncated_file": 0.002, "duplicate": 0.01,
    "age_conflict": 0.002,
}
# clean records' face_score is drawn in [1.5, 6), low_face_score's in (0.05, 0.95): the counts hold
# for any data.min_face_score in (0.95, 1.5]
CLEAN_FACE_SCORE = (1.5, 6.0)
LOW_FACE_SCORE = (0.05, 0.95)
LAST_PHOTO_YEAR = 2015
MATLAB_OFFSET = 366           # MATLAB datenum - Python date ordinal
EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


# ------------------------------------------------------------------------------ the images
def draw_crop(rng: np.random.Generator, width: int, height: int, quality: int) -> bytes:
    """A JPEG face crop: a soft background, a face (hair, skin tone, eyes, nose, mouth) drawn at a
    third of the size and upscaled (soft edges), shading and a fine grain: ~7 KB at ~190 px, like
    IMDB-WIKI's and UTKFace's crops (flat noise would compress far worse, flat colour far better)."""
    from PIL import Image, ImageDraw

    w, h = int(width), int(height)
    sw, sh = max(16, w // 3), max(16, h // 3)
    grey = rng.uniform(60, 200)
    grid = (0.6 * grey + 0.4 * rng.uniform(20, 235, size=(4, 4, 3))).astype(np.uint8)
    small = Image.fromarray(grid).resize((sw, sh), Image.BILINEAR)
    d = ImageDraw.Draw(small)
    cx, cy = sw / 2 + rng.normal(0, sw * 0.03), sh / 2 + rng.normal(0, sh * 0.03)
    fw, fh = sw / 3.6 * rng.uniform(0.85, 1.1), sh / 3.6 * rng.uniform(1.0, 1.3)
    tone = rng.uniform(0, 1)
    skin = (1 - tone) * np.array([95, 60, 40]) + tone * np.array([240, 205, 175])
    hair = rng.uniform(10, 200) * np.array([1, 0.8, 0.6]) + rng.normal(0, 10, 3)

    def rgb(v: np.ndarray) -> tuple[int, ...]:
        return tuple(int(x) for x in np.clip(v, 0, 255))

    d.ellipse([cx - fw * 1.1, cy - fh * 1.15, cx + fw * 1.1, cy + fh * 0.3], fill=rgb(hair))
    d.ellipse([cx - fw, cy - fh * 0.85, cx + fw, cy + fh], fill=rgb(skin))
    for s in (-1, 1):
        ex, ey = cx + s * fw * 0.42, cy - fh * 0.1
        d.ellipse([ex - fw * 0.18, ey - fh * 0.06, ex + fw * 0.18, ey + fh * 0.06], fill=(235, 235, 235))
        d.ellipse([ex - fw * 0.07, ey - fw * 0.07, ex + fw * 0.07, ey + fw * 0.07], fill=(35, 25, 20))
    d.line([cx - fw * 0.35, cy + fh * 0.5, cx + fw * 0.35, cy + fh * 0.5], fill=(150, 50, 50), width=1)
    d.line([cx, cy, cx - fw * 0.1, cy + fh * 0.25], fill=rgb(skin * 0.5), width=1)
    arr = np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.float32)
    noise = rng.normal(128, 30, size=(h // 6 + 1, w // 6 + 1)).clip(0, 255).astype(np.uint8)
    shade = np.asarray(Image.fromarray(noise).resize((w, h), Image.BILINEAR), dtype=np.float32)
    arr *= (0.68 + shade / 400)[..., None]
    arr += rng.normal(0, 2.0, size=(h, w, 1)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def _write_chunk(args: tuple[str, int, list[tuple[str, int, int, int, int, str]]]) -> int:
    """Worker: write a chunk of crops; returns the bytes written."""
    folder, seed, rows = args
    total = 0
    for rel, image_seed, w, h, quality, kind in rows:
        if kind == "missing_file":
            continue
        data = draw_crop(np.random.default_rng([seed, image_seed]), w, h, quality)
        if kind == "truncated_file":
            data = data[: len(data) // 2]
        with open(os.path.join(folder, rel), "wb") as f:
            f.write(data)
        total += len(data)
    return total


# ---------------------------------------------------------------------------- the metadata
def _counts(n: int, rates: Mapping[str, float]) -> dict[str, int]:
    """Records of each dirty kind: round(rate * n), at least one where the rate is positive."""
    unknown = sorted(set(rates) - set(DIRTY_KINDS))
    if unknown:
        raise ValueError(f"scale.dirty: unknown kinds {unknown}; known: {', '.join(DIRTY_KINDS)}")
    counts = {k: (max(1, round(float(rates.get(k, 0.0)) * n)) if float(rates.get(k, 0.0)) > 0 else 0)
              for k in DIRTY_KINDS}
    # the originals of duplicates and conflicts are clean records, one each
    need = sum(counts.values()) + counts["duplicate"] + counts["age_conflict"]
    if need > n * 0.8:
        raise ValueError(f"{n} records cannot hold {need} dirty records and originals; lower scale.dirty or raise N")
    return counts


def _dates(datenum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(year, month) of integer MATLAB datenums (valid ones)."""
    days = (datenum.astype(np.int64) - MATLAB_OFFSET - EPOCH_ORDINAL).astype("datetime64[D]")
    years = days.astype("datetime64[Y]").astype(np.int64) + 1970
    months = days.astype("datetime64[M]").astype(np.int64) % 12 + 1
    return years, months


def _datenum(year: np.ndarray, month: np.ndarray, day: np.ndarray) -> np.ndarray:
    ordinal = np.array([date(int(y), int(m), int(d)).toordinal() for y, m, d in zip(year, month, day, strict=True)],
                       dtype=np.int64)
    return (ordinal + MATLAB_OFFSET).astype(float)


def _age(dob: np.ndarray, taken: np.ndarray) -> np.ndarray:
    """The source's age: photo year - birth year, one less for people born from July on."""
    y, m = _dates(dob)
    return taken - y - (m >= 7)


def plan_records(n: int, seed: int = 0, subset: str = "imdb", rates: Mapping[str, float] | None = None,
                 photos_per_person: float = 20.0) -> pd.DataFrame:
    """The records of a generated data set, one row each: the .mat fields, the file to write
    (image_seed: which picture; width, height, quality) and `kind` (clean or a DIRTY_KINDS key)."""
    rates = DEFAULT_RATES if rates is None else rates
    counts = _counts(n, rates)
    rng = np.random.default_rng([seed, n, 12])
    kind = np.full(n, "clean", dtype=object)
    order = rng.permutation(n)
    start = 0
    for k, c in counts.items():
        kind[order[start: start + c]] = k
        start += c
    clean = np.flatnonzero(kind == "clean")

    # people: a date of birth each (1935-2000); several photos each (imdb: ~20 per celebrity)
    n_people = int(max(min(n, 10), math.ceil(n / max(float(photos_per_person), 1.0))))
    person = rng.integers(0, n_people, size=n)
    birth = _datenum(rng.integers(1935, 2001, n_people), rng.integers(1, 13, n_people), rng.integers(1, 29, n_people))
    dob = birth[person]
    by, bm = _dates(dob)
    age = np.clip(np.round(rng.normal(36, 13, n)), 1, 90).astype(np.int64)
    taken = np.minimum(by + age + (bm >= 7), LAST_PHOTO_YEAR).astype(float)
    face_score = rng.uniform(*CLEAN_FACE_SCORE, n)
    second = np.full(n, np.nan)
    gender = rng.integers(0, 2, n).astype(float)
    gender[rng.random(n) < 0.02] = np.nan
    side = np.clip(rng.lognormal(np.log(190), 0.35, n), 64, 512).astype(np.int64)
    width = np.maximum(32, (side * rng.uniform(0.85, 1.15, n)).astype(np.int64))
    quality = rng.integers(80, 96, n)
    image_seed = np.arange(n, dtype=np.int64)

    def where(k: str) -> np.ndarray:
        return np.flatnonzero(kind == k)

    i = where("no_photo_date")
    taken[i] = np.where(np.arange(len(i)) % 2 == 0, 0.0, 1500.0)  # no year / not a photo year
    i = where("two_faces")
    second[i] = rng.uniform(1.0, 4.0, len(i))
    i = where("no_face")
    face_score[i] = -np.inf
    i = where("low_face_score")
    face_score[i] = rng.uniform(*LOW_FACE_SCORE, len(i))
    i = where("invalid_dob")  # no date of birth, or born after the photo (a negative age)
    after = _datenum(taken[i] + 1, np.full(len(i), 3), np.full(len(i), 1))
    dob[i] = np.where(np.arange(len(i)) % 2 == 0, 0.0, after)
    i = where("age_out_of_range")  # born 1850-1880: over 100 at any photo year from 1990
    dob[i] = _datenum(rng.integers(1850, 1881, len(i)), np.full(len(i), 1), np.full(len(i), 1))
    taken[i] = np.maximum(taken[i], 1990)
    # copies of distinct clean records: the same picture (bytes), the same person
    originals = rng.choice(clean, size=counts["duplicate"] + counts["age_conflict"], replace=False)
    for k, orig in (("duplicate", originals[: counts["duplicate"]]), ("age_conflict", originals[counts["duplicate"]:])):
        i = where(k)
        image_seed[i], person[i], taken[i], dob[i] = orig, person[orig], taken[orig], dob[orig]
        side[i], width[i], quality[i] = side[orig], width[orig], quality[orig]
        if k == "age_conflict":  # born 5 years earlier: 5 years older in the same picture
            dob[i] = dob[orig] - 1826
    valid = dob > MATLAB_OFFSET
    ages = np.full(n, np.nan)
    ages[valid] = _age(dob[valid], taken[valid])
    ok = kind == "clean"
    assert np.all((ages[ok] >= 0) & (ages[ok] <= 90)), "generator: a clean record's age is out of range"
    conf = where("age_conflict")
    assert np.all(ages[conf] != ages[image_seed[conf]]), "generator: an age conflict without another age"

    y, m = _dates(np.where(valid, dob, birth[person]))
    rel = [f"{r % 100:02d}/nm{p:07d}_rm{r:09d}_{yy}-{mm}-1_{int(t)}.jpg"
           for r, p, yy, mm, t in zip(range(n), person, y, m, taken, strict=True)]
    # the face inside the crop: IMDB-WIKI's crops add a 40 % margin on every side
    x1, y1 = width * 0.4 / 1.8, side * 0.4 / 1.8
    return pd.DataFrame({
        "full_path": rel, "dob": dob, "photo_taken": taken, "gender": gender, "person": person,
        "name": [f"Person {p}" for p in person], "face_score": face_score, "second_face_score": second,
        "x1": x1, "y1": y1, "x2": width - x1, "y2": side - y1, "kind": kind, "age": ages,
        "image_seed": image_seed, "width": width, "height": side, "quality": quality,
    })


def expected_removed(plan: pd.DataFrame) -> dict[str, int]:
    """What cleaning (agecls.data.cleaning.RULES) must remove from a planned data set, per rule."""
    out = dict.fromkeys(dict.fromkeys(DIRTY_KINDS.values()), 0)
    counts = plan["kind"].value_counts()
    for k, rule in DIRTY_KINDS.items():
        out[rule] += int(counts.get(k, 0)) * (2 if k == "age_conflict" else 1)
    return out


def _cell(values: Sequence[Any]) -> np.ndarray:
    """A MATLAB 1 x n cell array (savemat writes object arrays as cells)."""
    arr = np.empty((1, len(values)), dtype=object)
    for i, v in enumerate(values):
        arr[0, i] = v
    return arr


def write_mat(plan: pd.DataFrame, path: Path, subset: str) -> None:
    """The .mat of IMDB-WIKI: one 1x1 struct named after the subset, each field 1 x n, in the
    released order; imdb adds celeb_names (one per celebrity) and celeb_id (1-based)."""
    from scipy.io import savemat

    row = lambda col: plan[col].to_numpy(dtype=float)[None, :]  # noqa: E731
    boxes = plan[["x1", "y1", "x2", "y2"]].to_numpy(dtype=float)
    struct: dict[str, Any] = {
        "dob": row("dob"), "photo_taken": row("photo_taken"), "full_path": _cell(plan["full_path"].tolist()),
        "gender": row("gender"), "name": _cell(plan["name"].tolist()),
        "face_location": _cell([b[None, :] for b in boxes]), "face_score": row("face_score"),
        "second_face_score": row("second_face_score"),
    }
    if subset == "imdb":
        n_people = int(plan["person"].max()) + 1
        struct["celeb_names"] = _cell([f"Person {p}" for p in range(n_people)])
        struct["celeb_id"] = (plan["person"].to_numpy(dtype=float) + 1)[None, :]
    savemat(path, {subset: struct}, do_compression=True, oned_as="row")


def dataset_folder(root: str | Path, n: int, seed: int, subset: str) -> Path:
    return Path(root) / f"{subset}-n{n}-seed{seed}-v{GENERATOR_VERSION}"


def generate(root: str | Path, n: int, seed: int = 0, subset: str = "imdb", rates: Mapping[str, float] | None = None,
             workers: int = 1, photos_per_person: float = 20.0) -> Path:
    """Write (or reuse) a generated IMDB-WIKI-style data set of n records; returns its folder, the
    `data.root` of the imdb_wiki source (data.subset=`subset`). Its meta.json holds the counts of
    each dirty kind and what cleaning must remove."""
    if subset not in ("imdb", "wiki"):
        raise ValueError(f"scale.subset={subset!r}; choose imdb or wiki")
    rates = dict(DEFAULT_RATES if rates is None else rates)
    params = {"version": GENERATOR_VERSION, "n": int(n), "seed": int(seed), "subset": subset,
              "rates": {k: float(v) for k, v in sorted(rates.items())}, "photos_per_person": float(photos_per_person)}
    folder = dataset_folder(root, n, seed, subset)
    meta_file = folder / "meta.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("params") == params:
            log.info("Scale data set %s: %d records (reused)", folder, n)
            return folder
        shutil.rmtree(folder)  # made with other parameters
    t0 = time.perf_counter()
    plan = plan_records(n, seed, subset, rates, photos_per_person)
    with building(folder) as tmp:
        for d in range(100):
            (tmp / f"{d:02d}").mkdir()
        cols = ["full_path", "image_seed", "width", "height", "quality", "kind"]
        rows = list(plan[cols].itertuples(index=False, name=None))
        rows = [(r, int(s), int(w), int(h), int(q), k) for r, s, w, h, q, k in rows]
        jobs = [(str(tmp), int(seed), rows[i: i + 1000]) for i in range(0, n, 1000)]
        written = 0
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for k, b in enumerate(pool.map(_write_chunk, jobs)):
                    written += b
                    if (k + 1) % 20 == 0:
                        log.info("Generating %s: %d of %d images", folder.name, min(n, (k + 1) * 1000), n)
        else:
            written = sum(map(_write_chunk, jobs))
        write_mat(plan, tmp / f"{subset}.mat", subset)
        seconds = time.perf_counter() - t0
        mat_bytes = (tmp / f"{subset}.mat").stat().st_size
        files = int((plan["kind"] != "missing_file").sum())
        meta = {"params": params, "records": int(n), "files": files,
                "kinds": {k: int(v) for k, v in plan["kind"].value_counts().sort_index().items()},
                "expected_removed": expected_removed(plan),
                "expected_records_out": int(n - sum(expected_removed(plan).values())),
                "image_bytes": int(written), "mat_bytes": int(mat_bytes),
                "bytes_per_image": written / max(files, 1), "seconds": seconds, "workers": int(workers)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info("Generated %s: %d records, %.1f KB per image, in %.0f s", folder, n, meta["bytes_per_image"] / 1e3, seconds)
    return folder


# ------------------------------------------------------------------------------ memory use
def _pss(pid: int) -> float:
    """Anonymous + shared-memory pages of a process, proportional share (kB)."""
    total = 0.0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Pss_Anon:", "Pss_Shmem:")):
                    total += float(line.split()[1])
    except OSError:
        pass
    return total


def _status_kb(pid: int, keys: Sequence[str]) -> float:
    total = 0.0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.split(":", 1)[0] in keys:
                    total += float(line.split()[1])
    except OSError:
        pass
    return total


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process, its reaped children and its live descendants."""
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    for pid in _descendants(os.getpid())[1:]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in fields[11:15]) / CLOCK_TICKS  # utime stime cutime cstime
        except (OSError, IndexError, ValueError):
            pass
    return total


class PeakMemory:
    """Samples, on a thread, this process tree's anonymous memory (Pss_Anon + Pss_Shmem summed over
    the process and its descendants) and the main process's RssAnon + RssShmem; keeps the peaks.
    `overhead_cpu_s`: the CPU the sampling thread itself took (subtracted from a stage's CPU time)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = float(interval)
        self.pid = os.getpid()
        self.tree_kb = 0.0
        self.main_kb = 0.0
        self.samples = 0
        self.overhead_cpu_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        tree = sum(_pss(p) for p in _descendants(self.pid))
        self.tree_kb = max(self.tree_kb, tree)
        self.main_kb = max(self.main_kb, _status_kb(self.pid, ("RssAnon", "RssShmem")))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            t0, c0 = time.perf_counter(), time.thread_time()
            self.sample()
            self.overhead_cpu_s += time.thread_time() - c0
            # never more than ~10 % of a core on the sampling itself
            self._stop.wait(max(self.interval, 10 * (time.perf_counter() - t0)))

    def __enter__(self) -> PeakMemory:
        try:  # reset VmHWM, so it is this stage's peak (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        self.vmhwm_kb = _status_kb(self.pid, ("VmHWM",))


# -------------------------------------------------------------------------------- the stages
def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


class StageRun:
    """One stage in its own process: `spec` says which, on which data, with which options."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = dict(spec)
        self.data = dict(spec["data"])
        self.work = Path(spec["work"])
        self.cache_dir = self.work / "cache"
        self.meter: PeakMemory | None = None
        self.seconds = 0.0

    @contextmanager
    def measured(self):
        with PeakMemory() as meter:
            t0, cpu0 = time.perf_counter(), tree_cpu_seconds()
            yield
            self.seconds = time.perf_counter() - t0
            self.cpu_seconds = tree_cpu_seconds() - cpu0
        self.cpu_seconds -= meter.overhead_cpu_s
        self.meter = meter

    def source(self):
        from agecls.data.sources import make_source

        return make_source("imdb_wiki", self.spec["root"], subset=self.spec["subset"], cropped=True)

    def options(self):
        from agecls.data.cleaning import CleaningOptions

        d = self.data
        return CleaningOptions(min_face_score=d["min_face_score"], min_age=d["min_age"], max_age=d["max_age"],
                               check_images=d["check_images"], deduplicate=d["deduplicate"])

    def index_fn(self, source):
        """The image index as AgeDataModule builds it: data.cache_dir's index file, data.num_workers."""
        from agecls.data.index import build_index, index_file_for

        cache_file = index_file_for(self.cache_dir, source.root, source.name)
        workers = max(1, int(self.data["num_workers"]))
        verify = self.data.get("verify", "stat")
        return cache_file, lambda paths: build_index(paths, cache_file, decode=bool(self.data["check_images"]),
                                                     workers=workers, verify=verify)

    def run(self) -> dict[str, Any]:
        stage = self.spec["stage"]
        out = getattr(self, f"stage_{stage}")()
        m = self.meter
        return {"seconds": self.seconds, "peak_rss_mb": m.tree_kb / 1024, "rss_anon_main_mb": m.main_kb / 1024,
                "vmhwm_mb": m.vmhwm_kb / 1024, "memory_samples": m.samples, "cpu_seconds": self.cpu_seconds,
                "load_avg_1min": os.getloadavg()[0],  # a shared machine: what else ran meanwhile
                **out}

    # each returns {bytes_on_disk, items, ...}
    def stage_load(self) -> dict[str, Any]:
        source = self.source()
        with self.measured():
            loaded = source.load()
        return {"bytes_on_disk": 0, "items": len(loaded.records)}

    def stage_index(self) -> dict[str, Any]:
        from agecls.data.cleaning import clean_records

        source = self.source()
        loaded = source.load()
        # the images cleaning indexes: those the metadata rules keep (no index: file rules skipped)
        kept, _ = clean_records(loaded.records, self.options())
        paths = kept["path"].tolist()
        del loaded, kept
        cache_file, index = self.index_fn(source)
        cache_file.unlink(missing_ok=True)  # cold: every file hashed and decoded
        with self.measured():
            table = index(paths)
        return {"bytes_on_disk": _dir_bytes(cache_file), "items": len(paths),
                "unreadable": int((~table["ok"]).sum())}

    def stage_clean(self) -> dict[str, Any]:
        from agecls.data.cleaning import clean_records

        source = self.source()
        loaded = source.load()
        _, index = self.index_fn(source)
        with self.measured():
            records, report = clean_records(loaded.records, self.options(), index, loaded.removed)
            path = self.work / "cleaning.json"
            path.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        records.to_pickle(self.work / "clean.pkl")
        return {"bytes_on_disk": path.stat().st_size, "items": len(loaded.records),
                "records_out": report.records_out, "removed": report.removed}

    def stage_split(self) -> dict[str, Any]:
        from agecls.data.splits import assign_splits, relative_paths

        records = pd.read_pickle(self.work / "clean.pkl")
        rel = self.source().relative_to
        path = self.work / "split.csv"
        with self.measured():
            keys = relative_paths(records["path"], rel)
            records = records.assign(split=assign_splits(records, self.data["splits"], self.data["split_seed"], keys=keys))
            table = pd.DataFrame({"path": keys, "age": records["age"], "split": records["split"]})
            if "sha1" in records.columns:
                table["sha1"] = records["sha1"].to_numpy()
            table.to_csv(path, index=False)
        records.to_pickle(self.work / "split.pkl")
        return {"bytes_on_disk": path.stat().st_size, "items": len(records),
                "splits": {s: int(v) for s, v in records["split"].value_counts().items()}}

    def _cache_class(self):
        from agecls.data.jpeg_cache import JpegCache
        from agecls.data.pixel_cache import PixelCache

        return (JpegCache, "jpegs") if self.spec["format"] == "jpeg" else (PixelCache, "pixels")

    def stage_cache_build(self) -> dict[str, Any]:
        records = pd.read_pickle(self.work / "split.pkl")
        cls, _ = self._cache_class()
        with self.measured():
            cache = cls.build_or_load(records, self.cache_dir, self.spec["side"], float(self.data["face_margin"]),
                                      workers=max(1, int(self.data["num_workers"])))
        return {"bytes_on_disk": _dir_bytes(cache.directory), "items": len(records),
                "cache_dir": str(cache.directory)}

    def stage_epoch_load(self) -> dict[str, Any]:
        """One epoch of the training loader of AgeDataModule itself (its sampler, workers, batch
        size, collate), on the cache cache_build made: the batches a model would get."""
        from agecls.data import AgeDataModule

        _, folder = self._cache_class()

        def built() -> list[str]:  # the caches in the format's folder (not a build's lock file)
            return sorted(p.name for p in (self.cache_dir / folder).iterdir() if p.is_dir())

        before = built()
        skip = {"_target_", "source", "root", "report_dir", "cache_dir", "cache", "cache_format", "split_file"}
        opts = {k: v for k, v in self.data.items() if k not in skip}
        dm = AgeDataModule(source="imdb_wiki", root=self.spec["root"], subset=self.spec["subset"], cropped=True,
                           cache=True, cache_format=self.spec["format"], cache_dir=str(self.cache_dir),
                           report_dir=None, **opts)
        dm.prepare_data()
        dm.setup("fit")
        after = built()
        if after != before:
            raise RuntimeError(f"AgeDataModule built another cache ({after} against {before}): its records "
                               "differ from the benchmark's")
        loader = dm.train_dataloader()
        images = batches = 0
        with self.measured():
            for batch in loader:
                assert batch["image"].dtype.is_floating_point is False
                images += len(batch["age"])
                batches += 1
        return {"bytes_on_disk": 0, "items": images, "batches": batches,
                "images_per_s": images / max(self.seconds, 1e-9), "loader_workers": int(loader.num_workers)}


def _child(spec: Mapping[str, Any], conn: Any) -> None:
    try:
        conn.send(("ok", StageRun(spec).run()))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_stage(spec: Mapping[str, Any], isolate: bool = True) -> dict[str, Any]:
    """Run one stage: in a forked process (its memory peaks are its own), or here."""
    if not isolate:
        return StageRun(spec).run()
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(dict(spec), send), name=f"scale-{spec['stage']}")
    proc.start()
    send.close()
    try:
        status, value = recv.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"stage {spec['stage']} (N={spec['n']}) died with exit code {proc.exitcode}") from None
    proc.join()
    if status != "ok":
        raise RuntimeError(f"stage {spec['stage']} (N={spec['n']}) failed:\n{value}")
    return value


# ------------------------------------------------------------------------------- the suite
def data_options(cfg: DictConfig) -> dict[str, Any]:
    """The data options every source shares (conf/data/_base.yaml's keys), resolved from cfg.data."""
    from agecls.utils.hydra_utils import config_dir

    base = OmegaConf.load(Path(config_dir()) / "data" / "_base.yaml")
    skip = {"_target_", "source", "root", "report_dir", "cache_dir", "split_file"}
    out = {}
    for key in base:
        if key in skip or key not in cfg.data:
            continue
        value = cfg.data[key]
        out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    out["face_margin"] = float(cfg.data.get("face_margin", 0.0) or 0.0)
    return out


def _hardware(cfg: DictConfig) -> str:
    import torch

    from agecls.bench import hardware_name

    want = str(cfg.get("device", "auto"))
    device = torch.device("cuda" if want == "auto" and torch.cuda.is_available() else ("cpu" if want == "auto" else want))
    return hardware_name(device)


def run_scale_suite(cfg: DictConfig) -> pd.DataFrame:
    """`python -m agecls.bench suite=scale`: generate, measure every stage at every N, write the
    CSV and the plot, print the table with the growth of seconds per image."""
    from agecls.data.jpeg_cache import choose_format
    from agecls.data.transforms import eval_resize

    sc = cfg.scale
    sizes = [int(n) for n in sc.sizes]
    if not sizes or min(sizes) < 10:
        raise ValueError(f"scale.sizes={sizes}: give one or more sizes of at least 10 images")
    stages = list(sc.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"scale.stages: unknown {unknown}; stages are {', '.join(STAGES)}")
    formats = [str(f) for f in sc.formats]
    root = Path(str(sc.root)).expanduser()
    work_root = Path(str(sc.work_dir)).expanduser() if sc.get("work_dir") else root / "work"
    workers = int(sc.workers) if sc.get("workers") else (os.cpu_count() or 1)
    data = data_options(cfg)
    side = eval_resize(int(data["image_size"]), float(data["crop_pct"]))
    hardware = _hardware(cfg)
    rates = {**DEFAULT_RATES, **(OmegaConf.to_container(sc.dirty, resolve=True) if sc.get("dirty") else {})}
    isolate = bool(sc.get("isolate", True))
    rows: list[dict[str, Any]] = []
    from agecls.bench import REPO

    output = Path(str(sc.output)) if sc.get("output") else REPO / "benchmarks" / "results" / f"{hardware}-scale.csv"

    def save(rows: list[dict[str, Any]]) -> pd.DataFrame:
        table = pd.DataFrame(rows)
        table["seconds_per_image"] = table["seconds"] / table["n_images"]
        table["bytes_per_image"] = table["bytes_on_disk"] / table["n_images"]
        table = table[COLUMNS + [c for c in table.columns if c not in COLUMNS]]
        table = write_table(table, output, merge=bool(sc.get("merge", True)))
        plot(table, output.with_suffix(".png"))
        return table

    common = {"hardware": hardware, "image_size": int(data["image_size"]), "cache_side": side,
              "batch_size": int(data["batch_size"]), "num_workers": int(data["num_workers"]),
              "subset": str(sc.subset), "date": time.strftime("%Y-%m-%d")}

    for n in sizes:
        t0 = time.perf_counter()
        folder = generate(root, n, int(sc.seed), str(sc.subset), rates, workers, float(sc.photos_per_person))
        meta = json.loads((folder / "meta.json").read_text())
        # the time of the run that made it (reused: this run took reused_seconds to find it)
        rows.append({"n_images": n, "stage": "generate", "seconds": meta["seconds"], "peak_rss_mb": np.nan,
                     "bytes_on_disk": meta["image_bytes"] + meta["mat_bytes"], "cache_format": "",
                     "items": n, "reused_seconds": time.perf_counter() - t0, **common})
        work = work_root / f"n{n}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        base = {"n": n, "root": str(folder), "subset": str(sc.subset), "work": str(work), "data": data, "side": side}
        plan = [(s, "") for s in stages if s not in CACHE_STAGES]
        kept = None
        for fmt in formats:
            plan += [(s, fmt) for s in stages if s in CACHE_STAGES]
        for stage, fmt in plan:
            if fmt == "auto":
                fmt = choose_format("auto", kept or n, side, float(data.get("cache_memory_budget_gb", 8.0)))
            if stage == "cache_build" and fmt == "raw":
                need = (kept or n) * 3 * side * side
                free = shutil.disk_usage(work).free
                if need > free - 2e9:
                    log.warning("Skipping the raw cache at N=%d: it needs %.1f GB, %.1f GB are free", n, need / 1e9, free / 1e9)
                    continue
            if stage == "epoch_load" and not any(r["stage"] == "cache_build" and r["cache_format"] == fmt
                                                 and r["n_images"] == n for r in rows):
                continue
            log.info("Scale benchmark: N=%d, %s%s ...", n, stage, f" ({fmt})" if fmt else "")
            res = run_stage({**base, "stage": stage, "format": fmt}, isolate=isolate)
            if stage == "clean":
                kept = int(res["records_out"])
                if res["removed"] != {**res["removed"], **meta["expected_removed"]}:
                    log.warning("Cleaning removed %s; the generator planted %s", res["removed"], meta["expected_removed"])
            extra = {k: v for k, v in res.items() if k not in ("seconds", "peak_rss_mb", "bytes_on_disk", "removed", "splits", "cache_dir")}
            rows.append({"n_images": n, "stage": stage, "seconds": res["seconds"], "peak_rss_mb": res["peak_rss_mb"],
                         "bytes_on_disk": res["bytes_on_disk"], "cache_format": fmt, **extra, **common})
            log.info("  %.2f s (%.1f us per image), peak %.0f MB anonymous, %.1f MB on disk", res["seconds"],
                     res["seconds"] / n * 1e6, res["peak_rss_mb"], res["bytes_on_disk"] / 1e6)
            if stage == "epoch_load" and not sc.get("keep_caches", False):  # disk: one cache at a time
                shutil.rmtree(work / "cache" / ("jpegs" if fmt == "jpeg" else "pixels"), ignore_errors=True)
        if not sc.get("keep_caches", False):
            shutil.rmtree(work, ignore_errors=True)
        table = save(rows)  # after each N: a long run stopped later keeps what it measured
    if not sc.get("keep_caches", False) and work_root.is_dir() and not any(work_root.iterdir()):
        work_root.rmdir()
    print(summarize(table))
    print(f"wrote {output} and {output.with_suffix('.png')}")
    return table


def write_table(table: pd.DataFrame, output: Path, merge: bool = True) -> pd.DataFrame:
    """Write the CSV; with `merge`, rows of an earlier run at sizes not measured now are kept."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if merge and output.exists():
        old = pd.read_csv(output, keep_default_na=False, na_values=[""])
        old = old[~old["n_images"].isin(table["n_images"].unique())]
        table = pd.concat([old, table], ignore_index=True)
    table["cache_format"] = table["cache_format"].fillna("")
    table = table.sort_values(["n_images"], kind="stable").reset_index(drop=True)
    table.to_csv(output, index=False)
    return table


def growth(table: pd.DataFrame) -> pd.DataFrame:
    """Per stage and format: seconds per image at the largest N over that at the smallest."""
    out = []
    t = table.assign(cache_format=table["cache_format"].fillna(""))
    for (stage, fmt), g in t.groupby(["stage", "cache_format"], sort=False):
        g = g.sort_values("n_images")
        lo, hi = g.iloc[0], g.iloc[-1]
        ratio = (hi["seconds"] / hi["n_images"]) / (lo["seconds"] / lo["n_images"]) if len(g) > 1 else np.nan
        # the same for CPU seconds (process and workers): what other load on a shared machine changes least
        cpu = np.nan
        if len(g) > 1 and "cpu_seconds" in g.columns and lo.get("cpu_seconds", 0) > 0:
            cpu = (hi["cpu_seconds"] / hi["n_images"]) / (lo["cpu_seconds"] / lo["n_images"])
        out.append({"stage": stage, "cache_format": fmt, "n_small": int(lo["n_images"]), "n_large": int(hi["n_images"]),
                    "growth": ratio, "cpu_growth": cpu, "peak_rss_mb_max": g["peak_rss_mb"].max()})
    return pd.DataFrame(out)


def summarize(table: pd.DataFrame) -> str:
    t = table.assign(cache_format=table["cache_format"].fillna(""))
    sizes = sorted(t["n_images"].unique())
    g = growth(t).set_index(["stage", "cache_format"])
    head = f"{'stage':<12}{'format':<7}" + "".join(f"{f'N={n:,}':>38}" for n in sizes) + f"{'growth':>9}  target{'cpu growth':>12}"
    sub = f"{'':<19}" + "".join(f"{'s':>9}{'us/img':>9}{'peak MB':>9}{'B/img':>11}" for _ in sizes)
    lines = ["scale benchmark: seconds, microseconds per image, peak anonymous memory (MB), bytes on disk per image",
             head, sub]
    order = {s: i for i, s in enumerate(("generate", *STAGES))}
    keys = sorted(g.index, key=lambda k: (order.get(k[0], 99), k[1]))
    for stage, fmt in keys:
        line = f"{stage:<12}{fmt or '-':<7}"
        for n in sizes:
            r = t[(t["stage"] == stage) & (t["cache_format"] == fmt) & (t["n_images"] == n)]
            if r.empty:
                line += f"{'-':>38}"
                continue
            r = r.iloc[0]
            peak = "-" if pd.isna(r["peak_rss_mb"]) else f"{r['peak_rss_mb']:.0f}"
            line += f"{r['seconds']:>9.2f}{r['seconds'] / n * 1e6:>9.1f}{peak:>9}{r['bytes_on_disk'] / n:>11,.0f}"
        ratio = g.loc[(stage, fmt), "growth"]
        verdict = "" if stage == "generate" or pd.isna(ratio) else ("met" if ratio <= GROWTH_TARGET else "MISSED")
        line += f"{'-' if pd.isna(ratio) else f'{ratio:.2f}x':>9}  {verdict:<6}"
        cpu = g.loc[(stage, fmt), "cpu_growth"]
        line += f"{'-' if pd.isna(cpu) else f'{cpu:.2f}x':>12}"
        lines.append(line)
    measured = t[t["stage"] != "generate"]
    if len(sizes) > 1:
        lines.append(f"growth = seconds per image at N={sizes[-1]:,} over N={sizes[0]:,}; target <= {GROWTH_TARGET}x (O(N)); "
                     "cpu growth: the same for CPU seconds of the stage's processes")
    big = measured[measured["n_images"] == sizes[-1]]
    if len(big):
        top = big.loc[big["peak_rss_mb"].idxmax()]
        lines.append(f"peak anonymous memory at N={sizes[-1]:,}: {top['peak_rss_mb']:.0f} MB ({top['stage']}"
                     f"{' ' + top['cache_format'] if top['cache_format'] else ''}); target < 4096 MB: "
                     f"{'met' if top['peak_rss_mb'] < 4096 else 'MISSED'}")
    return "\n".join(lines)


def plot(table: pd.DataFrame, path: Path) -> None:
    """Seconds against N per stage (and cache format), log-log, with an O(N) guide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = table.assign(cache_format=table["cache_format"].fillna(""))
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for (stage, fmt), g in t.groupby(["stage", "cache_format"], sort=False):
        g = g.sort_values("n_images")
        ax.plot(g["n_images"], g["seconds"], marker="o", label=f"{stage} ({fmt})" if fmt else stage,
                linestyle="--" if stage == "generate" else "-")
    sizes = np.array(sorted(t["n_images"].unique()), dtype=float)
    if len(sizes) > 1:
        ref = t[t["n_images"] == sizes[0]]["seconds"].median()
        ax.plot(sizes, ref * sizes / sizes[0], color="grey", linestyle=":", label="O(N)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images (N)")
    ax.set_ylabel("seconds")
    hw = t["hardware"].iloc[0] if "hardware" in t.columns else ""
    ax.set_title(f"agecls data stages against N ({hw})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
