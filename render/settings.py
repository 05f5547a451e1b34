"""Configuration of the render stage (loaded from YAML with dotted overrides, see common/config.py).

`RenderSettings` holds everything that changes the pixels: its hash is the cache key of a rendered
object, so a changed setting renders again. `RenderConfig` adds how the work is run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from common.config import config_hash

SCHEMA_VERSION = 1   # bump when the output layout or the meaning of a setting changes
# Settings added after schema 1, and the value that renders exactly as before they existed: at that value a
# setting stays out of the cache key, so adding a setting does not make every rendered object stale.
ADDED_SETTINGS = {"adaptive_threshold": 0.0, "min_samples": 0}


@dataclass
class RenderSettings:
    resolution: int = 256
    """Image width = height in pixels."""
    samples: int = 24
    """Cycles samples per pixel (with adaptive sampling, the most). Chosen by bench/render.py's curve as the
    cheapest setting whose every view is >= 40 dB PSNR (on white) against a 1024-sample reference, on the
    four test GLBs under four HDRIs: 24 samples, adaptive (0.05, at least 8) + fast denoiser, 1.50 s/view
    on 2 CPU threads at 256 px; 16 + fast (1.15 s/view) leaves a view at 39.3 dB."""
    adaptive_threshold: float = 0.05
    """Cycles' adaptive sampling: a pixel stops once its noise estimate is under this (0: off, every pixel
    gets `samples`; else `samples` is the most and `min_samples` the fewest)."""
    min_samples: int = 8
    """With adaptive sampling, the fewest samples per pixel, at most `samples` (0: Cycles' own choice)."""
    denoiser: str = "fast"
    """OpenImageDenoise quality: none | fast | balanced | high (not "off": YAML reads that as false)."""
    normalise: str = "cube"
    """cube: the bounding box's longest side becomes 1 (SyncDreamer/the paper; a box-like object's
    corners leave the frame in some views at distance 1.5). sphere: the bounding sphere's diameter
    becomes 1, so the whole object is in every view."""
    distance: float = 1.5
    """Camera distance from the centre of the unit cube."""
    lens_mm: float = 35.0
    sensor_mm: float = 32.0
    hdri_luminance: tuple[float, float] = (0.7, 1.3)
    """Range of the HDRI's mean luminance after scaling (each HDRI's strength is normalised)."""
    hdris: list[str] = field(default_factory=list)
    """Names of Blender's bundled HDRIs to draw from (city, courtyard, ...); empty = all."""
    seed: int = 0
    """Base seed; each object's seed is derived from it and the object's uid."""

    def key(self) -> str:
        return config_hash({"schema": SCHEMA_VERSION, **{k: v for k, v in self.__dict__.items()
                                                        if not (k in ADDED_SETTINGS and v == ADDED_SETTINGS[k])}})

    def validate(self) -> None:
        if not 8 <= self.resolution <= 4096:
            raise ValueError(f"resolution {self.resolution}: expected 8..4096 pixels")
        if self.samples < 1:
            raise ValueError(f"samples {self.samples}: expected at least 1")
        if self.adaptive_threshold < 0:
            raise ValueError(f"adaptive_threshold {self.adaptive_threshold}: expected >= 0 (0: off)")
        if self.min_samples < 0:
            raise ValueError(f"min_samples {self.min_samples}: expected >= 0")
        if self.denoiser not in ("none", "fast", "balanced", "high"):
            raise ValueError(f"denoiser {self.denoiser!r}: expected none, fast, balanced or high")
        if self.normalise not in ("cube", "sphere"):
            raise ValueError(f"normalise {self.normalise!r}: expected cube or sphere")
        lo, hi = self.hdri_luminance
        if not 0 < lo <= hi:
            raise ValueError(f"hdri_luminance {self.hdri_luminance}: expected 0 < low <= high")


@dataclass
class RenderConfig:
    settings: RenderSettings = field(default_factory=RenderSettings)
    timeout: float = 900.0
    """Seconds one object may take (start-up, import, 32 views); then its process group is killed.
    Measured at the defaults, 256 px, one CPU thread: a median 130 s per object, two threads 53 s (bench/render.py)."""
    retries: int = 1
    """Extra attempts for transient failures (timeout, crash, download); permanent ones never retry."""
    device: str = "cpu"
    """Cycles device: cpu | cuda | optix | hip | oneapi | metal."""
    cpus_per_task: int = 1
    """CPUs Ray reserves per object; also Cycles' thread count."""
    gpus_per_task: float = 0.0
    """GPUs Ray reserves per object (set e.g. 0.5 with --device optix)."""
    objects_per_worker: int = 100
    """Objects one Blender process renders, each from a factory-empty scene, before a fresh process takes
    over (1: a process per object). A timeout or crash replaces the process at once."""
    worker_max_rss_growth_mb: float = 2048.0
    """A Blender process whose memory grew by more than this since its first object is replaced."""
    num_workers: Optional[int] = None
    """Objects rendered at once; default: every CPU of the local machine or cluster."""
    num_shards: int = 1
    shards: str = "all"
    limit: Optional[int] = None
    """Render at most this many objects of the selected shards (after sorting by uid)."""

    def validate(self) -> None:
        self.settings.validate()
        if self.objects_per_worker < 1:
            raise ValueError(f"objects_per_worker {self.objects_per_worker}: expected at least 1 (1: a process per object)")
        if self.worker_max_rss_growth_mb <= 0:
            raise ValueError(f"worker_max_rss_growth_mb {self.worker_max_rss_growth_mb}: expected a positive size")
        if self.timeout <= 0:
            raise ValueError(f"timeout {self.timeout}: expected a positive number of seconds")
