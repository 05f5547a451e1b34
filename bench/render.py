"""Render-stage benchmark: prints JSON (and writes it with --out).

    python bench/render.py                      # the four test GLBs at the defaults (256 px): about 30 min on 2 CPUs
    python bench/render.py --quick              # a smoke run at 32 px
    python bench/render.py --parts pipeline --out bench/results/render-cpu-2core.json   # one part, into a result

Measures
(breakdown) where a view's time goes, on the Duck: scene sync + PNG at 1 sample, the PNG write, path tracing
    per sample, the denoiser, and the world's importance sampling;
(curve) the curve that chose the defaults: seconds per view against PSNR (composited on white, 0..1) versus
    the renderer's own 1024-sample, undenoised reference at the default light paths, each object under another
    HDRI, the worst view of every object reported: a setting qualifies when every view is >= 40 dB;
(pipeline) objects per hour through the pipeline (pipelines/render_objaverse.py, Ray) at the defaults, with
    persistent Blender workers (objects_per_worker=100) and with a process per object
    (objects_per_worker=1), for 1 worker x all CPUs and all-CPUs workers x 1 thread, and the Blender
    start-up time each spent; and the ratio to SyncDreamer's own Blender script on the same four objects and
    machine (a median of 89 s per object, measured by running it here: its 128 samples + denoiser, 1 diffuse /
    1 glossy bounce).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ASSETS = ROOT / "tests" / "data" / "glb"
SYNCDREAMER_SECONDS_PER_OBJECT = 89.0   # median over the four GLBs, SyncDreamer's script on this 2-CPU machine
# Rows of the curve: samples, denoiser, and optionally light paths (SyncDreamer's: 1 diffuse, 1 glossy,
# 3 transparent, 3 transmission bounces) instead of the defaults.
LEVELS = [{"samples": s, "denoiser": d} for s, d in
          [(8, "fast"), (12, "fast"), (16, "fast"), (24, "fast"), (16, "high"), (64, "none")]]
LEVELS += [{"samples": 24, "denoiser": "fast", "adaptive_threshold": 0.05, "min_samples": 8},
           {"samples": 32, "denoiser": "fast", "adaptive_threshold": 0.05, "min_samples": 8},
           {"samples": 16, "denoiser": "fast", "light_paths": "syncdreamer"}]
ALL_PARTS = {"breakdown", "curve", "pipeline"}
TUNED = ("samples", "denoiser", "adaptive_threshold", "min_samples")   # RenderSettings fields a row sets

CURVE_SCRIPT = r"""
import json, sys, time
import bpy
from pathlib import Path
from render import cameras, scene
src, out, res, reference_spp, levels, hdri = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5]), int(sys.argv[6])
device = sys.argv[7]
scene.reset(); scene.import_object(Path(src)); scene.normalise()
scene.setup_world(scene.bundled_hdris()[hdri], 40.0, 1.0)
cam = scene.add_camera(35.0, 32.0)
views = [(45.0, 20.0), (200.0, 35.0)]
def render(level, tag):
    for samples in (1, level["samples"]):   # a 1-sample view first: scene sync, BVH, kernels
        scene.setup_render(res, samples, level["denoiser"], device, 0, level.get("adaptive_threshold", 0.0),
                           level.get("min_samples", 0))
        if level.get("light_paths") == "syncdreamer":
            c = bpy.context.scene.cycles
            c.diffuse_bounces, c.glossy_bounces, c.transparent_max_bounces, c.transmission_bounces = 1, 1, 3, 3
        if samples == 1:
            scene.render_view(cam, cameras.c2w_blender(*views[0], 1.5), out / "warm.png")
    t = time.perf_counter()
    for i, v in enumerate(views):
        scene.render_view(cam, cameras.c2w_blender(*v, 1.5), out / f"{tag}-{i}.png")
    return {**level, "seconds_per_view": (time.perf_counter() - t) / len(views),
            "views": [str(out / f"{tag}-{i}.png") for i in range(len(views))]}
rows = [render({"samples": reference_spp, "denoiser": "none"}, "ref")]
rows += [render(level, str(i)) for i, level in enumerate(levels)]
print("CURVE" + json.dumps(rows))
"""

BREAKDOWN_SCRIPT = r"""
import json, sys, time
import bpy
from mathutils import Matrix
from pathlib import Path
from render import cameras, scene
src, out, res, samples, denoiser = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
t = time.perf_counter(); scene.reset(); scene.import_object(Path(src)); scene.normalise(); imported = time.perf_counter() - t
scene.setup_world(scene.bundled_hdris()[1], 40.0, 1.0)
cam = scene.add_camera(35.0, 32.0)
def per_view(samples, denoiser, write=True, world_mis=True):
    scene.setup_render(res, samples, denoiser, "cpu", 0)
    bpy.context.scene.world.cycles.sampling_method = "AUTOMATIC" if world_mis else "NONE"
    scene.render_view(cam, cameras.c2w_blender(10.0, 20.0, 1.5), out / "warm.png")
    t = time.perf_counter()
    for az in (45.0, 135.0, 225.0, 315.0):
        if write:
            scene.render_view(cam, cameras.c2w_blender(az, 20.0, 1.5), out / "view.png")
        else:
            cam.matrix_world = Matrix(cameras.c2w_blender(az, 20.0, 1.5).tolist())
            bpy.ops.render.render()
    return (time.perf_counter() - t) / 4
one = per_view(1, "none")
plain = per_view(samples, "none")
print("BREAKDOWN" + json.dumps({
    "object": Path(src).name, "import_and_normalise_s": imported,
    "view_at_1_sample_s": one, "png_write_s": one - per_view(1, "none", write=False),
    "path_tracing_per_sample_s": (plain - one) / (samples - 1),
    f"view_at_{samples}_samples_s": plain, f"denoiser_{denoiser}_s": per_view(samples, denoiser) - plain,
    f"view_at_{samples}_samples_without_world_importance_sampling_s": per_view(samples, "none", world_mis=False)}))
"""


def breakdown(obj, resolution, samples, denoiser):
    """Where one view's time goes, on one object (every CPU thread): scene sync and PNG at 1 sample, path
    tracing per sample, the denoiser, and the share of the world's importance sampling."""
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([sys.executable, "-c", BREAKDOWN_SCRIPT, str(obj), tmp, str(resolution), str(samples), denoiser],
                             capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(next(ln for ln in run.stdout.splitlines() if ln.startswith("BREAKDOWN"))[9:])


def curve(objects, resolution, reference_spp, levels, device="cpu"):
    """One row per level: mean seconds per view over the objects, the worst view's PSNR, each object's worst
    (against the undenoised reference_spp render on the same Cycles device)."""
    import numpy as np
    from PIL import Image

    from optimize3d.evaluate import psnr
    from render.preview import on_white

    def load(path):
        return np.asarray(on_white(Image.open(path)), dtype=np.float32) / 255

    per_object = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, obj in enumerate(objects):
            out = Path(tmp) / obj.stem
            out.mkdir()
            hdri = (2 * i + 1) % 8   # each object under another of Blender's 8 HDRIs: courtyard, interior, studio, sunset
            run = subprocess.run([sys.executable, "-c", CURVE_SCRIPT, str(obj), str(out), str(resolution), str(reference_spp),
                                  json.dumps(levels), str(hdri), device], capture_output=True, text=True, cwd=ROOT)
            if run.returncode != 0:
                raise RuntimeError(f"{obj.name} on {device}: {run.stderr.strip().splitlines()[-1:] or run.returncode}")
            ref, *rows = json.loads(next(ln for ln in run.stdout.splitlines() if ln.startswith("CURVE"))[5:])
            for row in rows:
                row["psnr"] = [psnr(load(a), load(b)) for a, b in zip(row.pop("views"), ref["views"])]
            per_object[obj.name] = rows
    rows = []
    for i, level in enumerate(levels):
        worst = {name: round(min(r[i]["psnr"]), 2) for name, r in per_object.items()}
        rows.append({**level, "seconds_per_view": statistics.mean(r[i]["seconds_per_view"] for r in per_object.values()),
                     "psnr_min_db": min(worst.values()), "psnr_min_db_per_object": worst,
                     "every_view_40db": min(worst.values()) >= 40.0})
    return rows


def pipeline(objects_dir, workers, threads, objects_per_worker, overrides):
    """One run of the render pipeline; objects per hour from its own render loop's time (Ray's start-up,
    a few seconds once per run, reported apart)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "pipelines" / "render_objaverse.py"), "--source", str(objects_dir),
               "--output", tmp, "--num-workers", str(workers), "--no-progress", f"cpus_per_task={threads}",
               f"objects_per_worker={objects_per_worker}", *overrides]
        t = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"render_objaverse.py {' '.join(overrides)}: {run.stderr.strip().splitlines()[-1:]}")
        wall = time.perf_counter() - t
        summary = json.loads(next(Path(tmp, "runs").glob("*/summary.json")).read_text())
        per_object = [json.loads(line)["seconds"] for line in Path(tmp, "manifest.jsonl").read_text().splitlines()]
    return {"workers": workers, "threads_per_worker": threads, "objects_per_worker": objects_per_worker,
            "objects": summary["ok"], "failed": summary["failed"], "render_seconds": summary["seconds"],
            "objects_per_hour": 3600 * summary["ok"] / summary["seconds"],
            "seconds_per_object_median": statistics.median(per_object),
            "blender_processes": summary["blender_processes"], "blender_start_seconds": summary["blender_start_seconds"],
            "ray_start_and_exit_seconds": wall - summary["seconds"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="32 px, a short curve on one object, the pipeline on two, one worker layout (a smoke run)")
    p.add_argument("--out", type=Path, help="also write the JSON here (with --parts, into what it holds already)")
    p.add_argument("--parts", default="breakdown,curve,pipeline",
                   help="what to measure, any of breakdown, curve, pipeline (default: %(default)s)")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    if not parts or not parts <= ALL_PARTS:
        p.error(f"--parts {args.parts!r}: expected a comma-separated list of {', '.join(sorted(ALL_PARTS))}")
    from render.settings import RenderSettings
    settings = RenderSettings()
    objects = sorted(ASSETS.glob("*.glb"))
    levels, reference, curve_objects = LEVELS, 1024, objects
    if args.quick:
        settings.resolution, settings.samples, settings.denoiser = 32, 2, "none"
        objects, levels, reference = objects[:2], [{"samples": 2, "denoiser": "none"}, {"samples": 2, "denoiser": "fast"}], 16
        curve_objects = objects[:1]
    cpus = os.cpu_count() or 1
    report = json.loads(args.out.read_text()) if args.out and args.out.exists() and parts != ALL_PARTS else {}
    report.update(machine={"cpus": cpus}, resolution=settings.resolution)
    default = {k: getattr(settings, k) for k in TUNED}
    if "curve" in parts:
        rows = curve(curve_objects, settings.resolution, reference, levels)
        qualified = [r for r in rows if r["every_view_40db"] and "light_paths" not in r]
        chosen = min(qualified, key=lambda r: r["seconds_per_view"]) if qualified else None
        report["curve"] = {"reference_samples": reference, "rows": rows,
                           "cheapest_every_view_40db": {k: chosen[k] for k in TUNED if k in chosen} if chosen else None}
    report["default"] = default
    if "breakdown" in parts:
        duck = next((o for o in objects if o.name == "Duck.glb"), objects[0])
        report["breakdown"] = breakdown(duck, settings.resolution, max(settings.samples, 2), "fast")
    if "pipeline" not in parts:
        return finish(report, args.out)
    # The pipeline runs at the defaults (after --quick's reductions): the curve's choice once it is the default.
    overrides = [f"settings.{k}={v}" for k, v in default.items()] + [f"settings.resolution={settings.resolution}"]
    with tempfile.TemporaryDirectory() as tmp:
        for obj in objects:
            os.symlink(obj, Path(tmp) / obj.name)
        # --quick: the one worker x all threads layout only (both process policies): a smoke run of the code
        configs = [(1, cpus)] if args.quick else [(1, cpus), (cpus, 1)] if cpus > 1 else [(1, 1)]
        report["pipeline"] = [pipeline(tmp, w, t, n, overrides) for w, t in configs for n in (100, 1)]
    best = max(report["pipeline"], key=lambda r: r["objects_per_hour"])
    syncdreamer_per_hour = 3600 / SYNCDREAMER_SECONDS_PER_OBJECT
    report["syncdreamer"] = {"seconds_per_object_median": SYNCDREAMER_SECONDS_PER_OBJECT,
                             "objects_per_hour": syncdreamer_per_hour, "views": 32, "resolution": 256,
                             "note": "SyncDreamer's script run on this machine on the same four GLBs: 128 samples + "
                                     "denoiser, 1 diffuse / 1 glossy bounce"}
    report["speedup_vs_syncdreamer"] = {"objects_per_hour": best["objects_per_hour"] / syncdreamer_per_hour,
                                        "config": {k: best[k] for k in ("workers", "threads_per_worker", "objects_per_worker")}}
    finish(report, args.out)


def finish(report: dict, out: Path | None) -> None:
    text = json.dumps(report, indent=2)
    if out:
        out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
