"""View grids of a rendered object, composited on white, for people to look at.

    python -m render.preview OUTPUT/objects/<bb>/<uid>   # writes its preview.png
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def on_white(rgba: Image.Image) -> Image.Image:
    """rgb * a + (1 - a): straight alpha composited over white (no dark fringes)."""
    a = np.asarray(rgba.convert("RGBA"), dtype=np.float32) / 255.0
    rgb = a[..., :3] * a[..., 3:] + (1.0 - a[..., 3:])
    return Image.fromarray(np.round(rgb * 255).astype(np.uint8), "RGB")


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, img in enumerate(images):
        sheet.paste(img.convert("RGB"), ((i % columns) * w, (i // columns) * h))
    return sheet


def object_preview(obj_dir: Path) -> Image.Image:
    """Row pairs: the 16 random views, then the 16 fixed views, 8 per row."""
    views = [on_white(Image.open(p)) for s in ("random", "fixed") for p in sorted((obj_dir / s).glob("*.png"))]
    return grid(views, columns=8)


if __name__ == "__main__":
    for d in sys.argv[1:]:
        object_preview(Path(d)).save(Path(d) / "preview.png")
