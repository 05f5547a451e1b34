"""The render script against a Ray cluster: `ray job submit` and `--address`, all on 127.0.0.1."""
from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, SMALL, render_worker_pids

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """`ray start --head` on loopback with token authentication, stopped (only it) afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")   # short: Ray's unix sockets live under it
    gcs_port, dash_port, agent_port = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port), "--num-cpus", "2",
                    "--dashboard-agent-listen-port", str(agent_port),
                    "--temp-dir", temp_dir, "--disable-usage-stats"], env=env, check=True, capture_output=True,
                   timeout=120)
    try:
        yield {"env": env, "gcs": f"127.0.0.1:{gcs_port}", "dashboard": f"http://127.0.0.1:{dash_port}",
               "processes": lambda: cluster_processes(temp_dir)}
    finally:
        for p in cluster_processes(temp_dir):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """This test's cluster: the processes started with its temp dir and their descendants (Ray's agents rename
    themselves, ray::DashboardAgent, so they are found as descendants, not by name); other Ray on the machine
    does not count."""
    ours = [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in a for a in (p.info["cmdline"] or []))]
    return list({p.pid: p for p in ours + [c for p in ours for c in p.children(recursive=True)]}.values())


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return addr.is_loopback or bool(getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback)


def listening_addresses(pids: set[int]) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.pid in pids}


def test_ray_job_submit(head, tmp_path):
    out = tmp_path / "out"
    for _ in range(30):   # the head's job agent comes up a few seconds after `ray start` returns
        job = subprocess.run([RAY, "job", "submit", "--address", head["dashboard"], "--", sys.executable,
                              str(ROOT / "pipelines" / "render_objaverse.py"), "--source", "demo", "--demo-count",
                              "2", "--output", str(out), *SMALL], env=head["env"], capture_output=True, text=True,
                             timeout=600, cwd=ROOT)
        if "No available agent" not in job.stderr:
            break
        time.sleep(1)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout.lower()
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [e["status"] for e in lines] == ["ok", "ok"]
    pids = {p.pid for p in head["processes"]()}
    addresses = listening_addresses(pids)
    assert len(addresses) >= 1 and all(is_loopback(ip) for ip in addresses), f"the cluster listens on {addresses}"


def test_address_joins_an_existing_cluster(head, tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in head["env"].items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    run = subprocess.run([sys.executable, str(ROOT / "pipelines" / "render_objaverse.py"), "--address", head["gcs"],
                          "--source", "demo", "--demo-count", "1", "--output", str(out), *SMALL],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["ok"] == 1
    assert render_worker_pids(out) == []


def test_without_the_token_the_cluster_refuses(head):
    """The dashboard (jobs API) itself refuses a request without the token (401) or with a wrong one (403), and
    answers the same request with it: the refusal is the server's, not a client that failed to connect."""
    url = head["dashboard"] + "/api/jobs/"
    token = head["env"]["RAY_AUTH_TOKEN"]
    answers = {}
    for name, headers in (("none", {}), ("wrong", {"Authorization": "Bearer " + "0" * 32}),
                          ("right", {"Authorization": "Bearer " + token})):
        for _ in range(30):     # the head's job agent comes up a few seconds after `ray start` returns
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
                    answers[name] = (r.status, r.read().decode())
            except urllib.error.HTTPError as e:
                answers[name] = (e.code, e.read().decode())
            if answers[name][0] not in (502, 503):
                break
            time.sleep(1)
    assert answers["none"] == (401, "Unauthorized: Missing authentication token")
    assert answers["wrong"] == (403, "Forbidden: Invalid authentication token")
    assert answers["right"][0] == 200 and isinstance(json.loads(answers["right"][1]), list)
