"""Boxes as binary glTF with chosen materials, made by trimesh and then given glTF material fields that
trimesh does not write (KHR_materials_unlit, emissiveFactor) by editing the JSON chunk."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import trimesh


def box_glb(path: Path, base_color=(1.0, 0.0, 0.0, 1.0), unlit: bool = False, emissive=(0.0, 0.0, 0.0),
            vertex_color=None) -> Path:
    """vertex_color (RGBA bytes): COLOR_0 on every vertex, under a white material of the same name."""
    box = trimesh.creation.box(extents=(1.0, 0.6, 0.4))
    if vertex_color is None:
        box.visual = trimesh.visual.TextureVisuals(material=trimesh.visual.material.PBRMaterial(
            name="paint", baseColorFactor=[int(round(255 * c)) for c in base_color], metallicFactor=0.0,
            roughnessFactor=0.8))
    else:
        box.visual.vertex_colors = vertex_color
    data = box.export(file_type="glb")
    length = struct.unpack_from("<I", data, 12)[0]
    doc = json.loads(data[20:20 + length])
    rest = data[20 + length:]
    if vertex_color is not None:             # trimesh writes COLOR_0 without a material
        doc["materials"] = [{"name": "paint", "pbrMetallicRoughness": {"baseColorFactor": [1.0, 1.0, 1.0, 1.0],
                                                                       "metallicFactor": 0.0, "roughnessFactor": 0.8}}]
        for primitive in doc["meshes"][0]["primitives"]:
            primitive["material"] = 0
    material = doc["materials"][0]
    material["emissiveFactor"] = list(emissive)
    if unlit:
        material.setdefault("extensions", {})["KHR_materials_unlit"] = {}
        doc["extensionsUsed"] = sorted(set(doc.get("extensionsUsed", [])) | {"KHR_materials_unlit"})
    chunk = json.dumps(doc).encode()
    chunk += b" " * (-len(chunk) % 4)
    body = struct.pack("<I4s", len(chunk), b"JSON") + chunk + rest
    Path(path).write_bytes(struct.pack("<4sII", b"glTF", 2, 12 + len(body)) + body)
    return Path(path)
