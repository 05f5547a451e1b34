"""Real weights: LDM -> diffusers conversion (full-size key maps on the meta device, a tiny checkpoint
against diffusers' own single-file loader), the released checkpoint's camera featurisation, the image
tower, refusing pickles, and original files accepted by finetune.py directly."""
import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

from model.convert import ConversionError, convert, convert_unet_state, convert_vae_state, extract_visual, read_state_dict
from model.mvmodel import ModelConfig, MultiViewModel, double_radians_features
from model.unet import build_unet, camera_features, multiview_forward
from tests.conftest import DATA, ROOT, run_main
from tests.ldm_layout import UNET, unet_keys, vae_keys

TINY_LDM = dict(in_ch=3, out_ch=3, mc=32, mult=(1, 2), res_blocks=1, attention_levels=(1,), ctx=64)


def meta_state(keys: dict) -> dict:
    return {k: torch.empty(shape, device="meta") for k, shape in keys.items()}


def test_layout_generator_reproduces_mvdreams_key_list():
    assert unet_keys() == json.loads((DATA / "mvdream-sd21-unet-keys.json").read_text())


def test_full_size_unet_every_key_mapped_none_left_shapes_match():
    with torch.device("meta"):
        unet = build_unet(ModelConfig.sd21().unet)
    sd = meta_state(json.loads((DATA / "mvdream-sd21-unet-keys.json").read_text()))
    sd.update(meta_state(vae_keys()))                       # the other parts of the file are not the UNet's
    converted = convert_unet_state(sd, unet)
    expected = unet.state_dict()
    assert set(converted) == set(expected) and len(converted) == 690
    assert all(converted[k].shape == expected[k].shape for k in expected)
    assert sum(v.numel() for v in converted.values()) == pytest.approx(867.6e6, rel=1e-3)


def test_a_missing_or_extra_unet_key_is_an_error():
    with torch.device("meta"):
        unet = build_unet(ModelConfig.sd21().unet)
    keys = json.loads((DATA / "mvdream-sd21-unet-keys.json").read_text())
    short = meta_state({k: v for k, v in keys.items() if "output_blocks.3.1.proj_in.weight" not in k})
    with pytest.raises(ConversionError, match="1 keys not mapped"):
        convert_unet_state(short, unet)
    renamed_extra = meta_state({**keys, UNET + "input_blocks.1.1.transformer_blocks.0.attn3.to_q.weight": [320, 320]})
    with pytest.raises(ConversionError, match="1 unexpected"):
        convert_unet_state(renamed_extra, unet)
    dropped_extra = meta_state({**keys, UNET + "refiner.weight": [320]})
    with pytest.raises(ConversionError, match="1 source keys left over"):
        convert_unet_state(dropped_extra, unet)
    no_camera = meta_state({k: v for k, v in keys.items() if "camera_embed" not in k})
    with pytest.raises(ConversionError, match="no camera embedding"):
        convert_unet_state(no_camera, unet)


def test_full_size_vae_and_image_tower_keys():
    import open_clip
    with torch.device("meta"):
        vae = MultiViewModel.new_vae()
        clip = open_clip.create_model("ViT-H-14", pretrained=None, device="meta")
    converted = convert_vae_state(meta_state(vae_keys()), vae)
    assert set(converted) == set(vae.state_dict())
    assert all(converted[k].shape == v.shape for k, v in vae.state_dict().items())
    tower = {f"cond_stage_model.model.visual.{k}": v for k, v in clip.visual.state_dict().items()}
    visual = extract_visual({**tower, **meta_state(vae_keys())})
    assert {k[len("visual."):] for k in visual} == set(clip.visual.state_dict())


@pytest.fixture(scope="module")
def tiny_ldm_file(tmp_path_factory):
    """A tiny LDM-layout checkpoint with random weights, as torch.save writes MVDream's .pt files."""
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) * 0.1 for k, shape in unet_keys(**TINY_LDM).items()}
    path = tmp_path_factory.mktemp("ldm") / "tiny-4view.pt"
    torch.save(sd, path)
    return path


def test_tiny_conversion_gives_the_same_unet_as_diffusers_single_file_loader(tiny_ldm_file, tmp_path):
    from diffusers import UNet2DConditionModel
    cfg = dataclasses.replace(ModelConfig.tiny(), unet=dataclasses.replace(ModelConfig.tiny().unet, multiview_attention=False))
    out = convert(tiny_ldm_file, tmp_path / "converted", model_cfg=cfg)
    ours = build_unet(cfg.unet)
    from model.checkpoint import load_model_weights
    load_model_weights(type("M", (), {"unet": ours})(), out)
    # diffusers covers everything but the camera MLP's name: MVDream's camera_embed is its label_emb.
    raw = torch.load(tiny_ldm_file, weights_only=True)
    renamed = {k.replace("camera_embed.", "label_emb.0."): v for k, v in raw.items()}
    ours.save_config(tmp_path / "unet_config")
    theirs = UNet2DConditionModel.from_single_file(renamed, config=str(tmp_path / "unet_config"), local_files_only=True)
    g = torch.Generator().manual_seed(1)
    x, cams, ctx = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 16, generator=g), torch.randn(2, 1, 64, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        a = multiview_forward(ours.eval(), x, t, cams, ctx, num_views=1)
        b = theirs.eval()(x, t, encoder_hidden_states=ctx, class_labels=cams).sample
    assert a.abs().mean() > 1e-3
    assert torch.allclose(a, b, atol=1e-5)
    cfg_written = json.loads((out / "config.json").read_text())
    assert cfg_written["camera_featurization"] == "mvdream"                  # no image tower in the file


def test_cli_writes_the_featurisation_and_finetune_takes_the_file_directly(tiny_ldm_file, rendered_demo, tmp_path, capsys,
                                                                           monkeypatch):
    code, _, err = run_main("convert_checkpoint", ["--input", tiny_ldm_file, "--output", tmp_path / "c",
                                                   "--camera-featurization", "isotropic3d-double-radians"], capsys)
    # The CLI converts to the sd21 layout: a tiny file does not fit it, and says so in one line.
    assert code == 2 and "not mapped" in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists()
    env_cache = tmp_path / "cache"
    monkeypatch.setenv("ISO3D_CACHE", str(env_cache))
    code, _, err = run_main("finetune", ["--stage", "1", "--config", "tiny", "--data", rendered_demo, "--output",
                                         tmp_path / "run", "--init", tiny_ldm_file, "--max-steps", "1", "val_every=100",
                                         "model.unet.multiview_attention=true"], capsys)
    assert code == 0, err[-2000:]
    converted = list((env_cache / "converted").iterdir())
    assert len(converted) == 1 and converted[0].name.startswith("tiny-4view-")
    assert (tmp_path / "run" / "checkpoints" / "step-000001" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_a_checkpoint_that_needs_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    import argparse
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(ConversionError, match="needs pickle"):
        read_state_dict(path)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ConversionError, match="not a torch checkpoint|needs pickle"):
        read_state_dict(tmp_path / "text.pt")


# The released guidance's camera input for a camera at elevation E, azimuth A (degrees, position
# (cos E cos A, cos E sin A, sin E)): numbers printed by the released code itself (pkunliu/Isotropic3D,
# isotropic/camera_utils.py with its guidance's get_camera_cond), not derived from this project's maths.
RELEASED_3D = {
    (0, 0): [1, 0, 0, 0, 0, 0, -1, -1, 0, 1, 0, 0, 0, 0, 0, 1],
    (15, 45): [0.99990605, -6.2632e-05, 0.013707212, 0.013707212, 0.013707355, 0.004568816, -0.999895612, -0.999895612,
               0, 0.999989561, 0.004569245, 0.004569245, 0, 0, 0, 1],
    (30, 200): [0.998144739, -0.000556399, 0.060883261, 0.060883261, 0.060885803, 0.009121441, -0.99810306, -0.99810306,
                0, 0.999958244, 0.009138395, 0.009138395, 0, 0, 0, 1],
    (22, 359): [0.994026409, -0.000731404, 0.109137363, 0.109137363, 0.109139814, 0.006661501, -0.994004087, -0.994004087,
                0, 0.999977544, 0.006701533, 0.006701533, 0, 0, 0, 1],
    (5, 90): [0.999624217, -4.1751e-05, 0.027412102, 0.027412102, 0.027412134, 0.001522514, -0.999623057, -0.999623057,
              0, 0.99999884, 0.001523087, 0.001523087, 0, 0, 0, 1],
    (-10, 300): [0.995827275, 0.000277988, 0.091257659, 0.091257659, 0.091258082, -0.003033459, -0.995822655, -0.995822655,
                 0, 0.99999536, -0.003046169, -0.003046169, 0, 0, 0, 1],
    (40, 10.5): [0.999994885, -3.8972e-05, 0.00319824, 0.00319824, 0.003198477, 0.012184333, -0.999920653, -0.999920653,
                 0, 0.999925768, 0.012184395, 0.012184395, 0, 0, 0, 1],
    (0, 180): [0.99849715, 0, 0.054803665, 0.054803665, 0.054803665, 0, -0.99849715, -0.99849715, 0, 1, 0, 0, 0, 0, 0, 1],
    (12.5, 271.25): [0.996588292, -0.000314263, 0.082532888, 0.082532888, 0.082533487, 0.003794718, -0.996581067,
                     -0.996581067, 0, 0.999992751, 0.003807709, 0.003807709, 0, 0, 0, 1],
}
# The released 2D sampler's four preview cameras (its get_camera(4): azimuths 0/90/180/270, elevation 15).
RELEASED_PREVIEW = [
    [1, 0, 0, 0, 0, 0.004569246, -0.999989569, -0.999989569, 0, 0.999989569, 0.004569246, 0.004569246, 0, 0, 0, 1],
    [0.999624193, -2.186e-06, 0.027412133, 0.027412133, 0.027412133, 7.9719e-05, -0.999624193, -0.999624193,
     0, 1, 7.9749e-05, 7.9749e-05, 0, 0, 0, 1],
    [0.998497128, -7.6e-08, 0.054803666, 0.054803666, 0.054803666, 1.39e-06, -0.998497128, -0.998497128,
     0, 1, 1.392e-06, 1.392e-06, 0, 0, 0, 1],
    [0.996619642, -2e-09, 0.082154006, 0.082154006, 0.082154006, 2.4e-08, -0.996619642, -0.996619642, 0, 1, 2.4e-08, 2.4e-08, 0, 0, 0, 1],
]


@pytest.mark.parametrize("el,az", sorted(RELEASED_3D))
def test_double_radians_featurisation_equals_the_released_code(el, az):
    from render.cameras import c2w_blender
    for distance in (1.5, 3.7):                    # the released camera input has unit translation
        c2w = torch.tensor(c2w_blender(az, el, distance), dtype=torch.float64)[None]
        got = double_radians_features(c2w)[0].numpy()
        assert np.abs(got - np.array(RELEASED_3D[(el, az)])).max() <= 1e-6
    model = MultiViewModel(dataclasses.replace(ModelConfig.tiny(), camera_featurization="isotropic3d-double-radians"))
    c2w = torch.tensor(c2w_blender(az, el, 1.5), dtype=torch.float32)[None]
    assert np.abs(model.cameras(c2w)[0].numpy() - np.array(RELEASED_3D[(el, az)])).max() <= 1e-6


def test_the_3d_stage_and_the_sampler_use_the_released_cameras():
    from optimize3d.guidance import GuidanceConfig, MultiViewGuidance
    from render.cameras import c2w_blender
    model = MultiViewModel(dataclasses.replace(ModelConfig.tiny(), camera_featurization="isotropic3d-double-radians"))
    preview = torch.tensor(np.stack([c2w_blender(a, 30.0, 1.5) for a in (0, 90, 180, 270)]), dtype=torch.float32)
    assert np.abs(model.preview_features(preview).numpy() - np.array(RELEASED_PREVIEW)).max() <= 1e-6
    seen = []
    real_predict = model.predict
    model.predict = lambda x, t, cams, ctx, v: seen.append(cams) or real_predict(x, t, cams, ctx, v)
    model.sample(torch.zeros(64), preview, steps=1, guidance=3.0, features=model.preview_features(preview))
    assert np.abs(seen[-1][:4].numpy() - np.array(RELEASED_PREVIEW)).max() <= 1e-6
    model.sample_preview(torch.zeros(64), preview, steps=1, guidance=3.0)    # what generate.py's multiview.png calls
    assert np.abs(seen[-1][:4].numpy() - np.array(RELEASED_PREVIEW)).max() <= 1e-6
    guide = MultiViewGuidance(model, torch.zeros(64), GuidanceConfig())
    cams = torch.tensor(np.stack([c2w_blender(az, el, 2.0) for el, az in [(15, 45), (30, 200), (22, 359), (5, 90)]]),
                        dtype=torch.float32)
    guide(torch.rand(4, 3, 32, 32, requires_grad=True), cams, 0, torch.Generator().manual_seed(0))
    expected = np.array([RELEASED_3D[k] for k in [(15, 45), (30, 200), (22, 359), (5, 90)]])
    assert np.abs(seen[-1][:4].numpy() - expected).max() <= 1e-6
    # The project's own featurisation: the true cameras (flattened c2w, unit translation), no quirk.
    ours = MultiViewModel(ModelConfig.tiny())
    assert torch.allclose(ours.preview_features(preview), camera_features(preview))
    assert np.abs(ours.preview_features(preview).numpy() - np.array(RELEASED_PREVIEW)).max() > 0.5


def test_image_tower_alone_loads_into_the_encoder(tmp_path):
    from safetensors.torch import save_file
    from model.encoder import EncoderConfig, ImageEncoder
    from PIL import Image
    import open_clip
    torch.manual_seed(5)
    source = open_clip.create_model("iso3d-tiny-vit", pretrained=None)
    save_file({f"visual.{k}": v.contiguous() for k, v in source.visual.state_dict().items()}, str(tmp_path / "encoder.safetensors"))
    enc = ImageEncoder(EncoderConfig(model="iso3d-tiny-vit", weights=str(tmp_path / "encoder.safetensors")))
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    with torch.no_grad():
        expected = source.visual(enc.preprocess([img]))
    assert torch.allclose(enc.encode([img]), expected, atol=1e-6)
    assert not torch.allclose(ImageEncoder(EncoderConfig.tiny()).encode([img]), expected, atol=1e-3)


# ------------------------------------------------------------------ a converted directory carries its model
TINY_VAE_LDM = dict(in_ch=4, out_ch=4, mc=32, mult=(1, 2), res_blocks=1, attention_levels=(1,), ctx=64)


def tiny_vae_model_cfg() -> ModelConfig:
    """The tiny UNet on the latents of a tiny SD-style VAE (32 px -> 16x16x4): the sd21 code paths, small."""
    from model.encoder import EncoderConfig
    from model.unet import UNetConfig
    unet = dataclasses.replace(UNetConfig.tiny(), in_channels=4, out_channels=4, sample_size=16)
    return ModelConfig(unet=unet, encoder=EncoderConfig.tiny(), latent="vae", vae_block_out_channels=[32, 64],
                       vae_layers_per_block=1, image_size=32)


@pytest.fixture(scope="module")
def released_like(tmp_path_factory):
    """A tiny random checkpoint in the released isotropic3d.ckpt's layout (UNet + camera MLP, VAE, OpenCLIP
    image tower), converted into a checkpoint directory."""
    import open_clip
    g = torch.Generator().manual_seed(3)
    sd = {k: torch.randn(shape, generator=g) * 0.05 for k, shape in {**unet_keys(**TINY_VAE_LDM),
                                                                       **vae_keys(ch=32, mult=(1, 2), res_blocks=1)}.items()}
    torch.manual_seed(11)
    tower = open_clip.create_model("iso3d-tiny-vit", pretrained=None).visual.state_dict()
    sd.update({f"cond_stage_model.model.visual.{k}": v.clone() for k, v in tower.items()})
    root = tmp_path_factory.mktemp("released_like")
    torch.save(sd, root / "isotropic3d-tiny.ckpt")
    out = convert(root / "isotropic3d-tiny.ckpt", root / "converted", model_cfg=tiny_vae_model_cfg())
    return sd, tower, out


def assert_released_model(model_cfg, sd, tower):
    from model.encoder import ImageEncoder
    from model.mvmodel import MultiViewModel
    assert model_cfg.camera_featurization == "isotropic3d-double-radians"
    assert model_cfg.inference == "isotropic3d-release" and model_cfg.latent == "vae"
    model = MultiViewModel(model_cfg)
    vae = model.vae.state_dict()
    for name in ("encoder.conv_in.weight", "decoder.conv_out.bias", "quant_conv.weight"):
        assert torch.equal(vae[name], sd[f"first_stage_model.{name}"]), name
    enc = ImageEncoder(model_cfg.encoder, model_cfg.inference)
    assert all(torch.equal(v, tower[k]) for k, v in enc.visual.state_dict().items())
    assert enc.preprocessing == "isotropic3d-release"


def test_converted_directory_brings_vae_encoder_and_featurisation_to_finetune_and_generate(released_like, rendered_demo,
                                                                                           tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "pipelines"))
    import finetune
    import generate
    from model import checkpoint
    sd, tower, converted = released_like
    saved = json.loads((converted / "config.json").read_text())
    assert (saved["vae_path"], saved["encoder"]["weights"]) == ("vae", "encoder.safetensors")   # relative: movable
    moved = tmp_path / "moved"
    converted.rename(moved)                       # a directory copied elsewhere still finds its own weights
    try:
        args = finetune.parse_args(["--stage", "1", "--config", "tiny", "--data", str(rendered_demo), "--output",
                                    str(tmp_path / "run"), "--init", str(moved), "--max-steps", "1", "val_every=100"])
        cfg, init = finetune.resolve(args)
        assert init == str(moved)
        assert_released_model(cfg.model, sd, tower)
        assert finetune.main(["--stage", "1", "--config", "tiny", "--data", str(rendered_demo), "--output",
                              str(tmp_path / "run"), "--init", str(moved), "--max-steps", "1", "val_every=100"]) == 0
        step = checkpoint.find(tmp_path / "run")               # a run directory: its latest checkpoint
        assert step == tmp_path / "run" / "checkpoints" / "step-000001"
        assert_released_model(checkpoint.model_config(step), sd, tower)
        # An override on the command line still wins over the checkpoint's configuration.
        args = finetune.parse_args(["--stage", "1", "--data", str(rendered_demo), "--output", str(tmp_path / "r2"),
                                    "--init", str(moved), "model.inference=project"])
        assert finetune.resolve(args)[0].model.inference == "project"

        args = generate.parse_args(["--image", str(DATA / "clip-rgba-333x300.png"), "--checkpoint", str(moved)])
        model_cfg = generate.resolve_model(args)
        assert_released_model(model_cfg, sd, tower)
        loaded = checkpoint.load_model(args.checkpoint, model_cfg)
        assert torch.equal(loaded.vae.state_dict()["encoder.conv_in.weight"], sd["first_stage_model.encoder.conv_in.weight"])
        ldm_cam = sd["model.diffusion_model.camera_embed.0.weight"]
        assert torch.equal(loaded.unet.class_embedding.linear_1.weight, ldm_cam)
        monkeypatch.setenv("ISO3D_CACHE", str(tmp_path / "cache"))
        code, printed, err = run_main("generate", ["--image", DATA / "clip-rgba-333x300.png", "--checkpoint",
                                                   tmp_path / "run", "--output", tmp_path / "gen", "--config", "tiny",
                                                   "--steps", "2", "--no-progress", "preview_steps=1", "val_every=2",
                                                   "ckpt_every=2", "export.resolution=32", "export.threshold=3",
                                                   "export.turntable_frames=2", "export.turntable_size=16"], capsys)
        assert code == 0, err[-2000:]
        assert json.loads(printed)["status"] == "ok"
        assert err.count("generate.py: note: the full-size path (vae latents") == 1     # said once, up front
    finally:
        sys.path.remove(str(ROOT / "pipelines"))


def test_full_size_without_weights_refuses_in_one_line(rendered_demo, tmp_path, capsys):
    with pytest.raises(ValueError, match="model.vae_path is not set"):
        ModelConfig.sd21().validate()
    no_encoder = dataclasses.replace(ModelConfig.sd21(), vae_path=None, allow_random_weights=False,
                                     latent="pixel")
    with pytest.raises(ValueError, match="model.encoder.weights is not set: ViT-H-14"):
        no_encoder.validate()
    allowed = dataclasses.replace(ModelConfig.sd21(), allow_random_weights=True)
    allowed.validate()
    with torch.device("meta"):
        model = MultiViewModel(allowed)              # the full-size layout builds, without memory, when allowed
    assert sum(p.numel() for p in model.unet.parameters()) == pytest.approx(867.6e6, rel=1e-3)
    code, _, err = run_main("finetune", ["--stage", "1", "--config", "sd21", "--data", rendered_demo, "--output",
                                         tmp_path / "run"], capsys)
    assert code == 2 and err.count("\n") == 1 and "model.vae_path is not set" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name,content", [("text.ckpt", "not a checkpoint\n"), ("image.png", "<html></html>"),
                                          ("weights.safetensors", "not a checkpoint\n"), ("nothing.pt", "")])
def test_a_file_that_is_no_checkpoint_is_one_whole_line(name, content, rendered_demo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ISO3D_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / name
    bad.write_text(content)
    image = DATA / "clip-rgba-333x300.png"
    commands = [["generate", "--image", image, "--checkpoint", bad, "--output", tmp_path / "g"]]
    if name == "text.ckpt":        # the same loader behind both scripts: one finetune.py case is enough
        commands.append(["finetune", "--stage", "1", "--data", rendered_demo, "--output", tmp_path / "f", "--init", bad])
    for script, *args in commands:
        code, _, err = run_main(script, args, capsys)
        assert code == 2, err[-2000:]
        assert err.count("\n") == 1 and str(bad) in err, err
        assert err.rstrip().endswith((")", "safetensors)", "checkpoint (.ckpt/.pt/.safetensors)")), err


def test_checkpoints_are_readable_by_diffusers_and_old_ones_still_load(tiny_checkpoint, tmp_path):
    import shutil
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from model import checkpoint
    ours = checkpoint.load_model(tiny_checkpoint)
    theirs = UNet2DConditionModel.from_pretrained(tiny_checkpoint / "unet")
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.unet.state_dict().items())
    assert DDPMScheduler.from_pretrained(tiny_checkpoint / "scheduler").config.beta_schedule == "scaled_linear"
    old = tmp_path / "old"                       # the layout before unet/: config.json + model.safetensors
    old.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", old / "config.json")
    save_file({k: v.contiguous() for k, v in ours.unet.state_dict().items()}, str(old / "model.safetensors"))
    again = checkpoint.load_model(old)
    assert all(torch.equal(v, again.unet.state_dict()[k]) for k, v in ours.unet.state_dict().items())


def test_guidance_latents_follow_the_inference_switch():
    """isotropic3d-release: bilinear resize without antialiasing, a *sample* of the VAE posterior (x 0.18215),
    as the released guidance's encode_images; project: antialiased resize and the posterior mean."""
    import torch.nn.functional as F
    from optimize3d.guidance import GuidanceConfig, MultiViewGuidance
    renders = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    released = dataclasses.replace(tiny_vae_model_cfg(), inference="isotropic3d-release", allow_random_weights=True)
    torch.manual_seed(0)
    model = MultiViewModel(released)
    guide = MultiViewGuidance(model, torch.zeros(64), GuidanceConfig())
    got = guide.latents(renders.clone().requires_grad_(), torch.Generator().manual_seed(7))
    x = F.interpolate(renders, (32, 32), mode="bilinear", align_corners=False) * 2 - 1
    expected = model.vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7)) * 0.18215
    assert torch.allclose(got, expected, atol=1e-6) and got.requires_grad
    assert not torch.allclose(got, guide.latents(renders, torch.Generator().manual_seed(8)), atol=1e-4)
    model.cfg = dataclasses.replace(released, inference="project")
    got = guide.latents(renders, torch.Generator().manual_seed(7))
    x = F.interpolate(renders, (32, 32), mode="bilinear", align_corners=False, antialias=True) * 2 - 1
    assert torch.allclose(got, model.vae.encode(x).latent_dist.mean * 0.18215, atol=1e-6)


def test_sampler_eta_one_is_seeded_and_differs_from_eta_zero():
    from render.cameras import c2w_blender
    torch.manual_seed(0)
    model = MultiViewModel(ModelConfig.tiny()).eval()
    cams = torch.tensor(np.stack([c2w_blender(a, 15.0, 1.5) for a in (0, 90, 180, 270)]), dtype=torch.float32)
    emb = torch.randn(64, generator=torch.Generator().manual_seed(1))
    run = lambda eta, seed: model.sample(emb, cams, steps=3, guidance=3.0, eta=eta,  # noqa: E731
                                         generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1.0, 5), run(1.0, 5))
    assert not torch.allclose(run(1.0, 5), run(0.0, 5), atol=1e-4)


def test_an_unknown_config_names_the_presets(rendered_demo, tmp_path, capsys):
    code, _, err = run_main("finetune", ["--stage", "1", "--config", "huge", "--data", rendered_demo, "--output",
                                         tmp_path / "run"], capsys)
    assert code == 2 and err.count("\n") == 1 and "tiny, small, sd21" in err
    assert not (tmp_path / "run").exists()
