"""pipelines/demo.py: the chained stages and their cache (tiny settings), and report.html in headless
Chromium (Debian's chromium package; .ci/run installs it)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

SCRIPT = str(ROOT / "pipelines" / "demo.py")
# 4 objects at 32 px; val_percent 25 holds out demo2-0-002-cylinder and demo2-0-003-cone.
SMALL = ["render.count=4", "render.resolution=32", "render.samples=4", "render.denoiser=none", "val_percent=25",
         "stage1.max_steps=2", "stage2.max_steps=2", "generate.steps=4",
         "generate.overrides=[val_every=4,ckpt_every=2,preview_steps=2,export.resolution=32,export.threshold=3,"
         "export.turntable_frames=4,export.turntable_size=32]"]


def run(out, *extra, timeout=900):
    r = subprocess.run([sys.executable, SCRIPT, "--output", str(out), *SMALL, *extra], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def stage_dirs(out):
    return sorted(p.name for p in out.iterdir() if p.is_dir() and p.name.split("-")[0] in ("render", "stage1", "stage2", "generate"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run(out)


def test_demo_writes_meshes_metrics_and_report_for_a_seen_and_a_held_out_object(demo):
    out, summary = demo
    objects = summary["objects"]
    assert objects["seen"]["object"] == "demo2-0-000-box" and objects["held_out"]["object"] == "demo2-0-002-cylinder"
    assert not any(summary["cached"].values()) and all(s > 0 for s in summary["seconds"].values())
    metrics = json.loads((out / "metrics.json").read_text())
    for role in ("seen", "held_out"):
        m = metrics["objects"][role]
        assert m["2d"]["psnr"] > 0 and m["3d"]["psnr"] > 0
        assert -1 <= m["2d"]["ssim"] <= 1 and -1 <= m["3d"]["ssim"] <= 1
        assert 0 <= m["3d"]["silhouette_iou"] <= 1 and 0 <= m["3d"]["volume_iou"] <= 1
        assert m["3d"]["chamfer"] > 0 and 0 <= m["3d"]["colour_error"] <= 1
        assert set(m["targets"]) == {"2d.psnr", "3d.silhouette_iou", "3d.volume_iou", "3d.colour_error"}
        assert m["targets"]["3d.volume_iou"]["value"] == m["3d"]["volume_iou"]
        run_dir = m["run"]
        for name in ("mesh.glb", "turntable.gif", "comparison.png"):
            assert os.path.isfile(os.path.join(run_dir, name)), name
    html = (out / "report.html").read_text()
    assert html.count("<model-viewer ") == 2 and "silhouette_iou" in html and html.count("comparison.png") == 2
    assert "demo target" in html and "held out of training" in html
    assert not list(out.glob("*.partial"))


def test_logs_are_plain_lines_and_commands_name_final_paths(demo):
    out, _ = demo
    stage1 = (out / "logs" / "stage1.log").read_text()
    assert "\r" not in stage1 and "stage 1: 100%" in stage1
    for cmd in out.glob("*-*/**/cmd.txt"):
        assert ".partial" not in cmd.read_text(), cmd


def test_bad_setting_fails_before_anything_is_written(demo):
    out, _ = demo
    before = (out / "config.yaml").read_text()
    r = subprocess.run([sys.executable, SCRIPT, "--output", str(out), *SMALL, "stage1.overrides=[lr_schedule=cosine]"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cosine" in r.stderr.strip().splitlines()[-1]
    assert (out / "config.yaml").read_text() == before


def test_second_run_reuses_everything(demo):
    out, first = demo
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*-*/**/*") if p.is_file() and "logs" not in p.parts}
    again = run(out)
    assert all(again["cached"].values())
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps     # no stage redid its work
    assert again["objects"] == first["objects"]
    assert again["seconds"] == first["seconds"]                     # the times of the run that did the work


def test_changed_3d_setting_redoes_only_the_3d_stage(demo):
    out, first = demo
    before = stage_dirs(out)
    changed = run(out, "generate.steps=3")
    assert changed["cached"] == {"render": True, "stage1": True, "stage2": True, "generate": False}
    new = set(stage_dirs(out)) - set(before)
    assert len(new) == 1 and new.pop().startswith("generate-")


def test_force_redoes_that_stage_and_what_follows(demo):
    out, _ = demo
    forced = run(out, "--force", "stage2")
    assert forced["cached"] == {"render": True, "stage1": True, "stage2": False, "generate": False}


def test_an_object_without_a_surface_is_reported_and_the_demo_goes_on(demo):
    out, _ = demo
    summary = run(out, "generate.overrides=[val_every=4,ckpt_every=2,preview_steps=2,export.resolution=32,"
                       "export.threshold=1e9,export.turntable_frames=4,export.turntable_size=32]")
    for obj in summary["objects"].values():
        assert "no surface" in obj["error"] and obj["2d"]["psnr"] > 0 and obj["3d"] == {}
        assert not any(t["met"] for name, t in obj["targets"].items() if name.startswith("3d."))
    html = (out / "report.html").read_text()
    assert html.count("gave no mesh") == 2 and "<model-viewer " not in html


def test_changed_render_setting_rerenders_and_retrains(demo):
    out, first = demo
    changed = run(out, "render.samples=2")
    assert not any(changed["cached"].values())
    assert changed["keys"]["render"] != first["keys"]["render"] and changed["keys"]["stage1"] != first["keys"]["stage1"]


def test_killed_stage_is_not_taken_as_complete(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, SCRIPT, "--output", str(out), *SMALL], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not list(out.glob("stage1-*.partial/checkpoints/step-*")) and time.time() < deadline:
        assert proc.poll() is None, "the demo ended before stage 1 wrote a checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p.name.split("-")[0] for p in out.glob("*.partial")] == ["stage1"]
    assert [p.name for p in out.glob("stage1-*") if not p.name.endswith(".partial")] == []
    summary = run(out)
    assert summary["cached"] == {"render": True, "stage1": False, "stage2": False, "generate": False}
    assert not list(out.glob("*.partial"))


def test_report_opens_in_headless_chromium_with_the_3d_view_loaded(demo, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run and `make setup-browser` install Debian's package)")
    out, _ = demo
    if "model-viewer-umd.min.js" not in (out / "report.html").read_text():
        pytest.fail("report.html has no model-viewer: run `make setup` (npm ci in pipelines/web)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--window-size=1100,1400"]
    url = (out / "report.html").as_uri()
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    assert 'data-model-loaded="true"' in dom
    shot = out / "report.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=180)
    assert shot.stat().st_size > 10_000
