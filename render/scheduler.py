"""Render many objects: skip the complete ones, then feed Ray actors (one Blender process each) until every
object is rendered or has failed, retrying transient failures, with a watchdog per object.

    root = RenderRoot(Path("renders"))
    summary = render_all(root, select(refs, shards, num_shards, None), cfg, address=None)
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from dataclasses import asdict

from render.actor import RenderActor
from render.layout import object_dir
from render.output import RenderRoot
from render.quality import manifest_quality
from render.settings import RenderConfig, RenderSettings
from render.sources import ObjectRef, objaverse_annotations
from render.supervisor import TRANSIENT

log = logging.getLogger("render")


def plan(root: RenderRoot, selected: list[tuple[ObjectRef, int]], key: str) -> tuple[list, int]:
    """(objects to render, how many are complete already) with one listing of objects/ and one read of the
    manifest: an object is complete when its folder exists and its last manifest line is ok with these
    settings. Only a folder without such a line (its run killed before the line was written) has its
    meta.json read; when that says complete, the missing line is written."""
    on_disk = root.object_uids()
    recorded = root.latest()
    todo, skipped = [], 0
    for r, s in selected:
        last = recorded.get(r.uid, {})
        if r.uid in on_disk and last.get("status") == "ok" and last.get("settings_key") == key:
            skipped += 1
        elif r.uid in on_disk and root.is_complete(r.uid, key):
            meta = json.loads((object_dir(root.path, r.uid) / "meta.json").read_text())
            root.record({"uid": r.uid, "original_id": r.original_id, "source": r.source, "shard": s,
                         "status": "ok", "reason": None, "sha256": meta.get("sha256"), "settings_key": key,
                         "quality": manifest_quality(meta["quality"]) if "quality" in meta else None,
                         "seconds": None, "recovered": True})
            skipped += 1
        else:
            todo.append((r, s))
    return todo, skipped


def render_all(root: RenderRoot, selected: list[tuple[ObjectRef, int]], cfg: RenderConfig,
               address: str | None = None, objaverse_dir: str | None = None, progress: bool = True) -> dict:
    """Render every selected object not already complete: `workers` Ray actors, each with a Blender process
    that renders objects in turn (`BlenderWorker`)."""
    from tqdm import tqdm

    from common.ray_local import init_ray

    settings: RenderSettings = cfg.settings
    cfg.validate()
    key = settings.key()
    root.clean_stale()
    todo, skipped = plan(root, selected, key)
    summary = {"selected": len(selected), "skipped": skipped, "ok": 0, "failed": 0, "retried": 0,
               "failures": {}, "settings_key": key}
    log.info("%d objects selected, %d already complete, %d to render", len(selected), skipped, len(todo))
    if not todo:
        return summary

    annotations = objaverse_annotations([r for r, _ in todo], objaverse_dir)
    local_cpus = max(1, (cfg.num_workers or os.cpu_count() or 1) * cfg.cpus_per_task)
    init_ray(address, num_cpus=None if address or os.environ.get("RAY_ADDRESS") else local_cpus)
    import ray   # after init_ray: it sets the environment Ray reads at import
    workers = cfg.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1) // cfg.cpus_per_task))
    actor_class = ray.remote(RenderActor).options(num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task)

    def new_actor():
        return actor_class.remote(str(root.path), cfg.objects_per_worker, cfg.worker_max_rss_growth_mb)

    idle = [new_actor() for _ in range(min(workers, len(todo)))]
    watchdog = 2 * cfg.timeout + 120   # download + start-up + render; the worker's own timeout is tighter
    pending = deque((r, s, 0) for r, s in todo)
    inflight: dict = {}
    started = time.time()
    bar = tqdm(total=len(todo), unit="obj", desc="render", disable=not progress, dynamic_ncols=True)
    try:
        while pending or inflight:
            while pending and idle:
                ref, shard, attempt = pending.popleft()
                actor = idle.pop()
                handle = actor.render.remote(ref, asdict(settings), str(root.path), cfg.device, cfg.cpus_per_task,
                                             cfg.timeout, objaverse_dir, annotations.get(ref.uid))
                inflight[handle] = (ref, shard, attempt, time.time(), actor)
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=5.0)
            for handle, (ref, shard, attempt, t0, actor) in list(inflight.items()):
                if handle not in done and t0 > 0 and time.time() - t0 > watchdog:
                    ray.kill(actor)   # its Blender dies with it (render/worker.py: die_with_parent)
                    inflight[handle] = (ref, shard, attempt, -1.0, actor)   # -1: killed by the watchdog
            for handle in done:
                ref, shard, attempt, t0, actor = inflight.pop(handle)
                try:
                    entry = ray.get(handle)
                    idle.append(actor)
                except ray.exceptions.RayError as e:
                    # The actor is gone (watchdog, node lost, killed): this object failed; a new actor takes its place.
                    ray.kill(actor)
                    idle.append(new_actor())
                    reason, error = (("timeout", f"killed after {watchdog:g} s") if t0 < 0
                                     else ("crash", str(e).strip().splitlines()[0]))
                    entry = {"uid": ref.uid, "original_id": ref.original_id, "source": ref.source,
                             "status": "failed", "reason": reason, "error": error}
                entry.setdefault("seconds", time.time() - t0 if t0 > 0 else watchdog)
                entry.update(shard=shard, attempts=attempt + 1, settings_key=key)
                if entry["status"] == "failed" and entry["reason"] in TRANSIENT and attempt < cfg.retries:
                    summary["retried"] += 1
                    log.warning("%s: %s (%s), retrying", ref.uid, entry["reason"], entry.get("error"))
                    pending.append((ref, shard, attempt + 1))
                    continue
                root.record(entry)
                if entry["status"] == "ok":
                    summary["ok"] += 1
                else:
                    summary["failed"] += 1
                    summary["failures"][entry["reason"]] = summary["failures"].get(entry["reason"], 0) + 1
                    log.warning("%s failed: %s: %s", ref.uid, entry["reason"], entry.get("error"))
                bar.update(1)
                bar.set_postfix(ok=summary["ok"], failed=summary["failed"])
        # Every Blender ends before the run returns (not when Ray gets round to reaping its workers).
        closed = ray.get([a.close.remote() for a in idle])
        summary["blender_processes"] = sum(c["processes"] for c in closed)
        summary["blender_start_seconds"] = sum(c["start_seconds"] for c in closed)
        for a in idle:
            ray.kill(a)
    finally:
        bar.close()
    elapsed = time.time() - started
    summary["seconds"] = elapsed
    summary["seconds_per_object"] = elapsed / max(1, summary["ok"] + summary["failed"])
    summary["workers"] = workers
    return summary
