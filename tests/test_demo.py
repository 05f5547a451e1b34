"""pipelines/demo.py: the chained stages and their cache (tiny settings), and report.html in headless
Chromium (Debian's chromium package; .ci/run installs it).

One demo run (the `demo` fixture: stage 1 onwards from scratch, its render stage seeded with the session's
rendered demo objects, the same command's output) is made; every test that changes something works on a copy of
it, so no test depends on what another left behind. What a variant would redo is known from the stage keys
(`stage_keys`, a pure function of the settings): that is tested without running, and only the variants that
prove something about running (a cached rerun; a forced stage killed half-way, resumed with a changed 3D
setting) run."""
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.config import load_config
from tests.conftest import DEMO_RENDER, ROOT, chromium_path, run_main

SCRIPT = str(ROOT / "pipelines" / "demo.py")
# 4 objects at 32 px; val_percent 25 holds out demo2-0-002-cylinder and demo2-0-003-cone. Each stage's final
# validation grid samples with 2 steps, not 20 (3 s of a 2-step stage's 5 s of training).
SMALL = ["render.count=4", "render.resolution=32", "render.samples=4", "render.denoiser=none", "val_percent=25",
         "stage1.max_steps=2", "stage2.max_steps=2", "stage1.overrides=[sample_steps=2]",
         "stage2.overrides=[sample_steps=2]", "generate.steps=4",
         "generate.overrides=[val_every=4,ckpt_every=2,preview_steps=2,export.resolution=32,export.threshold=3,"
         "export.turntable_frames=4,export.turntable_size=32]"]
NO_SURFACE = SMALL[-1].replace("export.threshold=3,", "export.threshold=1e9,")   # a field with no surface that dense


def run(out, *extra, timeout=900):
    r = subprocess.run([sys.executable, SCRIPT, "--output", str(out), *SMALL, *extra], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def render_settings(args: list) -> tuple:
    """What a render_objaverse.py command renders: its source, the number of demo objects, the resolved settings."""
    import dataclasses
    from pipelines.render_objaverse import parse_args, resolve_config
    parsed = parse_args([*map(str, args), "--output", "unused"])
    return parsed.source, parsed.demo_count, dataclasses.asdict(resolve_config(parsed))


@pytest.fixture(scope="module")
def demo(rendered_demo, tmp_path_factory):
    """The demo run, its render stage seeded with the session's rendered demo objects: the command that made them
    renders what the demo's render stage would (asserted), so stage 1 onwards run on the files the stage would
    have written. The render command itself is tested end to end by every test that uses `rendered_demo` and
    in test_render_*."""
    from common.atomic import atomic_write_json
    from pipelines.demo import DemoConfig, render_args, stage_keys
    cfg = load_config(DemoConfig, None, SMALL)
    assert render_settings(render_args(cfg.render)) == render_settings(DEMO_RENDER)
    out = tmp_path_factory.mktemp("demo")
    key = stage_keys(cfg)["render"]
    shutil.copytree(rendered_demo, out / f"render-{key}", ignore=shutil.ignore_patterns("cache"))   # what training added
    atomic_write_json(out / f"render-{key}" / "stage.json", {"seconds": None, "key": key})
    return out, run(out)


@pytest.fixture
def demo_copy(demo, tmp_path):
    """A copy of the demo's output (file times kept) for a test that changes it."""
    out, summary = demo
    copy = tmp_path / "demo"
    shutil.copytree(out, copy)
    return copy, summary


def psnr_on_white(sampled: Path, truth_rgba: Path) -> float:
    """PSNR of a sampled view against a rendered RGBA view composited on white, written out here (not the
    project's metric code) so that a wrong metric or wrong view pairing cannot agree with itself."""
    a = np.asarray(Image.open(sampled).convert("RGB"), np.float64) / 255
    t = np.asarray(Image.open(truth_rgba).convert("RGBA"), np.float64) / 255
    b = t[..., :3] * t[..., 3:] + (1 - t[..., 3:])
    return float(-10 * np.log10(np.mean((a - b) ** 2)))


def test_demo_writes_meshes_metrics_and_report_for_a_seen_and_a_held_out_object(demo):
    """Measured at these toy settings (2 training steps from the base model, 4 SDS steps: the sampled views are
    blotches and the field is still near its initial blob): 2D PSNR 8.1-8.2 dB (7.2-7.3 from random weights),
    silhouette IoU 0.63-0.68, volume IoU 0.52-0.55 on 2 cores. The floors below sit well under those and well
    above what an empty, misplaced or unexported field gives (0); the 2D PSNR is recomputed here from the
    written images."""
    out, summary = demo
    objects = summary["objects"]
    assert objects["seen"]["object"] == "demo2-0-000-box" and objects["held_out"]["object"] == "demo2-0-002-cylinder"
    assert summary["cached"] == {"render": True, "stage1": False, "stage2": False, "generate": False}   # render: seeded
    assert all(summary["seconds"][s] > 0 for s in ("stage1", "stage2", "generate"))
    metrics = json.loads((out / "metrics.json").read_text())
    for role in ("seen", "held_out"):
        m = metrics["objects"][role]
        run_dir, truth = Path(m["run"]), Path(m["ground_truth"])
        sampled = sorted((run_dir / "multiview").glob("*.png"))
        assert len(sampled) == 4
        ours = np.mean([psnr_on_white(v, truth / "fixed" / f"{4 * i:03d}.png") for i, v in enumerate(sampled)])
        assert m["2d"]["psnr"] == pytest.approx(ours, abs=0.05) and 4 < m["2d"]["psnr"] < 40
        assert -1 <= m["2d"]["ssim"] <= 1 and -1 <= m["3d"]["ssim"] <= 1 and m["3d"]["psnr"] > 8
        assert m["3d"]["silhouette_iou"] >= 0.4 and m["3d"]["volume_iou"] >= 0.3, m["3d"]
        assert 0 < m["3d"]["chamfer"] < 0.3 and 0 <= m["3d"]["colour_error"] <= 1
        assert set(m["targets"]) == {"2d.psnr", "3d.silhouette_iou", "3d.volume_iou", "3d.colour_error"}
        assert m["targets"]["3d.volume_iou"]["value"] == m["3d"]["volume_iou"]
        assert m["targets"]["2d.psnr"]["met"] == (m["2d"]["psnr"] >= 18.0)
        for name in ("mesh.glb", "turntable.gif", "comparison.png"):
            assert (run_dir / name).is_file(), name
    assert set(metrics["conditioning"]) == {"seen", "held_out"}
    html = (out / "report.html").read_text()
    assert html.count("<model-viewer ") == 2 and "silhouette_iou" in html and html.count("comparison.png") == 2
    assert "demo target" in html and "held out of training" in html
    assert not list(out.glob("*.partial"))
    # The loss curves: each stage's TensorBoard loss, the last point the loss its final checkpoint recorded.
    for name in ("stage1", "stage2"):
        (stage_dir,) = out.glob(f"{name}-*")
        final = json.loads((stage_dir / "checkpoints" / "step-000002" / "training_state" / "state.json").read_text())
        assert [p[0] for p in metrics["losses"][name]] == [2]
        assert metrics["losses"][name][-1][1] == pytest.approx(final["loss"], rel=1e-6)
        assert f"{name}: training loss per step" in html
    assert html.count('<svg class="curve"') == 2 and html.count("<polyline") == 2


def test_logs_are_plain_lines_and_commands_name_final_paths(demo):
    out, _ = demo
    stage1 = (out / "logs" / "stage1.log").read_text()
    assert "\r" not in stage1 and "stage 1: 100%" in stage1
    for cmd in out.glob("*-*/**/cmd.txt"):
        assert ".partial" not in cmd.read_text(), cmd
    # Stage 1 starts from the committed base model, as the paper's starts from MVDream.
    (stage1_cmd,) = out.glob("stage1-*/cmd.txt")
    assert f"--init {ROOT / 'model' / 'base-tiny'}" in stage1_cmd.read_text()


def test_bad_setting_fails_before_anything_is_written(demo, tmp_path, capsys):
    out, _ = demo
    before = (out / "config.yaml").read_text()
    for where in (out, tmp_path / "new"):
        code, _, err = run_main("demo", ["--output", where, *SMALL, "stage1.overrides=[lr_schedule=cosine]"], capsys)
        assert code == 2 and "cosine" in err.strip().splitlines()[-1]
    assert (out / "config.yaml").read_text() == before and not (tmp_path / "new").exists()


def test_stage_keys_change_with_their_settings_for_that_stage_and_every_later_one():
    """What a changed setting redoes, without running: its stage and every stage after it get new keys, the
    stages before it keep theirs (a new key = a new directory = the stage is redone; a kept key = reused)."""
    from pipelines.demo import STAGES, DemoConfig, stage_keys
    base = stage_keys(load_config(DemoConfig, None, SMALL))
    for change, first in (("render.samples=2", "render"), ("stage1.max_steps=3", "stage1"),
                          ("stage2.overrides=[sample_steps=2,lr=0.002]", "stage2"), ("generate.steps=3", "generate"),
                          (NO_SURFACE, "generate"), ("val_percent=30", "stage1"), ("base=null", "stage1")):
        keys = stage_keys(load_config(DemoConfig, None, [*SMALL, change]))
        i = STAGES.index(first)
        assert [keys[s] == base[s] for s in STAGES] == [True] * i + [False] * (len(STAGES) - i), change
    assert stage_keys(load_config(DemoConfig, None, SMALL)) == base


def test_second_run_reuses_everything(demo, capsys):
    out, first = demo
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*-*/**/*") if p.is_file() and "logs" not in p.parts}
    code, printed, _ = run_main("demo", ["--output", out, *SMALL], capsys)
    assert code == 0
    again = json.loads(printed)
    assert all(again["cached"].values())
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps     # no stage redid its work
    assert again["objects"] == first["objects"]
    assert again["seconds"] == first["seconds"]                     # the times of the run that did the work


def test_forced_stage_killed_half_way_is_redone_with_what_follows_and_no_surface_is_reported(demo_copy):
    """--force stage2 removes stage 2 and the 3D stage at once; killed while stage 2 trains, it leaves only
    stage 2's .partial, which the next run (no --force) continues, to the same model; the 3D stage is redone
    too, here with a threshold no field reaches (a 3D setting: stage 2's key is kept, the 3D stage's changes),
    and each object is reported without a surface, with its 2D metrics. (Which stages a changed setting
    redoes is tested on the keys, without running, above; a rerun with the same keys reuses everything.)"""
    out, first = demo_copy
    keys = first["keys"]
    proc = subprocess.Popen([sys.executable, SCRIPT, "--output", str(out), *SMALL, "--force", "stage2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600               # a readiness wait, not a timing assertion
    while not list(out.glob("stage2-*.partial/checkpoints/step-*")) and time.time() < deadline:
        assert proc.poll() is None, "the demo ended before stage 2 wrote a checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p.name for p in out.glob("*.partial")] == [f"stage2-{keys['stage2']}.partial"]
    assert not (out / f"stage2-{keys['stage2']}").exists() and not (out / f"generate-{keys['generate']}").exists()
    assert (out / f"stage1-{keys['stage1']}").is_dir()
    summary = run(out, NO_SURFACE)
    assert summary["cached"] == {"render": True, "stage1": True, "stage2": False, "generate": False}
    assert not list(out.glob("*.partial"))
    assert {s: summary["keys"][s] == keys[s] for s in keys} == {"render": True, "stage1": True, "stage2": True,
                                                                "generate": False}
    for obj in summary["objects"].values():
        assert "no surface" in obj["error"] and obj["2d"]["psnr"] > 4 and obj["3d"] == {}
        assert not any(t["met"] for name, t in obj["targets"].items() if name.startswith("3d."))
    # the resumed stage 2 is the uninterrupted one: the same sampled views (PSNR to 8-bit rounding)
    assert summary["objects"]["seen"]["2d"]["psnr"] == pytest.approx(first["objects"]["seen"]["2d"]["psnr"], abs=0.05)
    html = (out / "report.html").read_text()
    assert html.count("gave no mesh") == 2 and "<model-viewer " not in html


def test_report_opens_in_headless_chromium_with_the_3d_view_loaded(demo, tmp_path):
    from playwright.sync_api import sync_playwright
    chromium = chromium_path()
    out, _ = demo
    if "model-viewer-umd.min.js" not in (out / "report.html").read_text():
        pytest.fail("report.html has no model-viewer: run `make setup` (npm ci in pipelines/web)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu",
                                                                   "--enable-unsafe-swiftshader"])
        page = browser.new_page(viewport={"width": 1100, "height": 1400})
        page.goto((out / "report.html").as_uri())
        page.wait_for_function("() => document.body.dataset.modelLoaded !== 'pending'", timeout=120_000)
        assert page.evaluate("document.body.dataset.modelLoaded") == "true"     # every viewer loaded its mesh
        assert page.locator("model-viewer").count() == 2
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        # The report's viewer reads glTF vertex colours as linear, as the spec says (and Blender, test_render_blender):
        # an unlit box whose stored COLOR_0 is 128 shows as 188. mesh.glb stores its sRGB albedo converted to linear,
        # so the viewer shows the colour the field learned (tests/test_optimize3d.py).
        from tests.material_glbs import box_glb
        shutil.copy(out / "model-viewer-umd.min.js", tmp_path)
        grey = base64.b64encode(box_glb(tmp_path / "grey.glb", unlit=True, vertex_color=(128, 128, 128, 255)).read_bytes())
        (tmp_path / "grey.html").write_text(     # the mesh inline, as report.html has it (a file:// fetch is refused)
            '<body style="margin:0"><script src="model-viewer-umd.min.js"></script><model-viewer id="v" src="data:'
            f'model/gltf-binary;base64,{grey.decode()}" tone-mapping="neutral" style="width:200px;height:200px">'
            '</model-viewer></body>')
        page.goto((tmp_path / "grey.html").as_uri())
        page.wait_for_function("() => document.querySelector('#v').loaded", timeout=120_000)
        page.wait_for_timeout(500)              # a frame after loading (a readiness wait, not a timing assertion)
        centre = np.asarray(Image.open(io.BytesIO(page.locator("#v").screenshot())).convert("RGB"))[90:110, 90:110]
        browser.close()
    assert shot.stat().st_size > 10_000
    assert np.abs(centre.astype(int) - 188).max() <= 3, centre.reshape(-1, 3).mean(0)
