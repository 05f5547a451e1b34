"""What a render run costs before its first object starts, at Objaverse scale: prints JSON.

    python bench/render_start.py                    # synthetic Objaverse caches of 10k and 100k objects
    python bench/render_start.py --sizes 800000     # the real size (a few GB of disk and minutes)

For each size N, a synthetic Objaverse cache in the package's layout (the path index, one metadata file per
folder of 5000 objects) and a render root in which half the objects are complete (a folder with meta.json
and an ok manifest line). Timed: listing the objects (the path index read once), selecting the shards,
planning (one listing of objects/, one read of the manifest, meta.json read only for folders without a
manifest line), and reading the annotations of the objects to render (each metadata file once); then what
each render task pays to find its file, against the objaverse package's load_objects (which reads the
whole path index at every call). The per-object cost should not grow with N.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402,F401  (before torch: see common/__init__.py)
from render.layout import object_dir  # noqa: E402
from render.settings import RenderSettings  # noqa: E402
from render.output import RenderRoot  # noqa: E402
from render.scheduler import plan  # noqa: E402
from render.shards import select  # noqa: E402
from render.sources import list_objects, objaverse_annotations, resolve  # noqa: E402

PER_FOLDER = 5000


def synthetic(root: Path, n: int, key: str) -> tuple[Path, RenderRoot]:
    base = root / "objaverse" / "hf-objaverse-v1"
    (base / "metadata").mkdir(parents=True)
    uids = [f"{i:032x}" for i in range(n)]
    folder = lambda i: f"{i // PER_FOLDER // 1000:03d}-{i // PER_FOLDER % 1000:03d}"  # noqa: E731
    with gzip.open(base / "object-paths.json.gz", "wt") as f:
        json.dump({u: f"glbs/{folder(i)}/{u}.glb" for i, u in enumerate(uids)}, f)
    for start in range(0, n, PER_FOLDER):
        with gzip.open(base / "metadata" / f"{folder(start)}.json.gz", "wt") as f:
            json.dump({u: {"name": f"object {u}", "license": "by", "tags": []} for u in uids[start:start + PER_FOLDER]}, f)
    renders = RenderRoot(root / "renders")
    lines = []
    for u in uids[::2]:                                  # every other object is complete
        object_dir(renders.path, u).mkdir(parents=True)
        (object_dir(renders.path, u) / "meta.json").write_text(json.dumps({"settings_key": key}))
        lines.append(json.dumps({"uid": u, "status": "ok", "settings_key": key}))
    renders.manifest.write_text("\n".join(lines) + "\n")
    return root / "objaverse", renders


def measure(n: int) -> dict:
    key = RenderSettings().key()
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        cache, renders = synthetic(Path(d), n, key)
        build_s = time.perf_counter() - t
        reads = []
        original = RenderRoot.is_complete
        RenderRoot.is_complete = lambda self, uid, k: reads.append(uid) or original(self, uid, k)
        try:
            times = {}
            t = time.perf_counter()
            refs = list_objects("objaverse", Path(d) / "sources", objaverse_dir=str(cache))
            times["list_s"] = time.perf_counter() - t
            t = time.perf_counter()
            selected = select(refs, [0], 1, None)
            times["select_s"] = time.perf_counter() - t
            t = time.perf_counter()
            todo, skipped = plan(renders, selected, key)
            times["plan_s"] = time.perf_counter() - t
            t = time.perf_counter()
            annotations = objaverse_annotations([r for r, _ in todo], str(cache))
            times["annotations_s"] = time.perf_counter() - t
            # In each render task: the object's file from the cache, against the package's load_objects,
            # which reads the whole path index for every call.
            sample = [r for r, _ in todo[:20]]
            for r in sample:
                (cache / "hf-objaverse-v1" / r.locator).parent.mkdir(parents=True, exist_ok=True)
                (cache / "hf-objaverse-v1" / r.locator).write_bytes(b"glTF")
            t = time.perf_counter()
            for r in sample:
                resolve(r, str(cache))
            resolve_s = (time.perf_counter() - t) / len(sample)
            import objaverse
            t = time.perf_counter()
            for r in sample[:3]:
                objaverse.load_objects([r.original_id])
            package_s = (time.perf_counter() - t) / 3
        finally:
            RenderRoot.is_complete = original
    total = sum(times.values())
    return {"objects": n, "to_render": len(todo), "complete": skipped, "annotated": len(annotations),
            "meta_json_reads": len(reads), **{k: round(v, 3) for k, v in times.items()},
            "total_s": round(total, 3), "microseconds_per_object": round(1e6 * total / n, 1),
            "task_resolve_s_per_object": round(resolve_s, 6), "package_load_objects_s_per_object": round(package_s, 4),
            "synthetic_build_s": round(build_s, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    args = p.parse_args()
    print(json.dumps({"runs": [measure(n) for n in args.sizes]}, indent=2))


if __name__ == "__main__":
    main()
