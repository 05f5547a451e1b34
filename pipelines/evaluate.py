"""Evaluation as a pipeline: a checkpoint's image-to-3D against every object of a render root.

    python pipelines/evaluate.py --objects OUTPUT_OF_RENDER --checkpoint CKPT --output outputs/eval
    python pipelines/evaluate.py --objects renders/ --checkpoint CKPT --output eval/ --steps 2000 --address auto

For each rendered object (render_objaverse.py's layout: the demo's, a GSO or an Objaverse render), its fixed
view 0 (azimuth 0, so the run's frame is the object's) goes through generate.py's image-to-3D with
`preprocess.frame=false` (the renders' scale is kept, so views compare at the same cameras), then
optimize3d/evaluate.py scores against the object's renders: PSNR and SSIM of the model's 4 sampled views and
of the NeRF's 16 fixed-view renders, silhouette IoU, and, when the source mesh is found (`--meshes DIR` with
<uid>.glb, or the render root's sources/*/<uid>.glb), Chamfer distance, volume IoU and colour error of the
exported mesh; LPIPS with `--lpips-backbone FILE` (torchvision's AlexNet weights, alexnet-owt-7be5be79.pth, or
the same as .safetensors; the lpips package's own linear layers), otherwise left out, and the summary says so.
One Ray task per object (a GPU each when the cluster has them: --gpus-per-task); generate's cache makes a rerun
redo nothing and a killed run resume (each 3D stage from its last field checkpoint).

Output:
  OUT/runs/<uid>/<uid>-<key>/   each object's generate run, with metrics.json and comparison.png
  OUT/objects/<uid>.json        its metrics and run folder (status evaluated | cached | no_surface: the 3D stage
                                ended without a surface, 2D metrics only | failed)
  OUT/summary.json              per metric over the objects: mean, median, worst, count; the failures
  OUT/index.html                a row per object (input, ground truth / sampled views / NeRF), sortable by any metric
"""
from __future__ import annotations

import argparse
import html
import json
import shlex
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without install

from common.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from common.config import ConfigError  # noqa: E402
from pipelines.generate import model_overrides, resolve_config, resolve_model  # noqa: E402
from pipelines.report import STYLE, _rel  # noqa: E402
from render.layout import object_dir, object_dirs  # noqa: E402

# (section, metric, higher is better): the summary's and the page's columns
METRICS = [("2d", "psnr", True), ("2d", "ssim", True), ("2d", "lpips", False), ("3d", "psnr", True),
           ("3d", "ssim", True), ("3d", "lpips", False),
           ("3d", "silhouette_iou", True), ("3d", "chamfer", False), ("3d", "volume_iou", True),
           ("3d", "colour_error", False)]
LPIPS_NOTE = "LPIPS left out: it needs its backbone's weights (--lpips-backbone FILE), and none were given"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", type=Path, required=True, help="a render root (render_objaverse.py --output)")
    p.add_argument("--checkpoint", type=Path, required=True, help="as generate.py's --checkpoint")
    p.add_argument("--output", type=Path, default=Path("outputs/evaluate"), help="default: %(default)s")
    p.add_argument("--uids", nargs="+", metavar="UID", help="only these objects of the render root (default: all)")
    p.add_argument("--meshes", type=Path, help="a folder of source meshes named <uid>.glb (default: the render "
                   "root's sources/*/<uid>.glb; without one an object's mesh metrics are left out)")
    p.add_argument("--lpips-backbone", type=Path, help="torchvision's AlexNet weights (alexnet-owt-7be5be79.pth or "
                   ".safetensors), for LPIPS; without it LPIPS is left out")
    p.add_argument("--config", default="auto", help="as generate.py's --config")
    p.add_argument("--steps", type=int, help="3D-stage steps (tiny: 300, sd21: 10000)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--address", help="Ray cluster (default: a local Ray on 127.0.0.1)")
    p.add_argument("--gpus-per-task", type=float, default=None, help="default: 1 when the Ray cluster has GPUs, else 0")
    p.add_argument("--cpus-per-task", type=float, default=1.0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="key.sub=value: GenerateConfig fields, or model.* fields")
    args = p.parse_args(argv)
    args.remove_background, args.segmenter, args.strict = False, None, False   # renders carry their alpha
    # the renders' own framing: the NeRF is compared with the renders at their cameras
    args.overrides = [*args.overrides, "preprocess.frame=false"]
    return args


def source_mesh(render_root: Path, meshes: Path | None, uid: str) -> Path | None:
    candidates = [meshes / f"{uid}.glb"] if meshes else sorted((render_root / "sources").glob(f"*/{uid}.glb"))
    return next((p for p in candidates if p.is_file()), None)


def evaluate_object(uid: str, render_root: Path, mesh: Path | None, checkpoint: Path, out: Path, cfg, cmd: str,
                    device: str | None, overrides: list[str], lpips_backbone: Path | None = None) -> dict:
    """One object: its fixed view 0 -> generate (cached by its key) -> metrics (kept in the run once made).
    A 3D stage that ends without a surface (an empty field) is a row of its own, "no_surface", with the
    reason and the 2D metrics of its sampled views (its run folder stays .partial, as generate leaves it)."""
    from dataset.views import RenderedObject
    from optimize3d.evaluate import LPIPS, evaluate_run, sample_metrics, sampled_view_pairs, scored_mesh
    from optimize3d.export import EmptyMeshError
    from optimize3d.image_to_3d import generate
    image = out / "inputs" / f"{uid}.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    source = object_dir(render_root, uid) / "fixed" / "000.png"
    if not image.is_file() or image.read_bytes() != source.read_bytes():
        shutil.copyfile(source, image)
    try:
        result = generate(image, checkpoint, out / "runs" / uid, cfg, cmd=cmd, progress=False, device=device,
                          model_overrides=overrides)
        run = Path(result["output"])
        earlier = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else None
        fresh = earlier is not None and earlier.get("scored") == scored_mesh(run)    # not of an earlier mesh
        if fresh and (lpips_backbone is None or "lpips" in earlier["2d"]):
            metrics, evaluated = earlier, False              # made by an earlier evaluation of this run
        else:
            scorer = LPIPS(lpips_backbone) if lpips_backbone is not None else None
            metrics, evaluated = evaluate_run(run, object_dir(render_root, uid), mesh, lpips=scorer), True
    except Exception as e:  # noqa: BLE001  (one object's failure is a row of the report, not the end of the others)
        if not isinstance(e, EmptyMeshError) or e.run_dir is None:
            return {"uid": uid, "status": "failed", "error": f"{type(e).__name__}: {e}".splitlines()[0]}
        run, reason = e.run_dir, str(e).splitlines()[0]
        try:
            scorer = LPIPS(lpips_backbone) if lpips_backbone is not None else None
            pairs = sampled_view_pairs(run, RenderedObject.open(object_dir(render_root, uid)))
            metrics = {"2d": sample_metrics(pairs, scorer), "3d": {}, "error": reason}
            atomic_write_json(run / "metrics.json", metrics)
        except Exception as e2:  # noqa: BLE001
            return {"uid": uid, "status": "failed", "error": f"{reason}; then {type(e2).__name__}: {e2}".splitlines()[0]}
        return {"uid": uid, "status": "no_surface", "error": reason, "generate": "no_surface", "run": str(run),
                "input": str(image), "metrics": metrics}
    return {"uid": uid, "status": "evaluated" if evaluated else "cached", "generate": result["status"],
            "run": str(run), "input": str(image), "metrics": metrics}


def summarise(rows: list[dict], lpips_backbone: Path | None = None) -> dict:
    note = LPIPS_NOTE if lpips_backbone is None else f"LPIPS: AlexNet backbone {lpips_backbone}, lpips 0.1.4 linear layers v0.1"
    out = {"objects": len(rows), "failed": {r["uid"]: r["error"] for r in rows if r["status"] == "failed"},
           "no_surface": {r["uid"]: r["error"] for r in rows if r["status"] == "no_surface"}, "notes": [note],
           "metrics": {}}
    for section, name, higher in METRICS:
        values = [(r["metrics"][section][name], r["uid"]) for r in rows
                  if r["status"] != "failed" and r["metrics"].get(section, {}).get(name) is not None]
        if not values:
            continue
        worst = min(values) if higher else max(values)
        out["metrics"][f"{section}.{name}"] = {
            "mean": statistics.fmean(v for v, _ in values), "median": statistics.median(v for v, _ in values),
            "worst": worst[0], "worst_object": worst[1], "count": len(values), "higher_is_better": higher}
    return out


def write_page(rows: list[dict], summary: dict, out: Path) -> Path:
    """index.html: the summary, then a row per object; a click on a column heading sorts by it."""
    def rel(p: str) -> str:
        return _rel(Path(p).resolve(), out.resolve())

    def cell(value) -> str:
        return f"<td data-v='{value:.6g}'>{value:.3f}</td>" if isinstance(value, float) else "<td data-v=''>–</td>"
    heads = "".join(f"<th onclick='sortBy({i + 2})'>{s} {n}</th>" for i, (s, n, _) in enumerate(METRICS))
    body = []
    for r in rows:
        if r["status"] == "failed":
            body.append(f"<tr><td>{html.escape(r['uid'])}</td><td colspan='{len(METRICS) + 1}'>failed: "
                        f"{html.escape(r['error'])}</td></tr>")
            continue
        m = r["metrics"]
        comparison = Path(r["run"]) / "comparison.png"
        pictures = (f"<img src='{rel(r['input'])}' height='64'> <img src='{rel(str(comparison))}' height='96'>"
                    if comparison.is_file() else f"<img src='{rel(r['input'])}' height='64'>")
        body.append(f"<tr><td>{html.escape(r['uid'])}</td><td>{pictures}</td>"
                    + "".join(cell(m.get(s, {}).get(n)) for s, n, _ in METRICS) + "</tr>")
    summary_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v['mean']:.3f}</td><td>{v['median']:.3f}</td><td>{v['worst']:.3f} "
        f"({html.escape(v['worst_object'])})</td><td>{v['count']}</td></tr>" for k, v in summary["metrics"].items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>iso3d evaluation</title>
{STYLE}<style>#objects th{{cursor:pointer;background:#eee}}</style></head><body>
<h1>Evaluation: {len(rows)} objects</h1>
<p>{html.escape(' '.join(summary['notes']))}. Failed: {len(summary['failed'])}. No surface (2D metrics only):
{len(summary['no_surface'])}.</p>
<table id="summary"><tr><th>metric</th><th>mean</th><th>median</th><th>worst</th><th>objects</th></tr>{summary_rows}</table>
<p>Each row: the input (fixed view 0), then ground truth / the model's sampled views / the NeRF's renders at
azimuths 0, 90, 180, 270. Click a heading to sort.</p>
<table id="objects"><thead><tr><th onclick="sortBy(0)">object</th><th>views</th>{heads}</tr></thead>
<tbody>{''.join(body)}</tbody></table>
<script>
let order = {{}};
function sortBy(col) {{
  const tbody = document.querySelector('#objects tbody');
  const rows = [...tbody.rows];
  order[col] = -(order[col] || -1);
  const key = r => {{ const c = r.cells[col]; if (!c) return ''; const v = c.dataset.v;
                      return v === undefined ? c.textContent : (v === '' ? NaN : parseFloat(v)); }};
  rows.sort((a, b) => {{ const x = key(a), y = key(b);
    if (typeof x === 'number' || typeof y === 'number') {{
      if (isNaN(x)) return 1; if (isNaN(y)) return -1; return order[col] * (x - y); }}
    return order[col] * String(x).localeCompare(String(y)); }});
  rows.forEach(r => tbody.appendChild(r));
}}
</script></body></html>"""
    atomic_write_text(out / "index.html", page)
    return out / "index.html"


def run_all(uids: list[str], args, cfg, cmd: str) -> list[dict]:
    from common.ray_local import map_tasks
    root, out, checkpoint = args.objects.resolve(), args.output.resolve(), args.checkpoint.resolve()
    meshes = args.meshes.resolve() if args.meshes else None
    lpips_backbone = args.lpips_backbone.resolve() if args.lpips_backbone else None

    def one(uid: str) -> dict:
        return evaluate_object(uid, root, source_mesh(root, meshes, uid), checkpoint, out, cfg, cmd, args.device,
                               model_overrides(args), lpips_backbone)

    rows = []
    for row in map_tasks(one, uids, args.address, args.cpus_per_task, args.gpus_per_task, "objects", not args.no_progress):
        atomic_write_json(out / "objects" / f"{row['uid']}.json", row)
        rows.append(row)
    return sorted(rows, key=lambda r: r["uid"])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cmd = shlex.join([sys.executable, str(Path(__file__).resolve()), *argv])
    try:
        if not args.objects.is_dir():
            raise ValueError(f"--objects {args.objects}: not a folder")
        uids = sorted(object_dirs(args.objects)) if (args.objects / "objects").is_dir() else []
        if not uids:
            raise ValueError(f"--objects {args.objects}: no rendered objects (expected render_objaverse.py's layout, objects/<bb>/<uid>/)")
        if args.uids:
            unknown = sorted(set(args.uids) - set(uids))
            if unknown:
                raise ValueError(f"--uids: {', '.join(unknown)} not in --objects {args.objects}")
            uids = sorted(set(args.uids))
        missing = [u for u in uids if not (object_dir(args.objects, u) / "fixed" / "000.png").is_file()]
        if missing:
            raise ValueError(f"--objects {args.objects}: {len(missing)} objects have no fixed/000.png, e.g. {missing[0]}")
        if args.meshes is not None and not args.meshes.is_dir():
            raise ValueError(f"--meshes {args.meshes}: not a folder")
        if args.lpips_backbone is not None:
            from optimize3d.evaluate import LPIPS
            LPIPS(args.lpips_backbone)               # a wrong file is refused before any object runs
        model_cfg = resolve_model(args)
        cfg = resolve_config(args, model_cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    (args.output / "objects").mkdir(parents=True, exist_ok=True)
    rows = run_all(uids, args, cfg, cmd)
    summary = summarise(rows, args.lpips_backbone)
    atomic_write_json(args.output / "summary.json", summary)
    page = write_page(rows, summary, args.output)
    if args.lpips_backbone is None:
        print(LPIPS_NOTE, file=sys.stderr)
    print(json.dumps({"summary": str(args.output / "summary.json"), "page": str(page), "objects": len(rows),
                      "failed": len(summary["failed"])}, indent=1))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
