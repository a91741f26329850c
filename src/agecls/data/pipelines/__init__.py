"""Input pipelines: each turns the prepared records into per-split datasets and finishes their
batches on the device, behind one interface (`base.Pipeline`).

    per_sample   data.cache=false: PIL + torchvision per image, per epoch, in DataLoader workers
    raw          data.cache=true data.cache_format=raw: uint8 pixels, memory-mapped
    jpeg         data.cache=true data.cache_format=jpeg: the same crops as JPEGs, decoded per batch
    features     data.feature_cache=true: frozen-backbone features computed once (wraps another)

To add a pipeline: a module here with a `Pipeline` subclass, and its name in PIPELINES below (the
value data.cache_format selects when data.cache=true; agecls.utils.checks accepts it from there).
"""

from __future__ import annotations

import logging

from agecls.data.jpeg_cache import choose_format
from agecls.data.pipelines.base import Pipeline, PipelineOptions, build_lock
from agecls.data.pipelines.cached import CachedPipeline, JpegCachePipeline, RawCachePipeline
from agecls.data.pipelines.features import FeaturePipeline
from agecls.data.pipelines.per_sample import PerSamplePipeline

log = logging.getLogger(__name__)

PIPELINES: dict[str, type[Pipeline]] = {
    "per_sample": PerSamplePipeline,
    "raw": RawCachePipeline,
    "jpeg": JpegCachePipeline,
}


def make_pipeline(name: str, options: PipelineOptions, n_images: int = 0, memory_budget_gb: float = 8.0) -> Pipeline:
    """The pipeline `name` (a key of PIPELINES, or `auto`: raw when the raw cache of `n_images`
    fits `memory_budget_gb`, jpeg otherwise)."""
    if name == "auto":
        name = choose_format("auto", n_images, options.cache_side, memory_budget_gb)
    if name not in PIPELINES:
        raise ValueError(f"input pipeline {name!r}: choose one of {', '.join(PIPELINES)} (or auto)")
    return PIPELINES[name](options)


__all__ = ["PIPELINES", "CachedPipeline", "FeaturePipeline", "JpegCachePipeline", "PerSamplePipeline",
           "Pipeline", "PipelineOptions", "RawCachePipeline", "build_lock", "make_pipeline"]
