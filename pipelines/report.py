"""report.html for a generation run: input, sampled views, turntable, interactive mesh, metrics; and the
demo's page (write_demo_report: a seen and a held-out object side by side with their ground truth).

    python pipelines/report.py RUN_DIR [--output report.html]      # RUN_DIR: one generate.py output

The interactive view is Google's <model-viewer> web component (npm @google/model-viewer, installed by
`make setup` into pipelines/web/node_modules and copied beside the report). The mesh is embedded as a
data URI up to EMBED_LIMIT bytes, so that the page works when opened straight from disk (browsers do not
let a file:// page fetch a file); a larger mesh is linked and the page must be served over HTTP
(`python -m http.server`). Without model-viewer installed, the page says so and shows the turntable.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without install

from common.atomic import atomic_write_text  # noqa: E402

MODEL_VIEWER = Path(__file__).parent / "web" / "node_modules" / "@google" / "model-viewer" / "dist" / "model-viewer-umd.min.js"
EMBED_LIMIT = 32 << 20


def _rel(path: Path, start: Path) -> str:
    return html.escape(os.path.relpath(path, start))


def _metrics_table(metrics: dict) -> str:
    rows = []
    for stage, values in metrics.items():
        if not isinstance(values, dict):
            continue
        for name, value in values.items():
            if isinstance(value, float):
                value = f"{value:.4g}"
            elif not isinstance(value, (int, str)):
                continue
            rows.append(f"<tr><td>{html.escape(stage)}</td><td>{html.escape(name)}</td><td>{html.escape(str(value))}</td></tr>")
    return "<table><tr><th>stage</th><th>metric</th><th>value</th></tr>" + "".join(rows) + "</table>" if rows else "<p>no metrics</p>"


LOADED_SCRIPT = """<script>
// body[data-model-loaded]: "true" once every viewer on the page has loaded its mesh, "error" if one failed.
const viewers = [...document.querySelectorAll('model-viewer')];
let loaded = 0;
viewers.forEach(v => {
  v.addEventListener('load', () => { if (++loaded === viewers.length) document.body.dataset.modelLoaded = 'true'; });
  v.addEventListener('error', () => { document.body.dataset.modelLoaded = 'error'; });
});
</script>"""


def _viewers(meshes: list, base: Path) -> list[str]:
    """One <model-viewer> per mesh (embedded as a data URI up to EMBED_LIMIT), with the script that marks
    the page loaded; or a note per mesh when model-viewer is not installed or the mesh is missing."""
    if not meshes:
        return []
    if not MODEL_VIEWER.is_file() or any(m is None for m in meshes):
        return ["<p>Interactive view unavailable: <code>pipelines/web/node_modules</code> is not installed "
                "(<code>make setup</code> installs it with npm) or the run has no mesh.glb.</p>"] * len(meshes)
    shutil.copyfile(MODEL_VIEWER, base / MODEL_VIEWER.name)
    tags = []
    for mesh in meshes:       # loading="eager": a viewer below the fold would otherwise wait to be scrolled to
        src = ("data:model/gltf-binary;base64," + base64.b64encode(mesh.read_bytes()).decode()) \
            if mesh.stat().st_size <= EMBED_LIMIT else _rel(mesh, base)
        tags.append(f'<model-viewer loading="eager" src="{src}" alt="generated mesh" camera-controls auto-rotate shadow-intensity="0.6" '
                    'exposure="1.1" style="width:400px;height:400px;background:#fff"></model-viewer>')
    tags[0] = f'<script src="{MODEL_VIEWER.name}"></script>\n' + tags[0]
    tags[-1] += "\n" + LOADED_SCRIPT
    return tags


def _figure(path, base: Path, caption: str, height: int = 192) -> str:
    if path is None or not Path(path).is_file():
        return ""
    return (f'<figure><img src="{_rel(Path(path), base)}" style="image-rendering:pixelated;height:{height}px">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


STYLE = """<style>body{font-family:sans-serif;margin:2em;max-width:1100px} figure{display:inline-block;margin:0 1em 1em 0}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}
.met{color:#070} .missed{color:#b00}</style>"""


def write_report(run_dir: Path, output: Path, metrics: dict | None = None, title: str = "iso3d generation") -> Path:
    run_dir, output = Path(run_dir).resolve(), Path(output).resolve()
    base = output.parent
    base.mkdir(parents=True, exist_ok=True)
    mesh = next(run_dir.glob("mesh.glb"), None)
    turntable = next(run_dir.glob("turntable.*"), None)
    if metrics is None and (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
    viewer = _viewers([mesh], base)
    images = []
    for label, path in (("the input as the model saw it (input.png, preprocessed) + 4 sampled views (multiview.png)",
                         run_dir / "multiview.png"),
                        ("turntable", turntable), ("3D optimisation, last validation", max(run_dir.glob("validation/*.png"), default=None))):
        images.append(_figure(path, base, label))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
{STYLE}</head>
<body data-model-loaded="pending">
<h1>{html.escape(title)}</h1>
<p>Run: <code>{html.escape(str(run_dir))}</code></p>
<h2>Images</h2>
{''.join(images)}
<h2>Mesh (<a href="{_rel(mesh, base) if mesh else ''}">mesh.glb</a>)</h2>
{viewer[0]}
<h2>Metrics</h2>
{_metrics_table(metrics or {})}
</body></html>
"""
    atomic_write_text(output, page)
    return output


def tensorboard_scalars(folder: Path, tag: str) -> list[list[float]]:
    """[[step, value], ...] of one scalar in the TensorBoard event files of `folder` ([] when there are none)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [[e.step, e.value] for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def curve_svg(points: list, title: str, width: int = 420, height: int = 180) -> str:
    """An inline SVG line plot of [[step, value], ...]: the steps along x, the values along y (linear),
    the ranges written at the axes."""
    if not points:
        return f"<p>{html.escape(title)}: nothing logged</p>"
    left, right, top, bottom = 56, 10, 22, 28
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (width - left - right) / ((x1 - x0) or 1)
    sy = (height - top - bottom) / ((y1 - y0) or 1)
    line = " ".join(f"{left + (x - x0) * sx:.1f},{height - bottom - (y - y0) * sy:.1f}" for x, y in points)
    return (f'<svg class="curve" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{html.escape(title)}"><title>{html.escape(title)}</title>'
            f'<text x="{left}" y="14" font-size="12">{html.escape(title)}</text>'
            f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" fill="none" stroke="#999"/>'
            f'<polyline points="{line}" fill="none" stroke="#1565c0" stroke-width="1.2"/>'
            f'<text x="{left - 4}" y="{top + 10}" font-size="10" text-anchor="end">{y1:.3g}</text>'
            f'<text x="{left - 4}" y="{height - bottom}" font-size="10" text-anchor="end">{y0:.3g}</text>'
            f'<text x="{left}" y="{height - 10}" font-size="10">step {x0:g}</text>'
            f'<text x="{width - right}" y="{height - 10}" font-size="10" text-anchor="end">{x1:g}</text></svg>')


def write_demo_report(summary: dict, output: Path) -> Path:
    """The demo's page: per object (seen, held out) the ground truth, the model's sampled views and the
    NeRF's renders at the same cameras (comparison.png), the mesh in a 3D viewer, the metrics against the
    demo's targets; the loss curves of both fine-tuning stages (summary["losses"]); then each stage's time
    from the run that did its work."""
    output = Path(output).resolve()
    base = output.parent
    roles = list(summary["objects"])
    runs = [Path(summary["objects"][r]["run"]) for r in roles]
    meshes = [next(run.glob("mesh.glb"), None) for run in runs]
    tags = iter(_viewers([m for m in meshes if m is not None], base))
    viewers = [next(tags) if m is not None else "" for m in meshes]
    sections = []
    for role, run, viewer in zip(roles, runs, viewers):
        obj = summary["objects"][role]
        rows = "".join(
            f"<tr><td>{html.escape(path)}</td><td>{_fmt(t['value'])}</td><td>{html.escape(t['target'])}</td>"
            f"<td class=\"{'met' if t['met'] else 'missed'}\">{'met' if t['met'] else 'not met'}</td></tr>"
            for path, t in obj["targets"].items())
        label = "seen in training" if role == "seen" else "held out of training"
        sections.append(
            f"<h2>{html.escape(obj['object'])} ({label})</h2>\n"
            + (_figure(run / "comparison.png", base, "rows: ground truth, the model's 4 sampled views, the NeRF's renders "
                       "(azimuths 0, 90, 180, 270)", 288) if (run / "comparison.png").is_file() else
               _figure(run / "multiview.png", base, "the input as the model saw it (preprocessed) and its 4 sampled views", 96))
            + _figure(next(run.glob("turntable.*"), None), base, "turntable", 192)
            + (f"\n<p class=\"missed\">The 3D stage gave no mesh: {html.escape(obj['error'])}</p>\n" if "error" in obj else
               f"\n<p><a href=\"{_rel(run / 'mesh.glb', base)}\">mesh.glb</a> &middot; run <code>{html.escape(str(run))}</code></p>\n"
               + viewer)
            + "<table><tr><th>metric</th><th>value</th><th>demo target</th><th></th></tr>" + rows + "</table>\n"
            + _metrics_table({k: obj[k] for k in ("2d", "3d")}))
    cond = summary.get("conditioning", {})
    cond_rows = "".join(
        f"<tr><td>{html.escape(summary['objects'][r]['object'])}</td>"
        + "".join(f"<td>{_fmt(c['psnr_against'][o])}</td>" for o in roles)
        + f"<td class=\"{'met' if c['own_is_closest'] else 'missed'}\">{'yes' if c['own_is_closest'] else 'no'}</td></tr>"
        for r, c in cond.items())
    cond_table = ("<h2>Does the condition matter?</h2><p>PSNR (dB) of each object's sampled views (same noise seed) "
                  "against each object's ground truth.</p><table><tr><th>samples of</th>"
                  + "".join(f"<th>vs {html.escape(summary['objects'][o]['object'])}</th>" for o in roles)
                  + "<th>closest to its own</th></tr>" + cond_rows + "</table>") if cond else ""
    curves = "".join(curve_svg(points, f"{name}: training loss per step")
                     for name, points in summary.get("losses", {}).items())
    stage_rows = "".join(
        f"<tr><td>{name}</td><td>{summary['keys'][name]}</td><td>{'reused' if info['cached'] else 'ran'}</td>"
        f"<td>{_fmt(info['seconds'])}</td></tr>" for name, info in summary["stages"].items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>iso3d demo</title>
{STYLE}</head>
<body data-model-loaded="pending">
<h1>iso3d demo: the tiny model on the procedural objects</h1>
{''.join(sections)}
{cond_table}
<h2>Fine-tuning</h2>
<div class="curves">{curves}</div>
<h2>Stages</h2>
<table><tr><th>stage</th><th>key</th><th>this run</th><th>seconds (of the run that did the work)</th></tr>{stage_rows}</table>
</body></html>
"""
    atomic_write_text(output, page)
    return output


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("n/a" if value is None else str(value))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    if not (args.run_dir / "multiview.png").is_file():
        print(f"report.py: error: {args.run_dir}: not a generate.py output (no multiview.png)", file=sys.stderr)
        return 2
    print(write_report(args.run_dir, args.output or args.run_dir / "report.html"))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def write_render_report(root: Path, suspects_shown: int = 32) -> dict:
    """A render root's report.html (and report/suspects.png) showing render/quality.py's
    `render_statistics`: objects by status and failure reason, the quality flags' counts and the figures'
    distributions, the most suspect objects as images. Returns those numbers."""
    from PIL import Image

    from render.layout import object_dir
    from render.preview import grid, on_white
    from render.quality import render_statistics
    from render.output import RenderRoot
    root = Path(root).resolve()
    if not (root / "manifest.jsonl").is_file():
        raise FileNotFoundError(f"{root}: no manifest.jsonl (not a render output)")
    summary = render_statistics(RenderRoot(root).latest(), suspects_shown)
    shown = [s for s in summary["suspects"] if (object_dir(root, s["uid"]) / "fixed" / "000.png").is_file()]
    out_dir = root / "report"
    out_dir.mkdir(exist_ok=True)
    cells = []
    if shown:
        tiles = [on_white(Image.open(object_dir(root, s["uid"]) / "fixed" / "000.png")) for s in shown]
        grid(tiles, columns=8).save(out_dir / "suspects.png")
        cells = [_figure(object_dir(root, s["uid"]) / "preview.png", root, f"{s['uid']}: {', '.join(s['flags'])}", height=96)
                 for s in shown]
    rows = lambda d: "".join(f"<tr><td>{html.escape(str(k))}</td><td>{v}</td></tr>" for k, v in d.items())  # noqa: E731
    examples = summary["failure_examples"]
    failure_rows = "".join(f"<tr><td>{html.escape(r)}</td><td>{n}</td><td>{html.escape(examples[r]['uid'])}: "
                           f"{html.escape(examples[r]['error'])}</td></tr>" for r, n in summary["failures"].items())
    figure_rows = "".join(f"<tr><td>{k}</td>" + "".join(f"<td>{v}</td>" for v in q.values()) + "</tr>"
                          for k, q in summary["figures"].items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>render report: {html.escape(root.name)}</title>
{STYLE}</head><body>
<h1>Render report</h1>
<p><code>{html.escape(str(root))}</code>: {summary['objects']} objects in the manifest (its last line per object).</p>
<h2>Status</h2><table><tr><th>status</th><th>objects</th></tr>{rows(summary['status'])}</table>
<h2>Failures by reason</h2><table><tr><th>reason</th><th>objects</th><th>first example</th></tr>{failure_rows}</table>
<h2>Quality flags</h2>
<p>Of the rendered objects; {summary['without_quality_figures']} have no quality figures (rendered before they
existed). Training leaves out the flags in <code>data.exclude_flags</code> (by default nearly_empty, dark, magenta).</p>
<table><tr><th>flag</th><th>objects</th></tr>{rows(summary['flags'])}</table>
<h2>Figures</h2><table><tr><th>figure</th><th>min</th><th>p10</th><th>median</th><th>p90</th><th>max</th></tr>{figure_rows}</table>
<h2>Most suspect objects ({len(shown)} of {summary['flagged']} flagged)</h2>
{''.join(cells) or '<p>none flagged</p>'}
</body></html>
"""
    atomic_write_text(root / "report.html", page)
    return summary
