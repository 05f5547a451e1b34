"""The evaluation metrics on cases with known answers."""
import math

import numpy as np
import pytest
import trimesh

from optimize3d.evaluate import chamfer_distance, mask_iou, psnr, ssim, unit_box, volume_iou


def test_identical_images():
    img = np.random.default_rng(0).random((32, 32, 3))
    assert psnr(img, img) == math.inf
    assert ssim(img, img) == pytest.approx(1.0)


def test_psnr_of_a_known_error_and_ssim_falls_with_noise():
    a = np.full((16, 16, 3), 0.5)
    assert psnr(a, a + 0.1) == pytest.approx(20.0)
    noisy = np.clip(a + np.random.default_rng(1).normal(0, 0.2, a.shape), 0, 1)
    assert ssim(a, noisy) < 0.5


def test_shifted_mask_iou():
    a = np.zeros((32, 32), bool)
    a[10:20, 10:20] = True
    b = np.roll(a, 2, axis=1)
    assert mask_iou(a, b) == pytest.approx(80 / 120)
    assert mask_iou(a, a) == 1.0 and mask_iou(a, ~a) == 0.0


def test_unit_cube_against_itself_and_scaled_copies():
    cube = trimesh.creation.box(extents=[1, 1, 1])
    assert chamfer_distance(cube, cube) < 0.01
    assert volume_iou(cube, cube) == pytest.approx(1.0)
    scaled = cube.copy()
    scaled.apply_scale(3.0)
    scaled.apply_translation([5, -2, 1])
    assert volume_iou(cube, scaled) == pytest.approx(1.0)          # unit-box normalisation removes scale and offset
    assert chamfer_distance(cube, scaled) < 0.01
    flat = trimesh.creation.box(extents=[1, 1, 0.5])                 # normalised: still half the cube's volume
    # 32 of 64 voxel layers, plus the layer each face plane touches (the voxelisation keeps surface voxels)
    assert volume_iou(cube, flat) == pytest.approx(34 / 64, abs=0.005)
    assert chamfer_distance(cube, flat) > 0.05


def test_unit_box_normalisation():
    m = unit_box(trimesh.creation.box(extents=[2, 4, 1], transform=trimesh.transformations.translation_matrix([3, 3, 3])))
    assert m.extents.max() == pytest.approx(1.0) and np.allclose(m.bounds.mean(0), 0)


def alexnet_file(path, seed=0):
    """torchvision's AlexNet state dict with seeded random weights (the real file is not reachable from CI)."""
    import torch
    import torchvision
    torch.manual_seed(seed)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


def test_lpips_reads_its_backbone_from_a_local_file(tmp_path):
    import torch
    from safetensors.torch import save_file
    from optimize3d.evaluate import LPIPS
    pth = alexnet_file(tmp_path / "alexnet.pth")
    save_file(torch.load(pth, weights_only=True), str(tmp_path / "alexnet.safetensors"))
    score = LPIPS(pth)
    rng = np.random.default_rng(0)
    a = rng.random((64, 64, 3)).astype(np.float32)
    small = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    large = np.clip(a + rng.normal(0, 0.3, a.shape), 0, 1)
    assert score(a, a) == pytest.approx(0, abs=1e-7)
    assert 0 < score(a, small) < score(a, large)
    assert LPIPS(tmp_path / "alexnet.safetensors")(a, large) == pytest.approx(score(a, large), rel=1e-6)
    assert LPIPS(alexnet_file(tmp_path / "other.pth", seed=1))(a, large) != pytest.approx(score(a, large), rel=1e-3)
    with pytest.raises(FileNotFoundError, match="not a file"):
        LPIPS(tmp_path / "missing.pth")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="not torchvision's AlexNet state dict"):
        LPIPS(tmp_path / "wrong.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="unreadable"):
        LPIPS(tmp_path / "junk.pth")
