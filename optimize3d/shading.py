"""Shading of the 3D stage (threestudio's diffuse material with a point light and soft shading).

    mode = draw_shading(step, cfg, rng)                     # "albedo" | "lambertian" | "textureless"
    rgb = shade(albedo, normals, points, light_positions, ambient, mode)

Albedo only before `shading_start`; afterwards textureless with probability p_textureless, else
lambertian with probability p_lambertian, else albedo. Soft shading: ambient ~ U(0, 1), diffuse =
1 - ambient. Light: direction = normalise(camera position + N(0, 1)), distance ~ U(light_distance_range).
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

MODES = ("albedo", "lambertian", "textureless")


def draw_shading(step: int, shading_start: int, p_textureless: float, p_lambertian: float, rng: random.Random) -> str:
    if step < shading_start:
        return "albedo"
    if rng.random() < p_textureless:
        return "textureless"
    return "lambertian" if rng.random() < p_lambertian else "albedo"


def light_positions(camera_positions: torch.Tensor, distance_range: tuple[float, float],
                    generator: torch.Generator, group_size: int) -> torch.Tensor:
    """One point light per view [V, 3]: per camera group of `group_size` views one offset N(0, 1) and one
    distance, the direction of each view's light = its camera position + that offset (the released code)."""
    groups = camera_positions.shape[0] // group_size
    offset = torch.randn(groups, 3, generator=generator).repeat_interleave(group_size, 0).to(camera_positions)
    lo, hi = distance_range
    distance = lo + (hi - lo) * torch.rand(groups, 1, generator=generator).repeat_interleave(group_size, 0)
    return F.normalize(camera_positions + offset, dim=-1) * distance.to(camera_positions)


def shade(albedo: torch.Tensor, normals: torch.Tensor | None, points: torch.Tensor, light: torch.Tensor | None,
          ambient: float, mode: str) -> torch.Tensor:
    """Per-sample colour [N, 3]. light: the point light of each sample's view [N, 3]."""
    if mode == "albedo":
        return albedo
    if mode not in MODES:
        raise ValueError(f"shading {mode!r}: expected one of {MODES}")
    cos = (normals * F.normalize(light - points, dim=-1)).sum(-1, keepdim=True).clamp(min=0)
    lit = ambient + (1 - ambient) * cos
    base = torch.ones_like(albedo) if mode == "textureless" else albedo
    return (base * lit).clamp(0, 1)
