"""The sd21 preset of the 3D stage against the released configuration, with numbers from the released code.

tests/data/released-3d-config.json was made by running pkunliu/Isotropic3D's threestudio/data/random_multiview.py
(unmodified) on the data section of configs/isotropic3d-shading.yaml: its "source" field says how. Nothing
here re-derives those numbers from this project's code."""
import json
import math
import random

import numpy as np
import pytest
import torch

from optimize3d.field import Field, FieldConfig
from optimize3d.guidance import GuidanceConfig, distillation_loss
from optimize3d.cameras import draw_elevations, sample_cameras
from optimize3d.config import GenerateConfig
from optimize3d.shading import light_positions
from tests.conftest import ROOT

RELEASED = json.loads((ROOT / "tests" / "data" / "released-3d-config.json").read_text())


def elevation_draws(cfg: GenerateConfig, steps: int) -> np.ndarray:
    """What sample_cameras draws (checked below against its cameras) for `steps` steps of two groups."""
    rng = random.Random(0)
    return np.array([e for _ in range(steps) for e in draw_elevations(cfg, 2, rng)])


def test_views_and_resolution_per_step_are_the_released_batch_schedule():
    cfg = GenerateConfig.sd21()
    for step, released in RELEASED["views_at_step"].items():
        step = int(step)
        c2w, fov, azimuths, elevations = sample_cameras(cfg, random.Random(step), step)
        assert c2w.shape[0] == fov.shape[0] == len(azimuths) == cfg.views_at(step) == released["views"], step
        assert len(elevations) == released["views"] // 4                       # groups of n_view 4
        assert cfg.resolution_at(step) == released["height"], step


def test_elevations_follow_the_released_distribution():
    cfg = GenerateConfig.sd21()
    q = np.linspace(0.01, 0.99, 99)
    released = np.array(RELEASED["elevation_deg_quantiles_1_to_99"])
    ours = np.quantile(elevation_draws(cfg, RELEASED["draws"]), q)             # as many draws as the oracle's
    # 10^5 draws each: a quantile's standard error is about 0.05 deg here; 0.35 deg is 5 of them for both.
    assert np.abs(ours - released).max() < 0.35, np.abs(ours - released).max()
    # The test can fail: uniform degrees alone (what the preset drew before) misses by degrees.
    cfg.elevation_sampling = "uniform"
    assert np.abs(np.quantile(elevation_draws(cfg, 20_000), q) - released).max() > 2.0


def test_each_group_has_its_own_camera_and_shares_it_across_its_views():
    cfg = GenerateConfig.sd21()
    rng, fovs, rel, differ = random.Random(1), [], [], 0
    for _ in range(2000):
        c2w, fov, azimuths, elevations = sample_cameras(cfg, rng, 0)
        pos = c2w[:, :3, 3].view(2, 4, 3)
        dist = pos.norm(dim=-1)
        elev = torch.rad2deg(torch.asin(pos[..., 2] / dist))
        assert torch.allclose(elev, torch.tensor(elevations)[:, None].expand(2, 4), atol=1e-3)
        assert torch.allclose(dist, dist[:, :1].expand(2, 4), rtol=1e-5) and (fov.view(2, 4) == fov.view(2, 4)[:, :1]).all()
        spacing = (np.diff(np.array(azimuths).reshape(2, 4), axis=1) % 360)
        assert np.allclose(spacing, 90.0, atol=1e-4)
        differ += elevations[0] != elevations[1]
        fovs += fov.view(2, 4)[:, 0].tolist()
        rel += (dist[:, 0] * torch.tan(torch.deg2rad(fov.view(2, 4)[:, 0]) / 2)).tolist()
    assert differ == 2000                                                      # independent groups
    lo, hi = RELEASED["fovy_deg_range"]
    assert lo - 0.1 < min(fovs) and max(fovs) < hi + 0.1 and max(fovs) - min(fovs) > 0.95 * (hi - lo)
    lo, hi = RELEASED["relative_distance_range"]
    assert lo - 1e-3 < min(rel) and max(rel) < hi + 1e-3 and max(rel) - min(rel) > 0.95 * (hi - lo)


def test_one_light_per_group():
    cams = torch.randn(8, 3) * 2
    lights = light_positions(cams, (0.8, 1.5), torch.Generator().manual_seed(0), 4)
    d = lights.norm(dim=-1).view(2, 4)
    assert RELEASED["light_distance_shared_in_group"] and torch.allclose(d, d[:, :1].expand(2, 4))
    assert not torch.allclose(d[0, 0], d[1, 0])
    lo, hi = RELEASED["light_distance_range"]
    assert ((d >= lo) & (d <= hi)).all()


def test_two_groups_are_guided_as_two_separate_multiview_samples():
    """The std rescale is per group of 4 views (the released reshape to [-1, n_view, ...]), the loss divided by
    all views: two groups together give the mean of the two groups alone."""
    cfg = GuidanceConfig()
    ac = torch.linspace(0.999, 0.01, 1000)
    z = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    z[4:] *= 3                                                # groups of different scale: a global std would mix them
    noise = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    eps_cond = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    eps_uncond = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def predict_for(rows):
        return lambda x_t: (eps_cond[rows], eps_uncond[rows])
    both = distillation_loss(z, noise, 500, ac, predict_for(slice(0, 8)), cfg, views=4)
    first = distillation_loss(z[:4], noise[:4], 500, ac, predict_for(slice(0, 4)), cfg)
    second = distillation_loss(z[4:], noise[4:], 500, ac, predict_for(slice(4, 8)), cfg)
    torch.testing.assert_close(both, (first + second) / 2)
    whole = distillation_loss(z, noise, 500, ac, predict_for(slice(0, 8)), cfg)            # one group of 8: differs
    assert not math.isclose(float(whole), float(both), rel_tol=1e-3)


def test_the_tiny_preset_keeps_its_own_cameras():
    cfg = GenerateConfig.tiny()
    assert cfg.view_groups == [1] and cfg.elevation_sampling == "uniform"
    with pytest.raises(ValueError, match="view_groups"):
        GenerateConfig(view_groups=[2]).validate()
    with pytest.raises(ValueError, match="elevation_sampling"):
        GenerateConfig(elevation_sampling="gaussian").validate()


def test_the_sd21_preset_has_the_released_settings():
    released, cfg = RELEASED["released_config"], GenerateConfig.sd21()
    assert [cfg.views * g for g in cfg.view_groups] == released["data.batch_size"] and cfg.views == released["data.n_view"]
    assert cfg.resolution_milestones == released["data.resolution_milestones"] and cfg.resolutions == released["data.width"]
    assert cfg.elevation_range == released["data.elevation_range"] and cfg.fov_range == released["data.fovy_range"]
    assert cfg.relative_distance_range == released["data.camera_distance_range"]
    assert cfg.nerf.normal_type == released["system.geometry.normal_type"]
    assert cfg.mixed_precision == released["trainer.precision"]
    assert cfg.steps == released["trainer.max_steps"] and cfg.march.samples_per_ray == released["system.renderer.num_samples_per_ray"]
    assert cfg.seed == released["seed"]


def small_field(normal_type: str, dtype=torch.float32) -> Field:
    """Two dense levels (grid_sample) and two hashed ones (gather), with embeddings far from the blob; the
    pure-torch grid (float64, gradients in positions), which tests/test_hashgrid_fused.py holds the fused one to."""
    torch.manual_seed(0)
    field = Field(FieldConfig(levels=4, log2_table_size=9, base_resolution=4, per_level_scale=2.0, hidden=8,
                              normal_type=normal_type, hash_implementation="torch")).to(dtype)
    with torch.no_grad():
        field.encoding.embeddings.normal_(0, 1.0)
    return field


def test_analytic_normals_are_the_density_gradient():
    """Against central differences of the density in float64 (no autograd), inside and outside the box."""
    field = small_field("analytic", torch.float64)
    x = torch.cat([torch.rand(300, 3, dtype=torch.float64) * 1.8 - 0.9, torch.tensor([[1.5, 0.2, 0.1]], dtype=torch.float64)])
    with torch.no_grad():                                     # as validation and export call it
        sigma, _, n = field.with_normals(x)
    eps = 1e-6
    grad = torch.stack([(field.density(x + eps * e) - field.density(x - eps * e)) / (2 * eps)
                        for e in torch.eye(3, dtype=torch.float64)], -1)
    torch.testing.assert_close(n, torch.nn.functional.normalize(-grad, dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sigma, field.density(x))
    assert not n.requires_grad                                 # no graph kept outside training
    assert field.with_normals(x)[2].requires_grad              # training: the graph is kept


def test_a_loss_on_analytic_normals_trains_the_field_through_the_second_derivative():
    """gradcheck (float64 finite differences) of embeddings and MLP weights -> normals: the double backward
    through grid_sample (the dense levels) and the hash gathers is exact."""
    field = small_field("analytic", torch.float64)
    x = torch.rand(40, 3, dtype=torch.float64) * 1.6 - 0.8

    class Normals(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.field = field

        def forward(self, points):
            return self.field.with_normals(points)[2]

    def normals(embeddings, weight):
        return torch.func.functional_call(Normals(), {"field.encoding.embeddings": embeddings,
                                                      "field.density_net.0.weight": weight}, (x,), strict=False)
    inputs = (field.encoding.embeddings.detach().clone().requires_grad_(), field.density_net[0].weight.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(normals, inputs, eps=1e-6, atol=1e-5, fast_mode=True)
    # Finite differences, by contrast, reach the weights only through first derivatives of the density.
    fd = small_field("finite_difference")
    assert fd.with_normals(x.float())[2].requires_grad
    with pytest.raises(ValueError, match="normal_type"):
        small_field("pred").with_normals(x.float())


def test_16_mixed_runs_the_whole_step_in_fp16_with_a_gradient_scaler_that_resumes(tmp_path):
    """The released precision: fp16 autocast over the field, the renderer and the diffusion model (here on the
    CPU, where torch also autocasts to fp16), the loss scaled; the scaler's state is part of the field checkpoint."""
    from model.mvmodel import ModelConfig, MultiViewModel
    from optimize3d.guidance import MultiViewGuidance
    from optimize3d.config import Precision
    from optimize3d.fieldstate import load_nerf, save_nerf
    from optimize3d.optimize import build_field, sds_step
    cfg = GenerateConfig.tiny()
    cfg.mixed_precision, cfg.nerf.normal_type = "16-mixed", "analytic"
    torch.manual_seed(0)
    model = MultiViewModel(ModelConfig.tiny()).eval().requires_grad_(False)
    guide = MultiViewGuidance(model, torch.randn(model.cfg.unet.cross_attention_dim), cfg.guidance)
    nerf, grid, opt = build_field(cfg, torch.device("cpu"))
    precision = Precision.of(cfg.mixed_precision, torch.device("cpu"))
    assert precision.step == torch.float16 and precision.scaler.is_enabled()
    dtypes = []
    nerf.density_net[0].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))   # (closed-form normals call the layers)
    unet_dtypes = []
    model.unet.conv_in.register_forward_hook(lambda module, args, out: unet_dtypes.append(out.dtype))
    for step in range(3):
        parts = sds_step(cfg, nerf, grid, opt, guide, step, precision)
        assert math.isfinite(parts["loss"])
    assert torch.float16 in dtypes and set(unet_dtypes) == {torch.float16}
    scale = precision.scaler.get_scale()
    assert scale < 65536.0                  # fp16 gradients overflowed at the initial scale and it backed off, as Lightning's does
    save_nerf(tmp_path, 3, nerf, grid, opt, precision.scaler)
    resumed = Precision.of(cfg.mixed_precision, torch.device("cpu"))
    assert load_nerf(tmp_path / "step-000003", *build_field(cfg, torch.device("cpu")), resumed.scaler) == 3
    assert resumed.scaler.get_scale() == scale
    assert Precision.of("auto", torch.device("cpu")).step is None and not Precision.of("auto", torch.device("cpu")).scaler.is_enabled()


def test_closed_form_normals_equal_autograds_gradient_of_the_density_and_its_second_derivative():
    """The pure-torch field writes -d(density)/dx out by the chain rule (no double backward): the same normals
    as autograd's gradient of the density, and the same gradients of a loss on them, in every parameter."""
    field = small_field("analytic", torch.float64)
    x = torch.rand(200, 3, dtype=torch.float64) * 2.2 - 1.1             # some outside the box
    probe = torch.randn(200, 3, dtype=torch.float64)
    closed = field.with_normals(x)[2]
    points = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(field.density(points), points, torch.ones(200, dtype=torch.float64), create_graph=True)
    reference = torch.nn.functional.normalize(-grad, dim=-1)
    torch.testing.assert_close(closed, reference, atol=1e-9, rtol=1e-9)
    params = list(field.parameters())
    ours = torch.autograd.grad((closed * probe).sum(), params, allow_unused=True)
    theirs = torch.autograd.grad((reference * probe).sum(), params, allow_unused=True)
    for name, a, b in zip([n for n, _ in field.named_parameters()], ours, theirs):
        if b is None:                                                   # the albedo MLP: not in the normals
            assert a is None or a.abs().max() == 0, name
        else:
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=name)
