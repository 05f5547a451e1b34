"""The fused (Warp) hash grid against the pure-torch reference, on Warp's CPU backend: values, Jacobians
and the gradients of both, with points outside the box, hash collisions at the finest level and no points
at all; and a field and a training step built on each."""
from pathlib import Path

import numpy as np
import pytest
import torch

from optimize3d.field import Field, FieldConfig, TorchHashGrid, build_hash_grid
from optimize3d.hashgrid_warp import FusedHashGrid
from optimize3d.march import MarchConfig
from optimize3d.renderer import render_views
from render.cameras import DISTANCE, FOV_DEG, c2w_blender

# A table of 2^8 rows under a finest level of 64^3 vertices: the hashed levels collide on most rows.
COLLIDING = FieldConfig(levels=4, features_per_level=2, log2_table_size=8, base_resolution=2, per_level_scale=2.8)


def pair(cfg: FieldConfig, scale: float = 1.0):
    torch.manual_seed(0)
    ref, fused = TorchHashGrid(cfg), FusedHashGrid(cfg)
    with torch.no_grad():
        ref.embeddings.normal_(0, scale)
        fused.embeddings.copy_(ref.embeddings)
    return ref, fused


def points(n: int, seed: int = 0) -> torch.Tensor:
    """Uniform over [-0.25, 1.25]^3 (a fifth of each axis outside the box), plus the box's corners."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g) * 1.5 - 0.25
    return torch.cat([x, torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.5]])])


def grads(grid, x, g_values, g_jacobian):
    h, jac = grid.with_jacobian(x)
    (g,) = torch.autograd.grad((h * g_values).sum() + (jac * g_jacobian).sum(), grid.embeddings)
    return h, jac, g


@pytest.mark.parametrize("cfg", [FieldConfig.tiny(), COLLIDING,
                                 FieldConfig(levels=3, features_per_level=1, log2_table_size=10, base_resolution=5),
                                 FieldConfig(levels=3, features_per_level=4, log2_table_size=12, base_resolution=7,
                                             per_level_scale=2.0)],
                         ids=["tiny", "colliding", "1-feature", "4-features"])
def test_values_jacobians_and_gradients_equal_the_torch_reference(cfg):
    ref, fused = pair(cfg)
    x = points(3000)
    assert ((x < 0) | (x > 1)).any(-1).float().mean() > 0.4               # many points outside the box
    g = torch.Generator().manual_seed(1)
    g_values = torch.randn(x.shape[0], ref.output_dim, generator=g)
    g_jacobian = torch.randn(x.shape[0], ref.output_dim, 3, generator=g)
    h_ref, j_ref, grad_ref = grads(ref, x, g_values, g_jacobian)
    h, j, grad = grads(fused, x, g_values, g_jacobian)
    assert torch.allclose(h, h_ref, atol=1e-5) and torch.allclose(fused(x), ref(x), atol=1e-5)
    assert torch.allclose(j, j_ref, rtol=1e-4, atol=1e-5 * float(j_ref.detach().abs().max()))
    outside = ((x < 0) | (x > 1))
    assert (j.permute(0, 2, 1)[outside] == 0).all()                           # clamped axes: no derivative
    assert torch.allclose(grad, grad_ref, rtol=1e-4, atol=1e-5 * float(grad_ref.detach().abs().max()))
    (grad_values_only,) = torch.autograd.grad((fused(x) * g_values).sum(), fused.embeddings)
    (grad_values_ref,) = torch.autograd.grad((ref(x) * g_values).sum(), ref.embeddings)
    assert torch.allclose(grad_values_only, grad_values_ref, rtol=1e-4, atol=1e-5 * float(grad_values_ref.abs().max()))


def test_collisions_at_the_finest_level_add_up():
    ref, fused = pair(COLLIDING)
    res = ref.resolutions[-1]
    assert (res + 1) ** 3 > 16 * ref.table                                    # hashed, and far over the table
    # Points on distinct vertices of the finest level that hash to one row: their gradients must add.
    vertices = torch.stack(torch.meshgrid(*[torch.arange(res + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    rows = (vertices[:, 0] ^ (vertices[:, 1] * 2654435761) ^ (vertices[:, 2] * 805459861)) % ref.table
    same = vertices[rows == rows[12345]][:50]
    assert same.shape[0] == 50
    x = same.float() / res
    (g_ref,) = torch.autograd.grad(ref(x)[:, -2:].sum(), ref.embeddings)
    (g,) = torch.autograd.grad(fused(x)[:, -2:].sum(), fused.embeddings)
    assert g[-1, rows[12345]].tolist() == pytest.approx([50.0, 50.0], abs=1e-4)
    assert torch.allclose(g, g_ref, atol=1e-4)


def test_no_points_give_empty_outputs_and_zero_gradients():
    ref, fused = pair(FieldConfig.tiny())
    x = torch.zeros(0, 3)
    h, j = fused.with_jacobian(x)
    assert h.shape == (0, ref.output_dim) and j.shape == (0, ref.output_dim, 3)
    (g,) = torch.autograd.grad(h.sum() + j.sum(), fused.embeddings)
    assert g.shape == fused.embeddings.shape and not g.any()


def test_results_do_not_depend_on_the_number_of_threads():
    _, fused = pair(FieldConfig.sd21())
    x = points(2000)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            outputs.append(grads(fused, x, torch.ones(1), torch.ones(1)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


def test_the_helper_threads_start_no_openmp_team_of_their_own():
    """On the CPU the levels are shared with helper threads. A torch op run in one of them gives it an OpenMP
    team of its own: then 2 x 2 threads contend for 2 cores and every later torch op of the process ran 40%
    slower (measured on the tiny UNet's guidance step). Counted in a fresh process: a forward and backward
    of 30,000 points with 2 torch threads adds the one helper thread and nothing else."""
    import subprocess
    import sys
    code = """
import os, torch
torch.set_num_threads(2)
from optimize3d.field import FieldConfig
from optimize3d.hashgrid_warp import FusedHashGrid
a = torch.randn(512, 512); a @ a; torch.zeros(1 << 20).add_(1)       # torch's own team is up
grid = FusedHashGrid(FieldConfig.tiny())
before = len(os.listdir("/proc/self/task"))
h, j = grid.with_jacobian(torch.rand(30000, 3)); (h.sum() + j.sum()).backward()
print(before, len(os.listdir("/proc/self/task")))
"""
    before, after = map(int, subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                            cwd=str(Path(__file__).resolve().parents[1])).stdout.split()[-2:])
    assert after == before + 1


def test_positions_that_need_a_gradient_are_refused():
    _, fused = pair(FieldConfig.tiny())
    with pytest.raises(ValueError, match="hash_implementation=torch"):
        fused(torch.rand(4, 3, requires_grad=True))


def test_auto_builds_the_fused_grid_and_checkpoints_move_between_implementations():
    assert isinstance(build_hash_grid(FieldConfig.tiny()), FusedHashGrid)
    torch.manual_seed(3)
    fused = Field(FieldConfig.tiny())
    ref = Field(FieldConfig(**{**FieldConfig.tiny().__dict__, "hash_implementation": "torch"}))
    assert type(ref.encoding) is TorchHashGrid
    ref.load_state_dict(fused.state_dict())                                   # strict: the same keys and shapes
    x = points(500) * 2 - 1
    assert torch.allclose(fused.density(x), ref.density(x), rtol=1e-4, atol=1e-4)


def test_a_shaded_training_step_with_analytic_normals_matches_the_torch_field():
    """A render with closed-form analytic normals and the orientation loss, then its gradient on every
    parameter: equal between the two implementations from the same weights."""
    fields = []
    for impl in ("torch", "fused"):
        cfg = FieldConfig(**{**FieldConfig.tiny().__dict__, "hash_implementation": impl, "normal_type": "analytic"})
        torch.manual_seed(0)
        f = Field(cfg)
        with torch.no_grad():
            f.encoding.embeddings.normal_(0, 0.5)
        fields.append(f)
    c2w = torch.tensor(np.stack([c2w_blender(az, 15.0, DISTANCE) for az in (0, 90)]), dtype=torch.float32)
    fov = torch.full((2,), FOV_DEG)
    march_cfg = MarchConfig.tiny()
    results = []
    for f in fields:
        out = render_views(f, None, c2w, fov, 16, march_cfg, mode="lambertian", lights=c2w[:, :3, 3], normals=True)
        loss = ((out["rgb"] - 0.3) ** 2).mean() + out["orientation"]
        results.append((out, torch.autograd.grad(loss, list(f.parameters()))))
    (a, ga), (b, gb) = results
    assert a["samples"] == b["samples"] > 0
    assert torch.allclose(a["rgb"], b["rgb"], atol=1e-4) and torch.allclose(a["normal"], b["normal"], atol=1e-3)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=1e-3, atol=1e-4 * float(y.abs().max()) + 1e-9)


@pytest.mark.parametrize("arch", [80, 90])
def test_the_kernels_compile_for_cuda_without_a_gpu(arch, tmp_path):
    """What CI can check of the CUDA build with no GPU: Warp's NVRTC compiles both kernels to PTX for A100 (sm_80)
    and H100 (sm_90), and the backward's scatter is a real global atomic add there (on the CPU it is a plain add,
    hence the per-thread levels)."""
    import warp as wp
    from optimize3d.hashgrid_warp import init_warp, kernels
    init_warp()
    ptx = {}
    for name, kernel in zip(("forward", "backward"), kernels(2, True)):
        (path,) = wp.compile_aot_module(kernel.module, arch=arch, module_dir=tmp_path, use_ptx=True)
        ptx[name] = path.read_text()
        assert f".target sm_{arch}" in ptx[name]
    assert "atom.global.add.f32" in ptx["backward"] or "red.global.add.f32" in ptx["backward"]
    assert "atom.global" not in ptx["forward"] and "red.global" not in ptx["forward"]   # the forward writes, once
