"""Fine-tuning on CPU with the tiny configuration: overfit, stage-2 reference view, exact resume, Ray Train."""
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dataset.samples import MultiViewDataset, SampleConfig, collate
from dataset.views import scan
from model.mvmodel import ModelConfig, MultiViewModel
from model.train import TrainConfig, prepare_embeddings, train
from pipelines.finetune import main as finetune_main

FAST = dict(sample_steps=2, val_every=10_000, log_every=1)


def tiny(stage=1, **kw):
    return dataclasses.replace(TrainConfig.tiny(stage), **{**FAST, **kw})


@pytest.fixture(scope="module")
def two_objects(rendered_demo, tmp_path_factory):
    data = tmp_path_factory.mktemp("two")
    (data / "objects").mkdir()
    for d in sorted((rendered_demo / "objects").iterdir())[:2]:
        shutil.copytree(d, data / "objects" / d.name)
    return data


def test_overfit_two_objects_loss_falls_by_half(two_objects, tmp_path):
    out = train(tiny(max_steps=40, batch_size=2, ckpt_every=40), two_objects, tmp_path)
    losses = out["losses"]
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert end < 0.5 * start, (start, end)
    assert (tmp_path / "checkpoints" / "step-000040" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "validation" / "step-000040.png").exists()
    assert list((tmp_path / "tensorboard").iterdir())


def test_stage2_reference_view_is_out_of_the_loss_but_conditions_targets(two_objects):
    cfg = TrainConfig.tiny(2)
    objs, _ = scan(two_objects)
    ds = MultiViewDataset(objs, prepare_embeddings(cfg, two_objects, objs), SampleConfig(image_size=32))
    batch = collate([ds[(0, "multi", 7)], ds[(1, "multi", 8)]])
    torch.manual_seed(0)
    model = MultiViewModel(ModelConfig.tiny())
    loss, pred = model.loss(batch, 2, torch.Generator().manual_seed(1), cond_dropout=0.0, return_parts=True)
    assert pred.shape[1] == 5                                   # 4 targets + the reference
    pred.retain_grad()
    loss.backward()
    assert torch.count_nonzero(pred.grad[:, 4]) == 0          # exactly zero for the reference view
    assert pred.grad[:, :4].abs().sum() > 0
    changed = dict(batch, reference=-batch["reference"])
    with torch.no_grad():
        _, pred2 = model.loss(changed, 2, torch.Generator().manual_seed(1), cond_dropout=0.0, return_parts=True)
    assert (pred2[:, :4] - pred[:, :4].detach()).abs().max() > 1e-4


def test_resume_gives_the_same_weights_as_training_straight(two_objects, tmp_path):
    cfg = tiny(max_steps=6, ckpt_every=3)
    train(cfg, two_objects, tmp_path / "straight")
    train(dataclasses.replace(cfg, max_steps=3), two_objects, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "tensorboard")       # as after a kill: only checkpoints survive
    out = train(cfg, two_objects, tmp_path / "resumed", resume="latest")
    assert out["start"] == 3 and len(out["losses"]) == 3
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-000006" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-000006" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_stage1_then_stage2_through_the_cli_and_ray_train_ddp(ray_local, two_objects, tmp_path):
    s1 = tmp_path / "s1"
    assert finetune_main(["--stage", "1", "--config", "tiny", "--data", str(two_objects), "--output", str(s1),
                          "--max-steps", "2", "--num-workers", "2", "sample_steps=2", "ckpt_every=2"]) == 0
    ckpt = s1 / "checkpoints" / "step-000002"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["camera_featurization"] == "mvdream" and cfg["latent"] == "pixel"
    assert (s1 / "config.yaml").exists() and "finetune" in (s1 / "cmd.txt").read_text()
    s2 = tmp_path / "s2"
    assert finetune_main(["--stage", "2", "--data", str(two_objects), "--output", str(s2), "--init", str(ckpt),
                          "--max-steps", "2", "sample_steps=2"]) == 0
    assert (s2 / "checkpoints" / "step-000002" / "unet" / "diffusion_pytorch_model.safetensors").exists()


@pytest.mark.parametrize("args,message", [
    (["--stage", "2"], "give --init"),
    (["--stage", "1", "lr=fast"], "lr"),
    (["--stage", "1", "--init", "/nonexistent"], "--init /nonexistent"),
])
def test_finetune_bad_input_is_one_clear_line(two_objects, tmp_path, capsys, args, message):
    assert finetune_main([*args, "--data", str(two_objects), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert finetune_main(["--stage", "1", "--data", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
