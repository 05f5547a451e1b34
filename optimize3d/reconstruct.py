"""Reconstruction: the 3D stage's field, marcher, renderer and export fitted to posed views by a
photometric loss instead of score distillation. It proves the machinery (cameras, axes, export
orientation) against ground truth, and turns any posed RGBA views into a mesh.

    python pipelines/generate.py --views OUTPUT/objects/<bb>/<uid>  # a rendered object: fits its random views
    result = reconstruct(Path(views_dir), Path("outputs/reconstruct"), ReconstructConfig.tiny())

Input: a folder in render/'s layout: cameras.json (OpenCV camera-to-world `c2w` per view, `K`, `width`,
`height`, one list of views per view set) and the RGBA views in <view set>/NNN.png. The field is fitted
to `train_set`; every other set is held out and only evaluated.
Loss per step, over `rays_per_step` rays drawn from all training pixels: MSE of the colour composited on
white + mask_weight x MSE of the opacity against the views' alpha.
Output: <out>/<folder name>-<key>/ with config.yaml, nerf/step-N/ (resumable), validation.png (per view
set, the fitted one first: 4 views as given over the field's renders at their cameras), mesh.glb,
turntable.gif, losses.jsonl, metrics.json (silhouette IoU and PSNR per view set; volume IoU against the
source mesh when meta.json names a glTF source). The key hashes the
views' bytes and every setting but `export`; the directory is built as <name>.partial/ and renamed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from PIL import Image
from tqdm import tqdm

from common.atomic import atomic_path, atomic_write_json, atomic_write_text
from common.config import config_hash, save_config, stable_seed
from optimize3d.evaluate import mask_iou, psnr, volume_iou
from optimize3d.export import Z_UP_TO_Y_UP, ExportConfig
from optimize3d.field import FieldConfig
from optimize3d.march import MarchConfig, camera_rays, step_size, update_grid
from optimize3d.export import export_outputs
from optimize3d.fieldstate import latest_nerf, load_nerf, save_nerf
from optimize3d.optimize import build_field, deterministic_algorithms, record_step, resolve_device, to_image
from optimize3d.renderer import render_rays, render_views
from optimize3d.rundir import run_dir_name, run_directory
from render.cameras import BLENDER_TO_OPENCV
from render.preview import on_white

SCHEMA_VERSION = 1
log = logging.getLogger("reconstruct")


@dataclass
class ReconstructConfig:
    nerf: FieldConfig = field(default_factory=FieldConfig)
    march: MarchConfig = field(default_factory=MarchConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    train_set: str = "auto"
    """The view set fitted; the others are held out (evaluated only). auto: `random` when the folder has it,
    else the first set in cameras.json. render/'s fixed set alone sees nothing below the object (one
    elevation, 30 deg): the visual hull of its silhouettes overlaps a box only 0.75 and a torus 0.60 (volume
    IoU), while the random set (elevations -10 to 40 deg) constrains the underside."""
    size: Optional[int] = None
    """Resize the views to size x size first (None: as stored)."""
    steps: int = 3000
    rays_per_step: int = 8192
    mask_weight: float = 1.0
    """Weight of the opacity-vs-alpha loss beside the colour loss."""
    empty_weight: float = 0.0
    """Weight of the mean alpha (at the marcher's step) of points drawn uniformly in the box: space that no
    view sees (below an object seen only from above) is taken as empty rather than kept as initialised.
    Measured (tiny, 64 px): on the fixed set alone 0.1 lifts the held-out silhouette IoU of a torus from
    0.81 to 0.90, but it also hollows what no view sees inside (a box's volume IoU 0.60 -> 0.39); off by default."""
    lr_grid: float = 0.01
    lr_mlp: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-15
    weight_decay: float = 0.0
    seed: int = 0
    deterministic: bool = False
    """torch's deterministic algorithms while fitting (GenerateConfig.deterministic)."""
    ckpt_every: int = 500
    log_every: int = 50

    @staticmethod
    def sd21() -> "ReconstructConfig":
        """The paper's field and marcher (GenerateConfig.sd21's)."""
        return ReconstructConfig()

    @staticmethod
    def tiny() -> "ReconstructConfig":
        """About a minute on a CPU for 64 px views: the tiny field, 64 samples per ray."""
        return ReconstructConfig(nerf=FieldConfig.tiny(), march=MarchConfig.tiny(),
                                 export=ExportConfig(resolution=96, threshold=10.0, turntable_frames=24, turntable_size=96),
                                 steps=400, rays_per_step=2048, ckpt_every=100, log_every=20, deterministic=True)

    def validate(self) -> None:
        if self.steps < 1 or self.rays_per_step < 1:
            raise ValueError(f"steps {self.steps} and rays_per_step {self.rays_per_step} must be at least 1")
        if self.size is not None and self.size < 8:
            raise ValueError(f"size {self.size}: at least 8 px")


class PosedViewsError(ValueError):
    pass


@dataclass
class PosedViews:
    rgb: torch.Tensor        # [N, 3, H, W] in [0, 1], composited on white
    alpha: torch.Tensor      # [N, 1, H, W] in [0, 1]
    c2w_gl: torch.Tensor     # [N, 4, 4] camera-to-world, Blender/OpenGL convention
    fov_deg: torch.Tensor    # [N]
    files: list[Path]

    @property
    def size(self) -> int:
        return self.rgb.shape[-1]


def read_cameras(folder: Path) -> dict:
    path = Path(folder) / "cameras.json"
    if not Path(folder).is_dir():
        raise PosedViewsError(f"--views {folder}: not a folder")
    try:
        cams = json.loads(path.read_text())
    except FileNotFoundError:
        raise PosedViewsError(f"--views {folder}: no cameras.json (expected render/'s layout: cameras.json + "
                              f"<view set>/NNN.png)") from None
    except ValueError as e:
        raise PosedViewsError(f"{path}: not JSON ({e})") from None
    if cams.get("convention") != "opencv":
        raise PosedViewsError(f"{path}: convention {cams.get('convention')!r}, expected 'opencv'")
    try:
        K, w, h = np.asarray(cams["K"], float), int(cams["width"]), int(cams["height"])
    except (KeyError, TypeError, ValueError):
        raise PosedViewsError(f"{path}: needs K (3x3), width and height") from None
    if K.shape != (3, 3) or w != h or abs(K[0, 0] - K[1, 1]) > 1e-6 * K[0, 0] or \
            abs(K[0, 2] - w / 2) > 1e-6 * w or abs(K[1, 2] - h / 2) > 1e-6 * h:
        raise PosedViewsError(f"{path}: K {K.tolist()} for {w}x{h}: only square images, square pixels and the "
                              f"principal point at the centre are supported")
    return cams


def view_sets(cams: dict) -> list[str]:
    return [k for k, v in cams.items() if isinstance(v, list) and v and isinstance(v[0], dict) and "c2w" in v[0]]


def load_posed_views(folder: Path, view_set: str, size: Optional[int] = None) -> PosedViews:
    """One view set of a posed-views folder (one-line PosedViewsError for anything wrong)."""
    folder = Path(folder)
    cams = read_cameras(folder)
    if view_set not in view_sets(cams):
        raise PosedViewsError(f"{folder / 'cameras.json'}: no view set {view_set!r} (has: {', '.join(view_sets(cams)) or 'none'})")
    stored = int(cams["width"])
    fov = math.degrees(2 * math.atan(stored / 2 / float(cams["K"][0][0])))
    rgb, alpha, c2w, files = [], [], [], []
    for i, view in enumerate(cams[view_set]):
        png = folder / view_set / f"{i:03d}.png"
        try:
            with Image.open(png) as img:
                has_alpha = "A" in img.getbands() or "transparency" in img.info
                img = img.convert("RGBA")
        except FileNotFoundError:
            raise PosedViewsError(f"--views {folder}: missing {view_set}/{png.name}") from None
        except Exception as e:
            raise PosedViewsError(f"--views {folder}: {view_set}/{png.name} unreadable ({type(e).__name__})") from None
        if not has_alpha:
            raise PosedViewsError(f"--views {folder}: {view_set}/{png.name} has no alpha channel (the views must be "
                                  f"RGBA: alpha is the object's silhouette)")
        if img.size != (stored, stored):
            raise PosedViewsError(f"--views {folder}: {view_set}/{png.name} is {img.size[0]}x{img.size[1]}, "
                                  f"cameras.json says {stored}x{stored}")
        if size is not None and size != stored:
            img = img.resize((size, size), Image.Resampling.LANCZOS)       # straight alpha, before compositing
        rgb.append(np.asarray(on_white(img), np.float32) / 255.0)
        alpha.append(np.asarray(img, np.float32)[..., 3:] / 255.0)
        try:
            m = np.asarray(view["c2w"], np.float64)
        except (KeyError, TypeError, ValueError):
            m = np.zeros(0)
        if m.shape != (4, 4) or not np.isfinite(m).all():
            raise PosedViewsError(f"{folder / 'cameras.json'}: {view_set}[{i}].c2w is not a finite 4x4 matrix")
        c2w.append(m @ BLENDER_TO_OPENCV)                                 # OpenCV -> OpenGL (its own inverse)
        files.append(png)
    to_t = lambda xs: torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return PosedViews(to_t(rgb), to_t(alpha), torch.tensor(np.stack(c2w), dtype=torch.float32),
                      torch.full((len(c2w),), fov), files)


def resolve_train_set(folder: Path, cfg: ReconstructConfig) -> str:
    sets = view_sets(read_cameras(folder))
    if cfg.train_set != "auto":
        return cfg.train_set
    if not sets:
        raise PosedViewsError(f"{Path(folder) / 'cameras.json'}: no view set (a list of views with c2w)")
    return "random" if "random" in sets else sets[0]


def views_digest(folder: Path, view_set: str) -> str:
    h = hashlib.sha256((Path(folder) / "cameras.json").read_bytes())
    for png in sorted((Path(folder) / view_set).glob("*.png")):
        h.update(png.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- fitting
def fit_step(cfg: ReconstructConfig, nerf, grid, opt, rays: tuple, step: int) -> dict:
    """One step on rays drawn from all training pixels (every draw a function of (seed, step))."""
    rays_o, rays_d, rgb, alpha = rays
    g = torch.Generator().manual_seed(stable_seed(cfg.seed, step))
    update_grid(grid, nerf, step, cfg.nerf.radius, cfg.march, cfg.seed)
    pick = torch.randint(0, rays_o.shape[0], (cfg.rays_per_step,), generator=g).to(rays_o.device)
    out = render_rays(nerf, grid, rays_o[pick], rays_d[pick], cfg.march, stratified=True, generator=g)
    loss_rgb = F.mse_loss(out["rgb"], rgb[pick])
    loss_mask = F.mse_loss(out["opacity"], alpha[pick])
    loss = loss_rgb + cfg.mask_weight * loss_mask
    if cfg.empty_weight > 0:
        r = cfg.nerf.radius
        points = (torch.rand(cfg.rays_per_step, 3, generator=g) * 2 - 1).to(rays_o.device) * r
        loss_empty = (1 - torch.exp(-nerf.density(points) * step_size(r, cfg.march))).mean()
        loss = loss + cfg.empty_weight * loss_empty
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"step": step + 1, "loss": float(loss.detach()), "rgb": float(loss_rgb.detach()),
            "mask": float(loss_mask.detach()), "samples": out["samples"]}


def training_rays(views: PosedViews, device) -> tuple:
    rays_o, rays_d = camera_rays(views.c2w_gl.to(device), views.fov_deg.to(device), views.size)
    flat = lambda x: x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).to(device)  # noqa: E731  (row-major, as camera_rays)
    return rays_o, rays_d, flat(views.rgb), flat(views.alpha)


@torch.no_grad()
def render_like(nerf, grid, views: PosedViews, march: MarchConfig) -> dict:
    device = next(nerf.parameters()).device
    return render_views(nerf, grid, views.c2w_gl.to(device), views.fov_deg.to(device), views.size, march,
                        ray_chunk=1 << 14)


def evaluate_sets(nerf, grid, folder: Path, cfg: ReconstructConfig) -> dict:
    """Silhouette IoU (opacity > 0.5 against alpha > 0.5) and PSNR on white, per view set."""
    out = {}
    for name in view_sets(read_cameras(folder)):
        views = load_posed_views(folder, name, cfg.size)
        r = render_like(nerf, grid, views, cfg.march)
        ious = [mask_iou(r["opacity"][i, 0].cpu().numpy() > 0.5, views.alpha[i, 0].numpy() > 0.5) for i in range(len(views.files))]
        psnrs = [psnr(r["rgb"][i].clamp(0, 1).cpu().numpy(), views.rgb[i].numpy()) for i in range(len(views.files))]
        out[name] = {"silhouette_iou": float(np.mean(ious)), "silhouette_iou_min": float(np.min(ious)),
                     "psnr": float(np.mean(psnrs)), "views": len(ious), "trained_on": name == cfg.train_set}
    return out


def source_mesh(folder: Path):
    """The source mesh of a rendered object, normalised as render/ did (meta.json's scale and offset, in
    Blender's z-up world), or None when meta.json names no glTF source that exists. Blender imports glTF
    y-up as z-up: a +90 degree turn about x."""
    meta_path = Path(folder) / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    src = Path(meta.get("source_file", ""))
    if src.suffix.lower() not in (".glb", ".gltf") or not src.is_file():
        return None
    mesh = trimesh.load(src, force="mesh")
    mesh.apply_transform(np.linalg.inv(Z_UP_TO_Y_UP))
    mesh.apply_scale(float(meta["scale"]))
    mesh.apply_translation(np.asarray(meta["offset"], float))
    return mesh


def exported_mesh_z_up(path: Path):
    """mesh.glb as written (y-up for glTF viewers) back in the field's z-up world."""
    mesh = trimesh.load(path, force="mesh")
    mesh.apply_transform(np.linalg.inv(Z_UP_TO_Y_UP))
    return mesh


def save_validation(nerf, grid, folder: Path, cfg: ReconstructConfig, path: Path, size: Optional[int] = None) -> None:
    """For the fitted set, then each held-out set: 4 of its views as rendered (ground truth) over the
    field's renders at the same cameras. size: the picture's view size (default: the views' own)."""
    from render.preview import grid as image_grid
    sets = view_sets(read_cameras(folder))
    tiles = []
    for name in [cfg.train_set] + [n for n in sets if n != cfg.train_set]:
        views = load_posed_views(folder, name, size or cfg.size)
        pick = np.linspace(0, len(views.files) - 1, 5)[:4].round().astype(int).tolist()
        sub = PosedViews(views.rgb[pick], views.alpha[pick], views.c2w_gl[pick], views.fov_deg[pick],
                         [views.files[i] for i in pick])
        r = render_like(nerf, grid, sub, cfg.march)
        tiles += [to_image(x) for x in sub.rgb] + [to_image(x) for x in r["rgb"]]
    with atomic_path(path) as tmp:
        image_grid(tiles, columns=4).save(tmp, format="PNG")


def reconstruct(folder: Path, out_root: Path, cfg: ReconstructConfig, cmd: str = "", progress: bool = True,
                device: Optional[str] = None) -> dict:
    """Fit, export and evaluate (see the module docstring). Returns a summary dict."""
    cfg.validate()
    folder = Path(folder)
    cfg = dataclasses.replace(cfg, train_set=resolve_train_set(folder, cfg))
    views = load_posed_views(folder, cfg.train_set, cfg.size)     # every check before any output
    settings = dataclasses.asdict(cfg)
    settings.pop("export")
    key = config_hash({"views": views_digest(folder, cfg.train_set), "settings": settings, "schema": SCHEMA_VERSION})
    final = Path(out_root) / run_dir_name(folder.resolve(), key)
    t0 = time.time()
    with run_directory(final, cfg.export, log, "reconstruct.log") as work:
        if work is None:
            return {"views": str(folder), "output": str(final), "status": "cached", "seconds": time.time() - t0}
        dev = resolve_device(device)
        save_config(cfg, work / "config.yaml")
        if cmd:
            atomic_write_text(work / "cmd.txt", cmd + "\n")
        nerf, grid, opt = build_field(cfg, dev)   # the 3D stage's field and optimiser, from this config
        start = 0
        if (ck := latest_nerf(work / "nerf")) is not None:
            start = load_nerf(ck, nerf, grid, opt)
            log.info("resumed from %s (step %d)", ck, start)
        if work != final:                         # else only the export settings changed
            rays = training_rays(views, dev)
            bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="fit", disable=not progress,
                       dynamic_ncols=True)
            with deterministic_algorithms(cfg.deterministic):
                for step in bar:
                    parts = fit_step(cfg, nerf, grid, opt, rays, step)
                    bar.set_postfix(rgb=f"{parts['rgb']:.3g}", mask=f"{parts['mask']:.3g}")
                    record_step(work, log, parts, cfg.log_every, cfg.steps)
                    if parts["step"] % cfg.ckpt_every == 0 or parts["step"] == cfg.steps:
                        save_nerf(work / "nerf", parts["step"], nerf, grid, opt)
            save_validation(nerf, grid, folder, cfg, work / "validation.png")
        info = export_outputs(nerf, grid, cfg.march, cfg.export, work)
        metrics = {"views": evaluate_sets(nerf, grid, folder, cfg)}
        truth = source_mesh(folder)
        if truth is not None:
            metrics["volume_iou_vs_source"] = volume_iou(exported_mesh_z_up(work / "mesh.glb"), truth, normalise=False)
        atomic_write_json(work / "metrics.json", metrics)
        log.info("exported %s; metrics %s", json.dumps(info), json.dumps(metrics))
    return {"views": str(folder), "output": str(final), "status": "ok", "seconds": time.time() - t0, **info,
            "metrics": metrics}
