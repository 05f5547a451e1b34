"""Shared fixtures: a local Ray on loopback (2 CPUs), hostile objects, process hygiene checks."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import common  # noqa: F401  (before torch: its OpenMP setting, see common/__init__.py)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
# The end-to-end modules and fixtures: what `make check` (pytest -m "not slow") leaves out. Each real Blender
# render, Ray cluster, training run or browser lives in one of them.
SLOW_MODULES = {"test_app", "test_bench", "test_demo", "test_finetune", "test_generate", "test_reconstruct",
                "test_render_blender", "test_render_cluster", "test_render_resume", "test_small", "test_train_cluster"}
SLOW_FIXTURES = {"rendered_demo", "tiny_checkpoint", "ray_local"}
# Small renders for tests: real Blender, real Cycles, just fewer pixels and samples.
SMALL = ["--resolution", "32", "--samples", "4", "--denoiser", "none", "--no-progress"]
# The rendered demo objects (the `rendered_demo` fixture): render_objaverse.py's arguments, less --output.
DEMO_RENDER = ["--source", "demo", "--demo-count", "4", *SMALL]


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


def pytest_sessionfinish(session, exitstatus):
    """A local Ray that an in-process pipeline call started (run_main of evaluate.py or generate.py --images) is
    shut down here, not during the interpreter's finalisation. One fresh-clone run of 242 passing tests ended
    with the pytest process segfaulting after its summary (no Python traceback: past faulthandler); the cause
    is not proven, Ray's native threads torn down at finalisation are the suspect."""
    import sys
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def chromium_path() -> str:
    """Debian's chromium for the browser tests. Missing: a skip on a developer's machine, a failure in CI
    (CI=true; .ci/run installs it), where a silent skip would hide that the pages were never opened."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "chromium is not installed (.ci/run and `make setup-browser` install Debian's package)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI must open the pages in a browser")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory):
    """$ISO3D_CACHE (converted checkpoints, file digests) in this run's temporary folder, never ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        if "ISO3D_CACHE" not in os.environ:
            mp.setenv("ISO3D_CACHE", str(tmp_path_factory.mktemp("iso3d-cache")))
        yield Path(os.environ["ISO3D_CACHE"])


@pytest.fixture(scope="module")
def ray_local():
    """The test process as the driver of a local 2-CPU Ray bound to 127.0.0.1, for one module. Ray Train's
    controller checks its workers every 0.5 s here, not every 2 s: a finished or killed worker is noticed
    sooner (measured: test_finetune's Ray Train run with a worker killed, 50-53 s against 59-61 s). Its
    processes read the setting from the environment they inherit at ray.init."""
    import ray
    from common.ray_local import init_ray
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        init_ray(None, num_cpus=2)
        yield ray
        ray.shutdown()


def made_once(tmp_path_factory, name: str, make) -> Path:
    """A session artifact made once per test run, however many pytest-xdist workers ask for it: the first
    builds it (make(path), at its final path: what it writes may name that path) and marks it done; the others
    wait on its lock and reuse it."""
    from filelock import FileLock
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent                          # shared by the workers of this run
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            make(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def rendered_demo(tmp_path_factory):
    """Four demo objects really rendered at 32 px (in a subprocess: it starts and stops its own Ray)."""
    import subprocess
    import sys

    def render(out: Path):
        subprocess.run([sys.executable, str(ROOT / "pipelines" / "render_objaverse.py"), *DEMO_RENDER, "--output", str(out)],
                       check=True, capture_output=True, timeout=600)
    return made_once(tmp_path_factory, "rendered_demo", render)


@pytest.fixture(scope="session")
def tiny_checkpoint(rendered_demo, tmp_path_factory):
    """A tiny model really fine-tuned (stage 1, a few steps) on the rendered demo objects."""
    import dataclasses
    from model.train import TrainConfig, train

    def fine_tune(run: Path):
        cfg = dataclasses.replace(TrainConfig.tiny(1), max_steps=6, ckpt_every=6, val_every=10_000, sample_steps=2)
        train(cfg, rendered_demo, run)
    return made_once(tmp_path_factory, "tiny_run", fine_tune) / "checkpoints" / "step-000006"


def run_main(script: str, args: list, capsys=None) -> tuple[int, str, str]:
    """pipelines/<script>.py's main(args) in this process: what `python pipelines/<script>.py ARGS` runs, less
    the interpreter start and imports (seconds per call). What it prints is read with pytest's `capsys`, or,
    without it (a fixture's call), by redirecting sys.stdout and sys.stderr. -> (exit code, stdout, stderr)."""
    import contextlib
    import importlib
    import io
    main = importlib.import_module(f"pipelines.{script}").main
    if capsys is None:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
        return code, out.getvalue(), err.getvalue()
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


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


def tensorboard_events(folder: Path) -> dict:
    """{"scalars": {tag: [(step, value)]}, "images": {tag: [step]}} of the TensorBoard event files in `folder` (or of
    the one event file `folder`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    return {"scalars": {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]},
            "images": {t: [e.step for e in acc.Images(t)] for t in tags["images"]}}
