"""pipelines/evaluate.py on a real render root of 3 demo objects with the tests' tiny checkpoint: per-object
metrics, the summary, the page in Chromium (sortable), a rerun that redoes nothing, a killed run that resumes."""
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from render.layout import object_dir, object_dirs
from tests.conftest import ROOT, chromium_path, run_main
from tests.test_evaluate import alexnet_file

SCRIPT = str(ROOT / "pipelines" / "evaluate.py")
FAST = ["--steps", "12", "--no-progress", "val_every=6", "ckpt_every=4", "export.resolution=48",
        "export.turntable_frames=4", "export.turntable_size=32", "preview_steps=2", "export.threshold=3"]


def render_root_of(rendered_demo, tmp_path, count: int):
    """A copy of the rendered demo root keeping its first `count` objects (and their source meshes)."""
    root = tmp_path / f"render-{count}"
    shutil.copytree(rendered_demo, root)
    for uid in sorted(object_dirs(root))[count:]:
        shutil.rmtree(object_dir(root, uid))
    return root, sorted(object_dirs(root))


@pytest.fixture(scope="module")
def evaluated(rendered_demo, tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    root, uids = render_root_of(rendered_demo, tmp, 3)
    out = tmp / "out"
    backbone = alexnet_file(tmp / "alexnet.pth")
    r = subprocess.run([sys.executable, SCRIPT, "--objects", str(root), "--checkpoint", str(tiny_checkpoint),
                        "--output", str(out), "--lpips-backbone", str(backbone), *FAST],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LPIPS left out" not in r.stderr
    return root, uids, out, tiny_checkpoint


def test_every_object_gets_metrics_and_the_summary_adds_them_up(evaluated):
    root, uids, out, _ = evaluated
    rows = {u: json.loads((out / "objects" / f"{u}.json").read_text()) for u in uids}
    for uid, row in rows.items():
        assert row["status"] == "evaluated" and row["generate"] == "ok", row
        m = row["metrics"]
        assert m["ground_truth"]["mesh"].endswith(f"{uid}.glb")           # the render root's own source mesh
        assert 5 < m["2d"]["psnr"] < 40 and 5 < m["3d"]["psnr"] < 40
        assert 0 < m["3d"]["silhouette_iou"] <= 1 and 0 <= m["3d"]["volume_iou"] <= 1 and m["3d"]["chamfer"] > 0
        assert m["2d"]["lpips"] > 0 and m["3d"]["lpips"] > 0                # --lpips-backbone given
        assert os.path.isfile(os.path.join(row["run"], "comparison.png"))
        assert os.path.basename(row["run"]).startswith(uid)                # the run is named after the object
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objects"] == 3 and summary["failed"] == {} and summary["notes"][0].startswith("LPIPS: AlexNet backbone")
    assert summary["metrics"]["2d.lpips"]["worst"] == max(rows[u]["metrics"]["2d"]["lpips"] for u in uids)
    iou = [rows[u]["metrics"]["3d"]["silhouette_iou"] for u in uids]
    s = summary["metrics"]["3d.silhouette_iou"]
    assert s["mean"] == pytest.approx(statistics.fmean(iou)) and s["median"] == pytest.approx(statistics.median(iou))
    assert s["worst"] == min(iou) and rows[s["worst_object"]]["metrics"]["3d"]["silhouette_iou"] == min(iou)
    chamfer = [rows[u]["metrics"]["3d"]["chamfer"] for u in uids]
    assert summary["metrics"]["3d.chamfer"]["worst"] == max(chamfer)     # lower is better: the worst is the largest


def test_the_page_opens_in_chromium_and_sorts_by_a_metric(evaluated):
    from playwright.sync_api import sync_playwright
    _, uids, out, _ = evaluated
    iou = {u: json.loads((out / "objects" / f"{u}.json").read_text())["metrics"]["3d"]["silhouette_iou"] for u in uids}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto((out / "index.html").as_uri())
        assert page.locator("#objects tbody tr").count() == 3
        page.wait_for_function("() => [...document.images].every(i => i.complete)")
        assert page.evaluate("[...document.images].filter(i => i.naturalWidth > 0).length") == 6   # input + comparison each
        column = page.locator("#objects th", has_text="3d silhouette_iou")
        column.click()
        first = page.evaluate("[...document.querySelectorAll('#objects tbody tr')].map(r => r.cells[0].textContent)")
        column.click()
        second = page.evaluate("[...document.querySelectorAll('#objects tbody tr')].map(r => r.cells[0].textContent)")
        browser.close()
    assert first == sorted(iou, key=iou.get) and second == sorted(iou, key=iou.get, reverse=True)


def test_a_rerun_redoes_nothing(evaluated, capsys):
    root, uids, out, checkpoint = evaluated
    runs = {u: json.loads((out / "objects" / f"{u}.json").read_text())["run"] for u in uids}
    before = {u: os.stat(os.path.join(runs[u], "metrics.json")).st_mtime_ns for u in uids}
    code, stdout, _ = run_main("evaluate", ["--objects", root, "--checkpoint", checkpoint, "--output", out,
                                            "--lpips-backbone", out.parent / "alexnet.pth", *FAST], capsys)
    assert code == 0, stdout
    for u in uids:
        row = json.loads((out / "objects" / f"{u}.json").read_text())
        assert row["status"] == "cached" and row["generate"] == "cached" and row["run"] == runs[u], row
        assert os.stat(os.path.join(runs[u], "metrics.json")).st_mtime_ns == before[u]


def test_bad_render_roots_and_backbones_are_one_line_errors(rendered_demo, tmp_path, tiny_checkpoint, capsys):
    code, _, err = run_main("evaluate", ["--objects", tmp_path / "none", "--checkpoint", tiny_checkpoint], capsys)
    assert code == 2 and err.strip() == f"evaluate.py: error: --objects {tmp_path / 'none'}: not a folder"
    (tmp_path / "empty").mkdir()
    code, _, err = run_main("evaluate", ["--objects", tmp_path / "empty", "--checkpoint", tiny_checkpoint], capsys)
    assert code == 2 and "no rendered objects" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "junk.pth").write_bytes(b"junk")
    code, _, err = run_main("evaluate", ["--objects", rendered_demo, "--checkpoint", tiny_checkpoint,
                                         "--lpips-backbone", tmp_path / "junk.pth", "--output", tmp_path / "out"], capsys)
    assert code == 2 and err.strip().startswith("evaluate.py: error: LPIPS backbone") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()                     # refused before anything was written


def processes_marked(marker: bytes) -> list[int]:
    """PIDs of live processes whose environment holds `marker` (the driver's, inherited by its Ray workers)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and marker in (d / "environ").read_bytes() and (d / "stat").read_text().split(") ")[-1][0] != "Z":
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def test_a_killed_evaluation_resumes(rendered_demo, tiny_checkpoint, tmp_path):
    """Killed once the object's 3D stage wrote its step-4 checkpoint: the driver's process group (Ray's head
    with it) and the Ray worker running the object (in its own process group; it would otherwise finish the
    object before it noticed). The next run resumes that run folder and finishes the evaluation."""
    root, (uid,) = render_root_of(rendered_demo, tmp_path, 1)
    out = tmp_path / "out"
    args = [sys.executable, SCRIPT, "--objects", str(root), "--checkpoint", str(tiny_checkpoint), "--output", str(out), *FAST]
    marker = f"ISO3D_TEST_KILLED_EVALUATION={tmp_path}"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "ISO3D_TEST_KILLED_EVALUATION": str(tmp_path)})
    deadline = time.time() + 300               # a readiness wait, not a timing assertion
    while not list((out / "runs" / uid).glob("*.partial/nerf/step-000004")) and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in processes_marked(marker.encode() + b"\0"):
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60
    while processes_marked(marker.encode() + b"\0") and time.time() < deadline:
        time.sleep(0.1)
    assert list((out / "runs" / uid).glob("*.partial")) and not (out / "objects" / f"{uid}.json").exists()
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LPIPS left out" in r.stderr                       # no --lpips-backbone: said in one line
    row = json.loads((out / "objects" / f"{uid}.json").read_text())
    assert "lpips" not in row["metrics"]["2d"]
    assert row["status"] == "evaluated" and row["generate"] == "ok" and not list((out / "runs" / uid).glob("*.partial"))
    with open(os.path.join(row["run"], "generate.log")) as log:
        assert "resumed from" in log.read()
