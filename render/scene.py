"""Everything that touches bpy: reset, import, normalise, HDRI world, render settings, views.

Runs only inside a worker process (render/worker.py), one object per process, main thread only.
"""
from __future__ import annotations

import glob
import math
import os
from pathlib import Path

import bpy
import numpy as np
from mathutils import Matrix

GEOMETRY_TYPES = {"MESH", "CURVE", "SURFACE", "META", "FONT"}


class SceneError(RuntimeError):
    """An object that cannot be rendered; `reason` is its manifest class."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def reset() -> None:
    """A factory-empty scene (no cube, camera or light) with script auto-execution off."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.context.preferences.filepaths.use_scripts_auto_execute = False


def import_object(path: Path) -> None:
    suffix = path.suffix.lower()
    ops = {
        ".glb": lambda p: bpy.ops.import_scene.gltf(filepath=p),
        ".gltf": lambda p: bpy.ops.import_scene.gltf(filepath=p),
        ".obj": lambda p: bpy.ops.wm.obj_import(filepath=p),
        ".fbx": lambda p: bpy.ops.import_scene.fbx(filepath=p),
        ".ply": lambda p: bpy.ops.wm.ply_import(filepath=p),
        ".stl": lambda p: bpy.ops.wm.stl_import(filepath=p),
    }
    if suffix not in ops:
        raise SceneError("unreadable", f"{path.name}: unsupported format {suffix!r}")
    try:
        result = ops[suffix](str(path))
    except Exception as e:  # importers raise RuntimeError with the add-on's message
        raise SceneError("import_error", f"{path.name}: import failed: {str(e).strip().splitlines()[-1]}") from None
    if "FINISHED" not in result:
        raise SceneError("import_error", f"{path.name}: importer returned {sorted(result)}")


def _geometry_objects() -> list:
    return [o for o in bpy.context.scene.objects if o.type in GEOMETRY_TYPES and not o.hide_render]


def _world_vertices(obj, depsgraph) -> np.ndarray:
    """Vertices after modifiers, armatures and shape keys, in world space."""
    evaluated = obj.evaluated_get(depsgraph)
    mesh = evaluated.to_mesh()
    try:
        co = np.empty(len(mesh.vertices) * 3, dtype=np.float64)
        mesh.vertices.foreach_get("co", co)
        co = co.reshape(-1, 3)
    finally:
        evaluated.to_mesh_clear()
    m = np.array(evaluated.matrix_world)
    return co @ m[:3, :3].T + m[:3, 3]


def remove_nonfinite_vertices() -> int:
    """Delete vertices with NaN/inf coordinates (Cycles' BVH does not survive them)."""
    import bmesh
    removed = 0
    for obj in bpy.context.scene.objects:
        if obj.type != "MESH":
            continue
        me = obj.data
        co = np.empty(len(me.vertices) * 3, dtype=np.float32)
        me.vertices.foreach_get("co", co)
        bad = ~np.isfinite(co.reshape(-1, 3)).all(1)
        if bad.any():
            bm = bmesh.new()
            bm.from_mesh(me)
            bm.verts.ensure_lookup_table()
            bmesh.ops.delete(bm, geom=[bm.verts[i] for i in np.flatnonzero(bad)], context="VERTS")
            bm.to_mesh(me)
            bm.free()
            removed += int(bad.sum())
    return removed


def normalise(mode: str = "cube") -> dict:
    """Scale and centre the whole scene into the unit cube [-0.5, 0.5]^3: its bounding box's longest
    side becomes 1 (mode "cube"), or its bounding sphere about the box centre gets diameter 1 ("sphere").

    Every root object is parented under one empty first, so that multi-root scenes move as one
    (scaling one root only is a known bug of several peer scripts).
    """
    scene = bpy.context.scene
    scene.frame_set(scene.frame_start)   # animated/rigged objects: normalise the frame we render
    geometry = _geometry_objects()
    if not geometry:
        raise SceneError("empty_scene", "the file has no mesh, curve or surface object")
    depsgraph = bpy.context.evaluated_depsgraph_get()
    points = [_world_vertices(o, depsgraph) for o in geometry]
    points = np.concatenate([p for p in points if len(p)] or [np.zeros((0, 3))])
    points = points[np.isfinite(points).all(1)]
    if len(points) == 0:
        raise SceneError("empty_scene", "the scene's meshes have no (finite) vertices")
    lo, hi = points.min(0), points.max(0)
    centre = (lo + hi) / 2
    extent = float((hi - lo).max()) if mode == "cube" else 2 * float(np.linalg.norm(points - centre, axis=1).max())
    if not extent > 0:
        raise SceneError("empty_scene", "the scene's geometry has zero extent")
    scale = 1.0 / extent
    offset = -centre * scale

    root = bpy.data.objects.new("normalise_root", None)
    scene.collection.objects.link(root)
    for obj in list(scene.objects):
        if obj.parent is None and obj is not root:
            world = obj.matrix_world.copy()
            obj.parent = root
            obj.matrix_world = world
    root.scale = (scale, scale, scale)
    root.location = tuple(offset)
    bpy.context.view_layer.update()
    return {"bbox_min": lo.tolist(), "bbox_max": hi.tolist(), "scale": scale, "offset": offset.tolist()}


def normalised_bbox() -> tuple[list[float], list[float]]:
    """World bounding box of the geometry as rendered (for checks and meta.json)."""
    depsgraph = bpy.context.evaluated_depsgraph_get()
    points = np.concatenate([_world_vertices(o, depsgraph) for o in _geometry_objects()])
    points = points[np.isfinite(points).all(1)]
    return points.min(0).tolist(), points.max(0).tolist()


def missing_images() -> list[str]:
    """Image textures whose data could not be loaded (rendered as Blender's pink)."""
    missing = []
    for img in bpy.data.images:
        if img.source == "FILE" and img.packed_file is None and not img.has_data:
            try:
                img.pixels[0]  # forces a load attempt
            except Exception:
                pass
            if not img.has_data:
                missing.append(img.filepath or img.name)
    return missing


def bundled_hdris() -> list[Path]:
    """Blender's own world HDRIs (CC0), shipped inside bpy: city, courtyard, forest, ..."""
    folder = bpy.utils.system_resource("DATAFILES", path="studiolights/world")
    files = sorted(Path(p) for p in glob.glob(os.path.join(folder, "*.exr")))
    if not files:
        raise RuntimeError(f"no bundled HDRIs found in {folder}")
    return files


def mean_luminance(image) -> float:
    px = np.empty(image.size[0] * image.size[1] * image.channels, dtype=np.float32)
    image.pixels.foreach_get(px)
    px = px.reshape(-1, image.channels)[:, :3]
    return float((px @ np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)).mean())


def setup_world(hdri: Path, rotation_deg: float, target_luminance: float) -> dict:
    """HDRI environment lighting; its strength is set so its mean luminance is `target_luminance`."""
    world = bpy.data.worlds.new("hdri")
    bpy.context.scene.world = world
    world.use_nodes = True
    nodes, links = world.node_tree.nodes, world.node_tree.links
    nodes.clear()
    coords = nodes.new("ShaderNodeTexCoord")
    mapping = nodes.new("ShaderNodeMapping")
    env = nodes.new("ShaderNodeTexEnvironment")
    background = nodes.new("ShaderNodeBackground")
    output = nodes.new("ShaderNodeOutputWorld")
    env.image = bpy.data.images.load(str(hdri), check_existing=True)
    mapping.inputs["Rotation"].default_value = (0.0, 0.0, math.radians(rotation_deg))
    luminance = mean_luminance(env.image)
    strength = target_luminance / max(luminance, 1e-6)
    background.inputs["Strength"].default_value = strength
    links.new(coords.outputs["Generated"], mapping.inputs["Vector"])
    links.new(mapping.outputs["Vector"], env.inputs["Vector"])
    links.new(env.outputs["Color"], background.inputs["Color"])
    links.new(background.outputs["Background"], output.inputs["Surface"])
    return {"name": hdri.stem, "rotation_deg": rotation_deg, "strength": strength,
            "mean_luminance": luminance, "target_luminance": target_luminance}


def setup_render(resolution: int, samples: int, denoiser: str, device: str, threads: int,
                 adaptive_threshold: float = 0.0, min_samples: int = 0) -> None:
    """Cycles, transparent film, Standard view transform, RGBA 8-bit PNG; nothing left at default.
    adaptive_threshold > 0: adaptive sampling, `samples` the most and `min_samples` (at most `samples`) the
    fewest per pixel."""
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.render.resolution_x = scene.render.resolution_y = resolution
    scene.render.resolution_percentage = 100
    scene.render.film_transparent = True
    scene.render.use_persistent_data = True   # the biggest speed lever for many views of one scene
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGBA"
    scene.render.image_settings.color_depth = "8"
    scene.view_settings.view_transform = "Standard"   # AgX would grey a white background
    scene.view_settings.look = "None"
    scene.view_settings.exposure = 0.0
    scene.view_settings.gamma = 1.0
    cycles = scene.cycles
    cycles.samples = samples
    cycles.use_adaptive_sampling = adaptive_threshold > 0
    cycles.adaptive_threshold = adaptive_threshold
    cycles.adaptive_min_samples = min(min_samples, samples)
    cycles.max_bounces = 4
    cycles.use_denoising = denoiser != "none"
    if denoiser != "none":
        cycles.denoiser = "OPENIMAGEDENOISE"
        cycles.denoising_quality = denoiser.upper()
    if threads > 0:
        scene.render.threads_mode = "FIXED"
        scene.render.threads = threads
    if device == "cpu":
        cycles.device = "CPU"
    else:
        prefs = bpy.context.preferences.addons["cycles"].preferences
        prefs.compute_device_type = device.upper()
        prefs.get_devices()
        gpus = [d for d in prefs.devices if d.type == device.upper()]
        if not gpus:
            raise RuntimeError(f"Cycles found no {device.upper()} device")
        for d in prefs.devices:
            d.use = d.type == device.upper()
        cycles.device = "GPU"


def add_camera(lens_mm: float, sensor_mm: float):
    data = bpy.data.cameras.new("camera")
    data.lens, data.sensor_width, data.sensor_fit = lens_mm, sensor_mm, "HORIZONTAL"
    data.clip_start, data.clip_end = 0.01, 100.0
    camera = bpy.data.objects.new("camera", data)
    bpy.context.scene.collection.objects.link(camera)
    bpy.context.scene.camera = camera
    return camera


def render_view(camera, c2w_blender: np.ndarray, path: Path) -> None:
    camera.matrix_world = Matrix(c2w_blender.tolist())
    bpy.context.scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)
