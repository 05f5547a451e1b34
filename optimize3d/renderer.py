"""Render the field: march rays through it, shade, composite on white.

    out = render_views(field, grid, c2w_gl, fov_deg, size, march_cfg, mode="albedo")
    out["rgb"]      [V, 3, H, W] in [0, 1] on a white background
    out["opacity"]  [V, 1, H, W];  out["normal"] [V, 3, H, W] (world normals mapped to [0, 1])
    out["orientation"]  sum(weights.detach() * clamp(n . d, min=0)^2) / count(opacity > 0)  (if normals)
    out = render_rays(field, grid, rays_o, rays_d, march_cfg)     # the same per ray: rgb [R, 3], opacity [R, 1]
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from optimize3d.march import MarchConfig, camera_rays, march
from optimize3d.shading import shade


def render_rays(field, grid, rays_o: torch.Tensor, rays_d: torch.Tensor, cfg: MarchConfig, mode: str = "albedo",
                lights: Optional[torch.Tensor] = None, ambient: float = 0.5, normals: bool = False,
                stratified: bool = False, generator: Optional[torch.Generator] = None,
                ray_chunk: Optional[int] = None) -> dict:
    """Rays [R, 3] -> {"rgb" [R, 3] on white, "opacity" [R, 1], "samples", and with normals "normal" [R, 3],
    "orientation"}. lights: the point light of each ray [R, 3] (lambertian / textureless modes).
    normals=True: the field's normals (field.cfg.normal_type) and the orientation loss. ray_chunk: rays
    marched at once (use it without grad to bound memory)."""
    need_normals = normals or mode != "albedo"

    def field_values(x, d, light):  # everything per sample that the backward pass needs
        if need_normals:
            sigma, albedo, n = field.with_normals(x)
            parts = [shade(albedo, n, x, light, ambient, mode), n * 0.5 + 0.5,
                     ((n * d).sum(-1, keepdim=True).clamp(min=0) ** 2)]
        else:
            sigma, albedo = field(x)
            parts = [albedo]
        return sigma, torch.cat(parts, -1)

    def sampler(chunk_lights):      # march() numbers the rays of the chunk it is given from 0
        def sample_fn(x, d, ray_index):
            light = chunk_lights[ray_index] if need_normals and chunk_lights is not None else None
            if cfg.recompute and torch.is_grad_enabled():
                return checkpoint(field_values, x, d, light, use_reentrant=False)
            return field_values(x, d, light)
        return sample_fn

    results = []
    chunk = ray_chunk or rays_o.shape[0]
    for s in range(0, rays_o.shape[0], chunk):
        results.append(march(sampler(None if lights is None else lights[s:s + chunk]), rays_o[s:s + chunk],
                             rays_d[s:s + chunk], field.cfg.radius, cfg, grid=grid, stratified=stratified,
                             generator=generator, density_fn=field.density))
    values = torch.cat([r["values"] for r in results])
    opacity = torch.cat([r["opacity"] for r in results])
    out = {"rgb": values[:, :3] + (1 - opacity), "opacity": opacity, "samples": sum(r["samples"] for r in results)}
    if need_normals:
        out["normal"] = values[:, 3:6] + (1 - opacity)
        weighted = sum((r["sample_weights"].detach().reshape(-1) * r["sample_values"][:, 6]).sum() for r in results)
        out["orientation"] = weighted / (opacity > 0).sum().clamp(min=1)
    return out


def render_views(field, grid, c2w_gl: torch.Tensor, fov_deg: torch.Tensor, size: int, cfg: MarchConfig,
                 mode: str = "albedo", lights: Optional[torch.Tensor] = None, ambient: float = 0.5,
                 normals: bool = False, stratified: bool = False, generator: Optional[torch.Generator] = None,
                 ray_chunk: Optional[int] = None) -> dict:
    """V cameras (c2w [V, 4, 4] Blender/OpenGL, FOV [V] degrees) -> images [V, C, size, size] (render_rays's
    keys). lights: one point light per view [V, 3]."""
    v = c2w_gl.shape[0]
    rays_o, rays_d = camera_rays(c2w_gl, fov_deg, size)
    ray_lights = None if lights is None else lights.repeat_interleave(size * size, 0)
    out = render_rays(field, grid, rays_o, rays_d, cfg, mode, ray_lights, ambient, normals, stratified, generator,
                      ray_chunk)
    image = lambda x: x.view(v, size, size, -1).permute(0, 3, 1, 2)  # noqa: E731
    for key in ("rgb", "opacity", "normal"):
        if key in out:
            out[key] = image(out[key])
    return out
