"""The input image of image-to-3D: checked, upright, identified by its content.

    picture = load_input_image(Path("photo.png"))   # PIL RGBA (RGB made opaque), or InputImageError (one line)

What the model then sees (segmentation, framing, compositing on white) is optimize3d/preprocess.py's.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from render.preview import on_white

FORMATS = ("PNG", "JPEG", "WEBP")
MIN_SIDE = 16
MAX_SIDE = 8192
WHITE_LEVEL = 250
"""A composited pixel with every channel at or above this counts as background."""


class InputImageError(ValueError):
    pass


def image_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_input_image(path: Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise InputImageError(f"image {path}: not a file")
    try:
        img = Image.open(path)
        fmt = img.format
        w, h = img.size        # read from the header, before any pixel is decoded
        if fmt not in FORMATS:
            raise InputImageError(f"image {path}: format {fmt} not supported (expected PNG, JPEG or WebP)")
        if min(w, h) < MIN_SIDE:
            raise InputImageError(f"image {path}: {w}x{h} px is too small (at least {MIN_SIDE} px a side)")
        if max(w, h) > MAX_SIDE:
            raise InputImageError(f"image {path}: {w}x{h} px is too large (at most {MAX_SIDE} px a side)")
        img.load()
    except InputImageError:
        raise
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise InputImageError(f"image {path}: not a readable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    rgba = ImageOps.exif_transpose(img).convert("RGBA")      # a phone photo's orientation tag applied
    if np.asarray(rgba)[..., 3].max() == 0:
        raise InputImageError(f"image {path}: fully transparent (nothing to reconstruct)")
    if (np.asarray(on_white(rgba)) >= WHITE_LEVEL).all():
        raise InputImageError(f"image {path}: only white pixels (nothing to reconstruct)")
    return rgba
