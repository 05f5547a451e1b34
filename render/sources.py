"""Where objects come from: Objaverse (through the `objaverse` package), a local folder, or `demo`.

Every source yields `ObjectRef(uid, original_id, locator, source)`. `uid` is safe as a path
component; `locator` is what `resolve()` turns into a local file, inside the Ray worker that renders it
(so Objaverse downloads happen in parallel, on the node that renders). For Objaverse the locator is the
file's path in the repository, from its path index read once per run; annotations are read once per
run too (`objaverse_annotations`), by the driver, for the objects it is about to render.

    refs = list_objects("demo", cache_dir)          # built-in procedural set, made with trimesh
    refs = list_objects("/data/models", cache_dir)  # a folder of GLB/glTF/OBJ/FBX/PLY/STL
    refs = list_objects("objaverse", cache_dir, lvis_categories=["chair"], limit=100)
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.atomic import atomic_path

SUPPORTED_SUFFIXES = (".glb", ".gltf", ".obj", ".fbx", ".ply", ".stl")
MAX_UID_LEN = 96
DEMO_COUNT = 12
DEMO_VERSION = 2  # bump when the generated objects change: it is part of their uids
OBJAVERSE_URL = "https://huggingface.co/datasets/allenai/objaverse/resolve/main"
ANNOTATION_FIELDS = ("name", "license", "uri", "user", "tags")
DOWNLOAD_TIMEOUT_S = 60.0
"""A download fails when the server sends nothing for this long (connect or any read)."""
DOWNLOAD_ATTEMPTS = 3
"""Tries per file (1 s, then 2 s between them) before its object fails with the reason."""
DEMO_SHAPES = ("box", "sphere", "cylinder", "cone", "capsule", "torus", "table", "snowman")


class SourceError(ValueError):
    pass


@dataclass(frozen=True)
class ObjectRef:
    uid: str           # sanitised, used as the folder name
    original_id: str   # what the source calls it (kept in meta.json)
    locator: str       # local path, or an Objaverse uid
    source: str        # "demo" | "folder" | "objaverse"


def sanitize_uid(original: str) -> str:
    """A path-safe id: [A-Za-z0-9._-] only, no leading dots, bounded length, collision-safe.

    An id that had to change (or is too long) gets a short hash of the original appended, so two
    different ids never map to the same folder.
    """
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", original).strip("._-")
    cleaned = re.sub(r"\.{2,}", "_", cleaned)
    if cleaned == original and 0 < len(cleaned) <= MAX_UID_LEN:
        return cleaned
    digest = hashlib.sha256(original.encode("utf-8")).hexdigest()[:10]
    return f"{cleaned[:MAX_UID_LEN - 11]}-{digest}" if cleaned else f"id-{digest}"


def list_objects(source: str, cache_dir: Path, *, seed: int = 0, demo_count: int = DEMO_COUNT,
                 uids: list[str] | None = None, lvis_categories: list[str] | None = None,
                 objaverse_dir: str | None = None, limit: int | None = None) -> list[ObjectRef]:
    """All objects of a source, sorted by uid (limit applied by the caller after sharding)."""
    if source == "demo":
        refs = demo_objects(Path(cache_dir) / "demo", count=demo_count, seed=seed)
    elif source == "objaverse":
        refs = objaverse_objects(uids=uids, lvis_categories=lvis_categories, objaverse_dir=objaverse_dir)
    else:
        refs = folder_objects(Path(source))
    seen: dict[str, str] = {}
    for r in refs:
        if r.uid in seen:
            raise SourceError(f"source {source}: ids {seen[r.uid]!r} and {r.original_id!r} map to the same uid {r.uid!r}")
        seen[r.uid] = r.original_id
    return sorted(refs, key=lambda r: r.uid)


def folder_objects(root: Path) -> list[ObjectRef]:
    """Every file under `root` whose suffix Blender imports; id = path relative to root."""
    if not root.is_dir():
        raise SourceError(f"--source {root}: not a directory (and not 'objaverse' or 'demo')")
    refs = []
    # Not only regular files: a broken symlink or a pipe is still an object the user asked for,
    # and the worker classifies it (unreadable, timeout) instead of it silently vanishing.
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in SUPPORTED_SUFFIXES and not path.is_dir():
            rel = path.relative_to(root).as_posix()
            refs.append(ObjectRef(sanitize_uid(rel), rel, str(path), "folder"))
    if not refs:
        raise SourceError(f"--source {root}: no {'/'.join(s[1:] for s in SUPPORTED_SUFFIXES)} files found")
    return refs


# --------------------------------------------------------------------------- objaverse

def _objaverse(objaverse_dir: str | None):
    import objaverse
    if objaverse_dir is not None:
        # objaverse reads its root at import time; this attribute is what its loaders use.
        objaverse._VERSIONED_PATH = str(Path(objaverse_dir).expanduser() / "hf-objaverse-v1")
    return objaverse


def objaverse_objects(uids: list[str] | None = None, lvis_categories: list[str] | None = None,
                      objaverse_dir: str | None = None) -> list[ObjectRef]:
    """Objaverse's objects, each with its file's path in the repository as the locator: the 800k-entry
    path index is read once here, never per object (objaverse.load_objects re-reads it at every call)."""
    objaverse = _objaverse(objaverse_dir)
    paths = objaverse._load_object_paths()    # the package's own index reader (load_uids is its keys)
    available = list(paths)
    if lvis_categories:
        lvis = objaverse.load_lvis_annotations()
        unknown = [c for c in lvis_categories if c not in lvis]
        if unknown:
            raise SourceError(f"--lvis-categories: unknown LVIS categories {unknown}")
        wanted = {u for c in lvis_categories for u in lvis[c]}
        available = [u for u in available if u in wanted]
    if uids:
        known = set(available)
        missing = [u for u in uids if u not in known]
        if missing:
            raise SourceError(f"--uids: {len(missing)} ids not in Objaverse (or not in the categories), e.g. {missing[:3]}")
        available = list(uids)
    return [ObjectRef(sanitize_uid(u), u, paths[u], "objaverse") for u in available]


def objaverse_url() -> str:
    """Where Objaverse's files are fetched from (the package's own source); ISO3D_OBJAVERSE_URL for a mirror."""
    return os.environ.get("ISO3D_OBJAVERSE_URL", OBJAVERSE_URL).rstrip("/")


def _fetch(rel: str, local: Path, timeout_s: float = DOWNLOAD_TIMEOUT_S, attempts: int = DOWNLOAD_ATTEMPTS) -> None:
    """One file of the Objaverse repository into the package's cache layout (a temporary name, then renamed),
    as objaverse's own downloader does, without its glob over every downloaded file after each download
    (quadratic over a run of 800k objects). A stalled server times out; a failed try is retried; the last
    failure is a SourceError naming the URL."""
    url = f"{objaverse_url()}/{rel}"
    for attempt in range(attempts):
        try:
            with atomic_path(local) as tmp, urllib.request.urlopen(url, timeout=timeout_s) as response, \
                    open(tmp, "wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
            return
        except (urllib.error.URLError, OSError) as e:      # HTTPError, refused, reset, timeouts
            reason = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
            if attempt + 1 < attempts:
                time.sleep(2 ** attempt)
    raise SourceError(f"download {url}: failed {attempts} times, last: {reason}")


def _in_cache(objaverse_dir: str | None, rel: str) -> Path:
    base = Path(_objaverse(objaverse_dir)._VERSIONED_PATH).resolve()
    local = (base / rel).resolve()
    if not local.is_relative_to(base):
        raise SourceError(f"object path {rel!r} leaves the Objaverse cache")
    return local


def resolve(ref: ObjectRef, objaverse_dir: str | None = None) -> Path:
    """Local file of an object; an Objaverse object is fetched into the package's cache if it is not there."""
    if ref.source != "objaverse":
        return Path(ref.locator)
    local = _in_cache(objaverse_dir, ref.locator)
    if not local.exists():
        _fetch(ref.locator, local)
    return local


def objaverse_annotations(refs: list[ObjectRef], objaverse_dir: str | None = None) -> dict[str, dict]:
    """{uid: name, license, uri, user, tags} of Objaverse objects, for their meta.json: each metadata file
    (one per repository folder, ~5k objects) read once per call, fetched first if missing. An unreadable
    file gives its objects {"error": ...}: annotations are nice to have, the render does not need them."""
    by_dir: dict[str, list[ObjectRef]] = {}
    for r in refs:
        if r.source == "objaverse":
            by_dir.setdefault(r.locator.split("/")[1], []).append(r)
    out = {}
    for folder, group in sorted(by_dir.items()):
        rel = f"metadata/{folder}.json.gz"
        try:
            local = _in_cache(objaverse_dir, rel)
            if not local.exists():
                _fetch(rel, local)
            with gzip.open(local, "rt") as f:
                data = json.load(f)
            for r in group:
                ann = data.get(r.original_id, {})
                out[r.uid] = {k: ann[k] for k in ANNOTATION_FIELDS if k in ann}
        except Exception as e:
            out.update({r.uid: {"error": f"annotations unavailable: {type(e).__name__}: {e}"} for r in group})
    return out


# --------------------------------------------------------------------------- demo

def demo_objects(out_dir: Path, count: int = DEMO_COUNT, seed: int = 0) -> list[ObjectRef]:
    """Procedural primitives with random colours or textures, written once as GLB (deterministic)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    refs = []
    for i in range(count):
        shape = DEMO_SHAPES[i % len(DEMO_SHAPES)]
        uid = f"demo{DEMO_VERSION}-{seed}-{i:03d}-{shape}"
        path = out_dir / f"{uid}.glb"
        if not path.exists():
            import trimesh

            from common.atomic import atomic_write_bytes
            mesh = make_demo_mesh(shape, np.random.default_rng([seed, i]))
            # glTF is y-up (Blender's importer turns it back to z-up): rotate -90 deg about x first.
            mesh.apply_transform(trimesh.transformations.rotation_matrix(-np.pi / 2, [1, 0, 0]))
            atomic_write_bytes(path, mesh.export(file_type="glb"))
        refs.append(ObjectRef(uid, uid, str(path), "demo"))
    return refs


def make_demo_mesh(shape: str, rng: np.random.Generator):
    """One demo object as a trimesh.Trimesh: random proportions, colour or stripe texture."""
    import trimesh
    from trimesh import creation

    s = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    if shape == "box":
        mesh = creation.box(extents=[s(0.4, 1.0), s(0.4, 1.0), s(0.4, 1.0)])
    elif shape == "sphere":
        mesh = creation.icosphere(subdivisions=3, radius=0.5)
        mesh.apply_scale([s(0.7, 1.0), s(0.7, 1.0), s(0.7, 1.0)])
    elif shape == "cylinder":
        mesh = creation.cylinder(radius=s(0.2, 0.5), height=s(0.5, 1.0), sections=48)
    elif shape == "cone":
        mesh = creation.cone(radius=s(0.3, 0.5), height=s(0.6, 1.0), sections=48)
    elif shape == "capsule":
        mesh = creation.capsule(height=s(0.3, 0.7), radius=s(0.15, 0.3), count=[24, 24])
    elif shape == "torus":
        mesh = creation.torus(major_radius=s(0.3, 0.4), minor_radius=s(0.08, 0.15))
    elif shape == "table":
        top = creation.box(extents=[s(0.8, 1.0), s(0.5, 0.8), 0.08])
        top.apply_translation([0, 0, 0.5])
        legs = [creation.cylinder(radius=0.04, height=0.5) for _ in range(4)]
        w, d = top.extents[0] / 2 - 0.08, top.extents[1] / 2 - 0.08
        for leg, (x, y) in zip(legs, [(w, d), (-w, d), (w, -d), (-w, -d)]):
            leg.apply_translation([x, y, 0.25])
        mesh = trimesh.util.concatenate([top, *legs])
    elif shape == "snowman":
        r1, r2 = s(0.25, 0.35), s(0.15, 0.22)
        body, head = creation.icosphere(3, radius=r1), creation.icosphere(3, radius=r2)
        head.apply_translation([0, 0, r1 + r2 * 0.8])
        mesh = trimesh.util.concatenate([body, head])
    else:
        raise SourceError(f"demo shape {shape!r}: unknown (choose from {DEMO_SHAPES})")
    # A random yaw so that no two objects share an orientation.
    mesh.apply_transform(trimesh.transformations.rotation_matrix(s(0, 2 * np.pi), [0, 0, 1]))
    colors = rng.integers(30, 230, size=(2, 3))
    if rng.random() < 0.5:
        rgba = np.concatenate([np.broadcast_to(colors[0], (len(mesh.faces), 3)), np.full((len(mesh.faces), 1), 255)], 1)
        mesh.visual = trimesh.visual.ColorVisuals(mesh, face_colors=rgba.astype(np.uint8))
    else:
        mesh.visual = _stripe_texture(mesh, colors, int(rng.integers(3, 9)))
    return mesh


def _stripe_texture(mesh, colors: np.ndarray, stripes: int):
    """Cylindrical UVs and a horizontal-stripe texture of two colours."""
    from PIL import Image
    import trimesh

    v = mesh.vertices - mesh.vertices.mean(0)
    u = (np.arctan2(v[:, 1], v[:, 0]) / (2 * np.pi)) % 1.0
    h = (v[:, 2] - v[:, 2].min()) / max(np.ptp(v[:, 2]), 1e-9)
    rows = (np.arange(64) * stripes // 64) % 2
    tex = np.asarray(colors, dtype=np.uint8)[rows][:, None, :].repeat(64, axis=1)
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(tex), metallicFactor=0.0,
                                                   roughnessFactor=0.8)
    return trimesh.visual.TextureVisuals(uv=np.stack([u, h], 1), material=material)
