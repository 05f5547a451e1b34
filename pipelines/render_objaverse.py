"""Render 3D objects with Blender into 16 random + 16 fixed views each, in parallel with Ray.

    python pipelines/render_objaverse.py --source demo --output runs/render            # built-in set
    python pipelines/render_objaverse.py --source /data/glbs --output out --resolution 256
    python pipelines/render_objaverse.py --source objaverse --lvis-categories chair,mug \
        --num-shards 64 --shards 0-3,7 --output /shared/renders --address ray://head:10001
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python pipelines/render_objaverse.py --source objaverse --shards all --output /shared/renders
    python pipelines/render_objaverse.py --report /shared/renders     # report.html: failures, quality flags

Blender worker processes (one per Ray worker) render objects in turn, each from a factory-empty scene
and under a timeout (a timeout or crash kills and replaces only that process); an object's folder appears under OUTPUT/objects/<bb>/<uid>/ (<bb>: a hash of the uid, render/layout.py) only when complete, and every attempt is a line of
OUTPUT/manifest.jsonl. A rerun skips objects already complete with the same render settings.
Each rendered object gets quality figures and flags (meta.json "quality", render/quality.py: nearly
empty views, dark, missing-texture magenta, unlit materials); training leaves flagged objects out by a
rule in its configuration (data.exclude_flags).
Exit status: 0 when at least one object is complete (failures are in the manifest), 1 when every
object of the run failed, 2 for bad input (nothing is written then).
Extra `key=value` arguments override configuration fields (e.g. settings.denoiser=high).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without install

from common.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from common.config import ConfigError, load_config, save_config  # noqa: E402
from common.logs import logging_to  # noqa: E402
from render.settings import RenderConfig  # noqa: E402
from render.output import RenderRoot  # noqa: E402
from render.scheduler import render_all  # noqa: E402
from render.shards import parse_shards, select  # noqa: E402
from render.sources import SourceError, list_objects  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--source", default="demo", help="objaverse | demo | PATH (a folder of GLB/glTF/OBJ/FBX/PLY/STL)")
    p.add_argument("--output", default="outputs/render", type=Path, help="render root (default: %(default)s)")
    p.add_argument("--config", type=Path, help="YAML file of RenderConfig fields")
    p.add_argument("--shards", help="shards to render: 'all' or a list like 0-3,7 (default: all)")
    p.add_argument("--num-shards", type=int, help="split the object list into this many shards (default: 1)")
    p.add_argument("--limit", type=int, help="render at most N objects of the selected shards")
    p.add_argument("--resolution", type=int, help="image size in pixels (default: 256)")
    p.add_argument("--samples", type=int, help="Cycles samples per pixel (default: 16, with the fast denoiser)")
    p.add_argument("--denoiser", choices=["none", "fast", "balanced", "high"], help="OpenImageDenoise quality")
    p.add_argument("--timeout", type=float, help="seconds per object before its Blender is killed (default: 900)")
    p.add_argument("--retries", type=int, help="extra attempts after a timeout or crash (default: 1)")
    p.add_argument("--device", help="Cycles device: cpu | cuda | optix | hip | oneapi | metal (default: cpu)")
    p.add_argument("--address", help="Ray cluster to join (default: start a local Ray on 127.0.0.1)")
    p.add_argument("--num-workers", type=int, help="objects rendered at once (default: all CPUs)")
    p.add_argument("--seed", type=int, help="base seed of views and lighting (default: 0)")
    p.add_argument("--uids", help="objaverse: comma-separated uids, or a file with one uid per line")
    p.add_argument("--lvis-categories", help="objaverse: keep objects of these LVIS categories (comma-separated)")
    p.add_argument("--objaverse-dir", help="objaverse: root of its cache/mirror (default: ~/.objaverse)")
    p.add_argument("--demo-count", type=int, default=12, help="demo: number of procedural objects (default: 12)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--report", type=Path, metavar="OUTPUT", help="render nothing: write OUTPUT/report.html (objects "
                   "by status and failure reason, quality flags and figures, the most suspect objects) and print "
                   "its numbers as JSON")
    p.add_argument("overrides", nargs="*", help="configuration overrides, key.sub=value")
    return p.parse_args(argv)


def resolve_config(args) -> RenderConfig:
    flags = {"shards": args.shards, "num_shards": args.num_shards, "limit": args.limit, "timeout": args.timeout,
             "retries": args.retries, "device": args.device, "num_workers": args.num_workers,
             "settings.resolution": args.resolution, "settings.samples": args.samples,
             "settings.denoiser": args.denoiser, "settings.seed": args.seed}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    return load_config(RenderConfig, args.config, overrides)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        from pipelines.report import write_render_report
        try:
            print(json.dumps(write_render_report(args.report)))
        except FileNotFoundError as e:
            print(f"render_objaverse.py: error: --report {e}", file=sys.stderr)
            return 2
        return 0
    try:
        cfg = resolve_config(args)
        cfg.validate()
        shards = parse_shards(cfg.shards, cfg.num_shards)
        uids = None
        if args.uids:
            uids_path = Path(args.uids)
            uids = uids_path.read_text().split() if uids_path.is_file() else args.uids.split(",")
        categories = args.lvis_categories.split(",") if args.lvis_categories else None
        refs = list_objects(args.source, args.output / "sources", seed=cfg.settings.seed, demo_count=args.demo_count,
                            uids=uids, lvis_categories=categories, objaverse_dir=args.objaverse_dir)
    except (ConfigError, SourceError, ValueError, OSError) as e:
        print(f"render_objaverse.py: error: {e}", file=sys.stderr)
        return 2

    root = RenderRoot(args.output)          # created only once the run's input is known to be good
    run_dir = root.path / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    atomic_write_text(run_dir / "cmd.txt", shlex.join([sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)]) + "\n")
    selected = select(refs, shards, cfg.num_shards, cfg.limit)
    with logging_to(run_dir / "render.log", stderr=True):
        summary = render_all(root, selected, cfg, address=args.address, objaverse_dir=args.objaverse_dir,
                             progress=not args.no_progress)
    summary.update(source=args.source, shards=shards, num_shards=cfg.num_shards)
    atomic_write_json(run_dir / "summary.json", summary)
    print(json.dumps({k: summary[k] for k in ("selected", "skipped", "ok", "failed", "failures")}))
    if summary["failed"] and not summary["ok"] and not summary["skipped"]:
        print(f"render_objaverse.py: error: every object failed ({summary['failures']}); see {root.path / 'manifest.jsonl'} "
              f"and {root.logs}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
