"""Read one rendered object (the layout render/ writes: OUTPUT/objects/<bucket>/<uid>/ with random/, fixed/,
cameras.json, meta.json; README "Render") into tensors on a white background.

    obj = RenderedObject.open(object_dir(render_root, uid))       # raises BrokenObject with the reason
    img = obj.image("random", 3, size=32)                         # [3, H, W] in [-1, 1]
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from render.cameras import NUM_VIEWS
from render.layout import object_dirs
from render.preview import on_white

VIEW_SETS = ("random", "fixed")


class BrokenObject(ValueError):
    """A rendered object that cannot be used; the message names the uid and what is wrong."""


@dataclass
class RenderedObject:
    uid: str
    path: Path
    cameras: dict
    resolution: int

    @staticmethod
    def open(path: Path) -> "RenderedObject":
        """Check the object fully (every view present, readable, the right size) before use."""
        path = Path(path)
        uid = path.name
        try:
            cams = json.loads((path / "cameras.json").read_text())
        except (OSError, ValueError) as e:
            raise BrokenObject(f"{uid}: cameras.json unreadable ({e})") from None
        size = cams.get("width")
        for view_set in VIEW_SETS:
            if len(cams.get(view_set, [])) != NUM_VIEWS:
                raise BrokenObject(f"{uid}: cameras.json has {len(cams.get(view_set, []))} {view_set} views, expected {NUM_VIEWS}")
            for i in range(NUM_VIEWS):
                png = path / view_set / f"{i:03d}.png"
                try:
                    with Image.open(png) as img:
                        img.verify()
                    with Image.open(png) as img:
                        if img.size != (size, size) or img.mode != "RGBA":
                            raise BrokenObject(f"{uid}: {view_set}/{png.name} is {img.size} {img.mode}, expected ({size}, {size}) RGBA")
                except BrokenObject:
                    raise
                except FileNotFoundError:
                    raise BrokenObject(f"{uid}: missing view {view_set}/{png.name}") from None
                except Exception as e:
                    raise BrokenObject(f"{uid}: unreadable view {view_set}/{png.name} ({type(e).__name__})") from None
        return RenderedObject(uid, path, cams, size)

    def png(self, view_set: str, index: int) -> Path:
        return self.path / view_set / f"{index:03d}.png"

    def angles(self, view_set: str, index: int) -> tuple[float, float]:
        v = self.cameras[view_set][index]
        return v["azimuth_deg"], v["elevation_deg"]

    def rgba(self, view_set: str, index: int, size: int | None = None) -> Image.Image:
        """The view as rendered (straight alpha), resized to size x size if given."""
        with Image.open(self.png(view_set, index)) as img:
            img = img.convert("RGBA")
            if size is not None and size != img.size[0]:
                img = img.resize((size, size), Image.Resampling.LANCZOS)  # on straight alpha, before compositing
        return img

    def image(self, view_set: str, index: int, size: int | None = None) -> torch.Tensor:
        """[3, H, W] in [-1, 1], composited on white as rgb * a + (1 - a)."""
        rgb = np.asarray(on_white(self.rgba(view_set, index, size)), dtype=np.float32) / 255.0
        return torch.from_numpy(rgb).permute(2, 0, 1) * 2 - 1


def content_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def split_of(uid: str, val_percent: float) -> str:
    """'train' or 'val', fixed by the uid alone (stable as the collection grows)."""
    bucket = int.from_bytes(hashlib.sha256(f"split:{uid}".encode()).digest()[:4], "little") % 10000
    return "val" if bucket < val_percent * 100 else "train"


def scan(render_root: Path, split: str | None = None, val_percent: float = 5.0) -> tuple[list[RenderedObject], dict[str, str]]:
    """Every complete object under render_root/objects (of one split), and {uid: reason} for broken ones."""
    good, broken = [], {}
    if not (Path(render_root) / "objects").is_dir():
        raise FileNotFoundError(f"{render_root}: no objects/ folder (not a render output?)")
    for uid, d in sorted(object_dirs(render_root).items()):
        if split is not None and split_of(uid, val_percent) != split:
            continue
        try:
            good.append(RenderedObject.open(d))
        except BrokenObject as e:
            broken[uid] = str(e)
    return good, broken
