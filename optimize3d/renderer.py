"""Render views of the field: march rays through it, shade, composite on white.

    out = render_views(field, grid, c2w_gl, fov_deg, size, march_cfg, mode="albedo")
    out["rgb"]      [V, 3, H, W] in [0, 1] on a white background
    out["opacity"]  [V, 1, H, W];  out["normal"] [V, 3, H, W] (world normals mapped to [0, 1])
    out["orientation"]  sum(weights.detach() * clamp(n . d, min=0)^2) / count(opacity > 0)  (if normals)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from optimize3d.march import MarchConfig, camera_rays, march
from optimize3d.shading import shade


def render_views(field, grid, c2w_gl: torch.Tensor, fov_deg: torch.Tensor, size: int, cfg: MarchConfig,
                 mode: str = "albedo", lights: Optional[torch.Tensor] = None, ambient: float = 0.5,
                 normals: bool = False, stratified: bool = False, generator: Optional[torch.Generator] = None,
                 ray_chunk: Optional[int] = None) -> dict:
    """lights: one point light per view [V, 3] (lambertian / textureless modes). normals=True also
    returns the normal image and the orientation loss (finite-difference normals cost 3 more density lookups
    per sample). ray_chunk: rays marched at once (use it without grad to bound memory)."""
    v = c2w_gl.shape[0]
    rays_o, rays_d = camera_rays(c2w_gl, fov_deg, size)
    per_view = size * size
    need_normals = normals or mode != "albedo"
    radius = field.cfg.radius

    offset = 0                      # first ray of the chunk being marched: march() numbers rays per chunk

    def field_values(x, d, light):  # everything per sample that the backward pass needs
        sigma, albedo = field(x)
        if need_normals:
            n = field.normals(x, sigma)
            parts = [shade(albedo, n, x, light, ambient, mode), n * 0.5 + 0.5,
                     ((n * d).sum(-1, keepdim=True).clamp(min=0) ** 2)]
        else:
            parts = [albedo]
        return sigma, torch.cat(parts, -1)

    def sample_fn(x, d, ray_index):
        light = lights[(ray_index + offset) // per_view] if need_normals and lights is not None else None
        if cfg.recompute and torch.is_grad_enabled():
            return checkpoint(field_values, x, d, light, use_reentrant=False)
        return field_values(x, d, light)

    results = []
    chunk = ray_chunk or rays_o.shape[0]
    for s in range(0, rays_o.shape[0], chunk):
        offset = s
        results.append(march(sample_fn, rays_o[s:s + chunk], rays_d[s:s + chunk], radius, cfg, grid=grid,
                             stratified=stratified, generator=generator))
    values = torch.cat([r["values"] for r in results])
    opacity = torch.cat([r["opacity"] for r in results])
    image = lambda x: x.view(v, size, size, -1).permute(0, 3, 1, 2)  # noqa: E731
    out = {"rgb": image(values[:, :3] + (1 - opacity)), "opacity": image(opacity),
           "samples": sum(r["samples"] for r in results)}
    if need_normals:
        out["normal"] = image(values[:, 3:6] + (1 - opacity))
        weighted = sum((r["sample_weights"].detach().reshape(-1) * r["sample_values"][:, 6]).sum() for r in results)
        out["orientation"] = weighted / (opacity > 0).sum().clamp(min=1)
    return out
