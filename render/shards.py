"""Shards, the manifest, resume, and Blender worker processes that render objects in turn under a timeout.

    root = RenderRoot(Path("renders"))
    summary = render_all(root, refs, cfg, address=None)   # Ray actors, each feeding one Blender worker

Completeness is the atomic rename of `objects/<bb>/.tmp-<uid>-*` to `objects/<bb>/<uid>` (render/layout.py);
an object whose folder exists and whose manifest line (or, failing that, meta.json) carries the current
settings key is complete and skipped on a rerun.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import select as select_io   # (`select` below is the shard selection)
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from dataclasses import asdict
from pathlib import Path

from common.atomic import append_line, replace_dir
from render.cameras import NUM_VIEWS
from render.layout import object_dir, object_dirs
from render.quality import manifest_quality
from render.settings import RenderConfig, RenderSettings
from render.sources import ObjectRef, objaverse_annotations, resolve

log = logging.getLogger("render")
PERMANENT = ("unreadable", "import_error", "empty_scene")
TRANSIENT = ("timeout", "crash", "download_error")
LOG_TAIL_LINES = 25
SCRATCH_PREFIX = "iso3d-render-"
OWNER_FILE = ".owner.lock"


# --------------------------------------------------------------------------- shards

def shard_of(uid: str, num_shards: int) -> int:
    """Deterministic shard of an object: independent of list order, machine and Python's hash seed."""
    return int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "little") % num_shards


def parse_shards(spec: str, num_shards: int) -> list[int]:
    """'all' or a list like '0-3,7' -> sorted shard indices, each checked against num_shards."""
    if num_shards < 1:
        raise ValueError(f"--num-shards {num_shards}: expected at least 1")
    if spec.strip() == "all":
        return list(range(num_shards))
    shards: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            lo_i, hi_i = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ValueError(f"--shards {spec!r}: {part!r} is not a number or a range like 0-3") from None
        if lo_i > hi_i or lo_i < 0 or hi_i >= num_shards:
            raise ValueError(f"--shards {spec!r}: {part!r} is outside 0..{num_shards - 1} (--num-shards {num_shards})")
        shards.update(range(lo_i, hi_i + 1))
    return sorted(shards)


def select(refs: list[ObjectRef], shards: list[int], num_shards: int, limit: int | None) -> list[tuple[ObjectRef, int]]:
    wanted = set(shards)
    chosen = [(r, shard_of(r.uid, num_shards)) for r in refs]
    chosen = [(r, s) for r, s in chosen if s in wanted]
    return chosen[:limit] if limit is not None else chosen


# --------------------------------------------------------------------------- the output folder

class RenderRoot:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.objects = self.path / "objects"
        self.logs = self.path / "logs"
        self.manifest = self.path / "manifest.jsonl"
        for d in (self.objects, self.logs):
            d.mkdir(parents=True, exist_ok=True)

    def is_complete(self, uid: str, key: str) -> bool:
        try:
            meta = json.loads((object_dir(self.path, uid) / "meta.json").read_text())
        except (OSError, ValueError):
            return False
        return meta.get("settings_key") == key

    def object_uids(self) -> set[str]:
        """The complete objects' uids (one listing per bucket, render/layout.py)."""
        return set(object_dirs(self.path))

    def record(self, entry: dict) -> None:
        append_line(self.manifest, json.dumps(entry, sort_keys=True))

    def latest(self) -> dict[str, dict]:
        """The manifest's last line per uid."""
        out: dict[str, dict] = {}
        if self.manifest.exists():
            for line in self.manifest.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    out[entry["uid"]] = entry
        return out

    def _work_in_progress(self, pattern: str) -> list[Path]:
        """Matches of `pattern` in objects/ and in its buckets (render/layout.py), where renders are built."""
        return [*self.objects.glob(pattern), *self.objects.glob(f"*/{pattern}")]

    def clean_stale(self) -> int:
        """Remove temporary folders whose owner is gone (its lock is free); returns how many."""
        removed = 0
        for d in self._work_in_progress(".tmp-*"):
            if d.suffix == ".lock" or not d.is_dir():
                continue
            lock = d.with_name(d.name + ".lock")
            with open(lock, "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue   # a live task is writing it
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
            lock.unlink(missing_ok=True)
        for d in self._work_in_progress(".trash-*"):
            shutil.rmtree(d, ignore_errors=True)
        for lock in self._work_in_progress(".tmp-*.lock"):
            if not lock.with_suffix("").exists():
                lock.unlink(missing_ok=True)
        return removed


# --------------------------------------------------------------------------- one object

def clean_stale_scratch(tmp_root: str | None = None) -> int:
    """Remove this machine's render scratch folders whose task is gone (a killed task never runs its
    `finally`): a live task holds an flock on the folder's owner file until it ends."""
    removed = 0
    for d in Path(tmp_root or tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        try:
            with open(d / OWNER_FILE, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        except (BlockingIOError, NotADirectoryError, FileNotFoundError, PermissionError):
            continue    # a live task's folder, another user's, or gone meanwhile
    return removed


def _log_tail(path: Path, start: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    lines = [ln for ln in lines if ln.strip() and not ln.startswith("Fra:")]
    return "\n".join(lines[-LOG_TAIL_LINES:])


class BlenderWorker:
    """One Blender process (render/worker.py) that renders objects in turn, each from a factory-empty
    scene. Replaced (a fresh process for the next object) after `max_objects` objects, when its memory
    grew by more than `max_rss_growth_mb` since its first object, and after an object that timed out or
    crashed it: such a failure kills this process group only and is that object's alone.

    Its scratch folder (Blender's user resources, caches, TMPDIR) lives while the process does, owned
    through an flock so that `clean_stale_scratch` removes it once its owner is gone."""

    def __init__(self, root_path: str, max_objects: int = 1, max_rss_growth_mb: float = 2048.0):
        self.root_path = str(Path(root_path).resolve())
        self.max_objects, self.max_rss_growth_mb = max_objects, max_rss_growth_mb
        self.proc: subprocess.Popen | None = None
        self.started = 0          # processes started, for the benchmark
        self.start_seconds = 0.0  # their start-up: first jobs' wall time less their time in the process

    def _start(self, log) -> None:
        clean_stale_scratch()
        # Locked before it gets the name clean_stale_scratch looks for, so no cleaner sees it unowned.
        pending = Path(tempfile.mkdtemp(prefix=".iso3d-pending-"))
        self.owner = open(pending / OWNER_FILE, "w")          # held while the process lives
        fcntl.flock(self.owner, fcntl.LOCK_EX)
        self.scratch = pending.with_name(f"{SCRATCH_PREFIX}{os.getpid()}-{pending.name.rsplit('-', 1)[-1]}")
        pending.rename(self.scratch)
        env = {**os.environ, "BLENDER_USER_RESOURCES": str(self.scratch / "blender"),
               "XDG_CACHE_HOME": str(self.scratch / "cache"), "TMPDIR": str(self.scratch),
               "ISO3D_RENDER_ROOT": self.root_path, "PYTHONUNBUFFERED": "1"}
        control_r, control_w = os.pipe()
        # Output before the first job (Python and bpy start-up) goes to the log of the job that started it.
        # No preexec_fn (unsafe in a child forked from a multi-threaded Ray actor): the worker sets its own
        # death signal first thing, and exits if this process is already gone (render/worker.py).
        self.proc = subprocess.Popen([sys.executable, "-m", "render.worker", str(control_w), str(os.getpid())],
                                     stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, pass_fds=(control_w,),
                                     env=env, start_new_session=True)
        os.close(control_w)
        self.control = os.fdopen(control_r, "r")
        self.objects, self.rss_first = 0, None
        self.started += 1

    def run(self, job: dict, timeout: float, log_path: Path) -> dict:
        """Render `job` (render/worker.py's format, `log` set here) within `timeout` seconds: the worker's
        result, or a failure {"status": "failed", "reason": "timeout" | "crash", "error"}."""
        t0 = time.perf_counter()
        if self.proc is not None and self.proc.poll() is not None:
            self.close()   # it died between objects (killed from outside): not this object's failure
        first = self.proc is None
        if first:
            with open(log_path, "ab") as log:
                self._start(log)
        try:
            self.proc.stdin.write((json.dumps({**job, "log": str(log_path)}) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass   # it died before reading the job: reported below as a crash
        ready, _, _ = select_io.select([self.control], [], [], timeout)
        if not ready:
            self.close(kill=True)
            return {"status": "failed", "reason": "timeout", "error": f"no result after {timeout:g} s; process group killed"}
        line = self.control.readline()
        if not line:
            code = self.close(kill=True)
            how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
            return {"status": "failed", "reason": "crash", "error": f"Blender died ({how}) without a result"}
        result = json.loads(line)
        if first:
            self.start_seconds += time.perf_counter() - t0 - result["seconds"]
        self.objects += 1
        rss = _rss_mb(self.proc.pid)
        self.rss_first = self.rss_first if self.rss_first is not None else rss
        if self.objects >= self.max_objects or rss - self.rss_first > self.max_rss_growth_mb:
            self.close()
        return result

    def close(self, kill: bool = False) -> int | None:
        """End the process (its stdin closed; killed with its group if `kill` or if it does not end within
        30 s) and remove its scratch; returns its exit code. Returns only once the process is gone."""
        if self.proc is None:
            return None
        if not kill:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass   # killed below
        try:   # it, if still there, and anything it started
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        code = self.proc.wait()
        for f in (self.proc.stdin, self.control):
            try:
                f.close()
            except OSError:
                pass
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.owner.close()
        self.proc = None
        return code


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def render_one(ref: ObjectRef, settings: dict, root_path: str, device: str, threads: int, timeout: float,
               objaverse_dir: str | None = None, annotations: dict | None = None,
               worker: BlenderWorker | None = None) -> dict:
    """Render one object with `worker` (default: a fresh Blender process, ended afterwards) and commit its
    folder; returns its manifest entry. `annotations` go into its meta.json."""
    root = RenderRoot(Path(root_path))
    started = time.time()
    entry = {"uid": ref.uid, "original_id": ref.original_id, "source": ref.source,
             "host": socket.gethostname(), "sha256": None}
    final = object_dir(root.path, ref.uid)
    final.parent.mkdir(exist_ok=True)              # the object's bucket (render/layout.py)
    tmp = final.parent / f".tmp-{ref.uid}-{uuid.uuid4().hex[:8]}"
    lock_path = tmp.with_name(tmp.name + ".lock")
    log_path = root.logs / f"{ref.uid}.log"
    log_start = log_path.stat().st_size if log_path.exists() else 0   # failed() reads it: attempts append to one log
    one_shot = worker is None
    worker = worker or BlenderWorker(root_path)
    if worker.root_path != str(root.path.resolve()):
        raise ValueError(f"this Blender worker renders into {worker.root_path}, not {root.path}")

    def failed(reason: str, error: str) -> dict:
        return {**entry, "status": "failed", "reason": reason, "error": error,
                "log_tail": _log_tail(log_path, log_start), "seconds": time.time() - started}

    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            try:
                src = resolve(ref, objaverse_dir)
            except Exception as e:
                return {**failed("download_error", f"{type(e).__name__}: {e}"), "log_tail": ""}
            tmp.mkdir()
            job = {"input": str(src), "out_dir": str(tmp), "uid": ref.uid, "original_id": ref.original_id,
                   "source": ref.source, "settings": settings, "device": device, "threads": threads,
                   "extra_meta": {"annotations": annotations} if annotations else {}}
            with open(log_path, "ab") as logf:
                logf.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {ref.original_id} on {entry['host']}\n".encode())
            result = worker.run(job, timeout, log_path)
            entry["sha256"] = result.get("sha256")
            if result["status"] != "ok":
                return failed(result["reason"], result["error"])
            pngs = sum(1 for _ in tmp.glob("*/*.png"))
            if pngs != 2 * NUM_VIEWS or not (tmp / "meta.json").exists() or not (tmp / "cameras.json").exists():
                return failed("crash", f"incomplete output ({pngs} views)")
            replace_dir(tmp, final)
            return {**entry, "status": "ok", "reason": None, "warnings": result.get("warnings", []),
                    "quality": result.get("quality"), "timings": result.get("timings"), "seconds": time.time() - started}
        finally:
            if one_shot:
                worker.close()
            shutil.rmtree(tmp, ignore_errors=True)
            lock_path.unlink(missing_ok=True)


class RenderActor:
    """A Ray actor owning one `BlenderWorker`: the driver sends it objects one by one."""

    def __init__(self, root_path: str, max_objects: int, max_rss_growth_mb: float):
        self.worker = BlenderWorker(root_path, max_objects, max_rss_growth_mb)

    def render(self, *args) -> dict:
        return render_one(*args, worker=self.worker)

    def close(self) -> dict:
        self.worker.close()
        return {"processes": self.worker.started, "start_seconds": self.worker.start_seconds}


# --------------------------------------------------------------------------- many objects

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
