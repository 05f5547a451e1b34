"""The multi-view UNet (tiny configuration, real diffusers modules) and the sd21 layout's size."""

import pytest
import torch

from model.unet import CAMERA_DIM, UNetConfig, build_unet, camera_features, multiview_forward
from render.cameras import c2w_blender


def pair(multiview=True):
    torch.manual_seed(0)
    a = build_unet(UNetConfig.tiny())
    b = build_unet(UNetConfig(**{**UNetConfig.tiny().__dict__, "multiview_attention": False}))
    b.load_state_dict(a.state_dict())
    return a.eval(), b.eval()


def inputs(n, d=64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 32, 32, generator=g)
    t = torch.full((n,), 500)
    cams = camera_features(torch.tensor([c2w_blender(90 * i, 15, 1.5) for i in range(n)], dtype=torch.float32))
    ctx = torch.randn(n, 1, d, generator=g)
    return x, t, cams, ctx


@torch.no_grad()
def test_multiview_attention_over_one_view_is_ordinary_self_attention():
    mv, plain = pair()
    x, t, cams, ctx = inputs(3)
    a = multiview_forward(mv, x, t, cams, ctx, num_views=1)
    b = multiview_forward(plain, x, t, cams, ctx, num_views=1)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_each_view_depends_on_the_others_only_with_multiview_attention():
    mv, plain = pair()
    x, t, cams, ctx = inputs(4)
    x2 = x.clone()
    x2[3] += torch.randn_like(x2[3])
    for model, coupled in ((mv, True), (plain, False)):
        a = multiview_forward(model, x, t, cams, ctx, num_views=4)
        b = multiview_forward(model, x2, t, cams, ctx, num_views=4)
        diff = (a[:3] - b[:3]).abs().max().item()
        assert (diff > 1e-4) if coupled else (diff < 1e-6), (coupled, diff)
    # two objects of 4 views in one batch do not see each other
    x8, t8, c8, ctx8 = inputs(8)
    y8 = x8.clone()
    y8[7] += 1.0
    a, b = multiview_forward(mv, x8, t8, c8, ctx8, 4), multiview_forward(mv, y8, t8, c8, ctx8, 4)
    assert (a[:4] - b[:4]).abs().max() < 1e-6 and (a[4:7] - b[4:7]).abs().max() > 1e-4


@torch.no_grad()
def test_camera_and_context_condition_the_output():
    mv, _ = pair()
    x, t, cams, ctx = inputs(4)
    base = multiview_forward(mv, x, t, cams, ctx, 4)
    assert (multiview_forward(mv, x, t, cams.flip(0), ctx, 4) - base).abs().max() > 1e-5
    assert (multiview_forward(mv, x, t, cams, torch.zeros_like(ctx), 4) - base).abs().max() > 1e-5
    emb = mv.class_embedding
    assert (emb.linear_1.in_features, emb.linear_1.out_features, emb.linear_2.out_features) == (CAMERA_DIM, 128, 128)
    with pytest.raises(ValueError, match="num_views"):
        multiview_forward(mv, x[:3], t[:3], cams[:3], ctx[:3], 4)


def test_camera_features_unit_translation():
    f = camera_features(torch.tensor([c2w_blender(30, 20, 1.5)], dtype=torch.float32))
    assert f.shape == (1, 16)
    assert torch.linalg.norm(f.view(4, 4)[:3, 3]) == pytest.approx(1.0, abs=1e-6)


def test_sd21_layout_has_mvdream_size():
    """Built on the meta device: the paper's UNet, 867.6 M parameters with the camera MLP (FACTS.md)."""
    with torch.device("meta"):
        unet = build_unet(UNetConfig.sd21())
    n = sum(p.numel() for p in unet.parameters())
    assert n == pytest.approx(867.6e6, rel=2e-3)
    assert unet.class_embedding.linear_1.weight.shape == (1280, 16)
    assert sum(1 for k in unet.attn_processors if k.endswith("attn1.processor")) == 16
