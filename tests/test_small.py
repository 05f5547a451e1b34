"""The `small` preset: every code path of the full-size (sd21) model at a size a CPU runs in seconds.
From an MVDream-layout checkpoint file (UNet + camera MLP + SD VAE, converted by --init) and an open_clip
weights file the test writes: the prepare step (VAE latents and CLIP embeddings in shards), stage 1 (VAE latents, bf16 autocast, gradient checkpointing, accumulation
with no_sync) -> stage 2 (the reference view in the attention) -> DDIM sampling -> the 3D stage (score
distillation through the VAE encoder) -> a mesh."""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
import yaml

from tests.conftest import DATA, ROOT, run_main
from tests.ldm_layout import unet_keys, vae_keys

SMALL_LDM = dict(in_ch=4, out_ch=4, mc=32, mult=(1, 2), res_blocks=1, attention_levels=(1,), ctx=64)


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    """A tiny random checkpoint file in MVDream's sd-v2.1-base-4view layout (no image tower: the paper's
    stage-1 starting point) and the image tower's weights as open_clip writes a whole model."""
    import open_clip
    from safetensors.torch import save_file
    import model.encoder  # noqa: F401  (registers the tiny ViT's open_clip configuration)
    root = tmp_path_factory.mktemp("small_weights")
    g = torch.Generator().manual_seed(3)
    sd = {k: torch.randn(shape, generator=g) * 0.05
          for k, shape in {**unet_keys(**SMALL_LDM), **vae_keys(ch=32, mult=(1, 2), res_blocks=1)}.items()}
    torch.save(sd, root / "mvdream-small-4view.pt")
    torch.manual_seed(11)
    clip = open_clip.create_model("iso3d-tiny-vit", pretrained=None)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(root / "open_clip-small.safetensors"))
    return root / "mvdream-small-4view.pt", root / "open_clip-small.safetensors", clip.visual.state_dict()


def test_small_preset_runs_every_full_size_path(small_weights, rendered_demo, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "pipelines"))
    import finetune
    from dataset.prepared import PrepareConfig
    from model.prepare import load_index, prepare
    from dataset.views import RenderedObject
    from model.mvmodel import load_vae, vae_encode
    from render.layout import object_dir
    from model import checkpoint
    from model.encoder import ImageEncoder
    from model.unet import build_unet
    ldm, encoder_weights, tower = small_weights
    monkeypatch.setenv("ISO3D_CACHE", str(tmp_path / "cache"))
    autocasts = []
    real_autocast = torch.autocast

    def recording_autocast(device_type, dtype=None, enabled=True, **kw):
        autocasts.append((device_type, dtype, enabled))
        return real_autocast(device_type, dtype=dtype, enabled=enabled, **kw)

    monkeypatch.setattr(torch, "autocast", recording_autocast)
    try:
        s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
        data = tmp_path / "renders"                       # a copy: the prepared data is written beside it
        shutil.copytree(rendered_demo / "objects", data / "objects")
        stage1 = ["--stage", "1", "--config", "small", "--data", str(data), "--init", str(ldm),
                  f"model.encoder.weights={encoder_weights}"]
        capsys.readouterr()
        assert finetune.main(stage1 + ["--prepare"]) == 0      # the prepare step alone, then training reuses it
        assert json.loads(capsys.readouterr().out) == {"objects": 4, "broken": 0, "encoded": 4, "shards_written": 1}
        assert finetune.main(stage1 + ["--output", str(s1)]) == 0
        cfg = yaml.safe_load((s1 / "config.yaml").read_text())
        assert (cfg["model"]["latent"], cfg["model"]["camera_featurization"], cfg["model"]["prediction_type"]) == \
            ("vae", "mvdream", "epsilon")
        assert cfg["model"]["unet"]["gradient_checkpointing"] and cfg["mixed_precision"] == "bf16" and cfg["grad_accum"] == 2
        assert build_unet(checkpoint.model_config(s1 / "checkpoints" / "step-000004").unet).is_gradient_checkpointing
        assert autocasts and all(a == ("cpu", torch.bfloat16, True) for a in autocasts)   # every step in bf16
        ck1 = s1 / "checkpoints" / "step-000004"
        assert (ck1 / "vae").is_symlink()                       # the frozen VAE is linked, not copied
        model_cfg = checkpoint.model_config(ck1)
        # What training read: the VAE's posterior mean x 0.18215 of each view, prepared once.
        index = load_index(model_cfg, data, PrepareConfig(**cfg["prepare"]))
        assert not prepare(model_cfg, data, PrepareConfig(**cfg["prepare"])).stats["encoded"]
        prepared = index.objects()[1]
        view = RenderedObject.open(object_dir(data, prepared.uid)).image("fixed", 2, 32)
        expected = vae_encode(load_vae(model_cfg), view[None])
        assert expected.shape == (1, 4, 16, 16)
        torch.testing.assert_close(prepared.latents([("fixed", 2)]), expected, rtol=1e-5, atol=1e-5)
        enc = ImageEncoder(model_cfg.encoder)                   # the tower came from the weights file
        assert all(torch.equal(v, tower[k]) for k, v in enc.visual.state_dict().items())
        # The UNet started from the converted file: after 4 steps at lr 1e-4 it is near it, not random.
        ldm_cam = torch.load(ldm, weights_only=True)["model.diffusion_model.camera_embed.0.weight"]
        s1_cam = checkpoint.load_model(ck1).unet.class_embedding.linear_1.weight
        assert (s1_cam - ldm_cam).abs().max() < 0.01 and not torch.equal(s1_cam, ldm_cam)

        assert finetune.main(["--stage", "2", "--config", "small", "--data", str(data), "--output", str(s2),
                              "--init", str(s1)]) == 0
        assert yaml.safe_load((s2 / "config.yaml").read_text())["lr_schedule"] == "linear"
        assert (s2 / "checkpoints" / "step-000002" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    finally:
        sys.path.remove(str(ROOT / "pipelines"))

    code, printed, err = run_main("generate", ["--image", DATA / "clip-rgba-333x300.png", "--checkpoint", s2,
                                               "--output", tmp_path / "gen", "--steps", "2", "--no-progress",
                                               "preview_steps=2", "val_every=2", "ckpt_every=2", "export.resolution=32",
                                               "export.threshold=2", "export.turntable_frames=2",
                                               "export.turntable_size=16"], capsys)
    assert code == 0, err[-2000:]
    result = json.loads(printed)
    assert result["status"] == "ok" and result["faces"] > 0, result
    out = tmp_path / "gen" / result["output"].rsplit("/", 1)[1]
    assert (out / "mesh.glb").stat().st_size > 0 and (out / "multiview.png").is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["steps"] == 2
