"""Render-stage benchmark: prints JSON.

    python bench/render.py                      # the four test GLBs, 256 px, default settings
    python bench/render.py --quick              # a smoke run at 32 px

Measures (1) the samples/denoiser curve: seconds per view against RMSE (composited on white, 0..1)
versus a 1024-sample reference, which is how the default samples/denoiser were chosen;
(2) per object: import, normalise, render and per-view seconds, and the Blender process's peak RSS;
(3) objects per minute through Ray with 1 worker x 2 threads and 2 workers x 1 thread.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ASSETS = ROOT / "tests" / "data" / "glb"

CURVE_SCRIPT = r"""
import json, sys, time
import numpy as np
from pathlib import Path
from PIL import Image
from render import cameras, scene
from render.preview import on_white
src, out, res, reference_spp, levels = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
scene.reset(); scene.import_object(Path(src)); scene.normalise()
scene.setup_world(scene.bundled_hdris()[1], 40.0, 1.0)
cam = scene.add_camera(35.0, 32.0)
views = [(45.0, 20.0), (200.0, 35.0)]
def render(spp, denoiser, tag):
    scene.setup_render(res, spp, denoiser, "cpu", 2)
    scene.render_view(cam, cameras.c2w_blender(*views[0], 1.5), out / "warm.png")  # persistent data warm-up
    t = time.perf_counter()
    imgs = []
    for i, v in enumerate(views):
        p = out / f"{tag}-{i}.png"
        scene.render_view(cam, cameras.c2w_blender(*v, 1.5), p)
        imgs.append(np.asarray(on_white(Image.open(p)), dtype=np.float32) / 255)
    return (time.perf_counter() - t) / len(views), imgs
_, ref = render(reference_spp, "none", "ref")
rows = []
for spp, denoiser in levels:
    sec, imgs = render(spp, denoiser, f"{spp}-{denoiser}")
    rmse = float(np.sqrt(np.mean([(a - b) ** 2 for a, b in zip(imgs, ref)])))
    rows.append({"samples": spp, "denoiser": denoiser, "seconds_per_view": sec, "rmse": rmse})
print("CURVE" + json.dumps(rows))
"""


def curve(objects, resolution, reference_spp, levels):
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for obj in objects:
            out = subprocess.run([sys.executable, "-c", CURVE_SCRIPT, str(obj), tmp, str(resolution), str(reference_spp),
                                  json.dumps(levels)], capture_output=True, text=True, cwd=ROOT, check=True)
            line = next(ln for ln in out.stdout.splitlines() if ln.startswith("CURVE"))
            results[obj.name] = json.loads(line[5:])
    merged = []
    for i, (spp, denoiser) in enumerate(levels):
        rows = [r[i] for r in results.values()]
        merged.append({"samples": spp, "denoiser": denoiser,
                       "seconds_per_view": sum(r["seconds_per_view"] for r in rows) / len(rows),
                       "rmse": sum(r["rmse"] for r in rows) / len(rows)})
    return merged


def per_object(objects, settings):
    from render.shards import RenderRoot, render_one
    from render.sources import ObjectRef
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = RenderRoot(Path(tmp))
        for obj in objects:
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            ref = ObjectRef(obj.name, obj.name, str(obj), "folder")
            entry = render_one(ref, settings, str(root.path), "cpu", os.cpu_count() or 1, 900)
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            rows[obj.name] = {"status": entry["status"], "seconds_total": entry["seconds"],
                              **{f"seconds_{k}": v for k, v in (entry.get("timings") or {}).items()},
                              "peak_rss_mb_so_far": max(peak, before) / 1024}
    return rows


def throughput(objects, settings_overrides, workers, threads):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "pipelines" / "render_objaverse.py"), "--source", str(objects), "--output",
               tmp, "--num-workers", str(workers), "--no-progress", f"cpus_per_task={threads}", *settings_overrides]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        elapsed = time.perf_counter() - t
    n = len(list(Path(objects).glob("*.glb")))
    return {"workers": workers, "threads_per_worker": threads, "objects": n, "seconds": elapsed,
            "objects_per_minute": 60 * n / elapsed, "note": "includes Ray start-up (about 5 s)"}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="32 px, two objects, a short curve (a smoke run)")
    args = p.parse_args()
    from render.settings import RenderSettings
    settings = RenderSettings()
    objects = sorted(ASSETS.glob("*.glb"))
    levels = [[8, "none"], [16, "none"], [32, "none"], [64, "none"], [128, "none"],
              [8, "fast"], [16, "fast"], [32, "fast"], [64, "fast"], [16, "high"], [32, "high"]]
    reference = 1024
    if args.quick:
        settings.resolution, settings.samples, settings.denoiser = 32, 4, "none"
        objects, levels, reference = objects[:2], [[4, "none"], [4, "fast"]], 32
    overrides = [f"settings.{k}={v}" for k, v in (("resolution", settings.resolution), ("samples", settings.samples),
                                                   ("denoiser", settings.denoiser))]
    report = {"machine": {"cpus": os.cpu_count()}, "resolution": settings.resolution,
              "default_samples": settings.samples, "default_denoiser": settings.denoiser}
    report["curve"] = {"reference_samples": reference, "rows": curve(objects, settings.resolution, reference, levels)}
    report["per_object"] = per_object(objects, settings.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        for obj in objects:
            os.symlink(obj, Path(tmp) / obj.name)
        report["throughput"] = [throughput(tmp, overrides, 1, os.cpu_count() or 1),
                                throughput(tmp, overrides, os.cpu_count() or 1, 1)]
    report["syncdreamer_reference"] = {"seconds_per_object_median": 89.0, "views": 32, "resolution": 256,
                                       "note": "SyncDreamer's script, 128 spp + denoiser, measured on this machine"}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
