"""The first thing to run on a machine with a GPU: every full-size path, random weights, JSON out.

    python bench/gpu.py                 # the sd21 sizes; writes bench/results/gpu-<gpu name>.json (<= 8 min, one H100)
    python bench/gpu.py --reduced       # the same code at toy sizes (any CPU; what the tests run)

1. Fine-tuning: stage 1 and stage 2 steps of the sd21 model on prepared latents, as training reads them
   (results before the prepare step, e.g. gpu-nvidia-h100-80gb-hbm3.json, include a VAE encode of every view) with
   gradient checkpointing and bf16 autocast (on a GPU), at the per-worker batch the presets use
   (multi-view branch: 4 views per object): seconds per micro-batch and per optimizer step, peak
   memory, and the largest batch that fits (doubling, then bisecting, within a time budget).
2. Sampling: DDIM-50, CFG 10, 4 views, fp32 (what generate.py's preview does) and bf16 autocast.
3. The 3D stage at the paper's settings (GenerateConfig.sd21: hash grid 16 levels x 2^19, 512 samples
   per ray, 8 views at 64 px and 4 at 256 px, 16-mixed) at 64 and 256 px, albedo and shaded phases, with the
   fused (Warp) and the torch hash grid and marcher (--marcher: one marcher for every row instead): steps/s, field samples per step, peak memory and the bytes per
   field sample that peak implies, and the projected hours of the whole 10,000-step schedule per hash
   grid ("schedule"). An out-of-memory is a result, recorded. Each row is measured twice: on the initial
   blob (`{size}px_{phase}/{impl}`) and on a converged object (`.../object`: the field's density first fitted
   to the occupancy of a real mesh, tests/data/glb/Duck.glb placed as render/ places it), where the occupancy
   grid and early termination skip what the blob does not let them ("schedule_object"). The learning
   rate is 0 while timing (every step's work still done), so the field stays what it was.
4. The render stage with Cycles on the GPU (OptiX, then CUDA) on the four shared GLBs (tests/data/glb) at the
   default settings (256 px, 32 views): seconds per view and the worst view's PSNR against a 1,024-sample
   undenoised reference on the same device (bench/render.py's curve), and objects per hour per GPU through
   the pipeline with persistent Blender workers (1 worker with the whole GPU, 2 sharing it), against the
   goal of all of Objaverse (800k objects) in a day on 32 GPUs: <= 3.4 s per object per GPU. --no-render
   skips it.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402,F401  (before torch: see common/__init__.py)
import torch  # noqa: E402

from common.config import git_commit  # noqa: E402
from model.encoder import EncoderConfig  # noqa: E402
from model.mvmodel import ModelConfig, MultiViewModel  # noqa: E402
from model.train import TrainConfig  # noqa: E402
from model.unet import UNetConfig  # noqa: E402
from optimize3d.guidance import MultiViewGuidance  # noqa: E402
from optimize3d.config import GenerateConfig, Precision  # noqa: E402
from optimize3d.optimize import build_field, resolve_device, sds_step  # noqa: E402
from render.cameras import DISTANCE, c2w_blender  # noqa: E402

VIEWS = 4
OBJECT = Path(__file__).resolve().parents[1] / "tests" / "data" / "glb" / "Duck.glb"
FITTED_DENSITY = 50.0        # inside the object: opaque within a few marcher steps at either preset
TIME_BUDGET_S = 420          # the whole script: leaves a 10-minute loan room for start and transfers
SEARCH_BUDGET_S = 45         # per stage, the largest-batch search


def reduced_model() -> ModelConfig:
    """sd21's code paths (VAE latents, 4-channel UNet with cross-attention at several levels) at toy size."""
    unet = UNetConfig(sample_size=8, block_out_channels=[32, 32, 64, 64], attention_head_dim=[2, 2, 4, 4],
                      cross_attention_dim=64, norm_num_groups=8, layers_per_block=1)
    return ModelConfig(unet=unet, encoder=EncoderConfig.tiny(), vae_block_out_channels=[32, 32, 32, 32],
                       vae_layers_per_block=1, image_size=64, allow_random_weights=True)


class Memory:
    """Peak memory since reset: the GPU allocator's on CUDA, the process's peak RSS elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def now_mb(self) -> float:
        return torch.cuda.memory_allocated() / 2**20 if self.cuda else 0.0

    def peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def random_batch(objects: int, unet: UNetConfig, stage: int, device, seed: int) -> dict:
    """A micro-batch as training reads it from the prepared shards: latents, not images (no VAE in the step)."""
    g = torch.Generator().manual_seed(seed)
    az = torch.rand(objects, generator=g) * 360
    cams = torch.tensor(np.stack([[c2w_blender(float(a) + 90 * k, 15.0, DISTANCE) for k in range(VIEWS)] for a in az]),
                        dtype=torch.float32)
    latent = (unet.in_channels, unet.sample_size, unet.sample_size)
    batch = {"target": torch.randn(objects, VIEWS, *latent, generator=g), "target_cameras": cams,
             "clip_embedding": torch.randn(objects, unet.cross_attention_dim, generator=g)}
    if stage == 2:
        batch["reference"] = torch.randn(objects, *latent, generator=g)
        batch["reference_camera"] = torch.tensor(np.stack([c2w_blender(0.0, 0.0, DISTANCE)] * objects), dtype=torch.float32)
    return {"encoded": True, **{k: v.to(device) for k, v in batch.items()}}


def train_steps(model, opt, cfg: TrainConfig, objects: int, device, bf16: bool, steps: int) -> float:
    """Mean seconds of one micro-batch (forward + backward) over `steps`, after one warm-up with an
    optimizer step (so that AdamW's state is allocated when the peak is read)."""
    batch = random_batch(objects, cfg.model.unet, cfg.stage, device, objects)
    sync = Memory(device).sync
    times = []
    for i in range(steps + 1):
        sync()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch, cfg.stage, torch.Generator().manual_seed(i), cfg.cond_dropout)
        loss.backward()
        sync()
        times.append(time.perf_counter() - t)
        if i == 0:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return sum(times[1:]) / max(1, steps)


def fits(model, opt, cfg, objects, device, bf16) -> bool:
    try:
        train_steps(model, opt, cfg, objects, device, bf16, steps=0)
        return True
    except RuntimeError as e:
        if not is_oom(e):
            raise
        opt.zero_grad(set_to_none=True)
        Memory(device).reset()                       # hand the failed attempt's blocks back
        return False


def largest_batch(model, opt, cfg, start: int, device, bf16, budget_s: float, cap: int) -> dict:
    """Doubling from the preset's batch, then bisecting between the last fit and the first failure."""
    t0 = time.perf_counter()
    lo, hi = 0, None
    n = start
    while n <= cap and time.perf_counter() - t0 < budget_s:
        if fits(model, opt, cfg, n, device, bf16):
            lo, n = n, n * 2
        else:
            hi = n
            break
    while hi is not None and hi - lo > max(1, lo // 8) and time.perf_counter() - t0 < budget_s:
        mid = (lo + hi) // 2
        if fits(model, opt, cfg, mid, device, bf16):
            lo = mid
        else:
            hi = mid
    return {"largest_objects_that_fit": lo, "smallest_that_failed": hi,
            "note": None if hi is not None else f"search stopped (cap {cap} or {budget_s:.0f} s budget): at least {lo}",
            "search_s": round(time.perf_counter() - t0, 1)}


def bench_training(model_cfg: ModelConfig, device, bf16: bool, reduced: bool, steps: int) -> dict:
    out = {}
    mem = Memory(device)
    for stage in (1, 2):
        cfg = TrainConfig.sd21(stage)
        cfg.model = model_cfg
        if reduced:
            cfg.batch_size = 2
        torch.manual_seed(0)
        model = MultiViewModel(model_cfg).to(device)
        model.unet.train()
        opt = torch.optim.AdamW([p for p in model.unet.parameters() if p.requires_grad], lr=cfg.lr)
        mem.reset()
        micro_s = train_steps(model, opt, cfg, cfg.batch_size, device, bf16, steps)
        peak = mem.peak_mb()
        mem.sync()
        t = time.perf_counter()
        opt.step()
        mem.sync()
        opt_s = time.perf_counter() - t
        row = {"objects_per_micro_batch": cfg.batch_size, "gradient_checkpointing": model_cfg.unet.gradient_checkpointing,
               "vae_in_step": False, "views_per_object": VIEWS + (stage == 2),
               "grad_accum": cfg.grad_accum, "seconds_per_micro_batch": round(micro_s, 4),
               "seconds_per_optimizer_step": round(cfg.grad_accum * micro_s + opt_s, 4),
               "images_per_second": round(cfg.batch_size * VIEWS / micro_s, 1), "peak_memory_mb": round(peak)}
        cap = 4 if reduced else 1024
        row.update(largest_batch(model, opt, cfg, cfg.batch_size, device, bf16, SEARCH_BUDGET_S, cap))
        out[f"stage{stage}"] = row
        del model, opt
    return out


@torch.no_grad()
def bench_sampling(model: MultiViewModel, device, steps: int) -> dict:
    c2w = torch.tensor(np.stack([c2w_blender(az, 15.0, DISTANCE) for az in (0, 90, 180, 270)]), dtype=torch.float32)
    emb = torch.randn(model.cfg.unet.cross_attention_dim)
    out = {}
    for name, bf16 in (("fp32", False), ("bf16_autocast", device.type == "cuda")):
        Memory(device).reset()
        model.sample(emb, c2w, 2, 10.0, torch.Generator().manual_seed(0))             # warm-up
        Memory(device).sync()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            views = model.sample(emb, c2w, steps, 10.0, torch.Generator().manual_seed(0))
        Memory(device).sync()
        out[name] = {"ddim_steps": steps, "guidance": 10.0, "views": int(views.shape[0]),
                     "seconds": round(time.perf_counter() - t, 3), "peak_memory_mb": round(Memory(device).peak_mb())}
    return out


def object_occupancy(path: Path, radius: float, res: int) -> torch.Tensor:
    """[res, res, res] bool over the field's box [-radius, radius]^3 (x, y, z): the cells whose centre lies
    inside the mesh, placed as render/ places it (Blender's z-up world, longest side scaled to 1, centred)."""
    import trimesh
    from scipy import ndimage
    from optimize3d.evaluate import unit_box
    from optimize3d.export import Z_UP_TO_Y_UP
    mesh = trimesh.load(path, force="mesh")
    mesh.apply_transform(np.linalg.inv(Z_UP_TO_Y_UP))         # glTF's y-up into Blender's z-up, as its importer does
    shell = unit_box(mesh).voxelized(pitch=1 / 96)
    # The duck's surface has gaps (not watertight): a closing (dilate, fill, erode by one voxel) seals them
    # before the inside is filled; filled as it is, only the shell would count (4% of its box, not 14%).
    solid = ndimage.binary_erosion(ndimage.binary_fill_holes(ndimage.binary_dilation(shell.matrix)))
    voxels = trimesh.voxel.VoxelGrid(solid, transform=shell.transform)
    c = (np.arange(res) + 0.5) / res * 2 * radius - radius
    centres = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 3)
    return torch.from_numpy(voxels.is_filled(centres).reshape(res, res, res))


def fit_to_occupancy(nerf, occupancy: torch.Tensor, steps: int, points: int, device, seed: int = 0) -> float:
    """The field's density fitted to an occupancy grid (inside FITTED_DENSITY, outside 0; log1p of both) at
    uniform random points of the box -> the last loss. A converged surface in seconds, without renders."""
    g = torch.Generator().manual_seed(seed)
    occ, res, r = occupancy.to(device), occupancy.shape[0], nerf.cfg.radius
    opt = torch.optim.Adam(nerf.parameters(), lr=1e-2)
    loss = torch.zeros(())
    for _ in range(steps):
        x = ((torch.rand(points, 3, generator=g) * 2 - 1) * r).to(device)
        cell = ((x / r + 1) / 2 * res).long().clamp(0, res - 1)
        target = occ[cell[:, 0], cell[:, 1], cell[:, 2]].float() * FITTED_DENSITY
        loss = torch.nn.functional.mse_loss(torch.log1p(nerf.density(x)), torch.log1p(target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss)


def fitted_object(cfg: GenerateConfig, device, reduced: bool) -> tuple[dict, dict]:
    """The state of a field (cfg.nerf) fitted to OBJECT's occupancy, and what the fit reached. Both hash grids
    load it (same parameter names and layout)."""
    from optimize3d.field import Field
    occupancy = object_occupancy(OBJECT, cfg.nerf.radius, 64 if reduced else 128)
    torch.manual_seed(0)
    nerf = Field(cfg.nerf).to(device)
    t = time.perf_counter()
    loss = fit_to_occupancy(nerf, occupancy, 150 if reduced else 400, 4096 if reduced else 1 << 17, device)
    info = {"mesh": OBJECT.name, "occupied_fraction": round(float(occupancy.float().mean()), 4),
            "fit_loss": round(loss, 4), "fit_seconds": round(time.perf_counter() - t, 1)}
    return {k: v.detach().clone() for k, v in nerf.state_dict().items()}, info


def bench_3d(model: MultiViewModel, device, sizes: list[int], steps: int, reduced: bool, marcher: str) -> dict:
    mem = Memory(device)
    preset = GenerateConfig.tiny() if reduced else GenerateConfig.sd21()
    fitted, fit_info = fitted_object(preset, device, reduced)
    out = {"object": fit_info}
    for size, phase, impl, start in [(s, p, i, f) for s in sizes for p in ("albedo", "shaded") for i in ("fused", "torch")
                                     for f in ("blob", "object")]:
        cfg = GenerateConfig.tiny() if reduced else GenerateConfig.sd21()
        groups = dict(zip(cfg.resolutions, cfg.view_groups)).get(size, 1)    # sd21: 8 views at 64 px, 4 at 256
        cfg.resolutions, cfg.resolution_milestones, cfg.view_groups = [size], [], [groups]
        cfg.march.marcher, cfg.nerf.hash_implementation = (impl if marcher == "row" else marcher), impl
        first = 0 if phase == "albedo" else cfg.shading_start    # the shading draw follows the step
        precision = Precision.of(cfg.mixed_precision, device)          # sd21: the released 16-mixed
        guide = MultiViewGuidance(model, torch.randn(model.cfg.unet.cross_attention_dim), cfg.guidance,
                                  autocast=precision.guidance)
        key = f"{size}px_{phase}/{impl}" + ("/object" if start == "object" else "")
        try:
            nerf, grid, opt = build_field(cfg, device)
            if start == "object":
                nerf.load_state_dict(fitted)
            for group in opt.param_groups:   # the field stays the initial blob: random weights would move it
                group["lr"] = 0.0            # anywhere (to nothing, at 0 samples), and sample counts would not compare
            sds_step(cfg, nerf, grid, opt, guide, 0, precision)   # warm-up; step 0 fills every cell of the grid
            mem.reset()
            base = mem.now_mb()
            samples, t = 0, time.perf_counter()
            modes = []
            for step in range(first + 1, first + 1 + steps):
                parts = sds_step(cfg, nerf, grid, opt, guide, step, precision)
                samples += parts["samples"]
                modes.append(parts["mode"])
            mem.sync()
            s = (time.perf_counter() - t) / steps
            peak = mem.peak_mb()
            out[key] = {"rays_per_step": cfg.views_at(first) * size * size, "samples_per_ray": cfg.march.samples_per_ray,
                        "marcher": cfg.march.marcher, "hash_grid": nerf.encoding.__class__.__name__,
                        "steps_per_s": round(1 / s, 3), "seconds_per_step": round(s, 4),
                        "field_samples_per_step": samples // steps,
                        "field_samples_per_ray": round(samples / steps / (cfg.views_at(first) * size * size), 2),
                        "modes": modes,
                        "peak_memory_mb": round(peak),
                        "bytes_per_sample": round((peak - base) * 2**20 / (samples // steps))
                        if mem.cuda and samples else None}
        except RuntimeError as e:
            if not is_oom(e):
                raise
            out[key] = {"rays_per_step": cfg.views_at(first) * size * size, "out_of_memory": str(e).splitlines()[0][:300]}
        finally:
            nerf = grid = opt = None
            mem.reset()
    out["schedule"] = projected_schedule(out, preset, sizes)
    out["schedule_object"] = projected_schedule(out, preset, sizes, "/object")
    return out


def projected_schedule(rows: dict, cfg: GenerateConfig, sizes: list[int], suffix: str = "") -> dict:
    """Hours of the preset's whole schedule (every step's resolution and phase, e.g. sd21: 5,000 steps of 8 views
    at 64 px, albedo, then 5,000 of 4 views at 256 px, shaded) from the measured seconds per step, per hash grid
    (the rows `{size}px_{phase}/{impl}{suffix}`)."""
    counts: dict = {}
    for step in range(cfg.steps):
        key = (cfg.resolution_at(step), "albedo" if step < cfg.shading_start else "shaded")
        counts[key] = counts.get(key, 0) + 1
    out = {"steps": cfg.steps, "steps_per_phase": {f"{size}px_{phase}": n for (size, phase), n in counts.items()}}
    for impl in ("fused", "torch"):
        rows_of = {key: rows.get(f"{key[0]}px_{key[1]}/{impl}{suffix}", {}) for key in counts}
        if any(key[0] not in sizes or "seconds_per_step" not in row for key, row in rows_of.items()):
            out[impl] = None                           # a size not measured, or out of memory
            continue
        seconds = sum(n * rows_of[key]["seconds_per_step"] for key, n in counts.items())
        out[impl] = {"hours": round(seconds / 3600, 2),
                     "peak_memory_mb": max(row["peak_memory_mb"] for row in rows_of.values())}
    return out


OBJAVERSE_OBJECTS, GOAL_GPUS, GOAL_SECONDS = 800_000, 32, 86_400


def bench_render(reduced: bool) -> dict:
    """Section 4: per Cycles device, the curve's default row and the pipeline's objects per hour (bench/render.py)."""
    import importlib.util
    import os
    import tempfile
    from render.settings import RenderSettings
    spec = importlib.util.spec_from_file_location("render_bench", Path(__file__).parent / "render.py")
    render_bench = importlib.util.module_from_spec(spec)     # bench/render.py (its name is the render package's)
    spec.loader.exec_module(render_bench)
    settings = RenderSettings()
    objects = sorted(render_bench.ASSETS.glob("*.glb"))
    reference, devices, layouts = 1024, ["optix", "cuda"], [(1, 1.0), (2, 0.5)]
    if reduced:                    # the same code on the CPU, at smoke size
        settings.resolution, settings.samples, settings.denoiser = 32, 2, "none"
        objects, reference, devices, layouts = objects[:1], 4, ["cpu"], [(1, 0.0)]
    level = {k: getattr(settings, k) for k in render_bench.TUNED}
    out = {"resolution": settings.resolution, "default": level, "reference_samples": reference,
           "objects": [o.name for o in objects], "goal_seconds_per_object_per_gpu": GOAL_GPUS * GOAL_SECONDS / OBJAVERSE_OBJECTS}
    overrides = [f"settings.{k}={v}" for k, v in level.items()] + [f"settings.resolution={settings.resolution}"]
    with tempfile.TemporaryDirectory() as tmp:
        for obj in objects:
            os.symlink(obj, Path(tmp) / obj.name)
        for device in devices:
            row: dict = {}
            try:
                (row["curve"],) = render_bench.curve(objects, settings.resolution, reference, [level], device)
                row["pipeline"] = []
                for workers, gpus in layouts:
                    run = render_bench.pipeline(tmp, workers, 2, 100, overrides + [f"device={device}", f"gpus_per_task={gpus}"])
                    run["gpus_per_worker"] = gpus
                    run["seconds_per_object_per_gpu"] = run["render_seconds"] / max(1, run["objects"]) * (workers * gpus or 1)
                    row["pipeline"].append(run)
                best = min(r["seconds_per_object_per_gpu"] for r in row["pipeline"])
                row["objaverse_days_on_32_gpus"] = round(best * OBJAVERSE_OBJECTS / GOAL_GPUS / GOAL_SECONDS, 2)
            except Exception as e:        # a device Cycles cannot use here is a result, recorded
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            out[device] = row
            print(json.dumps({"render": {device: row}}), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reduced", action="store_true", help="toy sizes of the same code (any device; for tests)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--marcher", default="row", choices=["row", "torch", "fused", "nerfacc", "auto"],
                   help="3D stage: row (default: the row's implementation, fused rows the Warp marcher, torch rows "
                        "the pure-torch one), or one for every row: torch, fused, nerfacc (CUDA; compiles its "
                        "extension on first use unless a prebuilt nerfacc is installed) or auto")
    p.add_argument("--no-render", action="store_true", help="skip section 4 (Cycles on the GPU)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file (default: bench/results/gpu-<gpu name>.json on a GPU, none on a CPU)")
    args = p.parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu" and not args.reduced:
        sys.exit("bench/gpu.py: no GPU here; the full sizes need one (use --reduced for the same code at toy size)")
    t0 = time.time()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    model_cfg = reduced_model() if args.reduced else ModelConfig.sd21()
    model_cfg.allow_random_weights = True
    result = {"device": name, "commit": git_commit(Path(__file__).parent), "torch": torch.__version__, "cuda": torch.version.cuda, "reduced": args.reduced,
              "bf16": bf16, "date": time.strftime("%Y-%m-%d"), "weights": "random"}
    if device.type == "cuda":
        result["gpu_memory_mb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**20)
    steps = 2 if args.reduced else 5
    result["training"] = bench_training(model_cfg, device, bf16, args.reduced, steps)
    print(json.dumps({"training": result["training"]}), flush=True)
    torch.manual_seed(0)
    model = MultiViewModel(model_cfg).to(device).eval().requires_grad_(False)
    result["sampling"] = bench_sampling(model, device, 5 if args.reduced else 50)
    print(json.dumps({"sampling": result["sampling"]}), flush=True)
    sizes = [16, 32] if args.reduced else [64, 256]
    result["generate_3d"] = bench_3d(model, device, sizes, 2 if args.reduced else 3, args.reduced, args.marcher)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()       # Cycles gets the GPU's memory
    if not args.no_render:
        result["render"] = bench_render(args.reduced)
    result["seconds_total"] = round(time.time() - t0, 1)
    if time.time() - t0 > TIME_BUDGET_S:
        result["warning"] = f"took {time.time() - t0:.0f} s, over the {TIME_BUDGET_S} s budget"
    text = json.dumps(result, indent=1)
    print(text)
    out = args.out
    if out is None and device.type == "cuda":
        out = Path(__file__).parent / "results" / f"gpu-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
