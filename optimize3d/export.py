"""Export the field: marching cubes on its density -> a vertex-coloured trimesh mesh; a turntable GIF.

    mesh = extract_mesh(field, ExportConfig())          # raises EmptyMeshError with a threshold to try
    save_mesh(mesh, out / "mesh.glb")                   # .glb (default), .obj or .ply
    save_turntable(field, grid, march_cfg, out / "turntable.gif")

The field's world is z-up (Blender's); glTF is y-up, so the mesh is rotated -90 deg about x on export
and stands upright in a browser. Mesh coordinates are those of the field's box otherwise.

Colours: a mesh in memory holds display (sRGB) colours, as the renders the field learned from. glTF stores
vertex colours (COLOR_0) and baseColorFactor as *linear* values (glTF 2.0 spec; three.js, model-viewer and
Blender read them so: an unlit COLOR_0 of 128 renders as 188), so save_mesh stores sRGB -> linear in mesh.glb
and load_mesh converts any glTF's back; OBJ and PLY keep sRGB bytes, as MeshLab and other PLY readers show them.
glTF's 8-bit linear COLOR_0 (what trimesh writes) has coarser steps in the darks: a display value under
0.05 rounds to 0 or 0.05.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import trimesh

from common.atomic import atomic_path, atomic_write_bytes, atomic_write_json
from common.config import config_hash
from render.cameras import DISTANCE, FOV_DEG, c2w_blender

Z_UP_TO_Y_UP = trimesh.transformations.rotation_matrix(-math.pi / 2, [1, 0, 0])
EXPORT_SCHEMA = 2           # 2: mesh.glb's vertex colours linear, as glTF specifies (1: sRGB bytes)


@dataclass
class ExportConfig:
    resolution: int = 256
    """Marching-cubes grid points per axis over the field's box."""
    threshold: Optional[float] = 10.0
    """Density of the surface (10 to 25 for the paper's settings; too high gives an empty mesh). None (null in
    YAML and overrides): threestudio's "auto", the mean density over the grid where it exceeds 1e-5; the value
    used is written to export.json."""
    format: str = "glb"
    """glb | obj | ply: mesh.glb is always written; obj or ply in addition."""
    min_faces: int = 16
    """Fewer faces than this is a degenerate mesh (an error, not a file)."""
    turntable_frames: int = 36
    turntable_size: int = 256
    turntable_elevation: float = 20.0
    turntable_fov: float = FOV_DEG
    turntable_distance: float = DISTANCE
    turntable_format: str = "gif"
    """gif (pillow) | mp4 (needs imageio-ffmpeg)."""


class EmptyMeshError(ValueError):
    run_dir: Path | None = None
    """Set by image_to_3d.generate: the run folder the field stays in (its sampled views, its checkpoints)."""


@torch.no_grad()
def density_grid(field, resolution: int, chunk: int = 1 << 18) -> np.ndarray:
    r = field.cfg.radius
    device = next(field.parameters()).device
    axis = torch.linspace(-r, r, resolution, device=device)
    pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    sigma = torch.cat([field.density(pts[s:s + chunk]) for s in range(0, pts.shape[0], chunk)])
    return sigma.view(resolution, resolution, resolution).float().cpu().numpy()


@torch.no_grad()
def extract_mesh(field, cfg: ExportConfig) -> trimesh.Trimesh:
    """Marching cubes (scikit-image) at cfg.threshold (None: auto_threshold); vertex colours = the albedo there;
    mesh.metadata["threshold"]: the density used (export.json records it)."""
    from skimage.measure import marching_cubes
    sigma = density_grid(field, cfg.resolution)
    lo, hi = float(sigma.min()), float(sigma.max())
    threshold = cfg.threshold if cfg.threshold is not None else auto_threshold(sigma)
    if not lo < threshold < hi:
        suggestion = np.percentile(sigma, 99) * 0.5
        named = f"{cfg.threshold:g}" if cfg.threshold is not None else f"null (auto: {threshold:.3g})"
        raise EmptyMeshError(f"export.threshold={named}: no surface, the density ranges over [{lo:.3g}, {hi:.3g}]; "
                             f"try export.threshold={suggestion:.3g}")
    r = field.cfg.radius
    spacing = (2 * r / (cfg.resolution - 1),) * 3
    # Density grows inwards: "ascent" winds the faces so that their normals point outwards.
    verts, faces, _, _ = marching_cubes(sigma, level=threshold, spacing=spacing, gradient_direction="ascent")
    verts = verts - r
    if len(faces) < cfg.min_faces:
        raise EmptyMeshError(f"export.threshold={threshold:g}: degenerate mesh ({len(faces)} faces); "
                             f"lower the threshold (density ranges over [{lo:.3g}, {hi:.3g}])")
    device = next(field.parameters()).device
    albedo = field(torch.as_tensor(verts, dtype=torch.float32, device=device))[1].cpu().numpy()
    colours = np.concatenate([np.round(albedo * 255), np.full((len(verts), 1), 255)], 1).astype(np.uint8)
    mesh = trimesh.Trimesh(vertices=verts, faces=faces, vertex_colors=colours, process=False)
    mesh.metadata["threshold"] = float(threshold)
    return mesh


def auto_threshold(sigma: np.ndarray) -> float:
    """threestudio's isosurface_threshold "auto": the mean of the densities above 1e-5 (a soft field from a short
    run gets a surface at its own scale, where a fixed threshold may find none)."""
    dense = sigma[sigma > 1e-5]
    return float(dense.mean()) if dense.size else math.inf


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """The sRGB transfer function's inverse (IEC 61966-2-1), values in [0, 1]."""
    c = np.asarray(c, np.float64)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    c = np.clip(np.asarray(c, np.float64), 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)


def export_key(cfg: ExportConfig) -> str:
    """What a finished run's export.json is compared with: a changed setting or export format re-exports."""
    return config_hash({"export": cfg, "schema": EXPORT_SCHEMA})


def save_mesh(mesh: trimesh.Trimesh, path: Path) -> None:
    """Written whole under a temporary name, then renamed (y-up for glTF viewers; glTF's colours linear)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in ("glb", "obj", "ply"):
        raise ValueError(f"mesh format {fmt!r}: expected glb, obj or ply")
    out = mesh.copy()
    out.apply_transform(Z_UP_TO_Y_UP)
    if fmt == "glb" and mesh.visual.kind == "vertex":
        rgba = np.asarray(mesh.visual.vertex_colors, np.float64) / 255.0
        rgba[:, :3] = srgb_to_linear(rgba[:, :3])
        out.visual = trimesh.visual.ColorVisuals(out, vertex_colors=np.round(rgba * 255).astype(np.uint8))
    data = out.export(file_type=fmt)
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)     # OBJ comes back as text


def load_mesh(path: Path) -> trimesh.Trimesh:
    """A mesh file as one mesh whose colours are as displayed (sRGB). glTF stores vertex colours (COLOR_0) and a
    material's baseColorFactor as linear values (a texture is sRGB) and trimesh hands them over as stored; here
    each glTF primitive's colour becomes factor x COLOR_0 in sRGB, or its texture's. OBJ and PLY colours are
    taken as sRGB, as their readers show them."""
    path = Path(path)
    if path.suffix.lower() in (".glb", ".gltf"):
        scene = trimesh.load(path, force="scene")
        parts = []
        for node in scene.graph.nodes_geometry:
            transform, name = scene.graph[node]
            geometry = scene.geometry[name]
            if isinstance(geometry, trimesh.Trimesh) and len(geometry.faces):
                part = trimesh.Trimesh(geometry.vertices, geometry.faces, process=False,
                                       visual=displayed_colours(geometry))     # a copy would drop COLOR_0 here
                part.apply_transform(transform)
                parts.append(part)
        mesh = trimesh.util.concatenate(parts) if parts else trimesh.Trimesh()
    else:
        mesh = trimesh.load(path, force="mesh")
    if len(mesh.faces) == 0:
        raise ValueError(f"mesh {path}: no faces")
    return mesh


def displayed_colours(part: trimesh.Trimesh) -> trimesh.visual.ColorVisuals:
    """One glTF primitive's vertex colours as displayed (sRGB bytes): base colour factor x COLOR_0, both linear,
    or its base colour texture (sRGB) sampled at the vertices."""
    n = len(part.vertices)
    if part.visual.kind == "vertex":
        linear = np.asarray(part.visual.vertex_colors, np.float64) / 255.0
    elif part.visual.kind == "texture" and getattr(part.visual.material, "baseColorTexture", None) is not None:
        return part.visual.to_color()
    else:
        material = getattr(part.visual, "material", None)
        factor = getattr(material, "baseColorFactor", None)
        linear = np.tile(np.asarray(factor if factor is not None else [255] * 4, np.float64) / 255.0, (n, 1))
        attributes = getattr(part.visual, "vertex_attributes", {})
        if "color" in attributes and len(attributes["color"]) == n:          # COLOR_0 beside a material
            linear = linear * np.asarray(attributes["color"], np.float64) / 255.0
    linear[:, :3] = linear_to_srgb(linear[:, :3])
    return trimesh.visual.ColorVisuals(vertex_colors=np.round(linear * 255).astype(np.uint8))


def turntable_cameras(cfg: ExportConfig, frames: int | None = None) -> torch.Tensor:
    n = frames or cfg.turntable_frames
    return torch.tensor(np.stack([c2w_blender(360.0 * i / n, cfg.turntable_elevation, cfg.turntable_distance)
                                  for i in range(n)]), dtype=torch.float32)


@torch.no_grad()
def turntable_frames(field, grid, march_cfg, cfg: ExportConfig) -> list[np.ndarray]:
    """Lambertian frames lit from the camera: shape and colour are both visible."""
    from optimize3d.renderer import render_views
    device = next(field.parameters()).device
    frames = []
    for c2w in turntable_cameras(cfg).to(device):
        out = render_views(field, grid, c2w[None], torch.tensor([cfg.turntable_fov]), cfg.turntable_size, march_cfg,
                           mode="lambertian", lights=c2w[None, :3, 3] * 1.5, ambient=0.4, ray_chunk=1 << 14)
        frames.append((out["rgb"][0].permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))
    return frames


def save_turntable(frames: list[np.ndarray], path: Path, fps: int = 12) -> None:
    import imageio.v3 as iio
    path = Path(path)
    if path.suffix not in (".gif", ".mp4"):
        raise ValueError(f"turntable {path}: expected .gif or .mp4")
    with atomic_path(path) as tmp:
        if path.suffix == ".gif":
            iio.imwrite(tmp, np.stack(frames), extension=".gif", duration=int(1000 / fps), loop=0)
        else:
            iio.imwrite(tmp, np.stack(frames), extension=".mp4", fps=fps)


def export_outputs(nerf, grid, march_cfg, cfg: ExportConfig, work: Path) -> dict:
    """mesh.glb (+ cfg.format), the turntable and export.json (what a rerun compares to re-export or not)."""
    mesh = extract_mesh(nerf, cfg)
    formats = {"glb", cfg.format}          # mesh.glb always (browsers, report.html), plus the one asked for
    for fmt in formats:
        save_mesh(mesh, work / f"mesh.{fmt}")
    for stale in work.glob("mesh.*"):              # a format asked for by an earlier export
        if stale.suffix.lstrip(".") not in formats:
            stale.unlink()
    frames = turntable_frames(nerf, grid, march_cfg, cfg)
    save_turntable(frames, work / f"turntable.{cfg.turntable_format}")
    info = {"vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces)),
            "watertight": bool(mesh.is_watertight), "threshold": mesh.metadata["threshold"], "export_key": export_key(cfg)}
    atomic_write_json(work / "export.json", info)
    return info
