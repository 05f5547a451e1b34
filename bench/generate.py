"""Image-to-3D benchmark (tiny configuration, CPU by default): prints JSON.

    python bench/generate.py                 # random-weight tiny model: speed only, no checkpoint needed
    python bench/generate.py --device cuda   # on a GPU (the nerfacc marcher is then available too)

1. Score-distillation steps/s at the tiny settings (4 views at 32 px, 64 samples per ray), per phase
   (albedo only; shaded with finite-difference normals), with the time split into field and guidance.
2. Marching: dense sampling against occupancy-grid skipping at several samples per ray, each image
   compared with a dense reference at 1024 samples per ray (PSNR): speed at equal image error.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.mvmodel import ModelConfig, MultiViewModel  # noqa: E402
from optimize3d.field import Field, FieldConfig  # noqa: E402
from optimize3d.guidance import MultiViewGuidance  # noqa: E402
from optimize3d.march import MarchConfig, camera_rays, march, new_occupancy_grid, update_grid  # noqa: E402
from optimize3d.optimize import GenerateConfig, build_field, sample_cameras  # noqa: E402
from optimize3d.renderer import render_views  # noqa: E402
from render.cameras import DISTANCE, FOV_DEG, c2w_blender  # noqa: E402


def sds_speed(device, steps: int) -> dict:
    cfg = GenerateConfig.tiny()
    model = MultiViewModel(ModelConfig.tiny()).to(device).eval().requires_grad_(False)
    guide = MultiViewGuidance(model, torch.randn(model.cfg.unet.cross_attention_dim), cfg.guidance)
    nerf, grid, opt = build_field(cfg, device)
    out = {}
    for phase, mode in (("albedo", "albedo"), ("shaded", "lambertian")):
        times = {"field": 0.0, "guidance": 0.0, "backward": 0.0}
        samples = 0
        for step in range(steps + 2):
            rng = random.Random(step)
            g = torch.Generator().manual_seed(step)
            update_grid(grid, nerf, step, 1.0, cfg.march)
            c2w, fov, _, _ = sample_cameras(cfg, rng)
            c2w, fov = c2w.to(device), fov.to(device)
            t0 = time.perf_counter()
            r = render_views(nerf, grid, c2w, fov, 32, cfg.march, mode=mode, lights=c2w[:, :3, 3], ambient=0.5,
                             normals=True, stratified=True, generator=g)
            t1 = time.perf_counter()
            loss = guide(r["rgb"], c2w, 100, g) + 10 * r["orientation"]
            t2 = time.perf_counter()
            opt.zero_grad()
            loss.backward()
            opt.step()
            t3 = time.perf_counter()
            if step >= 2:                       # the first steps warm up allocators and the grid
                times["field"] += t1 - t0
                times["guidance"] += t2 - t1
                times["backward"] += t3 - t2
                samples += r["samples"]
        total = sum(times.values())
        out[phase] = {"steps_per_s": round(steps / total, 2), "s_per_step": round(total / steps, 3),
                      **{f"{k}_s": round(v / steps, 3) for k, v in times.items()},
                      "field_samples_per_step": samples // steps}
    return out


def psnr(a, b) -> float:
    return float(-10 * torch.log10(((a - b) ** 2).mean().clamp(min=1e-12)))


@torch.no_grad()
def marching(device, size: int) -> list[dict]:
    torch.manual_seed(0)
    nerf = Field(FieldConfig.tiny()).to(device)
    with torch.no_grad():                       # a lumpy object rather than the plain blob
        nerf.encoding.embeddings.normal_(0, 1.0)
    c2w = torch.tensor(np.stack([c2w_blender(az, 20.0, DISTANCE) for az in (0, 90, 180, 270)]),
                       dtype=torch.float32, device=device)
    fov = torch.full((4,), FOV_DEG)
    o, d = camera_rays(c2w, fov, size)
    sample_fn = lambda x, dd, ri: (lambda s, a: (s, a))(*nerf(x))  # noqa: E731
    ref = march(sample_fn, o, d, 1.0, MarchConfig(samples_per_ray=1024, marcher="torch"))["values"]
    rows = []
    for n in (32, 64, 128):
        variants = [("dense", None, 0.01)]
        for threshold in (0.01, 0.001):       # nerfacc's occ_thre: the skipped cells' density bounds the error
            cfg = MarchConfig(samples_per_ray=n, marcher="torch", grid_update_every=1, grid_threshold=threshold)
            grid = new_occupancy_grid(1.0, cfg).to(device)
            for step in range(8):
                update_grid(grid, nerf, step, 1.0, cfg)
            variants.append((f"occupancy_grid(threshold={threshold})", grid, threshold))
        for name, g, threshold in variants:
            cfg = MarchConfig(samples_per_ray=n, marcher="torch", grid_threshold=threshold)
            march(sample_fn, o, d, 1.0, cfg, grid=g)
            t = time.perf_counter()
            r = march(sample_fn, o, d, 1.0, cfg, grid=g)
            rows.append({"marcher": name, "samples_per_ray": n, "seconds": round(time.perf_counter() - t, 4),
                         "field_evaluations": r["samples"], "psnr_vs_1024_dense": round(psnr(r["values"], ref), 2)})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=64, help="marching benchmark: pixels of each of the 4 views")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {"device": str(device), "cpu": platform.processor() or platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "sds_tiny": sds_speed(device, args.steps),
              "marching": marching(device, args.size),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
