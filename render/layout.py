"""Where a rendered object lives in a render root: OUTPUT/objects/<bucket>/<uid>/, the bucket being the
first two hex digits of sha256(uid), so that 800k objects make 256 folders of ~3k entries, not one folder
of 800k (which every filesystem, `ls` and NFS client handle badly). Roots written before the nesting
(OUTPUT/objects/<uid>/) are still read.

    object_dir(root, uid)        # the object's folder (existing, or where it goes)
    object_dirs(root)            # {uid: folder} of every object folder: 257 directory listings
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

BUCKET_CHARS = 2


def bucket(uid: str) -> str:
    return hashlib.sha256(uid.encode("utf-8")).hexdigest()[:BUCKET_CHARS]


def _is_object(path: Path) -> bool:
    return (path / "meta.json").exists() or (path / "cameras.json").exists()


def object_dir(root: Path, uid: str) -> Path:
    objects = Path(root) / "objects"
    nested = objects / bucket(uid) / uid
    if not nested.exists() and _is_object(objects / uid):
        return objects / uid                     # a root from before the nesting
    return nested


def object_dirs(root: Path) -> dict[str, Path]:
    """{uid: folder} of every object folder under root/objects (names starting with "." are work in progress)."""
    objects = Path(root) / "objects"
    nested, flat = {}, {}
    with os.scandir(objects) as top:
        for e in top:
            if e.name.startswith(".") or not e.is_dir():
                continue
            path = Path(e.path)
            if len(e.name) == BUCKET_CHARS and not _is_object(path):
                with os.scandir(path) as inner:
                    nested.update({f.name: Path(f.path) for f in inner if not f.name.startswith(".") and f.is_dir()})
            else:
                flat[e.name] = path
    return {**flat, **nested}          # an object re-rendered since the nesting: its nested folder
