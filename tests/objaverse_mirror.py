"""A small local Objaverse mirror in exactly the layout the `objaverse` package reads."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path


def make_mirror(root: Path, objects: dict[str, Path], lvis: dict[str, list[str]]) -> Path:
    """objects: uid -> a GLB to copy in. Returns the directory to pass as --objaverse-dir."""
    base = root / "hf-objaverse-v1"
    paths, metadata = {}, {}
    for uid, src in objects.items():
        rel = f"glbs/000-000/{Path(uid).name}.glb"
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, base / rel)
        paths[uid] = rel
        metadata[uid] = {"name": f"object {uid}", "license": "by", "uri": f"https://example.invalid/{uid}",
                         "tags": [{"name": "test"}]}
    (base / "metadata").mkdir(parents=True, exist_ok=True)
    for name, data in {"object-paths.json.gz": paths, "metadata/000-000.json.gz": metadata,
                       "lvis-annotations.json.gz": lvis}.items():
        with gzip.open(base / name, "wt") as f:
            json.dump(data, f)
    return root
