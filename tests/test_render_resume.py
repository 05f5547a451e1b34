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

from tests.conftest import ROOT, SMALL, render_worker_pids

SCRIPT = str(ROOT / "pipelines" / "render_objaverse.py")


def complete_objects(out):
    return sorted(p.name for p in (out / "objects").iterdir() if not p.name.startswith(".")) \
        if (out / "objects").exists() else []


def kill_tree(procs):
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_kill_mid_shard_then_rerun(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, SCRIPT, "--source", "demo", "--demo-count", "6", "--output", str(out), *SMALL]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree: list[psutil.Process] = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(complete_objects(out)) < 2:
            tree = psutil.Process(driver.pid).children(recursive=True) or tree
            time.sleep(0.2)
        assert len(complete_objects(out)) >= 2, "the first run made no progress"
        assert render_worker_pids(), "expected renders in flight at the moment of the kill"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        done_before = {u: (out / "objects" / u / "meta.json").stat().st_mtime_ns for u in complete_objects(out)}
        assert len(done_before) < 6
        deadline = time.time() + 30   # Blender dies with its parent (PR_SET_PDEATHSIG), not with a timeout
        while time.time() < deadline and render_worker_pids():
            time.sleep(0.2)
        assert render_worker_pids() == [], "a Blender process outlived the killed run"
    finally:
        driver.kill()
        kill_tree(tree)   # Ray's own agents outlive a SIGKILLed driver

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == len(done_before) and summary["ok"] == 6 - len(done_before)
    assert len(complete_objects(out)) == 6
    for uid, mtime in done_before.items():
        assert (out / "objects" / uid / "meta.json").stat().st_mtime_ns == mtime, f"{uid} was rendered twice"
    for uid in complete_objects(out):
        assert len(list((out / "objects" / uid).glob("*/*.png"))) == 32
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    oks = collections.Counter(e["uid"] for e in lines if e["status"] == "ok")
    assert oks == {uid: 1 for uid in complete_objects(out)}
    assert not [p for p in (out / "objects").iterdir() if p.name.startswith(".")], "partial folders left"
    assert render_worker_pids() == []
