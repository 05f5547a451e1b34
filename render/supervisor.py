"""Blender worker processes (render/worker.py) supervised from Python: fed objects one by one, timed out,
replaced when they crash, time out or grow; and `render_one`, which renders one object with such a
process and commits its folder atomically.

    worker = BlenderWorker("renders", max_objects=20)
    entry = render_one(ref, asdict(settings), "renders", "CPU", threads=2, timeout=900, worker=worker)
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common.atomic import replace_dir
from render.cameras import NUM_VIEWS
from render.layout import object_dir
from render.output import RenderRoot
from render.scratch import OWNER_FILE, SCRATCH_PREFIX, clean_stale_scratch
from render.sources import ObjectRef, resolve

PERMANENT = ("unreadable", "import_error", "empty_scene")
"""Failure reasons of the object itself: a retry would fail the same way."""
TRANSIENT = ("timeout", "crash", "download_error")
"""Failure reasons a retry may cure (render/scheduler.py retries them)."""
LOG_TAIL_LINES = 25


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
        ready, _, _ = select.select([self.control], [], [], timeout)
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
