"""Shared fixtures: a local Ray on loopback (2 CPUs), hostile objects, process hygiene checks."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
# Small renders for tests: real Blender, real Cycles, just fewer pixels and samples.
SMALL = ["--resolution", "32", "--samples", "4", "--denoiser", "none", "--no-progress"]


@pytest.fixture(scope="module")
def ray_local():
    """The test process as the driver of a local 2-CPU Ray bound to 127.0.0.1, for one module."""
    import ray
    from common.ray_local import init_ray
    init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def rendered_demo(tmp_path_factory):
    """Four demo objects really rendered at 32 px (in a subprocess: it starts and stops its own Ray)."""
    import subprocess
    import sys
    out = tmp_path_factory.mktemp("rendered_demo")
    subprocess.run([sys.executable, str(ROOT / "pipelines" / "render_objaverse.py"), "--source", "demo",
                    "--demo-count", "4", "--output", str(out), *SMALL], check=True, capture_output=True, timeout=600)
    return out


def render_worker_pids(root) -> list[int]:
    """PIDs of live render workers writing into the render root `root` (marked by ISO3D_RENDER_ROOT in
    their environment): other renders on the machine, another test's or another user's, do not count."""
    marker = b"ISO3D_RENDER_ROOT=" + str(Path(root).resolve()).encode() + b"\0"
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
            state = (d / "stat").read_text().split(") ")[-1][0]
        except OSError:
            continue
        if marker in env and state != "Z":
            pids.append(int(d.name))
    return pids


@pytest.fixture(scope="session")
def tiny_checkpoint(rendered_demo, tmp_path_factory):
    """A tiny model really fine-tuned (stage 1, a few steps) on the rendered demo objects."""
    import dataclasses
    from model.train import TrainConfig, train
    run = tmp_path_factory.mktemp("tiny_run")
    cfg = dataclasses.replace(TrainConfig.tiny(1), max_steps=6, ckpt_every=6, val_every=10_000, sample_steps=2)
    train(cfg, rendered_demo, run)
    return run / "checkpoints" / "step-000006"
