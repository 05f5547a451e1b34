"""Image-to-3D benchmark (tiny configuration, CPU by default): prints JSON.

    python bench/generate.py                 # random-weight tiny model: speed only, no checkpoint needed
    python bench/generate.py --device cuda   # on a GPU (the nerfacc marcher is then available too)

0. The hash encoding alone (50,000 points; tiny and sd21 grids; torch and fused): forward, + Jacobian,
   + backward, in ms.
1. Score-distillation steps/s at the tiny settings (4 views at 32 px, 64 samples per ray), per phase
   (albedo, shaded), normal type (finite differences; analytic, the released) and implementation (torch:
   the pure-torch hash grid and marcher; fused: the Warp hash grid and marcher), all in one run, with the time split into field, guidance and backward; the tiny
   preset's step before (torch, finite differences) and now (fused, analytic). Each row runs twice (all rows,
   then all rows in reverse order) and reports the mean.
2. Marching: dense sampling against occupancy-grid skipping, with and without early ray termination, at
   several samples per ray, each image compared with a dense reference at 1024 samples per ray (PSNR):
   speed at equal image error.
3. Memory of the paper's field (GenerateConfig.sd21: 16-level hash grid, 512 samples per ray, normals
   for the orientation loss) per field sample, with and without march.recompute. Method: each probe
   runs in a fresh process; the peak RSS (VmHWM, reset just before) of one render + backward at
   4 x S x S rays minus the RSS before it. The marginal bytes per sample between two sizes (the fixed
   part, one chunk's activations when recomputing, cancels) extrapolate it to the paper's 4 x 256 x 256
   rays by the sample count of that render (marched without gradients).
4. Reconstruction (generate.py --views, tiny preset): steps/s fitting 16 views of 64 px with the torch
   and the fused hash grid and marcher, the fused marcher without its first pass (march.first_pass=false),
   and the fused grid with the torch marcher, in one run (each row twice
   and the mean, as in section 1).
Each section runs in a process of its own (see main).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402,F401  (before torch: see common/__init__.py)
import torch  # noqa: E402

from model.mvmodel import ModelConfig, MultiViewModel  # noqa: E402
from optimize3d.field import Field, FieldConfig  # noqa: E402
from optimize3d.guidance import MultiViewGuidance  # noqa: E402
from optimize3d.march import MarchConfig, camera_rays, march, new_occupancy_grid, update_grid  # noqa: E402
from optimize3d.cameras import sample_cameras  # noqa: E402
from optimize3d.config import GenerateConfig  # noqa: E402
from optimize3d.optimize import build_field  # noqa: E402
from optimize3d.renderer import render_views  # noqa: E402
from render.cameras import DISTANCE, FOV_DEG, c2w_blender  # noqa: E402


def sds_phase(device, steps: int, implementation: str, mode: str, normal_type: str,
              model: MultiViewModel, guide: MultiViewGuidance) -> dict:
    cfg = GenerateConfig.tiny()
    cfg.nerf.hash_implementation, cfg.march.marcher, cfg.nerf.normal_type = implementation, implementation, normal_type
    nerf, grid, opt = build_field(cfg, device)
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
        if step >= 2:                       # the first steps warm up allocators, kernels and the grid
            times["field"] += t1 - t0
            times["guidance"] += t2 - t1
            times["backward"] += t3 - t2
            samples += r["samples"]
    total = sum(times.values())
    return {"steps_per_s": round(steps / total, 2), "s_per_step": round(total / steps, 3),
            **{f"{k}_s": round(v / steps, 3) for k, v in times.items()}, "field_samples_per_step": samples // steps}


def sds_speed(device, steps: int) -> dict:
    """Every phase with each hash grid and each normal type, in one run. The tiny preset's step is the mean
    of its two phases (albedo for the first half of the steps, shaded after)."""
    model = MultiViewModel(ModelConfig.tiny()).to(device).eval().requires_grad_(False)
    guide = MultiViewGuidance(model, torch.randn(model.cfg.unet.cross_attention_dim), GenerateConfig.tiny().guidance)
    rows = [(impl, normals, phase, mode) for impl in ("torch", "fused") for normals in ("finite_difference", "analytic")
            for phase, mode in (("albedo", "albedo"), ("shaded", "lambertian"))]
    runs = {}
    # every row twice, in one order and then the reverse, each with half the steps: a machine that drifts
    # (the shared guidance took 0.07 s a step in one row and 0.10 s in a later one of the same run) weighs on all
    for impl, normals, phase, mode in rows + rows[::-1]:
        runs.setdefault(f"{impl}/{normals}/{phase}", []).append(
            sds_phase(device, max(1, steps // 2), impl, mode, normals, model, guide))
    out = {key: {k: (round(sum(r[k] for r in pair) / 2, 3) if k != "field_samples_per_step"
                     else sum(r[k] for r in pair) // 2) for k in pair[0]} for key, pair in runs.items()}
    for row in out.values():
        row["steps_per_s"] = round(1 / row["s_per_step"], 2)
    preset = lambda impl, normals: (out[f"{impl}/{normals}/albedo"]["s_per_step"]  # noqa: E731
                                    + out[f"{impl}/{normals}/shaded"]["s_per_step"]) / 2
    before, now = preset("torch", "finite_difference"), preset("fused", "analytic")
    out["tiny_preset"] = {"before_torch_finite_difference_s_per_step": round(before, 3),
                          "now_fused_analytic_s_per_step": round(now, 3), "speedup": round(before / now, 2),
                          "fused_finite_difference_s_per_step": round(preset("fused", "finite_difference"), 3),
                          "torch_analytic_s_per_step": round(preset("torch", "analytic"), 3)}
    return out


def encoding_speed(points: int = 50_000, repeats: int = 5) -> dict:
    """The hash encoding alone, both implementations: forward; forward + Jacobian; forward + Jacobian +
    backward of both, on `points` uniform points (median ms of `repeats`, after a warm-up)."""
    from optimize3d.field import build_hash_grid
    out = {}
    x = torch.rand(points, 3, generator=torch.Generator().manual_seed(0))
    for preset in ("tiny", "sd21"):
        for impl in ("torch", "fused"):
            cfg = getattr(FieldConfig, preset)()
            cfg.hash_implementation = impl
            grid = build_hash_grid(cfg)

            def full():
                h, j = grid.with_jacobian(x)
                (h.sum() + j.sum()).backward()
            runs = {"forward_ms": lambda: grid(x).detach(), "forward_jacobian_ms": lambda: grid.with_jacobian(x),
                    "forward_jacobian_backward_ms": full}
            row = {}
            for name, fn in runs.items():
                times = []
                for _ in range(repeats + 1):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                row[name] = round(float(np.median(times[1:])) * 1000, 1)
            out[f"{preset}/{impl}"] = row
        out[f"{preset}/speedup"] = round(out[f"{preset}/torch"]["forward_jacobian_backward_ms"]
                                         / out[f"{preset}/fused"]["forward_jacobian_backward_ms"], 2)
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
        variants = [("dense", None, 0.01, False)]
        for threshold in (0.01, 0.001):       # nerfacc's occ_thre: the skipped cells' density bounds the error
            cfg = MarchConfig(samples_per_ray=n, marcher="torch", grid_update_every=1, grid_threshold=threshold)
            grid = new_occupancy_grid(1.0, cfg).to(device)
            for step in range(8):
                update_grid(grid, nerf, step, 1.0, cfg)
            variants.append((f"occupancy_grid(threshold={threshold})", grid, threshold, False))
            variants.append((f"occupancy_grid(threshold={threshold})+early_stop", grid, threshold, True))
        for name, g, threshold, early_stop in variants:
            # early_stop: a density pass drops samples under alpha 0.01 and behind transmittance 1e-4 (nerfacc's rule)
            cfg = MarchConfig(samples_per_ray=n, marcher="torch", grid_threshold=threshold)
            density_fn = nerf.density if early_stop else None
            march(sample_fn, o, d, 1.0, cfg, grid=g, density_fn=density_fn)
            t = time.perf_counter()
            r = march(sample_fn, o, d, 1.0, cfg, grid=g, density_fn=density_fn)
            rows.append({"marcher": name, "samples_per_ray": n, "seconds": round(time.perf_counter() - t, 4),
                         "field_evaluations": r["samples"], "psnr_vs_1024_dense": round(psnr(r["values"], ref), 2)})
    return rows


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss_kb() -> int:
    """Linux: reset the high-water mark (VmHWM) to the current RSS, which is returned (KiB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def peak_rss_kb() -> int:
    return _status_kb("VmHWM")


def memory_probe(size: int, recompute: bool) -> dict:
    """In a fresh process (see main): one full-size render + backward at 4 x size x size rays."""
    cfg = GenerateConfig.sd21()
    cfg.march.marcher, cfg.march.recompute = "torch", recompute
    nerf, grid, _ = build_field(cfg, torch.device("cpu"))
    update_grid(grid, nerf, 0, cfg.nerf.radius, cfg.march)
    c2w, fov, _, _ = sample_cameras(cfg, random.Random(0), cfg.resolution_milestones[-1])   # 4 views (one group)
    before = reset_peak_rss_kb()
    out = render_views(nerf, grid, c2w, fov, size, cfg.march, normals=True, stratified=True,
                       generator=torch.Generator().manual_seed(0))
    (out["rgb"].mean() + out["orientation"]).backward()
    peak = peak_rss_kb()
    return {"rays": c2w.shape[0] * size * size, "samples": out["samples"], "recompute": recompute,
            "peak_rss_increase_mb": round((peak - before) / 1024, 1),
            "bytes_per_sample": round((peak - before) * 1024 / max(1, out["samples"]))}


@torch.no_grad()
def paper_size_samples() -> int:
    cfg = GenerateConfig.sd21()
    cfg.march.marcher = "torch"
    nerf, grid, _ = build_field(cfg, torch.device("cpu"))
    update_grid(grid, nerf, 0, cfg.nerf.radius, cfg.march)
    c2w, fov, _, _ = sample_cameras(cfg, random.Random(0), cfg.resolution_milestones[-1])   # the 256 px phase: 4 views
    return render_views(nerf, grid, c2w, fov, 256, cfg.march, ray_chunk=1 << 13)["samples"]


def field_memory(sizes=(32, 64)) -> dict:
    rows = []
    for size in sizes:
        for recompute in (False, True):
            r = subprocess.run([sys.executable, __file__, "--memory-probe", str(size), str(int(recompute))],
                               capture_output=True, text=True, check=True)
            rows.append(json.loads(r.stdout))
    total = paper_size_samples()
    extrapolated = {}
    for recompute in (False, True):
        small, large = [r for r in rows if r["recompute"] == recompute]
        # The marginal cost per sample: the fixed part (one chunk's activations under recompute) cancels.
        marginal = (large["peak_rss_increase_mb"] - small["peak_rss_increase_mb"]) * 2**20 / (large["samples"] - small["samples"])
        extrapolated["recompute" if recompute else "kept"] = {
            "marginal_bytes_per_sample": round(marginal),
            "paper_size_gb": round((large["peak_rss_increase_mb"] * 2**20 + (total - large["samples"]) * marginal) / 2**30, 1)}
    return {"probes": rows, "paper_size_samples_per_step": total, "paper_size_extrapolated": extrapolated}


def reconstruction_speed(steps: int) -> dict:
    """Fit the tiny preset to 16 views of a lumpy field rendered at 64 px (written in render/'s layout)."""
    import tempfile

    from PIL import Image

    from optimize3d.reconstruct import ReconstructConfig, fit_step, load_posed_views, training_rays
    from render.cameras import c2w_opencv, fixed_angles, intrinsics
    torch.manual_seed(0)
    truth = Field(FieldConfig.tiny())
    with torch.no_grad():
        truth.encoding.embeddings.normal_(0, 1.0)
    angles = fixed_angles()
    c2w = torch.tensor(np.stack([c2w_blender(az, el, DISTANCE) for az, el in angles]), dtype=torch.float32)
    with torch.no_grad():
        views = render_views(truth, None, c2w, torch.full((len(angles),), FOV_DEG), 64, MarchConfig.tiny())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "fixed").mkdir()
        for i in range(len(angles)):
            a = views["opacity"][i, 0].clamp(1e-4, 1)
            rgb = ((views["rgb"][i] - (1 - a)) / a).clamp(0, 1)             # un-composite from white
            rgba = torch.cat([rgb, a[None]]).permute(1, 2, 0).numpy()
            Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA").save(folder / "fixed" / f"{i:03d}.png")
        (folder / "cameras.json").write_text(json.dumps({
            "convention": "opencv", "K": intrinsics(64).tolist(), "width": 64, "height": 64,
            "fixed": [{"azimuth_deg": az, "elevation_deg": el, "c2w": c2w_opencv(az, el, DISTANCE).tolist()} for az, el in angles]}))
        rays = training_rays(load_posed_views(folder, "fixed"), torch.device("cpu"))
        rows = (("torch", "torch", "torch"), ("fused", "fused", "fused"), ("fused_one_pass", "fused", "fused"),
                ("fused_grid_torch_marcher", "fused", "torch"))
        seconds, samples = {}, {}
        for name, impl, marcher in rows + rows[::-1]:    # the same run; each row twice, as sds_speed's
            cfg = ReconstructConfig.tiny()
            cfg.train_set, cfg.march.marcher, cfg.nerf.hash_implementation = "fixed", marcher, impl
            cfg.march.first_pass = name != "fused_one_pass"
            nerf, grid, opt = build_field(cfg, torch.device("cpu"))
            fit_step(cfg, nerf, grid, opt, rays, 0)
            t = time.perf_counter()
            samples[name] = sum(fit_step(cfg, nerf, grid, opt, rays, step)["samples"] for step in range(1, steps + 1))
            seconds.setdefault(name, []).append((time.perf_counter() - t) / steps)
        out = {}
        for name, _, _ in rows:
            s = sum(seconds[name]) / 2
            out[name] = {"preset": "tiny", "views": len(angles), "size": 64, "rays_per_step": cfg.rays_per_step,
                         "steps_per_s": round(1 / s, 2), "field_samples_per_step": samples[name] // steps,
                         "seconds_for_the_preset": round(cfg.steps * s, 1)}
    out["speedup_of_fused"] = round(out["fused"]["steps_per_s"] / out["torch"]["steps_per_s"], 2)
    out["speedup_of_fused_marcher"] = round(out["fused"]["steps_per_s"] / out["fused_grid_torch_marcher"]["steps_per_s"], 2)
    return out


def section(name: str, device, args) -> dict | list | None:
    if name == "encoding_50k_points":
        return encoding_speed() if device.type == "cpu" else None
    if name == "sds_tiny":
        return sds_speed(device, args.steps)
    if name == "marching":
        return marching(device, args.size)
    if name == "field_memory_cpu":
        return field_memory() if device.type == "cpu" else None
    if name == "reconstruction":
        return reconstruction_speed(args.steps * 3) if device.type == "cpu" else None
    raise ValueError(f"section {name!r}")


SECTIONS = ("encoding_50k_points", "sds_tiny", "marching", "field_memory_cpu", "reconstruction")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=64, help="marching benchmark: pixels of each of the 4 views")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-probe", nargs=2, type=int, metavar=("SIZE", "RECOMPUTE"), help=argparse.SUPPRESS)
    p.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:                     # one measurement in a fresh process (field_memory)
        print(json.dumps(memory_probe(args.memory_probe[0], bool(args.memory_probe[1]))))
        return
    device = torch.device(args.device)
    if args.section:
        print(json.dumps({"result": section(args.section, device, args),
                          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
        return
    # Each section in a fresh process: measured, the torch rows of a section ran 1.5x slower after the sd21
    # encoding section had run in the same process (the fused rows did not), which would flatter the ratios.
    result = {"device": str(device), "cpu": platform.processor() or platform.machine(), "threads": args.threads,
              "torch": torch.__version__}
    peak = 0
    for name in SECTIONS:
        cmd = [sys.executable, __file__, "--section", name, "--device", args.device, "--steps", str(args.steps),
               "--size", str(args.size), "--threads", str(args.threads)]
        out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        result[name], peak = out["result"], max(peak, out["peak_rss_mb"])
    result["peak_rss_mb"] = peak
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
