"""The 3D stage's cameras: each step's random camera groups (the released random_multiview.py) and the
fixed preview cameras of multiview.png."""
from __future__ import annotations

import math
import random

import numpy as np
import torch

from optimize3d.config import GenerateConfig
from render.cameras import c2w_blender


def draw_elevations(cfg: GenerateConfig, groups: int, rng: random.Random) -> list[float]:
    """One step's elevations in degrees, one per camera group, as `elevation_sampling` says (one coin per step)."""
    lo, hi = cfg.elevation_range
    if cfg.elevation_sampling == "sphere" or (cfg.elevation_sampling == "coin" and not rng.random() < 0.5):
        return [math.degrees(math.asin(2 * rng.uniform((lo + 90) / 180, (hi + 90) / 180) - 1)) for _ in range(groups)]
    return [rng.uniform(lo, hi) for _ in range(groups)]


def sample_cameras(cfg: GenerateConfig, rng: random.Random, step: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[float], list[float]]:
    """One step's cameras: view_groups[phase] groups, each with its own elevation, FOV, distance and azimuth
    offset (the released random_multiview.py), its `views` views 360/views apart. -> c2w (Blender/OpenGL)
    [G * V, 4, 4], FOV [G * V] (degrees), azimuths [G * V], elevations [G]."""
    elevations = draw_elevations(cfg, cfg.view_groups[cfg.phase(step)], rng)
    c2w, fovs, azimuths = [], [], []
    for elevation in elevations:
        fov = rng.uniform(*cfg.fov_range)
        distance = rng.uniform(*cfg.relative_distance_range) / math.tan(math.radians(fov) / 2)
        offset = rng.uniform(0, 360)
        group = [(offset + k * 360.0 / cfg.views) % 360.0 for k in range(cfg.views)]
        c2w += [c2w_blender(az, elevation, distance) for az in group]
        fovs += [fov] * cfg.views
        azimuths += group
    return torch.tensor(np.stack(c2w), dtype=torch.float32), torch.tensor(fovs), azimuths, elevations


def preview_cameras(cfg: GenerateConfig) -> torch.Tensor:
    return torch.tensor(np.stack([c2w_blender(az, cfg.preview_elevation, 1.5) for az in (0.0, 90.0, 180.0, 270.0)]),
                        dtype=torch.float32)
