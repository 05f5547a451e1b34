"""pipelines/generate.py end to end on CPU with a tiny checkpoint fine-tuned by the tests: outputs,
cache, re-export, resume after kill -9, many images through Ray, and input errors."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from optimize3d.inputs import InputImageError, load_input_image
from render.layout import object_dirs
from tests.conftest import ROOT, run_main, tensorboard_events

SCRIPT = str(ROOT / "pipelines" / "generate.py")
FAST = ["--steps", "12", "--no-progress", "val_every=6", "ckpt_every=4", "export.resolution=48",
        "export.turntable_frames=4", "export.turntable_size=32", "preview_steps=2", "export.threshold=3"]


def run(*args, timeout=600):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def input_image(rendered_demo, tmp_path_factory):
    src = sorted(object_dirs(rendered_demo).values())[0] / "random" / "003.png"
    path = tmp_path_factory.mktemp("inputs") / "object.png"
    path.write_bytes(src.read_bytes())
    return path


@pytest.fixture(scope="module")
def generated(input_image, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    r = run("--image", input_image, "--checkpoint", tiny_checkpoint, "--output", out, *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads(r.stdout)


def test_generate_writes_mesh_turntable_and_views(generated):
    out, result = generated
    d = out / f"object-{result['output'].rsplit('-', 1)[1]}"
    assert result["status"] == "ok" and d.is_dir() and not list(out.glob("*.partial"))
    mesh = trimesh.load(d / "mesh.glb", force="mesh")
    assert len(mesh.faces) > 100 and len(mesh.faces) == result["faces"]
    assert json.loads((d / "export.json").read_text())["threshold"] == 3.0 == result["threshold"]   # the one used
    gif = Image.open(d / "turntable.gif")
    assert gif.n_frames == 4 and gif.size == (32, 32)
    assert Image.open(d / "multiview.png").size == (5 * 32, 32)         # input + 4 sampled views
    assert (d / "validation" / "step-000012.png").is_file() and (d / "config.yaml").is_file()
    assert "generate.py" in (d / "cmd.txt").read_text()
    assert [p.name for p in (d / "nerf").iterdir()] == ["step-000012"]
    steps = [json.loads(line)["step"] for line in (d / "losses.jsonl").read_text().splitlines()]
    assert steps == [10, 12]                                             # log_every 10, and the last step
    events = tensorboard_events(d / "tensorboard")                       # what `tensorboard --logdir` shows
    assert {"loss", "sds", "orient", "samples", "step_seconds", "grad_scale"} <= set(events["scalars"])
    assert [s for s, _ in events["scalars"]["sds"]] == [10, 12] and events["images"]["validation"][-1] == 12


def test_rerun_is_cached_and_export_settings_only_reexport(generated, input_image, tiny_checkpoint, capsys):
    """The CLI's main in this process (the `generated` fixture ran it as a command): a rerun, then two export
    formats, which re-export the kept field without optimising again."""
    out, result = generated
    d = result["output"]
    args = ["--image", input_image, "--checkpoint", tiny_checkpoint, "--output", out, *FAST]
    code, printed, _ = run_main("generate", args, capsys)
    assert code == 0 and json.loads(printed)["status"] == "cached"
    losses = (out / d.rsplit("/", 1)[1] / "losses.jsonl").read_text()
    code, printed, err = run_main("generate", [*args, "export.format=obj"], capsys)
    assert code == 0, err[-2000:]
    again = json.loads(printed)
    assert again["status"] == "ok" and again["output"] == d              # same directory, not a new optimisation
    assert (out / d.rsplit("/", 1)[1] / "mesh.obj").is_file() and (out / d.rsplit("/", 1)[1] / "mesh.glb").is_file()
    code, _, _ = run_main("generate", [*args, "export.format=ply"], capsys)
    assert code == 0 and not (out / d.rsplit("/", 1)[1] / "mesh.obj").exists()   # no stale format left
    assert (out / d.rsplit("/", 1)[1] / "losses.jsonl").read_text() == losses


def test_too_high_threshold_is_a_clear_error_and_the_optimisation_is_kept(generated, input_image, tiny_checkpoint,
                                                                         capsys):
    out, result = generated
    code, _, err = run_main("generate", ["--image", input_image, "--checkpoint", tiny_checkpoint, "--output", out,
                                         *FAST, "export.threshold=1e6"], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "try export.threshold=" in err
    assert (out / result["output"].rsplit("/", 1)[1] / "nerf" / "step-000012").is_dir()     # the field is kept


def test_killed_run_resumes_from_its_last_checkpoint(generated, input_image, tiny_checkpoint, tmp_path, capsys):
    """The `generated` run's settings, killed once step 4's checkpoint exists (8 steps, about 4 s here, before
    the end), then run again (main in this process): it resumes and ends with exactly the `generated` run's
    weights."""
    args = ["--image", str(input_image), "--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path), *FAST]
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300               # a readiness wait, not a timing assertion
    while not list(tmp_path.glob("*.partial/nerf/step-000004")) and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = list(tmp_path.glob("*.partial"))
    assert len(partial) == 1 and not (partial[0] / "mesh.glb").exists()
    killed_at = max(int(p.name.split("-")[1]) for p in (partial[0] / "nerf").glob("step-*"))
    code, printed, err = run_main("generate", args, capsys)
    assert code == 0, err[-2000:]
    d = tmp_path / json.loads(printed)["output"].rsplit("/", 1)[1]
    assert (d / "mesh.glb").is_file() and not list(tmp_path.glob("*.partial"))
    assert "resumed from" in (d / "generate.log").read_text() and f"step {killed_at})" in (d / "generate.log").read_text()
    # The resumed run ends with exactly the weights of the uninterrupted one (every draw is a function of
    # (seed, step), the grid's refresh included).
    out, result = generated
    from safetensors.torch import load_file
    resumed = load_file(str(d / "nerf" / "step-000012" / "field.safetensors"))
    uninterrupted = load_file(str(out / result["output"].rsplit("/", 1)[1] / "nerf" / "step-000012" / "field.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:
        assert torch.equal(resumed[k], uninterrupted[k]), k


def test_many_images_one_ray_task_each(input_image, tiny_checkpoint, tmp_path, capsys):
    """main in this process, as the driver of the local Ray it starts (shut down at the end)."""
    import ray
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(input_image.read_bytes())
    Image.open(input_image).convert("RGB").save(folder / "b.jpg")
    (folder / "c.png").write_text("not an image")
    try:
        code, printed, _ = run_main("generate", ["--images", folder, "--checkpoint", tiny_checkpoint, "--output",
                                                 tmp_path / "out", *FAST, "--steps", "2"], capsys)
    finally:
        ray.shutdown()
    assert code == 1                                                        # c.png failed, the others did not
    results = {os.path.basename(x["image"]): x for x in json.loads(printed)}
    assert results["a.png"]["status"] == "ok" and results["b.jpg"]["status"] == "ok"
    assert results["c.png"]["status"] == "failed" and "not a readable image" in results["c.png"]["error"]
    assert len(list((tmp_path / "out").glob("*/mesh.glb"))) == 2


@pytest.mark.parametrize("make,message", [
    (lambda p: Image.new("RGB", (64, 64), "white").save(p), "only white pixels"),
    (lambda p: Image.new("RGB", (1, 1), "red").save(p), "1x1 px is too small"),
    (lambda p: p.write_text("hello"), "not a readable image"),
    (lambda p: Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(p), "fully transparent"),
    (lambda p: Image.new("RGB", (9000, 20), "red").save(p), "too large"),
])
def test_bad_images_are_one_line_errors(make, message, tmp_path, tiny_checkpoint, capsys):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(InputImageError, match=message):
        load_input_image(path)
    if message in ("only white pixels", "not a readable image"):                     # and through the CLI
        code, _, err = run_main("generate", ["--image", path, "--checkpoint", tiny_checkpoint, "--output", tmp_path / "o"],
                                capsys)
        assert code == 2 and message in err and err.strip().count("\n") == 0
        assert not (tmp_path / "o").exists()


def test_rgba_is_composited_on_white(tmp_path):
    from render.preview import on_white
    a = np.zeros((32, 32, 4), np.uint8)
    a[8:24, 8:24] = [200, 0, 0, 255]
    a[0, 0] = [0, 0, 0, 128]
    Image.fromarray(a, "RGBA").save(tmp_path / "x.png")
    rgb = np.asarray(on_white(load_input_image(tmp_path / "x.png")))
    assert rgb[16, 16].tolist() == [200, 0, 0] and rgb[2, 2].tolist() == [255, 255, 255]
    assert rgb[0, 0].tolist() == [127, 127, 127]
