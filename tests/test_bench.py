"""bench/gpu.py, the first thing to run on a GPU, runs its code at toy size on a CPU (every section)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_reduced_runs_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, "bench/gpu.py", "--reduced", "--device", "cpu", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    for stage in ("stage1", "stage2"):
        row = result["training"][stage]
        assert row["gradient_checkpointing"] is True             # the sd21 layout's default, at toy size
        assert row["seconds_per_micro_batch"] > 0 and row["largest_objects_that_fit"] >= row["objects_per_micro_batch"]
    assert result["training"]["stage2"]["views_per_object"] == 5  # 4 targets + the reference view
    assert result["sampling"]["fp32"]["views"] == 4
    rows = {k: v for k, v in result["generate_3d"].items() if "px_" in k}
    assert set(rows) == {f"{size}px_{phase}/{impl}{field}" for size in (16, 32) for phase in ("albedo", "shaded")
                         for impl in ("fused", "torch") for field in ("", "/object")}
    for key, row in rows.items():
        assert row["field_samples_per_step"] > 0, key             # the blob or the object, in view
        assert row["steps_per_s"] > 0
        assert row["hash_grid"] == ("FusedHashGrid" if "/fused" in key else "TorchHashGrid")
        assert row["marcher"] == ("fused" if "/fused" in key else "torch")      # each row all one implementation
    assert set(rows["32px_shaded/fused"]["modes"]) <= {"albedo", "lambertian", "textureless"}
    # The duck's occupancy, fitted: a surface that early termination stops at, so fewer samples per ray than
    # the blob's (measured 32 px, tiny: blob 11.7, object 1.2 per ray; the bound is 0.8x), the same with either
    # implementation (the fused marcher's first pass applies the torch marcher's rule).
    fitted = result["generate_3d"]["object"]
    assert fitted["mesh"] == "Duck.glb" and 0.005 < fitted["occupied_fraction"] < 0.1 and fitted["fit_loss"] < 0.2   # 0.0137, 0.026
    for phase in ("albedo", "shaded"):
        blob, duck = rows[f"32px_{phase}/fused"], rows[f"32px_{phase}/fused/object"]
        assert 0 < duck["field_samples_per_ray"] < 0.8 * blob["field_samples_per_ray"], (phase, blob, duck)
        assert duck["field_samples_per_step"] == rows[f"32px_{phase}/torch/object"]["field_samples_per_step"]
    schedule = result["generate_3d"]["schedule"]                  # the tiny preset: 150 albedo + 150 shaded steps at 32 px
    assert schedule["steps_per_phase"] == {"32px_albedo": 150, "32px_shaded": 150}
    for impl in ("fused", "torch"):
        expected = sum(150 * rows[f"32px_{phase}/{impl}"]["seconds_per_step"] for phase in ("albedo", "shaded")) / 3600
        assert schedule[impl]["hours"] == pytest.approx(expected, abs=0.006)
    render = result["render"]["cpu"]                              # section 4 at smoke size, on the CPU's Cycles
    assert "error" not in render, render
    assert render["curve"]["seconds_per_view"] > 0 and 10 < render["curve"]["psnr_min_db"] < 80
    (run,) = render["pipeline"]
    assert run["objects"] == 1 and run["failed"] == 0 and run["blender_processes"] == 1
    assert render["objaverse_days_on_32_gpus"] > 0


def test_gpu_bench_full_size_on_a_cpu_says_so(monkeypatch):
    """bench/gpu.py run in this process (runpy, as `python bench/gpu.py --device cpu`): it exits with the message
    Python prints to stderr, before it builds anything."""
    import runpy
    monkeypatch.setattr(sys, "argv", ["bench/gpu.py", "--device", "cpu"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(ROOT / "bench" / "gpu.py"), run_name="__main__")
    assert isinstance(exited.value.code, str) and exited.value.code.startswith("bench/gpu.py: no GPU here")


def test_train_bench_reads_sd21_size_shards_and_measures_attention():
    r = subprocess.run([sys.executable, "bench/train.py", "--objects", "30", "--micro-batches", "2", "--steps", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert set(result["loader"]["workers"]) == {"0", "1", "2"}
    assert all(row["objects_per_second"] > 0 for row in result["loader"]["workers"].values())
    assert result["loader"]["objects_per_micro_batch"] == 24               # the sd21 preset's micro-batch
    assert result["attention_tiny"]["multiview_s"] > 0 and result["attention_tiny"]["per_view_s"] > 0


def test_render_bench_quick_measures_the_curve_and_objects_per_hour_with_and_without_persistent_workers():
    r = subprocess.run([sys.executable, "bench/render.py", "--quick"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    rows = result["curve"]["rows"]
    assert [row["denoiser"] for row in rows] == ["none", "fast"]
    for row in rows:
        assert set(row["psnr_min_db_per_object"]) == {"Box.glb"}         # --quick: the curve on one object
        assert 10 < row["psnr_min_db"] < 80 and row["seconds_per_view"] > 0
    runs = {(row["workers"], row["objects_per_worker"]): row for row in result["pipeline"]}
    assert set(runs) == {(1, 100), (1, 1)}                 # --quick: one worker layout, both process policies
    for (workers, per_worker), row in runs.items():
        assert row["objects"] == 2 and row["failed"] == 0
        # persistent: one process per worker; otherwise one per object
        assert row["blender_processes"] == (workers if per_worker == 100 else 2)
        assert 0 < row["blender_start_seconds"] < row["render_seconds"]
        assert row["objects_per_hour"] == pytest.approx(3600 * 2 / row["render_seconds"])
    assert result["speedup_vs_syncdreamer"]["objects_per_hour"] > 0
    parts = result["breakdown"]
    assert parts["object"] == "Box.glb" and parts["view_at_1_sample_s"] > 0
    assert {"png_write_s", "path_tracing_per_sample_s", "denoiser_fast_s"} <= set(parts)


def test_fill_bench_measures_what_preprocess_fill_sets(rendered_demo, tmp_path):
    r = subprocess.run([sys.executable, "bench/fill.py", str(rendered_demo)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert result["objects"] == 4 and result["view_count"] == 4 * 16
    assert 0.5 < result["p10"] <= result["median"] <= result["p90"] <= 1.0
    empty = subprocess.run([sys.executable, "bench/fill.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert empty.returncode == 2 and "no rendered objects" in empty.stderr
