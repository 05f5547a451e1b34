"""How much of the frame the render stage's objects fill: the number behind preprocess.fill. Prints JSON.

    python bench/fill.py RENDER_ROOT [RENDER_ROOT ...]      # e.g. a render_objaverse.py output
    python bench/fill.py outputs/render --views random

Per object: the median, over its views, of the alpha box's longer side over the image side
(optimize3d/preprocess.py's alpha_fill, the quantity `fill` sets); then the median and spread over all views.
preprocess.fill 0.8 was set from the 12 procedural demo objects and the 4 objects of tests/data/glb rendered
at the paper's camera: median 0.797 over their 256 fixed views (0.78 demo, 0.90 glb).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402,F401  (before torch: see common/__init__.py)
from optimize3d.preprocess import alpha_fill  # noqa: E402
from render.layout import object_dirs  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("roots", nargs="+", type=Path, help="render roots (render_objaverse.py --output)")
    p.add_argument("--views", default="fixed", choices=["fixed", "random"], help="view set (default: %(default)s)")
    args = p.parse_args(argv)
    per_object, every = {}, []
    for root in args.roots:
        objects = object_dirs(root) if (root / "objects").is_dir() else {}
        if not objects:
            print(f"bench/fill.py: error: {root}: no rendered objects", file=sys.stderr)
            return 2
        for uid, folder in sorted(objects.items()):
            fills = [f for f in (alpha_fill(Image.open(v)) for v in sorted((folder / args.views).glob("*.png"))) if f]
            if fills:
                per_object[uid] = round(float(np.median(fills)), 4)
                every += fills
    q = np.percentile(every, [10, 50, 90])
    print(json.dumps({"views": args.views, "objects": len(per_object), "view_count": len(every),
                      "median": round(float(q[1]), 4), "p10": round(float(q[0]), 4), "p90": round(float(q[2]), 4),
                      "per_object": per_object}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
