"""kill -9 of a running render, then a rerun: nothing rendered twice, no partial folder, no Blender left."""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time

import psutil

from render.layout import object_dir, object_dirs
from tests.conftest import ROOT, SMALL, render_worker_pids

SCRIPT = str(ROOT / "pipelines" / "render_objaverse.py")


def complete_objects(out):
    return sorted(object_dirs(out)) if (out / "objects").exists() else []


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return "?"


def kill_tree(procs):
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_kill_mid_shard_then_rerun(tmp_path):
    """The property, independent of timing: whatever the killed run completed (before or after the kill:
    renders in flight may still finish and commit) is complete and never rendered again; the rest is
    rendered once; nothing partial is left, no Blender, and no Ray head of the killed run (GCS and raylet
    share the driver's fate; the rerun starts its own Ray)."""
    out = tmp_path / "out"
    cmd = [sys.executable, SCRIPT, "--source", "demo", "--demo-count", "6", "--output", str(out), *SMALL]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree: list[psutil.Process] = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (len(complete_objects(out)) >= 2 and render_worker_pids(out)):
            tree = psutil.Process(driver.pid).children(recursive=True) or tree
            time.sleep(0.2)
        assert len(complete_objects(out)) >= 2, "the first run made no progress"
        assert render_worker_pids(out), "expected renders in flight at the moment of the kill"
        tree = psutil.Process(driver.pid).children(recursive=True) or tree
        names = {p.pid: _name(p) for p in tree}
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.time() + 60   # Blender dies with its parent (PR_SET_PDEATHSIG), not with a timeout
        while time.time() < deadline and render_worker_pids(out):
            time.sleep(0.2)
        assert render_worker_pids(out) == [], "a Blender process outlived the killed run"
        # The local Ray head (GCS, raylet) shares the driver's fate: nothing for the next run to collide with.
        head = [p for p in tree if names[p.pid] in ("gcs_server", "raylet")]
        assert len(head) == 2 and not psutil.wait_procs(head, timeout=60)[1], "the killed driver's Ray head lives on"
    finally:
        driver.kill()
        # Ray's dashboard and runtime-env agents notice their raylet is gone and exit by themselves (measured:
        # within a minute); waiting for that would cost the suite a minute, so they go now.
        kill_tree(tree)
        psutil.wait_procs(tree, timeout=60)
    # Only now is the killed run's work settled: count what it completed.
    done_before = {u: (object_dir(out, u) / "meta.json").stat().st_mtime_ns for u in complete_objects(out)}
    assert 2 <= len(done_before) < 6

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "Token authentication" not in rerun.stderr          # the local Ray's auth mode is set, not defaulted
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == len(done_before) and summary["ok"] == 6 - len(done_before)
    assert len(complete_objects(out)) == 6
    for uid, mtime in done_before.items():
        assert (object_dir(out, uid) / "meta.json").stat().st_mtime_ns == mtime, f"{uid} was rendered twice"
    for uid in complete_objects(out):
        assert len(list(object_dir(out, uid).glob("*/*.png"))) == 32
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    oks = collections.Counter(e["uid"] for e in lines if e["status"] == "ok")
    assert oks == {uid: 1 for uid in complete_objects(out)}
    assert not [p for p in (out / "objects").glob("*/.*")], "partial folders left"
    assert render_worker_pids(out) == []


def test_a_killed_task_leaves_no_scratch_behind(tmp_path):
    """A render task killed before its `finally` leaks its scratch folder; the next task on the machine
    removes it, and never a folder whose task is alive."""
    import fcntl
    from render.scratch import OWNER_FILE, SCRATCH_PREFIX, clean_stale_scratch
    dead, alive = tmp_path / f"{SCRATCH_PREFIX}dead-1", tmp_path / f"{SCRATCH_PREFIX}alive-2"
    for d in (dead, alive):
        (d / "blender").mkdir(parents=True)
        (d / OWNER_FILE).touch()
    with open(alive / OWNER_FILE, "w") as owner:
        fcntl.flock(owner, fcntl.LOCK_EX)
        assert clean_stale_scratch(str(tmp_path)) == 1
        assert not dead.exists() and alive.exists()
    assert clean_stale_scratch(str(tmp_path)) == 1 and not alive.exists()
