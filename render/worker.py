"""A Blender worker process: renders the objects it is sent, one after another, each from a factory-empty
scene. Started, fed, timed out and replaced by render/supervisor.py (`BlenderWorker`).

    python -m render.worker CONTROL_FD [PARENT_PID] < jobs   # one JSON job per line; one JSON result per line on CONTROL_FD

A job: {"input", "out_dir", "uid", "original_id", "source", "settings": RenderSettings fields, "device",
"threads", "log", "extra_meta"}. Writes RGBA PNGs, cameras.json and meta.json into out_dir, then
{"status": "ok", ...} or {"status": "failed", "reason", "error"} as one line on CONTROL_FD. While a job
runs, the process's stdout and stderr (Blender's and Cycles' own output too) go to the job's log file.
Failure reasons: unreadable, import_error, empty_scene (permanent); anything else is a crash.
The process ends when its stdin closes, and is SIGKILLed when PARENT_PID (its supervisor) dies.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_json
from render import cameras
from render.settings import RenderSettings

GLTF_MAGIC = b"glTF"


def sniff(path: Path) -> str:
    """sha256 of the file; raises SceneError('unreadable') for files no importer should see."""
    from render.scene import SceneError
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SceneError("unreadable", f"{path.name}: cannot read ({e.strerror})") from None
    if not data:
        raise SceneError("unreadable", f"{path.name}: empty file (0 bytes)")
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head")):
        raise SceneError("unreadable", f"{path.name}: an HTML/XML page, not a 3D file (a failed download?)")
    if path.suffix.lower() == ".glb" and not data.startswith(GLTF_MAGIC):
        raise SceneError("unreadable", f"{path.name}: not a binary glTF (magic {data[:4]!r}, expected b'glTF')")
    return hashlib.sha256(data).hexdigest()


def render_object(job: dict, state: dict) -> dict:
    from render import scene

    settings = RenderSettings(**{**job["settings"], "hdri_luminance": tuple(job["settings"]["hdri_luminance"])})
    out = Path(job["out_dir"])
    src = Path(job["input"])
    timings: dict[str, float] = {}
    rng = np.random.default_rng(cameras.seed_for(job["uid"], settings.seed))

    t = time.perf_counter()
    sha256 = state["sha256"] = sniff(src)
    scene.reset()
    scene.import_object(src)
    timings["import"] = time.perf_counter() - t

    t = time.perf_counter()
    removed = scene.remove_nonfinite_vertices()
    normalisation = scene.normalise(settings.normalise)
    bbox_min, bbox_max = scene.normalised_bbox()
    missing = scene.missing_images()
    timings["normalise"] = time.perf_counter() - t

    hdris = scene.bundled_hdris()
    if settings.hdris:
        unknown = set(settings.hdris) - {h.stem for h in hdris}
        if unknown:
            raise ValueError(f"hdris: unknown names {sorted(unknown)}; bundled: {[h.stem for h in hdris]}")
        hdris = [h for h in hdris if h.stem in settings.hdris]
    hdri = hdris[int(rng.integers(len(hdris)))]
    lighting = scene.setup_world(hdri, float(rng.uniform(0, 360)), float(rng.uniform(*settings.hdri_luminance)))
    scene.setup_render(settings.resolution, settings.samples, settings.denoiser, job["device"], job["threads"],
                       settings.adaptive_threshold, settings.min_samples)
    camera = scene.add_camera(settings.lens_mm, settings.sensor_mm)

    view_sets = {"random": cameras.random_angles(rng), "fixed": cameras.fixed_angles()}
    views: dict[str, list] = {}
    t = time.perf_counter()
    for name, angles in view_sets.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        views[name] = []
        for i, (az, el) in enumerate(angles):
            scene.render_view(camera, cameras.c2w_blender(az, el, settings.distance), out / name / f"{i:03d}.png")
            views[name].append({"azimuth_deg": az, "elevation_deg": el, "distance": settings.distance,
                                "c2w": cameras.c2w_opencv(az, el, settings.distance).tolist()})
    timings["render"] = time.perf_counter() - t
    n_views = sum(len(v) for v in views.values())
    timings["per_view"] = timings["render"] / n_views

    import bpy
    from render.preview import object_preview
    from render.quality import gltf_materials, manifest_quality, object_quality
    object_preview(out).save(out / "preview.png")
    quality = object_quality(out, missing, gltf_materials(src))
    atomic_write_json(out / "cameras.json", {
        "convention": "opencv",  # camera looks down +Z, +Y down; c2w maps camera to world (z-up)
        "world": "blender z-up; object normalised into [-0.5, 0.5]^3",
        "K": cameras.intrinsics(settings.resolution, settings.lens_mm, settings.sensor_mm).tolist(),
        "width": settings.resolution, "height": settings.resolution, **views})
    warnings = []
    if removed:
        warnings.append(f"removed {removed} non-finite vertices")
    if missing:
        warnings.append(f"missing textures: {missing}")
    atomic_write_json(out / "meta.json", {
        "uid": job["uid"], "original_id": job["original_id"], "source": job["source"],
        "source_file": str(src), "sha256": sha256,
        "bbox_before": {"min": normalisation["bbox_min"], "max": normalisation["bbox_max"]},
        "scale": normalisation["scale"], "offset": normalisation["offset"],
        "bbox_after": {"min": bbox_min, "max": bbox_max},
        "hdri": lighting, "settings": settings.__dict__, "settings_key": settings.key(),
        "device": job["device"], "blender_version": bpy.app.version_string,
        "seed": cameras.seed_for(job["uid"], settings.seed), "timings": timings,
        "warnings": warnings, "missing_textures": missing, "quality": quality, **job.get("extra_meta", {})})
    return {"status": "ok", "sha256": sha256, "timings": timings, "warnings": warnings, "quality": manifest_quality(quality)}


def run_job(job: dict) -> dict:
    """The job's result; "seconds": how long it took in this process (the rest of a first job's wall time
    is the process's start-up)."""
    from render.scene import SceneError
    state: dict = {}
    t = time.perf_counter()
    try:
        result = render_object(job, state)
    except SceneError as e:
        result = {"status": "failed", "reason": e.reason, "error": str(e), "sha256": state.get("sha256")}
    except Exception as e:
        traceback.print_exc()
        result = {"status": "failed", "reason": "crash", "error": f"{type(e).__name__}: {e}", "sha256": state.get("sha256")}
    return {**result, "seconds": time.perf_counter() - t}


def redirect_output(fd: int) -> None:
    """Point this process's stdout and stderr at `fd`, after flushing what Python and C have buffered,
    so every line lands in the log of the job that printed it."""
    sys.stdout.flush()
    sys.stderr.flush()
    ctypes.CDLL(None).fflush(None)
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux PR_SET_PDEATHSIG), so a killed run leaves no Blender
    behind; set here, after exec, rather than in a preexec_fn of the multi-threaded parent. A parent that died
    before this line ran left us re-parented already: exit then."""
    import signal
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGKILL) != 0:   # PR_SET_PDEATHSIG
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(1)


def serve(control_fd: int) -> int:
    import render.scene  # noqa: F401  (bpy: part of the start-up, not of the first object)
    control = os.fdopen(control_fd, "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    for line in sys.stdin:
        job = json.loads(line)
        log = os.open(job["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        redirect_output(log)
        os.close(log)
        result = run_job(job)
        redirect_output(devnull)
        control.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2:
        die_with_parent(int(sys.argv[2]))
    sys.exit(serve(int(sys.argv[1])))
