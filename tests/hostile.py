"""The hostile objects a real Objaverse crawl contains, made on the spot for the render tests."""
from __future__ import annotations

import base64
import json
import os
import random
import struct
from pathlib import Path

import numpy as np
import trimesh

CUBE_POS = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], np.float32)
CUBE_IDX = np.array([0, 1, 3, 0, 3, 2, 4, 6, 7, 4, 7, 5, 0, 4, 5, 0, 5, 1, 2, 3, 7, 2, 7, 6, 0, 2, 6, 0, 6, 4,
                     1, 5, 7, 1, 7, 3], np.uint16)


class GltfBuilder:
    """Just enough glTF 2.0 to write the odd files a peer exporter produces."""

    def __init__(self):
        self.blob = bytearray()
        self.doc = {"asset": {"version": "2.0"}, "buffers": [], "bufferViews": [], "accessors": [],
                    "meshes": [], "nodes": [], "scenes": [{"nodes": []}], "scene": 0}

    def accessor(self, array: np.ndarray, type_: str, component: int) -> int:
        while len(self.blob) % 4:
            self.blob.append(0)
        self.doc["bufferViews"].append({"buffer": 0, "byteOffset": len(self.blob), "byteLength": array.nbytes})
        self.blob += array.tobytes()
        acc = {"bufferView": len(self.doc["bufferViews"]) - 1, "componentType": component,
               "count": int(array.shape[0]), "type": type_}
        if type_ == "VEC3" and component == 5126:
            finite = array[np.isfinite(array).all(1)] if np.isfinite(array).any() else np.zeros((1, 3))
            acc["min"], acc["max"] = finite.min(0).tolist(), finite.max(0).tolist()
        self.doc["accessors"].append(acc)
        return len(self.doc["accessors"]) - 1

    def mesh(self, positions: np.ndarray, indices: np.ndarray = CUBE_IDX, **attributes) -> int:
        attrs = {"POSITION": self.accessor(positions.astype(np.float32), "VEC3", 5126), **attributes}
        prim = {"attributes": attrs, "indices": self.accessor(indices, "SCALAR", 5123)}
        self.doc["meshes"].append({"primitives": [prim]})
        return len(self.doc["meshes"]) - 1

    def node(self, root: bool = True, **fields) -> int:
        self.doc["nodes"].append(fields)
        index = len(self.doc["nodes"]) - 1
        if root:
            self.doc["scenes"][0]["nodes"].append(index)
        return index

    def glb(self) -> bytes:
        while len(self.blob) % 4:
            self.blob.append(0)
        self.doc["buffers"] = [{"byteLength": len(self.blob)}]
        js = json.dumps(self.doc).encode()
        js += b" " * (-len(js) % 4)
        body = struct.pack("<II", len(js), 0x4E4F534A) + js + struct.pack("<II", len(self.blob), 0x004E4942) + self.blob
        return struct.pack("<III", 0x46546C67, 2, 12 + len(body)) + body

    def gltf(self) -> str:
        """Text glTF with the buffer embedded as a data URI (images stay external)."""
        self.doc["buffers"] = [{"byteLength": len(self.blob), "uri": "data:application/octet-stream;base64,"
                                + base64.b64encode(bytes(self.blob)).decode()}]
        return json.dumps(self.doc)


def scaled_box(scale: float) -> bytes:
    return trimesh.creation.box(extents=[scale, 2 * scale, 0.5 * scale]).export(file_type="glb")


def multi_root() -> bytes:
    scene = trimesh.Scene()
    for x in (-5.0, 5.0):
        scene.add_geometry(trimesh.creation.box(extents=[1, 1, 1]), transform=trimesh.transformations.translation_matrix([x, 0, 0]))
    return scene.export(file_type="glb")


def animated_rigged() -> bytes:
    b = GltfBuilder()
    joints = b.accessor(np.zeros((8, 4), np.uint8), "VEC4", 5121)
    weights = b.accessor(np.tile(np.array([1, 0, 0, 0], np.float32), (8, 1)), "VEC4", 5126)
    ibm = b.accessor(np.eye(4, dtype=np.float32).reshape(1, 16), "MAT4", 5126)
    mesh = b.mesh(CUBE_POS * 0.5, JOINTS_0=joints, WEIGHTS_0=weights)
    b.node(mesh=mesh, skin=0, name="body")
    bone = b.node(name="bone")
    b.doc["skins"] = [{"joints": [bone], "inverseBindMatrices": ibm}]
    times = b.accessor(np.array([[0.0], [1.0]], np.float32), "SCALAR", 5126)
    s = np.sqrt(0.5)
    rots = b.accessor(np.array([[0, 0, 0, 1], [0, 0, s, s]], np.float32), "VEC4", 5126)
    b.doc["animations"] = [{"channels": [{"sampler": 0, "target": {"node": bone, "path": "rotation"}}],
                            "samplers": [{"input": times, "output": rots, "interpolation": "LINEAR"}]}]
    return b.glb()


def nan_vertices() -> bytes:
    b = GltfBuilder()
    pos = np.concatenate([CUBE_POS, [[np.nan, 0, 0], [0, np.inf, 0]]]).astype(np.float32)
    idx = np.concatenate([CUBE_IDX, [0, 8, 9]]).astype(np.uint16)
    b.node(mesh=b.mesh(pos, idx))
    return b.glb()


def no_mesh() -> str:
    b = GltfBuilder()
    b.node(name="just-an-empty")
    b.node(name="a-camera", camera=0)
    b.doc["cameras"] = [{"type": "perspective", "perspective": {"yfov": 0.8, "znear": 0.1}}]
    return b.gltf()


def missing_texture() -> str:
    b = GltfBuilder()
    uv = b.accessor((CUBE_POS[:, :2] * 0.5 + 0.5).astype(np.float32), "VEC2", 5126)
    mesh = b.mesh(CUBE_POS, TEXCOORD_0=uv)
    b.doc["meshes"][mesh]["primitives"][0]["material"] = 0
    b.doc["materials"] = [{"pbrMetallicRoughness": {"baseColorTexture": {"index": 0}}}]
    b.doc["textures"] = [{"source": 0}]
    b.doc["images"] = [{"uri": "textures/missing.png"}]
    b.node(mesh=mesh)
    return b.gltf()


# name -> (how the render stage must classify it)
EXPECTED = {
    "zero-bytes.glb": ("failed", "unreadable"),
    "random-bytes.glb": ("failed", "unreadable"),
    "download-error-page.glb": ("failed", "unreadable"),
    "no-mesh.gltf": ("failed", "empty_scene"),
    "nan-vertices.glb": ("ok", None),
    "tiny-1e-4.glb": ("ok", None),
    "huge-1e4.glb": ("ok", None),
    "multi-root.glb": ("ok", None),
    "animated-rigged.glb": ("ok", None),
    "missing-texture.gltf": ("ok", None),
    "ünïcødé ☃ object.glb": ("ok", None),
    "truncated.glb": ("failed", "import_error"),
    "hangs-on-open.obj": ("failed", "timeout"),
}


def make_hostile_set(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    good = trimesh.creation.box(extents=[1, 1, 1]).export(file_type="glb")
    files = {
        "zero-bytes.glb": b"",
        "random-bytes.glb": random.Random(0).randbytes(4096),
        "download-error-page.glb": b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>",
        "no-mesh.gltf": no_mesh().encode(),
        "nan-vertices.glb": nan_vertices(),
        "tiny-1e-4.glb": scaled_box(1e-4),
        "huge-1e4.glb": scaled_box(1e4),
        "multi-root.glb": multi_root(),
        "animated-rigged.glb": animated_rigged(),
        "missing-texture.gltf": missing_texture().encode(),
        "ünïcødé ☃ object.glb": good,
        "truncated.glb": good[: len(good) // 2],
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    # Opening a FIFO blocks until a writer comes: an import that hangs, like a stalled network mount.
    os.mkfifo(folder / "hangs-on-open.obj")
    return folder
