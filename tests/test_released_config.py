"""The sd21 preset of the 3D stage against the released configuration, with numbers from the released code.

tests/data/released-cameras.json was made by running pkunliu/Isotropic3D's threestudio/data/random_multiview.py
(unmodified) on the data section of configs/isotropic3d-shading.yaml: its "source" field says how. Nothing
here re-derives those numbers from this project's code."""
import json
import math
import random

import numpy as np
import pytest
import torch

from optimize3d.guidance import GuidanceConfig, distillation_loss
from optimize3d.optimize import GenerateConfig, draw_elevations, sample_cameras
from optimize3d.shading import light_positions
from tests.conftest import ROOT

RELEASED = json.loads((ROOT / "tests" / "data" / "released-cameras.json").read_text())


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
