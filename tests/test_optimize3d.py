"""The 3D stage's parts: hash grid, normals, marching (occupancy grid vs dense), schedules, score
distillation gradients, mesh export."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import trimesh

from optimize3d.export import EmptyMeshError, ExportConfig, extract_mesh, save_mesh
from optimize3d.field import Field, FieldConfig, TorchHashGrid, build_hash_grid
from optimize3d.guidance import GuidanceConfig, distillation_loss, linear_ramp, t_range
from optimize3d.march import MarchConfig, box_intersect, camera_rays, march, new_occupancy_grid, update_grid
from render.cameras import c2w_blender, c2w_opencv, intrinsics, project


def test_hash_grid_levels_read_their_table_at_grid_vertices():
    cfg = FieldConfig(levels=2, features_per_level=2, log2_table_size=10, base_resolution=4, per_level_scale=4.0)
    enc = TorchHashGrid(cfg)                       # level 0: 5^3 = 125 <= 1024 dense; level 1: 17^3 > 1024 hashed
    torch.nn.init.normal_(enc.embeddings)
    i, j, k = 1, 3, 2
    dense = enc(torch.tensor([[i / 4, j / 4, k / 4]]))[0, :2]
    assert torch.allclose(dense, enc.embeddings[0, i * 25 + j * 5 + k], atol=1e-6)
    i, j, k = 5, 9, 14
    hashed = enc(torch.tensor([[i / 16, j / 16, k / 16]]))[0, 2:]
    index = (i ^ (j * 2654435761) ^ (k * 805459861)) % 1024
    assert torch.allclose(hashed, enc.embeddings[1, index], atol=1e-6)
    # Trilinear: halfway between two vertices of the dense level is their mean.
    mid = enc(torch.tensor([[1.5 / 4, 3 / 4, 2 / 4]]))[0, :2]
    assert torch.allclose(mid, (enc.embeddings[0, 1 * 25 + 15 + 2] + enc.embeddings[0, 2 * 25 + 15 + 2]) / 2, atol=1e-6)


def test_tcnn_requested_without_it_is_a_clear_error():
    pytest.importorskip("torch")
    try:
        import tinycudann  # noqa: F401
        pytest.skip("tiny-cuda-nn is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="hash_implementation=torch"):
        build_hash_grid(FieldConfig(hash_implementation="tcnn"))
    assert type(build_hash_grid(FieldConfig(hash_implementation="torch"))) is TorchHashGrid


def test_fresh_field_is_the_blob_and_its_normals_point_outwards():
    torch.manual_seed(0)
    field = Field(FieldConfig.tiny())
    x = torch.nn.functional.normalize(torch.randn(200, 3), dim=-1) * 0.3
    sigma, albedo = field(x)
    assert torch.allclose(sigma, torch.nn.functional.softplus(torch.tensor(10 * (1 - 0.3 / 0.5))), rtol=0.02)
    assert albedo.min() >= 0 and albedo.max() <= 1
    cos = (field.normals(x) * torch.nn.functional.normalize(x, dim=-1)).sum(-1)
    assert cos.min() > 0.95


def test_camera_rays_match_the_render_cameras():
    """The centre ray goes through the origin; a world point projects (OpenCV K, c2w) onto the pixel
    whose ray passes through it."""
    c2w = torch.tensor(c2w_blender(30.0, 20.0, 1.5), dtype=torch.float32)[None]
    fov = 2 * math.degrees(math.atan(16 / 35))                  # 35 mm lens, 32 mm sensor
    o, d = camera_rays(c2w, torch.tensor([fov]), 32)
    centre = (o[0] + d[16 * 32 + 16] * 1.5)                     # pixel (16, 16) centre is 0.5 px off axis
    assert centre.norm() < 0.05
    point = np.array([[0.2, -0.1, 0.15]])
    u, v = project(point, intrinsics(32), c2w_opencv(30.0, 20.0, 1.5))[0]
    ray = d[int(v) * 32 + int(u)].numpy()
    to_point = (point[0] - o[0].numpy())
    assert np.dot(ray, to_point / np.linalg.norm(to_point)) > 0.999


def test_box_intersection():
    near, far, hit = box_intersect(torch.tensor([[3.0, 0, 0], [3.0, 3, 0]]), torch.tensor([[-1.0, 0, 0], [-1.0, 0, 0]]), 1.0)
    assert hit.tolist() == [True, False]
    assert near[0].item() == pytest.approx(2.0) and far[0].item() == pytest.approx(4.0)


class Blob:
    """A known density field: a Gaussian blob (peak 60, sigma 0.15) around (0.1, 0, 0); colour =
    position mapped to [0, 1]."""
    centre = torch.tensor([0.1, 0.0, 0.0])

    def density(self, x):
        return 60.0 * torch.exp(-((x - self.centre) ** 2).sum(-1) / (2 * 0.15 ** 2))

    def __call__(self, x, d, ray_index):
        return self.density(x), x * 0.5 + 0.5


def psnr(a, b):
    return -10 * torch.log10(((a - b) ** 2).mean())


def test_occupancy_grid_marching_matches_dense_sampling():
    """Skipping the samples in cells the grid marks empty changes the image by little (cells below the
    threshold hold a little density by definition) and evaluates the field far less often."""
    cfg = MarchConfig(samples_per_ray=128, grid_resolution=32, grid_update_every=1, marcher="torch")
    torch.manual_seed(0)                                        # the grid update probes random points per cell
    blob = Blob()
    grid = new_occupancy_grid(1.0, cfg)
    for step in range(8):                                       # nerfacc's warm-up updates: every cell
        update_grid(grid, blob, step, 1.0, cfg)
    assert 0.01 < grid.binaries.float().mean() < 0.2
    c2w = torch.tensor(np.stack([c2w_blender(az, 20.0, 2.0) for az in (0, 120, 240)]), dtype=torch.float32)
    o, d = camera_rays(c2w, torch.full((3,), 50.0), 24)
    dense = march(blob, o, d, 1.0, cfg)
    skipped = march(blob, o, d, 1.0, cfg, grid=grid)
    assert skipped["samples"] < 0.15 * dense["samples"]
    assert (dense["opacity"] > 0.99).float().mean() > 0.05      # the blob is in view, opaque at its core
    assert psnr(skipped["opacity"], dense["opacity"]) > 30
    assert psnr(skipped["values"], dense["values"]) > 30
    empty = new_occupancy_grid(1.0, cfg)                         # a grid that was never filled skips everything
    empty.binaries.zero_()
    assert march(blob, o, d, 1.0, cfg, grid=empty)["opacity"].max() == 0


def test_early_ray_termination_skips_what_lies_behind_the_surface():
    """With a density_fn the torch marcher applies the released renderer's nerfacc rule: a first pass of
    densities drops the samples behind transmittance 1e-4 (lossless: what lies behind counts for at most 1e-4)
    and those under alpha 0.01; the sample function runs on the rest only."""
    cfg = MarchConfig(samples_per_ray=256, grid_resolution=32, grid_update_every=1, marcher="torch")
    torch.manual_seed(0)
    blob = Blob()
    grid = new_occupancy_grid(1.0, cfg)
    for step in range(8):
        update_grid(grid, blob, step, 1.0, cfg)
    c2w = torch.tensor(np.stack([c2w_blender(az, 20.0, 2.0) for az in (0, 120, 240)]), dtype=torch.float32)
    o, d = camera_rays(c2w, torch.full((3,), 50.0), 24)
    calls = []

    def counted(x, dd, ri):
        calls.append(x.shape[0])
        return blob(x, dd, ri)
    full = march(counted, o, d, 1.0, cfg, grid=grid)
    assert sum(calls) == full["samples"]
    stop_only = dataclasses.replace(cfg, alpha_threshold=0.0)
    early = march(blob, o, d, 1.0, stop_only, grid=grid, density_fn=blob.density)
    assert early["samples"] < 0.95 * full["samples"]                       # measured 0.91 on this soft blob
    assert (early["opacity"] - full["opacity"]).abs().max() <= 1.1e-4
    assert psnr(early["values"], full["values"]) > 60
    calls.clear()
    released = march(counted, o, d, 1.0, cfg, grid=grid, density_fn=blob.density)
    assert sum(calls) == released["samples"] < 0.6 * full["samples"]         # and the faint halo goes (0.56)
    off = dataclasses.replace(cfg, early_stop_eps=0.0, alpha_threshold=0.0)
    assert march(blob, o, d, 1.0, off, grid=grid, density_fn=blob.density)["samples"] == full["samples"]


def test_fused_occupancy_test_equals_the_torch_one():
    """march_warp.occupied_mask against march.occupied: random points, points outside the box on every side,
    and points exactly on cell faces (where a different rounding would pick the neighbouring cell)."""
    from optimize3d.march import occupied
    from optimize3d.march_warp import occupied_mask
    torch.manual_seed(0)
    grid = new_occupancy_grid(1.0, MarchConfig(grid_resolution=8))
    grid.binaries.copy_(torch.rand(grid.binaries.shape) < 0.5)
    faces = torch.randint(-9, 10, (2000, 3)).float() / 8                 # multiples of half a cell, in and out
    x = torch.cat([torch.rand(5000, 3) * 2.4 - 1.2, faces, torch.eye(3) * 1.0, -torch.eye(3) * 1.0])
    expected = occupied(grid, x, 1.0)
    assert 0.2 < expected.float().mean() < 0.5 and not expected[-6:-3].any()   # +1 is outside, -1 inside
    assert torch.equal(occupied_mask(grid.binaries, x, 1.0), expected)


@pytest.mark.parametrize("rule", ["released", "none", "early_stop_0.3"])
def test_fused_marcher_equals_the_torch_marcher(rule):
    """marcher=fused against marcher=torch (a first pass without gradients, then nerfacc's dense compositing):
    with its own first pass (march.first_pass, kernels for the occupancy test, the rule and the compositing)
    and without one (every occupied candidate evaluated once, the rule applied in the compositing kernel),
    the same values, opacity and depth, the same per-sample weights, and the same gradient of every field
    parameter, through the values, the opacity, the depth and the sample weights. Rays that miss the box,
    rays through empty cells only, no grid and a grid with nothing occupied included."""
    alpha_threshold, early_stop_eps = {"released": (0.01, 1e-4), "none": (0.0, 0.0), "early_stop_0.3": (0.01, 0.3)}[rule]
    torch.manual_seed(0)
    field = Field(FieldConfig.tiny())
    with torch.no_grad():
        field.encoding.embeddings.normal_(0, 1.0)                # a lumpy object: some rays stop early
    o = torch.randn(400, 3) * 0.3 + torch.tensor([0.0, 0.0, 3.0])
    d = torch.nn.functional.normalize(torch.tensor([0.0, 0.0, -1.0]) + 0.3 * torch.randn(400, 3), dim=-1)
    d[:20] = -d[:20]                                              # these miss the box
    base = MarchConfig(samples_per_ray=64, grid_update_every=1, alpha_threshold=alpha_threshold,
                       early_stop_eps=early_stop_eps)
    grid = new_occupancy_grid(field.cfg.radius, base)
    update_grid(grid, field, 0, field.cfg.radius, base)
    assert 0.05 < grid.binaries.float().mean() < 0.9
    empty = new_occupancy_grid(field.cfg.radius, base)
    empty.binaries.zero_()
    variants = {"torch": dict(marcher="torch"), "fused": dict(marcher="fused"),
                "fused_one_pass": dict(marcher="fused", first_pass=False)}
    for g in (grid, None, empty):
        results = {}
        for name, settings in variants.items():
            field.zero_grad()
            out = march(lambda x, dd, ri: field(x), o, d, field.cfg.radius, dataclasses.replace(base, **settings),
                        grid=g, stratified=True, generator=torch.Generator().manual_seed(3), density_fn=field.density)
            weighted = (out["sample_weights"].reshape(-1) * out["sample_values"][:, 0]).sum()
            loss = (out["values"] * torch.tensor([0.2, 0.5, 1.0])).sum() + out["opacity"].square().sum() \
                + 0.1 * out["depth"].sum() + weighted
            if loss.requires_grad:
                loss.backward()
            results[name] = out, weighted.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                                     for p in field.parameters()]
        ref, ref_weighted, ref_grads = results["torch"]
        for name in ("fused", "fused_one_pass"):
            fused, fused_weighted, fused_grads = results[name]
            for key in ("values", "opacity", "depth"):
                torch.testing.assert_close(fused[key], ref[key], rtol=1e-5, atol=2e-5)
            torch.testing.assert_close(fused_weighted, ref_weighted, rtol=1e-5, atol=1e-5)
            # per-sample weights: the torch marcher's are dense (0 where nothing was evaluated), the fused one's packed
            m = fused["sample_weights"].numel()
            torch.testing.assert_close(fused["sample_weights"].detach().sort(descending=True).values,
                                       ref["sample_weights"].detach().reshape(-1).sort(descending=True).values[:m],
                                       rtol=1e-5, atol=1e-6)
            assert (g is not empty) == bool((fused["sample_weights"] > 0).any())
            for a, b in zip(fused_grads, ref_grads):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * max(1.0, b.abs().max().item()))
        assert results["fused"][0]["samples"] == ref["samples"] <= results["fused_one_pass"][0]["samples"]
        if g is grid:
            assert ref["opacity"].max() > (0.6 if early_stop_eps == 0.3 else 0.99) and ref["opacity"][:20].max() == 0
            if rule != "none":                                    # the rule dropped samples the one pass evaluated
                assert ref["samples"] < 0.95 * results["fused_one_pass"][0]["samples"]


@pytest.mark.parametrize("arch", [80, 90])
def test_the_fused_marcher_compiles_for_cuda_without_a_gpu(arch, tmp_path):
    """What CI can check of the fused marcher's CUDA build with no GPU: Warp's NVRTC compiles its three kernels
    to PTX for A100 (sm_80) and H100 (sm_90). One thread per ray owns its samples: no atomics anywhere."""
    import warp as wp
    from optimize3d.hashgrid_warp import init_warp
    from optimize3d.march_warp import composite_kernels, occupied_kernel
    init_warp()
    for kernel in (occupied_kernel, *composite_kernels(3)):
        (path,) = wp.compile_aot_module(kernel.module, arch=arch, module_dir=tmp_path / kernel.key, use_ptx=True)
        ptx = path.read_text()
        assert f".target sm_{arch}" in ptx and ".entry" in ptx and "atom.global" not in ptx


def test_recomputed_and_chunked_renders_equal_the_plain_one():
    """Activation checkpointing (march.recompute) and ray chunks change memory, not results: the same
    image, normals and gradient of every field parameter. With several views per chunk and one light per
    view, a chunk must light each ray by its own view (the rays of views 2-3 sit in the second chunk)."""
    from optimize3d.renderer import render_views
    torch.manual_seed(0)
    field = Field(FieldConfig.tiny())
    with torch.no_grad():
        field.encoding.embeddings.normal_(0, 0.5)               # a lumpy object: normals vary
    c2w = torch.tensor(np.stack([c2w_blender(az, 20.0, 2.0) for az in (0, 90, 180, 270)]), dtype=torch.float32)
    lights = 3 * c2w[[1, 2, 3, 0], :3, 3] / 2                   # each view lit from the side (its neighbour)
    results = []
    for recompute, ray_chunk, light in ((False, None, lights), (True, None, lights), (True, 2 * 12 * 12, lights),
                                        (False, None, lights[[0, 1, 0, 1]])):
        cfg = MarchConfig(samples_per_ray=32, marcher="torch", recompute=recompute, chunk=500)
        field.zero_grad()
        out = render_views(field, None, c2w, torch.full((4,), 50.0), 12, cfg, mode="lambertian", lights=light,
                           ambient=0.2, normals=True, ray_chunk=ray_chunk)
        (out["rgb"].square().sum() + out["orientation"]).backward()
        results.append((out["rgb"].detach(), out["normal"].detach(),
                        [p.grad.clone() for p in field.parameters()]))
    plain, wrong_lights = results[0], results[3]
    for rgb, normal, grads in results[1:3]:
        torch.testing.assert_close(rgb, plain[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(normal, plain[1], rtol=1e-5, atol=1e-6)
        for g, g0 in zip(grads, plain[2]):
            torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-7)
    assert (plain[0] - wrong_lights[0]).abs().max() > 0.1       # chunk-local light indices would show


def test_nerfacc_marcher_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        march(Blob(), torch.zeros(1, 3), torch.ones(1, 3), 1.0, MarchConfig(marcher="nerfacc"))


@pytest.mark.parametrize("step,lo,hi,orient", [(0, 0.98, 0.98, 10.0), (4000, 0.50, 0.74, 802.0),
                                                (5000, 0.38, 0.68, 1000.0), (8000, 0.02, 0.50, 1000.0),
                                                (10000, 0.02, 0.50, 1000.0)])
def test_schedules(step, lo, hi, orient):
    assert t_range(GuidanceConfig(), step) == pytest.approx((lo, hi))
    assert linear_ramp(step, 10.0, 1000.0, 5000) == pytest.approx(orient)


def gaussian_score(alphas_cumprod, t, s_cond=0.7, s_uncond=1.3):
    """Exact noise predictions for data ~ N(0, s^2): E[eps | x_t] = sqrt(1 - ab) x_t / (ab s^2 + 1 - ab)."""
    ab = alphas_cumprod[t]
    k = lambda s: (1 - ab).sqrt() / (ab * s * s + 1 - ab)  # noqa: E731
    return lambda x_t: (k(s_cond) * x_t, k(s_uncond) * x_t), k(s_cond), k(s_uncond)


def test_sds_gradient_matches_finite_differences_of_its_potential():
    """With a linear (Gaussian) score, the SDS update w (eps_cfg(a z + b eps) - eps) is the gradient of
    the quadratic potential w (K a |z|^2 / 2 + (K b - 1) eps . z) / V; z = M theta is a toy renderer."""
    from model.mvmodel import noise_schedule
    ac = noise_schedule().alphas_cumprod.double()
    t, scale = 600, 7.5
    predict, kc, ku = gaussian_score(ac, t)
    cfg = GuidanceConfig(form="sds", guidance_scale=scale)
    g = torch.Generator().manual_seed(0)
    M = torch.randn(4 * 3 * 2 * 2, 5, generator=g, dtype=torch.float64)
    theta = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    render = lambda th: (M @ th).view(4, 3, 2, 2)  # noqa: E731
    loss = distillation_loss(render(theta), noise, t, ac, predict, cfg)
    (grad,) = torch.autograd.grad(loss, theta)
    a, b, w = ac[t].sqrt(), (1 - ac[t]).sqrt(), 1 - ac[t]
    K = ku + scale * (kc - ku)

    def potential(th):
        z = render(th)
        return w * (K * a * (z * z).sum() / 2 + (K * b - 1) * (noise * z).sum()) / 4

    fd = torch.stack([(potential(theta.detach() + e) - potential(theta.detach() - e)) / 2e-6
                      for e in torch.eye(5, dtype=torch.float64) * 1e-6])
    assert torch.allclose(grad, fd, rtol=1e-5, atol=1e-8)


def test_x0_reconstruction_target_with_std_rescale():
    from model.mvmodel import noise_schedule
    ac = noise_schedule().alphas_cumprod.double()
    t = 300
    predict, kc, ku = gaussian_score(ac, t)
    cfg = GuidanceConfig(form="x0", guidance_scale=10.0, std_rescale=0.5)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    loss = distillation_loss(z, noise, t, ac, predict, cfg)
    (grad,) = torch.autograd.grad(loss, z)
    a, b = ac[t].sqrt(), (1 - ac[t]).sqrt()
    x_t = a * z.detach() + b * noise
    x0 = (x_t - b * (ku + 10.0 * (kc - ku)) * x_t) / a
    x0_cond = (x_t - b * kc * x_t) / a
    target = 0.5 * x0 * x0_cond.std() / x0.std() + 0.5 * x0
    assert torch.allclose(grad, (z.detach() - target) / 4, atol=1e-9)
    assert loss.item() == pytest.approx(0.5 * ((z.detach() - target) ** 2).sum().item() / 4)


class SphereField(torch.nn.Module):
    """density 50 inside radius 0.4, one albedo (red unless given)."""
    def __init__(self, albedo=(1.0, 0.0, 0.0)):
        super().__init__()
        self.cfg = FieldConfig(radius=1.0)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.albedo = torch.tensor(albedo)

    def density(self, x):
        return 50.0 * torch.sigmoid((0.4 - x.norm(dim=-1)) * 200)

    def forward(self, x):
        return self.density(x), self.albedo.expand(x.shape[0], 3)


def test_mesh_export_of_a_sphere(tmp_path):
    mesh = extract_mesh(SphereField(), ExportConfig(resolution=64, threshold=25.0))
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * 0.4 ** 3, rel=0.05)   # positive: faces point outwards
    assert (mesh.visual.vertex_colors[:, :3] == [255, 0, 0]).all()
    save_mesh(mesh, tmp_path / "mesh.glb")
    loaded = trimesh.load(tmp_path / "mesh.glb", force="mesh")
    assert len(loaded.faces) == len(mesh.faces)
    assert not list(tmp_path.glob(".*"))                 # no temporary left behind


def test_glb_stores_linear_vertex_colours_and_the_evaluation_reads_them_back_as_displayed(tmp_path):
    """glTF's COLOR_0 is linear (the spec; Blender renders a stored 128 as 188, test_render_blender): an albedo of
    sRGB (0.5, 0.2, 0.8) is stored in mesh.glb as the published linear values 0.2140, 0.0331, 0.6038 (bytes 55, 8,
    154), read back by the evaluation as the colour it was (to 8-bit linear rounding, coarse in the darks), and
    kept as sRGB bytes in PLY, whose readers show bytes as they are."""
    from optimize3d.evaluate import mean_colour
    from optimize3d.export import load_mesh
    mesh = extract_mesh(SphereField(albedo=(0.5, 0.2, 0.8)), ExportConfig(resolution=32, threshold=25.0))
    assert (mesh.visual.vertex_colors[:, :3] == [128, 51, 204]).all()
    save_mesh(mesh, tmp_path / "mesh.glb")
    save_mesh(mesh, tmp_path / "mesh.ply")
    stored = trimesh.load(tmp_path / "mesh.glb", force="mesh").visual.vertex_colors[:, :3]
    assert (stored == [55, 8, 154]).all()
    shown = mean_colour(load_mesh(tmp_path / "mesh.glb"))
    np.testing.assert_allclose(shown, [128 / 255, 51 / 255, 204 / 255], atol=2 / 255)
    assert (trimesh.load(tmp_path / "mesh.ply", force="mesh").visual.vertex_colors[:, :3] == [128, 51, 204]).all()
    np.testing.assert_allclose(mean_colour(load_mesh(tmp_path / "mesh.ply")), [128 / 255, 51 / 255, 204 / 255], atol=1e-9)


class SoftBlobField(SphereField):
    """A soft field, as a short run leaves one: density 3 at most, falling off around radius 0.4."""
    def density(self, x):
        return 3.0 * torch.sigmoid((0.4 - x.norm(dim=-1)) * 20)


def test_threshold_null_is_threestudios_auto_and_finds_a_surface_a_fixed_one_misses():
    """export.threshold=null: threestudio's isosurface_threshold "auto", the mean of the grid's densities above
    1e-5 (computed here from the density formula on the same grid points); where the fixed threshold 5 finds no
    surface in a soft field, auto gives a closed mesh at the field's own scale."""
    with pytest.raises(EmptyMeshError, match="export.threshold=5: no surface"):
        extract_mesh(SoftBlobField(), ExportConfig(resolution=32, threshold=5.0))
    axis = np.linspace(-1.0, 1.0, 32)
    r = np.sqrt((np.stack(np.meshgrid(axis, axis, axis, indexing="ij")) ** 2).sum(0))
    sigma = 3.0 / (1 + np.exp(-(0.4 - r) * 20))
    expected = sigma[sigma > 1e-5].mean()
    mesh = extract_mesh(SoftBlobField(), ExportConfig(resolution=32, threshold=None))
    assert mesh.metadata["threshold"] == pytest.approx(expected, rel=1e-4)
    level = 0.4 + np.log(3.0 / expected - 1) / 20               # the radius where the density is the threshold
    assert mesh.is_watertight and mesh.volume == pytest.approx(4 / 3 * math.pi * level ** 3, rel=0.1)


def test_empty_mesh_is_an_error_with_a_threshold_to_try():
    with pytest.raises(EmptyMeshError, match=r"export.threshold=80: no surface.*try export.threshold="):
        extract_mesh(SphereField(), ExportConfig(resolution=32, threshold=80.0))


def test_export_rotates_z_up_to_y_up(tmp_path):
    rod = trimesh.creation.box(extents=[0.1, 0.1, 1.0])          # tall along z (Blender up)
    save_mesh(rod, tmp_path / "rod.glb")
    extents = trimesh.load(tmp_path / "rod.glb", force="mesh").extents
    assert extents[1] == pytest.approx(1.0)                       # tall along y (glTF up)
