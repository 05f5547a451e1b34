"""Rays, ray marching and volume rendering with nerfacc.

    rays_o, rays_d = camera_rays(c2w_gl, fov_deg, size)               # [V*H*W, 3] each
    out = march(field, rays_o, rays_d, grid, cfg, step_fn=shade)      # composited per-ray quantities

What nerfacc 0.5.3 runs where (measured; see README "nerfacc on CPU"):
  - CUDA only: every compiled op: `OccGridEstimator.sampling`, `traverse_grids`, `ray_aabb_intersect`,
    `pack_info`, and every packed (`ray_indices=`) rendering path.
  - pure torch, any device: the batched [n_rays, n_samples] forms of `render_weight_from_density` and
    `accumulate_along_rays`, and `OccGridEstimator` itself with `update_every_n_steps`.
So there are three marchers. "nerfacc" (GPU): the occupancy grid's own sampler emits packed samples in
occupied cells only. "torch" (CPU, and anywhere): a fixed number of stratified samples per ray between
the ray's box entry and exit; samples in cells the occupancy grid marks empty are not evaluated (their
density is 0), and nerfacc's batched compositing turns densities into weights. "fused" (any device, NVIDIA
Warp): the torch marcher's samples, occupancy test and compositing rule, with the test and the compositing
as kernels (march_warp.py): the same images and gradients with less work. "auto" picks "nerfacc" on a GPU,
otherwise "fused" when warp-lang is installed, otherwise "torch".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import nerfacc
import torch
import torch.nn.functional as F

from common.config import stable_seed


@dataclass
class MarchConfig:
    samples_per_ray: int = 512
    """Samples over the box diagonal (sets the step size of both marchers)."""
    grid_resolution: int = 32
    grid_update_every: int = 16
    grid_threshold: float = 0.01
    """A cell is occupied when its density * step size exceeds this (nerfacc's occ_thre)."""
    alpha_threshold: float = 0.01
    """Samples with a smaller alpha are dropped (nerfacc's alpha_thre; the torch marcher too, given a density_fn)."""
    early_stop_eps: float = 1e-4
    """A ray stops where its transmittance falls below this (nerfacc's early_stop_eps; the torch marcher too,
    given a density_fn): samples behind an opaque surface are not evaluated. 0: never."""
    first_pass: bool = True
    """fused marcher: apply the alpha / early-stop rule with a first pass of densities without gradients, then
    evaluate only the samples it keeps (as the torch marcher always does). False: evaluate every occupied
    sample once, with gradients, and apply the rule in the compositing: cheaper while the field is still a
    transparent blob, far dearer on a converged object, whose occupied cells fill its inside."""
    marcher: str = "auto"
    """auto | nerfacc (CUDA) | fused (any device, Warp) | torch (any device): see the module docstring."""
    chunk: int = 1 << 18
    """Samples evaluated at once (bounds memory)."""
    recompute: bool = True
    """With gradients, keep only each chunk's inputs and outputs and evaluate the field again in the
    backward pass (activation checkpointing): the paper's 4 x 256 x 256 rays need it on an 80 GB GPU
    (bench/results/gpu-*.json: 11.4 KB per sample without it). Costs one more forward of the field."""

    @staticmethod
    def tiny() -> "MarchConfig":
        # recompute off: a 32 px step fits in memory anyway, and on a CPU the second forward costs ~30%
        return MarchConfig(samples_per_ray=64, grid_resolution=32, grid_update_every=8, recompute=False)


def camera_rays(c2w_gl: torch.Tensor, fov_deg: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pinhole rays through pixel centres: c2w [V, 4, 4] (OpenGL: the camera looks down -z, +y up),
    vertical = horizontal FOV [V] in degrees -> origins, unit directions [V*size*size, 3] (row-major)."""
    device = c2w_gl.device
    focal = 0.5 * size / torch.tan(torch.deg2rad(fov_deg.to(device)) / 2)                # [V]
    j, i = torch.meshgrid(torch.arange(size, device=device), torch.arange(size, device=device), indexing="ij")
    x = (i + 0.5 - size / 2)[None] / focal[:, None, None]
    y = -(j + 0.5 - size / 2)[None] / focal[:, None, None]
    d_cam = torch.stack([x, y, -torch.ones_like(x)], -1)                                 # [V, H, W, 3]
    d = torch.einsum("vij,vhwj->vhwi", c2w_gl[:, :3, :3].to(d_cam), d_cam)
    o = c2w_gl[:, None, None, :3, 3].expand_as(d)
    return o.reshape(-1, 3).contiguous(), F.normalize(d.reshape(-1, 3), dim=-1)


def box_intersect(rays_o: torch.Tensor, rays_d: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slab test against [-radius, radius]^3 in torch -> t_near, t_far, hit (nerfacc's is CUDA only)."""
    inv = 1.0 / torch.where(rays_d.abs() < 1e-12, torch.full_like(rays_d, 1e-12), rays_d)
    t0, t1 = (-radius - rays_o) * inv, (radius - rays_o) * inv
    near = torch.minimum(t0, t1).amax(-1).clamp(min=0)
    far = torch.maximum(t0, t1).amin(-1)
    return near, far, far > near


def new_occupancy_grid(radius: float, cfg: MarchConfig) -> nerfacc.OccGridEstimator:
    return nerfacc.OccGridEstimator(roi_aabb=[-radius] * 3 + [radius] * 3, resolution=cfg.grid_resolution, levels=1)


def step_size(radius: float, cfg: MarchConfig) -> float:
    return 2 * radius * math.sqrt(3) / cfg.samples_per_ray


def update_grid(grid: nerfacc.OccGridEstimator, field, step: int, radius: float, cfg: MarchConfig, seed: int = 0) -> None:
    """nerfacc's refresh every grid_update_every steps. It jitters and picks cells with torch's global random
    state: seeded here from (seed, step), so that a resumed run refreshes its grid as an uninterrupted one."""
    if step % cfg.grid_update_every:
        return
    dt = step_size(radius, cfg)
    grid.train()
    device = grid.binaries.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(stable_seed(seed, step, "occupancy-grid"))
        grid.update_every_n_steps(step, lambda x: field.density(x)[:, None] * dt, occ_thre=cfg.grid_threshold,
                                  n=cfg.grid_update_every)


def occupied(grid: nerfacc.OccGridEstimator, x: torch.Tensor, radius: float) -> torch.Tensor:
    """Whether each point [N, 3] lies in an occupied grid cell (points outside the box: False)."""
    res = grid.binaries.shape[-1]
    cell = ((x / radius + 1) / 2 * res).floor().long()
    inside = ((cell >= 0) & (cell < res)).all(-1)
    cell = cell.clamp(0, res - 1)
    return inside & grid.binaries[0, cell[:, 0], cell[:, 1], cell[:, 2]]


def resolve_marcher(cfg: MarchConfig, device: torch.device) -> str:
    from optimize3d.field import warp_available
    if cfg.marcher == "auto":
        return "nerfacc" if device.type == "cuda" else "fused" if warp_available() else "torch"
    if cfg.marcher == "nerfacc" and device.type != "cuda":
        raise ValueError("marcher=nerfacc needs a CUDA device (nerfacc's sampler is CUDA only); use marcher=fused or torch")
    if cfg.marcher == "fused" and not warp_available():
        raise ImportError("marcher=fused needs NVIDIA Warp (pip install warp-lang); use marcher=torch")
    if cfg.marcher not in ("nerfacc", "fused", "torch"):
        raise ValueError(f"marcher {cfg.marcher!r}: expected auto, nerfacc, fused or torch")
    return cfg.marcher


# A sample function takes positions [N, 3], ray directions [N, 3] and the ray index of each sample [N]
# and returns (density [N], values [N, C]): what is composited along the rays.
SampleFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def evaluate(sample_fn: SampleFn, x: torch.Tensor, d: torch.Tensor, ray_index: torch.Tensor,
             chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_fn over the samples `chunk` at a time (each chunk is one unit of recomputation)."""
    sig_parts, val_parts = [], []
    for s in range(0, x.shape[0], chunk):
        sig, val = sample_fn(x[s:s + chunk], d[s:s + chunk], ray_index[s:s + chunk])
        sig_parts.append(sig)
        val_parts.append(val)
    if val_parts:
        return torch.cat(sig_parts), torch.cat(val_parts)
    # nothing to evaluate: probe the sample function once for the width of its values
    sig, val = sample_fn(torch.zeros(1, 3, device=x.device), torch.zeros(1, 3, device=x.device),
                         torch.zeros(1, dtype=torch.long, device=x.device))
    return sig[:0], val[:0]


@torch.no_grad()
def visible(density_fn, x: torch.Tensor, candidates: torch.Tensor, n_rays: int, n: int, dt: torch.Tensor,
            cfg: MarchConfig) -> torch.Tensor:
    """[R * n] bool: the candidate samples (ray-major, n per ray) whose alpha reaches cfg.alpha_threshold and
    in front of which the ray's transmittance is still at least cfg.early_stop_eps (densities without grad)."""
    idx = candidates.nonzero()[:, 0]
    sigma = torch.zeros(n_rays * n, device=x.device, dtype=x.dtype)
    for s in range(0, idx.numel(), cfg.chunk):
        sigma[idx[s:s + cfg.chunk]] = density_fn(x[idx[s:s + cfg.chunk]]).to(x.dtype)
    alpha = 1 - torch.exp(-sigma * dt)
    transmittance = torch.cumprod(torch.cat([torch.ones(n_rays, 1, device=x.device, dtype=x.dtype),
                                             (1 - alpha).view(n_rays, n)[:, :-1]], 1), 1).reshape(-1)
    return (alpha >= cfg.alpha_threshold) & (transmittance >= cfg.early_stop_eps)


def march(sample_fn: SampleFn, rays_o: torch.Tensor, rays_d: torch.Tensor, radius: float, cfg: MarchConfig,
          grid: Optional[nerfacc.OccGridEstimator] = None, stratified: bool = False,
          generator: Optional[torch.Generator] = None,
          density_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
    """Composite `sample_fn`'s values along each ray -> {"values": [R, C], "opacity": [R, 1],
    "depth": [R, 1], "samples": number of field evaluations, "sample_weights" [S] and "sample_values"
    [S, C] per sample (for losses on samples)}. grid=None: dense sampling (no skipping).
    density_fn (positions [N, 3] -> density [N]): a first pass without gradients over the candidate samples
    drops those under cfg.alpha_threshold and those behind cfg.early_stop_eps of transmittance, as nerfacc's
    sampler does with its sigma_fn; sample_fn then runs on the rest only ("samples": the evaluations with
    gradients). The fused marcher applies the same rule in its compositing, to samples all evaluated once."""
    marcher = resolve_marcher(cfg, rays_o.device)
    n_rays = rays_o.shape[0]
    dt = step_size(radius, cfg)
    if marcher == "nerfacc":
        if grid is None:
            raise ValueError("marcher=nerfacc samples through the occupancy grid: give grid")
        near, far, _ = box_intersect(rays_o, rays_d, radius)

        def sigma_fn(t0, t1, ri):
            x = rays_o[ri] + rays_d[ri] * ((t0 + t1) / 2)[:, None]
            return density_fn(x) if density_fn is not None else sample_fn(x, rays_d[ri], ri)[0]

        ray_indices, t_starts, t_ends = grid.sampling(rays_o, rays_d, sigma_fn=sigma_fn, t_min=near, t_max=far,
                                                      render_step_size=dt, stratified=stratified,
                                                      alpha_thre=cfg.alpha_threshold,
                                                      early_stop_eps=cfg.early_stop_eps)
        x = rays_o[ray_indices] + rays_d[ray_indices] * ((t_starts + t_ends) / 2)[:, None]
        sigma, values = evaluate(sample_fn, x, rays_d[ray_indices], ray_indices, cfg.chunk)
        weights, _, _ = nerfacc.render_weight_from_density(t_starts, t_ends, sigma, ray_indices=ray_indices, n_rays=n_rays)
        acc = lambda v: nerfacc.accumulate_along_rays(weights, v, ray_indices=ray_indices, n_rays=n_rays)  # noqa: E731
        return {"values": acc(values), "opacity": acc(None), "depth": acc(((t_starts + t_ends) / 2)[:, None]),
                "samples": int(x.shape[0]), "sample_weights": weights, "sample_values": values}

    n = cfg.samples_per_ray
    near, far, hit = box_intersect(rays_o, rays_d, radius)
    far = torch.where(hit, far, near)
    u = torch.arange(n, device=rays_o.device, dtype=rays_o.dtype)[None].expand(n_rays, n)
    if stratified:
        u = u + torch.rand(u.shape, generator=generator).to(u)
    else:
        u = u + 0.5
    span = (far - near)[:, None]
    t_mid = near[:, None] + span * u / n                                                  # [R, n]
    half = (span / n / 2).expand(n_rays, n)
    t_starts, t_ends = t_mid - half, t_mid + half
    x = rays_o[:, None] + rays_d[:, None] * t_mid[..., None]                              # [R, n, 3]
    flat = x.reshape(-1, 3)
    keep = hit[:, None].expand(n_rays, n).reshape(-1)
    if marcher == "fused":
        from optimize3d.march_warp import composite, occupied_mask, visible_mask
        if grid is not None:
            keep = keep & occupied_mask(grid.binaries, flat, radius)
        idx = keep.nonzero()[:, 0]
        count = keep.view(n_rays, n).sum(1)
        dt = (span / n).reshape(-1)
        rule = density_fn is not None and (cfg.alpha_threshold > 0 or cfg.early_stop_eps > 0)
        if rule and cfg.first_pass:
            with torch.no_grad():
                sigma = torch.cat([density_fn(flat[idx[s:s + cfg.chunk]]).float() for s in range(0, idx.numel(), cfg.chunk)]
                                  or [flat.new_zeros(0)])
            seen = visible_mask(sigma, dt, count.cumsum(0) - count, count, cfg.alpha_threshold, cfg.early_stop_eps)
            idx = idx[seen]
            count = torch.bincount(idx // n, minlength=n_rays)
            rule = False                      # applied: the compositing keeps every evaluated sample
        ray_of = idx // n
        sig, val = evaluate(sample_fn, flat[idx], rays_d[ray_of], ray_of, cfg.chunk)
        values, opacity, depth, weights = composite(sig, val, t_mid.reshape(-1)[idx], dt, count.cumsum(0) - count, count,
                                                    cfg.alpha_threshold if rule else 0.0, cfg.early_stop_eps if rule else 0.0)
        return {"values": values, "opacity": opacity[:, None], "depth": depth[:, None], "samples": int(idx.numel()),
                "sample_weights": weights, "sample_values": val}
    if grid is not None:
        keep = keep & occupied(grid, flat, radius)
    if density_fn is not None and (cfg.alpha_threshold > 0 or cfg.early_stop_eps > 0):
        keep = keep & visible(density_fn, flat, keep, n_rays, n, (span / n).expand(n_rays, n).reshape(-1), cfg)
    idx = keep.nonzero()[:, 0]
    ray_of = idx // n
    sig_kept, val_kept = evaluate(sample_fn, flat[idx], rays_d[ray_of], ray_of, cfg.chunk)
    sigma = torch.zeros(n_rays * n, device=rays_o.device, dtype=sig_kept.dtype).index_put((idx,), sig_kept)
    values = torch.zeros(n_rays * n, val_kept.shape[-1], device=rays_o.device, dtype=val_kept.dtype).index_put((idx,), val_kept)
    weights, _, _ = nerfacc.render_weight_from_density(t_starts, t_ends, sigma.view(n_rays, n))
    return {"values": nerfacc.accumulate_along_rays(weights, values.view(n_rays, n, -1)),
            "opacity": nerfacc.accumulate_along_rays(weights, None),
            "depth": nerfacc.accumulate_along_rays(weights, t_mid[..., None]),
            "samples": int(idx.numel()), "sample_weights": weights.reshape(-1), "sample_values": values}
