"""pipelines/base.py and the committed base model (model/base-tiny) the demo's stage 1 starts from."""
import json

import pytest
import torch
from safetensors.torch import load_file

from model import checkpoint
from model.unet import UNetConfig
from tests.conftest import ROOT, run_main

BASE = ROOT / "model" / "base-tiny"


def test_the_committed_base_loads_as_the_tiny_model_and_saw_none_of_the_demo_objects():
    weights = BASE / checkpoint.UNET_WEIGHTS
    assert weights.stat().st_size <= 10 * 2**20
    model = checkpoint.load_model(BASE)                       # config.json + unet/ as --init and --checkpoint load them
    assert model.cfg.unet.__dict__ == UNetConfig.tiny().__dict__
    assert model.cfg.latent == "pixel" and model.cfg.embedding_mean is not None
    state = load_file(str(weights))
    assert set(state) == set(model.unet.state_dict())
    assert all(torch.isfinite(v).all() for v in state.values())
    made = json.loads((BASE / "base.json").read_text())
    assert made["command"].startswith("python pipelines/base.py") and made["weights"] == "moving average"
    assert made["step"] == made["settings"]["train"]["max_steps"]
    # The demo's objects are seed 0 (demo2-0-...); the base's family is another seed.
    assert len(made["objects"]) == made["settings"]["render"]["count"] >= 40
    assert not any(uid.startswith("demo2-0-") for uid in made["objects"])
    from pipelines.demo import DemoConfig, base_checkpoint
    assert base_checkpoint(DemoConfig()) == BASE


def test_base_command_trains_and_publishes_a_checkpoint_that_loads(rendered_demo, tmp_path, capsys):
    out, dest = tmp_path / "run", tmp_path / "published"
    code, _, err = run_main("base", ["--data", rendered_demo, "--output", out, "--publish", dest,
                                     "train.max_steps=2", "train.overrides=[ema_decay=0.9,ckpt_every=2,sample_steps=2]"],
                            capsys)
    assert code == 0, err[-2000:]
    made = json.loads((dest / "base.json").read_text())
    assert made["step"] == 2 and made["weights"] == "moving average"
    assert sorted(p.name for p in dest.iterdir()) == ["base.json", "config.json", "scheduler", "unet"]
    run_ckpt = checkpoint.latest(next(out.glob("train-*")) / "checkpoints")
    # What was published is the run's moving average, bit for bit, and loads as a model.
    assert load_file(str(dest / checkpoint.UNET_WEIGHTS)).keys() == load_file(str(run_ckpt / checkpoint.EMA_WEIGHTS)).keys()
    for k, v in load_file(str(dest / checkpoint.UNET_WEIGHTS)).items():
        assert torch.equal(v, load_file(str(run_ckpt / checkpoint.EMA_WEIGHTS))[k])
    checkpoint.load_model(dest)
    # A rerun redoes nothing (the train stage is cached) and publishes the same file.
    code, _, err = run_main("base", ["--data", rendered_demo, "--output", out, "--publish", dest,
                                     "train.max_steps=2", "train.overrides=[ema_decay=0.9,ckpt_every=2,sample_steps=2]"],
                            capsys)
    assert code == 0 and len(list(out.glob("train-*"))) == 1


@pytest.mark.parametrize("args, message", [
    (["render.seed=0"], "render.seed=0: those are the demo's own objects"),
    (["train.overrides=[lr=-1,ema_decay=2]"], "ema_decay"),
])
def test_bad_base_settings_are_refused_in_one_line_before_anything_runs(tmp_path, capsys, args, message):
    code, _, err = run_main("base", ["--output", tmp_path / "run", "--publish", tmp_path / "p", *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists() and not list((tmp_path / "run").glob("*-*"))
