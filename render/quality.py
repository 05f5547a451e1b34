"""Per-object quality figures of a rendered object, and flags for what looks wrong (no bpy: numpy on the PNGs
and a read of the source's glTF JSON).

    q = object_quality(out_dir, missing_textures=[], materials=gltf_materials(source))
    q["flags"]      # e.g. ["dark", "unlit_black"]; meta.json "quality", the manifest, dataset exclusion
    render_statistics(RenderRoot(root).latest())   # a render root's numbers (pipelines/report.py shows them)

Figures: each view's alpha coverage (random 0-15, then fixed 0-15), the fraction of nearly empty views, the
mean luminance and the colour spread of the object's pixels, the fraction of them in Blender's
missing-texture magenta. Flags (thresholds at the top):
    nearly_empty      more than a quarter of the views show at most a speck of the object
    dark              the object's pixels are nearly black on average (renders black)
    magenta           most of the object is Blender's missing-texture pink
    missing_textures  the file names images that are not there
    unlit             a glTF material is KHR_materials_unlit: rendered flat in its base colour, unshaded,
                      as glTF viewers (three.js, Babylon, model-viewer) show it
    unlit_black       such a material has a black base colour and its colour only in emissiveFactor, which
                      the unlit extension and the viewers ignore: the object is black there too
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image

NEARLY_EMPTY_COVERAGE = 0.005   # a view whose object covers under 0.5% of the pixels shows a speck
NEARLY_EMPTY_VIEWS = 0.25
DARK_LUMINANCE = 0.04           # sRGB luma of the object's pixels, in [0, 1]
MAGENTA_FRACTION = 0.5
FLAGS = ("nearly_empty", "dark", "magenta", "missing_textures", "unlit", "unlit_black")


def gltf_materials(path: Path) -> list[dict]:
    """The materials of a .glb / .gltf (JSON only, nothing executed): name, unlit, base colour factor,
    whether a base colour texture is set, emissive factor. Other formats, or an unreadable file: []."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".glb":
            data = path.read_bytes()
            length, kind = struct.unpack_from("<I4s", data, 12)
            doc = json.loads(data[20:20 + length]) if kind == b"JSON" else {}
        elif path.suffix.lower() == ".gltf":
            doc = json.loads(path.read_text())
        else:
            return []
    except (OSError, ValueError, struct.error):
        return []
    out = []
    for m in doc.get("materials", []):
        pbr = m.get("pbrMetallicRoughness", {})
        out.append({"name": m.get("name", ""), "unlit": "KHR_materials_unlit" in m.get("extensions", {}),
                    "base_color": pbr.get("baseColorFactor", [1, 1, 1, 1]), "base_texture": "baseColorTexture" in pbr,
                    "emissive": m.get("emissiveFactor", [0, 0, 0])})
    return out


def object_quality(out_dir: Path, missing_textures: list[str], materials: list[dict]) -> dict:
    coverage, lum_sum, weight, colour_sum, colour_sq, magenta = [], 0.0, 0.0, np.zeros(3), np.zeros(3), 0.0
    for view_set in ("random", "fixed"):
        for png in sorted((Path(out_dir) / view_set).glob("*.png")):
            rgba = np.asarray(Image.open(png).convert("RGBA"), dtype=np.float64) / 255.0
            a = rgba[..., 3]
            coverage.append(float((a >= 0.5).mean()))
            rgb = rgba[..., :3]
            lum_sum += float((rgb @ [0.2126, 0.7152, 0.0722] * a).sum())
            weight += float(a.sum())
            colour_sum += (rgb * a[..., None]).sum((0, 1))
            colour_sq += (rgb ** 2 * a[..., None]).sum((0, 1))
            pink = (rgb[..., 0] > 0.7) & (rgb[..., 2] > 0.7) & (rgb[..., 1] < 0.3)
            magenta += float((pink * a).sum())
    w = max(weight, 1e-9)
    mean = colour_sum / w
    spread = float(np.sqrt(np.clip(colour_sq / w - mean ** 2, 0, None)).mean())
    figures = {"coverage": [round(c, 4) for c in coverage],
               "nearly_empty_fraction": round(float(np.mean([c < NEARLY_EMPTY_COVERAGE for c in coverage])), 4),
               "mean_luminance": round(lum_sum / w, 4), "colour_spread": round(spread, 4),
               "magenta_fraction": round(magenta / w, 4)}
    flags = []
    if figures["nearly_empty_fraction"] > NEARLY_EMPTY_VIEWS:
        flags.append("nearly_empty")
    if weight > 0 and figures["mean_luminance"] < DARK_LUMINANCE:
        flags.append("dark")
    if figures["magenta_fraction"] > MAGENTA_FRACTION:
        flags.append("magenta")
    if missing_textures:
        flags.append("missing_textures")
    unlit = [m for m in materials if m["unlit"]]
    if unlit:
        flags.append("unlit")
    if any(max(m["base_color"][:3]) < 0.01 and not m["base_texture"] and max(m["emissive"]) > 0 for m in unlit):
        flags.append("unlit_black")
    return {**figures, "unlit_materials": [m["name"] for m in unlit], "flags": flags}


def manifest_quality(quality: dict) -> dict:
    """The part of meta.json's quality figures the manifest carries (not the per-view coverage)."""
    return {k: v for k, v in quality.items() if k != "coverage"}


def _quantiles(values: list[float]) -> dict:
    q = np.quantile(values, [0, 0.1, 0.5, 0.9, 1.0]) if values else [float("nan")] * 5
    return dict(zip(("min", "p10", "median", "p90", "max"), (round(float(v), 4) for v in q)))


def render_statistics(latest: dict[str, dict], suspects_shown: int = 32) -> dict:
    """A render root's numbers from its manifest's last line per object: objects by status, failures by
    reason (with a first example each), counts per quality flag, the figures' quantiles, and the
    `suspects_shown` most suspect objects (most flags, then darkest) of `flagged`."""
    status, failures, examples, flags = {}, {}, {}, {}
    figures = {k: [] for k in ("mean_luminance", "colour_spread", "nearly_empty_fraction", "magenta_fraction")}
    suspects, without = [], 0
    for uid, e in sorted(latest.items()):
        status[e["status"]] = status.get(e["status"], 0) + 1
        if e["status"] != "ok":
            failures[e["reason"]] = failures.get(e["reason"], 0) + 1
            examples.setdefault(e["reason"], {"uid": uid, "error": str(e.get("error", ""))[:200]})
            continue
        q = e.get("quality")
        if not q:
            without += 1
            continue
        for k in figures:
            figures[k].append(q[k])
        for f in q["flags"]:
            flags[f] = flags.get(f, 0) + 1
        if q["flags"]:
            suspects.append((-len(q["flags"]), q["mean_luminance"], uid, q["flags"]))
    suspects.sort()
    return {"objects": len(latest), "status": status, "failures": failures, "failure_examples": examples,
            "flags": flags, "without_quality_figures": without, "figures": {k: _quantiles(v) for k, v in figures.items()},
            "flagged": len(suspects), "suspects": [{"uid": uid, "flags": f} for _, _, uid, f in suspects[:suspects_shown]]}
