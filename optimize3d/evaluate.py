"""Evaluation of a generation run against a rendered ground-truth object (FACTS.md conventions).

    metrics = evaluate_run(run_dir, gt_object_dir, gt_mesh_path)      # also writes run_dir/metrics.json
    python -m optimize3d.evaluate RUN_DIR GT_OBJECT_DIR GT_MESH

2D stage: PSNR and SSIM of the 4 sampled views (multiview/, azimuths 0/90/180/270 at the preview
elevation) against the fixed-set ground-truth views at the same cameras, on white, at the model's size.
comparison.png: the ground truth, the sampled views and the NeRF's renders at azimuths 0/90/180/270.
3D stage: PSNR, SSIM and silhouette IoU of the NeRF's renders at the 16 fixed-set cameras; Chamfer
distance and volume IoU (64^3) between the exported mesh and the ground-truth mesh, both normalised
into the unit box (centred on their bounding box, largest extent 1); colour_error: the largest RGB
difference (0-1) between the two meshes' area-weighted mean colours (the export's albedo vs the source's), both
as displayed: sRGB, glTF's linear vertex colours and colour factors converted (export.load_mesh).
Chamfer distance here = (mean nearest distance mesh->gt + mean gt->mesh) / 2, from 20,000 surface
samples each. The run's az = 0 is the input view: the input must be the fixed view 0 of the object
(azimuth 0), or the ground truth would need rotating first.
"""
from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import trimesh
from PIL import Image

from common.atomic import atomic_write_bytes, atomic_write_json
from optimize3d.export import load_mesh
from render.preview import on_white

SURFACE_SAMPLES = 20_000
METRICS_VERSION = 2         # 2: colour_error compares displayed (sRGB) colours; glTF's linear ones are converted
VOLUME_RESOLUTION = 64


# ---------------------------------------------------------------------------- metrics
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Images in [0, 1]; identical images give inf."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else -10 * math.log10(mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """[H, W, 3] in [0, 1] (scikit-image's SSIM, Gaussian-free 7x7 windows)."""
    from skimage.metrics import structural_similarity
    return float(structural_similarity(np.asarray(a, np.float64), np.asarray(b, np.float64), channel_axis=-1,
                                       data_range=1.0, win_size=min(7, min(a.shape[:2]) // 2 * 2 - 1)))


class LPIPS:
    """LPIPS (Zhang et al. 2018) with the lpips package's v0.1 linear layers (shipped with it) over an AlexNet
    backbone read from a local file: torchvision's alexnet-owt-7be5be79.pth (loaded with weights_only=True:
    tensors only, no code) or a .safetensors file of the same state dict. Nothing is downloaded.

        score = LPIPS(Path("alexnet-owt-7be5be79.pth"))(image_a, image_b)   # [H, W, 3] in [0, 1]; lower is closer
    """
    # torchvision's alexnet.features indices -> the lpips network's five slices
    SLICES = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}

    def __init__(self, backbone: Path):
        import warnings

        import lpips
        from safetensors.torch import load_file
        backbone = Path(backbone)
        if not backbone.is_file():
            raise FileNotFoundError(f"LPIPS backbone {backbone}: not a file")
        try:
            state = load_file(str(backbone)) if backbone.suffix == ".safetensors" else torch.load(
                backbone, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (a torch file that is not a plain state dict, or not a torch file)
            raise ValueError(f"LPIPS backbone {backbone}: unreadable as a state dict ({type(e).__name__})") from None
        if not isinstance(state, dict):
            raise ValueError(f"LPIPS backbone {backbone}: not a state dict")
        with warnings.catch_warnings():          # lpips 0.1.4 still passes torchvision's deprecated `pretrained`
            warnings.simplefilter("ignore", UserWarning)
            self.model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
        mapped = {f"net.slice{self.SLICES[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v
                  for k, v in state.items() if k.startswith("features.")}
        expected = {k for k in self.model.state_dict() if k.startswith("net.")}
        if set(mapped) != expected:
            raise ValueError(f"LPIPS backbone {backbone}: not torchvision's AlexNet state dict "
                             f"({len(set(mapped) & expected)} of its {len(expected)} feature tensors found)")
        self.model.load_state_dict(mapped, strict=False)

    @torch.no_grad()
    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        to = lambda x: torch.as_tensor(np.asarray(x, np.float32)).permute(2, 0, 1)[None]  # noqa: E731
        return float(self.model(to(a), to(b), normalize=True).reshape(()))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def unit_box(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Centred on its bounding box, largest extent 1."""
    out = mesh.copy()
    lo, hi = out.bounds
    out.apply_translation(-(lo + hi) / 2)
    out.apply_scale(1.0 / float((hi - lo).max()))
    return out


def chamfer_distance(a: trimesh.Trimesh, b: trimesh.Trimesh, samples: int = SURFACE_SAMPLES, seed: int = 0) -> float:
    from scipy.spatial import cKDTree
    a, b = unit_box(a), unit_box(b)
    pa = trimesh.sample.sample_surface(a, samples, seed=seed)[0]
    pb = trimesh.sample.sample_surface(b, samples, seed=seed + 1)[0]
    return float((cKDTree(pb).query(pa)[0].mean() + cKDTree(pa).query(pb)[0].mean()) / 2)


def volume_iou(a: trimesh.Trimesh, b: trimesh.Trimesh, resolution: int = VOLUME_RESOLUTION, normalise: bool = True) -> float:
    """IoU of the filled voxelisations at resolution^3 over the unit box [-0.5, 0.5]^3 (trimesh's
    voxelisation keeps every voxel the surface touches: a little conservative, equally for both).
    normalise=True: each mesh first centred and scaled into the box (unit_box), so only shape counts;
    False: the meshes as they are (already in the box): position, orientation and size count too."""
    centres = (np.indices((resolution,) * 3).reshape(3, -1).T + 0.5) / resolution - 0.5

    def filled(mesh):
        return mesh.voxelized(pitch=1.0 / resolution).fill().is_filled(centres)
    if normalise:
        a, b = unit_box(a), unit_box(b)
    return mask_iou(filled(a), filled(b))


def mean_colour(mesh: trimesh.Trimesh) -> np.ndarray:
    """The surface's mean colour, RGB in [0, 1] as stored (sRGB for the demo's glTFs and the exports), weighted
    by area: face colours, vertex colours, or a texture sampled at the vertices (trimesh's to_color)."""
    if mesh.visual.kind == "face":
        colours = np.asarray(mesh.visual.face_colors, np.float64)[:, :3] / 255.0
    else:
        visual = mesh.visual.to_color() if mesh.visual.kind == "texture" else mesh.visual
        colours = np.asarray(visual.vertex_colors, np.float64)[mesh.faces, :3].mean(1) / 255.0
    area = mesh.area_faces
    return (colours * area[:, None]).sum(0) / max(area.sum(), 1e-12)


# ---------------------------------------------------------------------------- a run
def _gt_view(obj, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-set ground-truth view: rgb on white [H, W, 3] in [0, 1], silhouette (alpha > 0.5)."""
    img = obj.rgba("fixed", index, size)
    return np.asarray(on_white(img), np.float32) / 255.0, np.asarray(img, np.float32)[..., 3] / 255.0 > 0.5


@torch.no_grad()
def render_fixed_views(run_dir: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The run's NeRF at the 16 fixed-set cameras -> rgb [16, H, W, 3], opacity [16, H, W]."""
    from common.config import load_config
    from optimize3d.config import GenerateConfig
    from optimize3d.fieldstate import latest_nerf, load_nerf
    from optimize3d.optimize import build_field
    from optimize3d.renderer import render_views
    from render.cameras import DISTANCE, FOV_DEG, c2w_blender, fixed_angles
    cfg = load_config(GenerateConfig, run_dir / "config.yaml")
    nerf, grid, _ = build_field(cfg, torch.device("cpu"))
    load_nerf(latest_nerf(run_dir / "nerf"), nerf, grid)
    c2w = torch.tensor(np.stack([c2w_blender(az, el, DISTANCE) for az, el in fixed_angles()]), dtype=torch.float32)
    fov = torch.full((len(c2w),), FOV_DEG)
    out = render_views(nerf, grid, c2w, fov, size, cfg.march, ray_chunk=1 << 14)
    return out["rgb"].permute(0, 2, 3, 1).clamp(0, 1).numpy(), out["opacity"][:, 0].numpy()


def sampled_view_pairs(run_dir: Path, obj) -> list[tuple[np.ndarray, np.ndarray]]:
    """The run's 4 sampled views (multiview/) with the object's fixed views 0, 4, 8, 12 (azimuths 0, 90,
    180, 270) at their size: [(sampled, truth)], RGB on white in [0, 1]."""
    views = sorted((Path(run_dir) / "multiview").glob("*.png"))
    if len(views) != 4:
        raise FileNotFoundError(f"run {run_dir}: expected 4 sampled views in multiview/, found {len(views)}")
    size = Image.open(views[0]).size[0]
    return [(np.asarray(Image.open(v).convert("RGB"), np.float32) / 255.0, _gt_view(obj, 4 * i, size)[0])
            for i, v in enumerate(views)]


def sample_metrics(pairs: list[tuple[np.ndarray, np.ndarray]], lpips: LPIPS | None = None) -> dict:
    """The 2D stage's metrics from sampled_view_pairs (with LPIPS when a scorer is given)."""
    out = {"psnr": float(np.mean([psnr(a, b) for a, b in pairs])), "ssim": float(np.mean([ssim(a, b) for a, b in pairs])),
           "views": len(pairs), "size": int(pairs[0][0].shape[0])}
    if lpips is not None:
        out["lpips"] = float(np.mean([lpips(a, b) for a, b in pairs]))
    return out


def evaluate_run(run_dir: Path, gt_object_dir: Path, gt_mesh: Path | None, size: int | None = None,
                 lpips: LPIPS | None = None) -> dict:
    """gt_mesh None (no source mesh at hand): the mesh metrics (chamfer, volume_iou, colour_error) are left out;
    lpips (an LPIPS scorer): LPIPS of the sampled views and of the NeRF's renders too."""
    from dataset.views import RenderedObject
    run_dir, gt_object_dir = Path(run_dir), Path(gt_object_dir)
    obj = RenderedObject.open(gt_object_dir)
    pairs2d = sampled_view_pairs(run_dir, obj)
    size2d = pairs2d[0][0].shape[0]
    size3d = size or size2d
    rgb, opacity = render_fixed_views(run_dir, size3d)
    gt = [_gt_view(obj, i, size3d) for i in range(len(rgb))]
    if not (run_dir / "mesh.glb").is_file():
        raise FileNotFoundError(f"run {run_dir}: no mesh.glb (the export failed or has not run)")
    mesh = load_mesh(run_dir / "mesh.glb")
    truth = load_mesh(Path(gt_mesh)) if gt_mesh is not None else None
    metrics = {
        "2d": sample_metrics(pairs2d, lpips),
        "3d": {"psnr": float(np.mean([psnr(rgb[i], gt[i][0]) for i in range(len(rgb))])),
               "ssim": float(np.mean([ssim(rgb[i], gt[i][0]) for i in range(len(rgb))])),
               "silhouette_iou": float(np.mean([mask_iou(opacity[i] > 0.5, gt[i][1]) for i in range(len(rgb))])),
               "mean_colour": mean_colour(mesh).round(4).tolist(), "views": len(rgb), "size": size3d},
        "ground_truth": {"object": str(gt_object_dir), "mesh": None if gt_mesh is None else str(gt_mesh)},
        "scored": scored_mesh(run_dir),
    }
    if lpips is not None:
        metrics["3d"]["lpips"] = float(np.mean([lpips(rgb[i], gt[i][0]) for i in range(len(rgb))]))
    if truth is not None:
        metrics["3d"].update(chamfer=chamfer_distance(mesh, truth), volume_iou=volume_iou(mesh, truth),
                             colour_error=float(np.abs(mean_colour(mesh) - mean_colour(truth)).max()))
    save_comparison(run_dir / "comparison.png", [gt[i][0] for i in (0, 4, 8, 12)], [a for a, _ in pairs2d],
                    [rgb[i] for i in (0, 4, 8, 12)])
    atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics


def scored_mesh(run_dir: Path) -> dict:
    """What a run's metrics.json was computed from: these metrics' version and the export that made mesh.glb.
    Metrics whose record differs from the run's now (a re-export, a changed metric) are stale."""
    export = Path(run_dir) / "export.json"
    return {"metrics_version": METRICS_VERSION,
            "export_key": json.loads(export.read_text()).get("export_key") if export.is_file() else None}


def save_comparison(path: Path, *rows: list) -> None:
    """Rows of [H, W, 3] images in [0, 1] (any sizes: each is shown at the largest) as one PNG."""
    from render.preview import grid
    size = max(img.shape[0] for row in rows for img in row)
    tiles = [Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).resize((size, size), Image.NEAREST)
             for row in rows for img in row]
    buf = io.BytesIO()
    grid(tiles, columns=len(rows[0])).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


if __name__ == "__main__":
    print(json.dumps(evaluate_run(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])), indent=1))
