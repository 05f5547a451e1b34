"""The 3D stage's loop: a NeRF optimised by score distillation with the multi-view model.

    nerf, grid = optimize(cfg, model, embedding, work)        # resumes from work/nerf/
    parts = sds_step(cfg, nerf, grid, opt, guide, step)       # one step: its losses

Configuration in optimize3d/config.py, cameras in cameras.py, field checkpoints in fieldstate.py; one image
end to end (input, output folder, export) in image_to_3d.py.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from common.atomic import append_line
from common.config import stable_seed
from optimize3d.cameras import sample_cameras
from optimize3d.config import GenerateConfig, Precision
from optimize3d.field import Field
from optimize3d.fieldstate import latest_nerf, load_nerf, save_nerf
from optimize3d.guidance import MultiViewGuidance, linear_ramp
from optimize3d.march import new_occupancy_grid, update_grid
from optimize3d.renderer import render_views
from optimize3d.shading import draw_shading, light_positions
from render.cameras import c2w_blender

log = logging.getLogger("generate")


def to_image(x: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> PIL."""
    return Image.fromarray((x.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))


def build_field(cfg: GenerateConfig, device: torch.device):
    torch.manual_seed(cfg.seed)
    nerf = Field(cfg.nerf).to(device)
    grid = new_occupancy_grid(cfg.nerf.radius, cfg.march).to(device)
    opt = torch.optim.AdamW([{"params": nerf.grid_parameters(), "lr": cfg.lr_grid},
                             {"params": nerf.mlp_parameters(), "lr": cfg.lr_mlp}],
                            betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, fused=True)
    return nerf, grid, opt


def sds_step(cfg: GenerateConfig, nerf: Field, grid, opt, guide: MultiViewGuidance, step: int,
             precision: Optional[Precision] = None) -> dict:
    """One optimisation step of the field (every draw a function of (seed, step)) -> its losses. precision:
    Precision.of(cfg.mixed_precision, device), the same object every step (its scaler keeps state)."""
    device = next(nerf.parameters()).device
    precision = precision or Precision.of("no", device)
    g = torch.Generator().manual_seed(stable_seed(cfg.seed, step))
    rng = random.Random(stable_seed(cfg.seed, step, "py"))
    update_grid(grid, nerf, step, cfg.nerf.radius, cfg.march, cfg.seed)
    c2w, fov, _, _ = sample_cameras(cfg, rng, step)
    c2w, fov = c2w.to(device), fov.to(device)
    mode = draw_shading(step, cfg.shading_start, cfg.p_textureless, cfg.p_lambertian, rng)
    ambient = rng.random()
    lights = light_positions(c2w[:, :3, 3], tuple(cfg.light_distance_range), g, cfg.views)
    w_orient = linear_ramp(step, cfg.orientation_weight[0], cfg.orientation_weight[1], cfg.orientation_ramp_steps)
    with torch.autocast(device.type, dtype=precision.step or torch.float32, enabled=precision.step is not None):
        out = render_views(nerf, grid, c2w, fov, cfg.resolution_at(step), cfg.march, mode=mode, lights=lights,
                           ambient=ambient, normals=w_orient > 0, stratified=True, generator=g)
        loss_sds = guide(out["rgb"], c2w, step, g, cfg.views)
        loss = loss_sds + (w_orient * out["orientation"] if w_orient > 0 else 0.0)
    opt.zero_grad(set_to_none=True)
    precision.scaler.scale(loss).backward()
    precision.scaler.step(opt)
    precision.scaler.update()
    return {"step": step + 1, "loss": float(loss.detach()), "sds": float(loss_sds.detach()),
            "orient": float(out.get("orientation", torch.zeros(())).detach()), "mode": mode, "samples": out["samples"]}


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """torch.use_deterministic_algorithms for the duration (warnings, not errors, for ops without a
    deterministic version), restored afterwards: the setting is per process."""
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def resolve_device(device: Optional[str]) -> torch.device:
    """The device asked for, else cuda when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def record_step(work: Path, logger: logging.Logger, parts: dict, every: int, total: int) -> None:
    """Every `every` steps and at the last: the step's losses to losses.jsonl and the log."""
    done = parts["step"]
    if done % every == 0 or done == total:
        append_line(work / "losses.jsonl", json.dumps(parts))
        logger.info("step %d %s", done, json.dumps(parts))


def optimize(cfg: GenerateConfig, model, embedding: torch.Tensor, work: Path, progress: bool = True) -> tuple:
    """Score-distil the field from `model` conditioned on `embedding`; resumes from work/nerf/."""
    with deterministic_algorithms(cfg.deterministic):
        return _optimize(cfg, model, embedding, work, progress)


def _optimize(cfg: GenerateConfig, model, embedding: torch.Tensor, work: Path, progress: bool) -> tuple:
    device = next(model.unet.parameters()).device
    nerf, grid, opt = build_field(cfg, device)
    precision = Precision.of(cfg.mixed_precision, device)
    start = 0
    if (ck := latest_nerf(work / "nerf")) is not None:
        start = load_nerf(ck, nerf, grid, opt, precision.scaler)
        log.info("resumed from %s (step %d)", ck, start)
    guide = MultiViewGuidance(model, embedding, cfg.guidance, autocast=precision.guidance)
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm
    writer = SummaryWriter(str(work / "tensorboard"))         # beside the plain-line log; a resume appends
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="3D", disable=not progress,
               dynamic_ncols=True)
    try:
        for step in bar:
            started = time.perf_counter()
            parts = sds_step(cfg, nerf, grid, opt, guide, step, precision)
            done = step + 1
            bar.set_postfix(sds=f"{parts['sds']:.3g}", orient=f"{parts['orient']:.3g}", mode=parts["mode"])
            record_step(work, log, parts, cfg.log_every, cfg.steps)
            if done % cfg.log_every == 0 or done == cfg.steps:
                for name in ("loss", "sds", "orient", "samples"):
                    writer.add_scalar(name, parts[name], done)
                writer.add_scalar("step_seconds", time.perf_counter() - started, done)
                writer.add_scalar("grad_scale", precision.scaler.get_scale() if precision.scaler.is_enabled() else 1.0, done)
            if done % cfg.val_every == 0 or done == cfg.steps:
                sheet = save_validation(nerf, grid, cfg, work / "validation" / f"step-{done:06d}.png")
                writer.add_image("validation", np.asarray(sheet.convert("RGB")), done, dataformats="HWC")
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                save_nerf(work / "nerf", done, nerf, grid, opt, precision.scaler)
    finally:
        writer.close()
    return nerf, grid


@torch.no_grad()
def save_validation(nerf: Field, grid, cfg: GenerateConfig, path: Path) -> Image.Image:
    """4 views at the preview elevation: albedo (top), normals (bottom); saved at `path`, and returned."""
    from render.preview import grid as image_grid
    device = next(nerf.parameters()).device
    dist = cfg.relative_distance_range[0] / math.tan(math.radians(cfg.fov_range[0]) / 2)
    c2w = torch.tensor(np.stack([c2w_blender(az, cfg.preview_elevation, dist) for az in (0, 90, 180, 270)]),
                       dtype=torch.float32, device=device)
    size = cfg.resolutions[-1]
    out = render_views(nerf, grid, c2w, torch.full((4,), cfg.fov_range[0]), size, cfg.march, normals=True,
                       ray_chunk=1 << 14)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet = image_grid([to_image(x) for x in out["rgb"]] + [to_image(x) for x in out["normal"]], columns=4)
    sheet.save(path)
    return sheet
