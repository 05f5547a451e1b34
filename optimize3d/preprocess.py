"""The one preprocessing step between a user's picture and the model: segmentation, then the training framing.

    picture = load_input_image(Path("photo.jpg"))                      # checked RGBA (optimize3d/inputs.py)
    rgba, warnings = preprocess(picture, PreprocessConfig(remove_background=True, segmenter="u2net.onnx"), "photo.jpg")

    python -m optimize3d.preprocess photo.jpg --output input.png --remove-background --segmenter u2net.onnx
    python -m optimize3d.preprocess photo.jpg --output input.png --figure before-after.png fill=0.7

generate.py and the app run this same step (their input.png is its output); the command shows what the model
will see before a long run. Settings: PreprocessConfig fields as key=value.

The model was trained on objects rendered alone on white, centred, at the paper's camera. So:
1. Segmentation. An image whose alpha channel separates object from background is kept as it is. Otherwise,
   with `remove_background`, rembg (onnxruntime) cuts the object out with a local segmenter file (`segmenter`:
   u2net.onnx, u2netp.onnx or silueta.onnx with the `u2net_custom` session; isnet-general-use.onnx with
   `dis_custom`; nothing is downloaded). Without it, an RGB image is taken as the object on a plain white
   background (its non-white pixels are the object); if its border is not near-white, a warning names the
   problem and the flag (`strict`: an error).
2. Framing (`frame`): the object's alpha bounding box (alpha >= OPAQUE) is centred and scaled so that its longer
   side is `fill` of the frame side, on a transparent square of `size` px. `fill` 0.8 is what the render stage
   gives at the paper's camera: median 0.797 over the 256 fixed views of 16 objects (the 12 procedural demo
   objects and tests/data/glb; `python bench/fill.py RENDER_ROOT` measures a render root).
   Evaluation against renders keeps the render's own framing (`frame: false`): its metrics compare at the
   render's cameras, so the input must keep their scale.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import common  # noqa: F401  (before torch: see common/__init__.py)
from optimize3d.inputs import WHITE_LEVEL, InputImageError

OPAQUE = 128
"""alpha >= this counts as object: the bounding box, the fill, and whether an alpha channel is useful."""
NEAR_WHITE = 230
"""A border pixel with every channel at or above this counts as white background."""
WHITE_BORDER_SHARE = 0.95
"""An RGB image is on a white background when at least this share of its border pixels is near-white."""
SESSIONS = ("u2net_custom", "dis_custom", "ben_custom")
"""rembg's sessions for a local model file (the others download theirs)."""


@dataclass
class PreprocessConfig:
    remove_background: bool = False
    """Cut the object out with `segmenter` when the image has no useful alpha channel."""
    segmenter: str = ""
    """A local ONNX segmentation model for rembg (e.g. u2net.onnx); see the module docstring."""
    segmenter_session: str = "u2net_custom"
    """rembg's session for that file: u2net_custom (u2net, u2netp, silueta), dis_custom (isnet), ben_custom."""
    frame: bool = True
    """Centre the object and scale it to `fill`; false keeps the image's own framing (evaluation on renders)."""
    fill: float = 0.8
    """The object's longer box side as a fraction of the frame side (the renders' median, measured)."""
    size: int = 256
    """Side of the framed image in px (the renders' size)."""
    strict: bool = False
    """An RGB image with a non-white border and no background removal is an error instead of a warning."""

    def validate(self) -> None:
        if self.remove_background and not self.segmenter:
            raise ValueError("remove_background needs a segmenter: --segmenter PATH (a local ONNX file such as "
                             "u2net.onnx; the README says where to get one)")
        if self.segmenter and not Path(self.segmenter).is_file():
            raise ValueError(f"segmenter {self.segmenter}: not a file")
        if self.segmenter_session not in SESSIONS:
            raise ValueError(f"segmenter_session {self.segmenter_session!r}: expected one of {', '.join(SESSIONS)}")
        if not 0.1 <= self.fill <= 1.0:
            raise ValueError(f"fill {self.fill}: expected a fraction in [0.1, 1]")
        if self.size < 16:
            raise ValueError(f"size {self.size}: at least 16 px")


def has_useful_alpha(rgba: Image.Image) -> bool:
    """Some pixels transparent and some opaque: the alpha channel separates object from background."""
    a = np.asarray(rgba.convert("RGBA"))[..., 3]
    return bool((a < OPAQUE).any() and (a >= OPAQUE).any())


def white_border_share(rgb: Image.Image) -> float:
    """Share of the pixels on the image's outer ring (2% of the shorter side, at least 1 px) that are near-white."""
    x = np.asarray(rgb.convert("RGB"))
    k = max(1, round(0.02 * min(x.shape[:2])))
    ring = np.concatenate([x[:k].reshape(-1, 3), x[-k:].reshape(-1, 3), x[k:-k, :k].reshape(-1, 3), x[k:-k, -k:].reshape(-1, 3)])
    return float((ring.min(axis=1) >= NEAR_WHITE).mean())


def alpha_box(alpha: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), end exclusive, of the pixels with alpha >= OPAQUE; None when there are none."""
    ys, xs = np.nonzero(alpha >= OPAQUE)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def alpha_fill(rgba: Image.Image) -> float | None:
    """The object's longer box side over the image's longer side (what `fill` sets)."""
    a = np.asarray(rgba.convert("RGBA"))[..., 3]
    box = alpha_box(a)
    return None if box is None else max(box[2] - box[0], box[3] - box[1]) / max(a.shape)


def input_warnings(picture: Image.Image, cfg: PreprocessConfig, name: str) -> list[str]:
    """What the model will not see as it expects, in one line each (cheap: no segmentation). strict: raises."""
    if has_useful_alpha(picture) or cfg.remove_background:
        return []
    share = white_border_share(picture)
    if share >= WHITE_BORDER_SHARE:
        return []
    problem = (f"image {name}: RGB with a background that is not white ({share:.0%} of its border is near-white): "
               f"the model expects the object alone on white")
    if cfg.strict:
        raise InputImageError(f"{problem} (strict); give an RGBA image or pass --remove-background --segmenter PATH")
    return [f"{problem}; pass --remove-background --segmenter PATH (or give an RGBA image)"]


@functools.lru_cache(maxsize=2)
def segmenter_session(path: str, session: str, mtime_ns: int):
    """rembg's session for a local model file, loaded once per process (and again when the file changes)."""
    from rembg import new_session
    try:
        return new_session(session, model_path=path)
    except Exception as e:         # onnxruntime raises its own types for a file that is not a model
        raise InputImageError(f"segmenter {path}: not a loadable ONNX model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def load_segmenter(cfg: PreprocessConfig):
    path = str(Path(cfg.segmenter).resolve())
    return segmenter_session(path, cfg.segmenter_session, Path(path).stat().st_mtime_ns)


def segment(picture: Image.Image, cfg: PreprocessConfig, name: str) -> Image.Image:
    """The picture's RGB with the segmenter's mask as alpha."""
    from rembg import remove
    session = load_segmenter(cfg)
    rgb = picture.convert("RGB")
    try:
        mask = remove(rgb, session=session, only_mask=True)
    except Exception as e:
        raise InputImageError(f"segmenter {cfg.segmenter}: failed on image {name} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    mask = np.asarray(mask.convert("L"))
    if not np.isfinite(mask).all() or (mask >= OPAQUE).sum() == 0:
        raise InputImageError(f"image {name}: the segmenter found no object")
    out = rgb.copy()
    out.putalpha(Image.fromarray(mask, "L"))
    return out


def frame(rgba: Image.Image, fill: float, size: int, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """The object's box (default: its alpha box) centred on a transparent size x size square, its longer side
    fill x size. Sub-pixel exact: the source window goes to the resampler in float coordinates; premultiplied,
    so no dark fringes."""
    x0, y0, x1, y1 = box or alpha_box(np.asarray(rgba.convert("RGBA"))[..., 3])
    side = max(x1 - x0, y1 - y0) / fill
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = math.floor(cx - side / 2) - 1, math.floor(cy - side / 2) - 1
    window = rgba.convert("RGBa").crop((left, top, math.ceil(cx + side / 2) + 1, math.ceil(cy + side / 2) + 1))
    src = (cx - side / 2 - left, cy - side / 2 - top, cx + side / 2 - left, cy + side / 2 - top)
    return window.resize((size, size), Image.Resampling.BICUBIC, box=src).convert("RGBA")


def preprocess(picture: Image.Image, cfg: PreprocessConfig, name: str) -> tuple[Image.Image, list[str]]:
    """A checked picture (load_input_image) -> (the RGBA the model sees, before compositing on white; warnings)."""
    warnings = input_warnings(picture, cfg, name)
    rgba, box = picture.convert("RGBA"), None
    if not has_useful_alpha(rgba):
        if cfg.remove_background:
            rgba = segment(rgba, cfg, name)
        elif white_border_share(rgba) >= WHITE_BORDER_SHARE:      # on white: the object is what is not white
            box = alpha_box(np.where(np.asarray(rgba)[..., :3].min(axis=-1) < WHITE_LEVEL, 255, 0))
        # else: a photo left as it is (warned above): the whole picture is framed
    if cfg.frame:
        rgba = frame(rgba, cfg.fill, cfg.size, box)
    return rgba, warnings


def main(argv=None) -> int:
    import argparse
    import sys
    from common.atomic import atomic_path
    from common.config import ConfigError, load_config
    from optimize3d.inputs import load_input_image
    from render.preview import on_white
    p = argparse.ArgumentParser(prog="python -m optimize3d.preprocess", description="the input as the model will see it")
    p.add_argument("image", type=Path)
    p.add_argument("--output", type=Path, required=True, help="the preprocessed RGBA (PNG)")
    p.add_argument("--remove-background", action="store_true")
    p.add_argument("--segmenter", type=Path, help="a local ONNX segmenter for rembg, e.g. u2net.onnx")
    p.add_argument("--strict", action="store_true")
    p.add_argument("--figure", type=Path, help="also write the image beside what the model sees (on white)")
    p.add_argument("overrides", nargs="*", help="PreprocessConfig fields, key=value")
    args = p.parse_intermixed_args(argv)             # the image, then options and key=value in any order
    flags = (["remove_background=true"] if args.remove_background else []) + (["strict=true"] if args.strict else []) + \
        ([f"segmenter={args.segmenter}"] if args.segmenter else [])
    try:
        cfg = load_config(PreprocessConfig, None, [*args.overrides, *flags])
        cfg.validate()
        picture = load_input_image(args.image)
        rgba, warnings = preprocess(picture, cfg, str(args.image))
    except (ConfigError, ValueError) as e:            # InputImageError is a ValueError
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"preprocess: warning: {w}", file=sys.stderr)
    with atomic_path(args.output) as tmp:
        rgba.save(tmp, format="PNG")
    if args.figure:
        side = rgba.size[1]
        before = picture.convert("RGB")
        before = before.resize((round(before.width * side / before.height), side), Image.Resampling.LANCZOS)
        sheet = Image.new("RGB", (before.width + side + side // 16, side), "white")
        sheet.paste(before, (0, 0))
        sheet.paste(on_white(rgba), (before.width + side // 16, 0))
        with atomic_path(args.figure) as tmp:
            sheet.save(tmp, format="PNG")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
