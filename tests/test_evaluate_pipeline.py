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


def kill_during_the_3d_stage(args: list, uid: str, out: Path, marker_value: str) -> None:
    """Start the evaluation and kill it once `uid`'s 3D stage wrote its step-4 checkpoint: the driver's process
    group (Ray's head with it) and the Ray workers (in process groups of their own; one would otherwise finish
    the object before it noticed), found by a marker in the environment they inherit."""
    marker = f"ISO3D_TEST_KILLED_EVALUATION={marker_value}".encode() + b"\0"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "ISO3D_TEST_KILLED_EVALUATION": marker_value})
    deadline = time.time() + 300               # a readiness wait, not a timing assertion
    while not list((out / "runs" / uid).glob("*.partial/nerf/step-000004")) and time.time() < deadline:
        assert proc.poll() is None, "the evaluation ended before it could be killed"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in processes_marked(marker):
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60
    while processes_marked(marker) and time.time() < deadline:
        time.sleep(0.1)


@pytest.fixture(scope="module")
def evaluated(rendered_demo, tiny_checkpoint, tmp_path_factory):
    """3 objects, as a user would meet the pipeline: a first run (the command, no LPIPS backbone) killed during
    the first object's 3D stage; the same arguments again (main in this process, the driver of the local Ray it
    starts), which resume it and evaluate all three; then with --lpips-backbone, which adds LPIPS to every
    object without generating anything again."""
    tmp = tmp_path_factory.mktemp("evaluate")
    root, uids = render_root_of(rendered_demo, tmp, 3)
    out = tmp / "out"
    args = ["--objects", str(root), "--checkpoint", str(tiny_checkpoint), "--output", str(out)]
    kill_during_the_3d_stage([sys.executable, SCRIPT, *args, *FAST], uids[0], out, str(tmp))
    killed = {"partial": bool(list((out / "runs" / uids[0]).glob("*.partial"))),
              "row": (out / "objects" / f"{uids[0]}.json").exists()}
    code, _, resumed_err = run_main("evaluate", args + FAST)
    assert code == 0, resumed_err[-3000:]
    resumed_rows = {u: json.loads((out / "objects" / f"{u}.json").read_text()) for u in uids}
    backbone = alexnet_file(tmp / "alexnet.pth")
    code, _, scored_err = run_main("evaluate", args + ["--lpips-backbone", str(backbone)] + FAST)
    assert code == 0, scored_err[-3000:]
    assert "LPIPS left out" not in scored_err
    return {"root": root, "uids": uids, "out": out, "checkpoint": tiny_checkpoint, "backbone": backbone,
            "killed": killed, "resumed_err": resumed_err, "resumed_rows": resumed_rows}


def test_every_object_gets_metrics_and_the_summary_adds_them_up(evaluated):
    uids, out = evaluated["uids"], evaluated["out"]
    rows = {u: json.loads((out / "objects" / f"{u}.json").read_text()) for u in uids}
    for uid, row in rows.items():
        # LPIPS added to the resumed run's evaluation: its generate runs reused, not redone
        assert row["status"] == "evaluated" and row["generate"] == "cached", row
        assert row["run"] == evaluated["resumed_rows"][uid]["run"]
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
    uids, out = evaluated["uids"], evaluated["out"]
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
    uids, out = evaluated["uids"], evaluated["out"]
    runs = {u: json.loads((out / "objects" / f"{u}.json").read_text())["run"] for u in uids}
    before = {u: os.stat(os.path.join(runs[u], "metrics.json")).st_mtime_ns for u in uids}
    code, stdout, _ = run_main("evaluate", ["--objects", evaluated["root"], "--checkpoint", evaluated["checkpoint"],
                                            "--output", out, "--lpips-backbone", evaluated["backbone"], *FAST], capsys)
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
    code, _, err = run_main("evaluate", ["--objects", rendered_demo, "--uids", "demo2-0-000-box", "no-such-object",
                                         "--checkpoint", tiny_checkpoint, "--output", tmp_path / "out"], capsys)
    assert code == 2 and err.strip() == f"evaluate.py: error: --uids: no-such-object not in --objects {rendered_demo}"
    (tmp_path / "junk.pth").write_bytes(b"junk")
    code, _, err = run_main("evaluate", ["--objects", rendered_demo, "--checkpoint", tiny_checkpoint,
                                         "--lpips-backbone", tmp_path / "junk.pth", "--output", tmp_path / "out"], capsys)
    assert code == 2 and err.strip().startswith("evaluate.py: error: LPIPS backbone") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()                     # refused before anything was written


def test_a_killed_evaluation_resumes(evaluated):
    """The killed first run left the object's run folder as .partial and no row; the same command again resumed
    that folder (its NeRF checkpoints) and finished every object, saying in one line that LPIPS was left out."""
    uid = evaluated["uids"][0]
    assert evaluated["killed"] == {"partial": True, "row": False}
    assert "LPIPS left out" in evaluated["resumed_err"]
    row = evaluated["resumed_rows"][uid]
    assert "lpips" not in row["metrics"]["2d"]
    assert row["status"] == "evaluated" and row["generate"] == "ok"
    assert not list((evaluated["out"] / "runs" / uid).glob("*.partial"))
    with open(os.path.join(row["run"], "generate.log")) as log:
        assert "resumed from" in log.read()


def test_a_changed_export_setting_re_exports_and_scores_the_new_mesh(evaluated, capsys):
    """An export.* setting changes only the mesh: the rerun re-exports each run in place, without optimising
    the field again, and scores the new mesh; the earlier mesh's metrics.json is not taken for it."""
    uids, out = evaluated["uids"], evaluated["out"]
    before = {u: json.loads((out / "objects" / f"{u}.json").read_text()) for u in uids}
    fields = {u: sorted(p.name for p in (Path(before[u]["run"]) / "nerf").iterdir()) for u in uids}
    changed = [a.replace("export.threshold=3", "export.threshold=2") for a in FAST]
    assert changed != FAST
    code, stdout, _ = run_main("evaluate", ["--objects", evaluated["root"], "--checkpoint", evaluated["checkpoint"],
                                            "--output", out, "--lpips-backbone", evaluated["backbone"], *changed], capsys)
    assert code == 0, stdout
    for u in uids:
        row = json.loads((out / "objects" / f"{u}.json").read_text())
        run = Path(row["run"])
        assert row["status"] == "evaluated" and row["generate"] == "ok" and row["run"] == before[u]["run"], row
        assert sorted(p.name for p in (run / "nerf").iterdir()) == fields[u]          # the same field, not a new one
        export_key = json.loads((run / "export.json").read_text())["export_key"]
        assert export_key != before[u]["metrics"]["scored"]["export_key"]
        assert json.loads((run / "metrics.json").read_text())["scored"]["export_key"] == export_key
