"""report.html for a generation run: input, sampled views, turntable, interactive mesh, metrics.

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


def write_report(run_dir: Path, output: Path, metrics: dict | None = None, title: str = "iso3d generation",
                 extra: str = "") -> Path:
    run_dir, output = Path(run_dir).resolve(), Path(output).resolve()
    base = output.parent
    base.mkdir(parents=True, exist_ok=True)
    mesh = next(run_dir.glob("mesh.glb"), None)
    turntable = next(run_dir.glob("turntable.*"), None)
    if metrics is None and (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
    if MODEL_VIEWER.is_file() and mesh is not None:
        shutil.copyfile(MODEL_VIEWER, base / MODEL_VIEWER.name)
        size = mesh.stat().st_size
        src = ("data:model/gltf-binary;base64," + base64.b64encode(mesh.read_bytes()).decode()) if size <= EMBED_LIMIT \
            else _rel(mesh, base)
        viewer = (f'<script src="{MODEL_VIEWER.name}"></script>\n'
                  f'<model-viewer id="mesh" src="{src}" alt="generated mesh" camera-controls auto-rotate '
                  'shadow-intensity="0.6" exposure="1.1" style="width:480px;height:480px;background:#fff"></model-viewer>\n'
                  "<script>const mv = document.getElementById('mesh');\n"
                  "mv.addEventListener('load', () => { document.body.dataset.modelLoaded = 'true'; });\n"
                  "mv.addEventListener('error', () => { document.body.dataset.modelLoaded = 'error'; });</script>")
    else:
        viewer = ("<p>Interactive view unavailable: <code>pipelines/web/node_modules</code> is not installed "
                  "(<code>make setup</code> installs it with npm) or the run has no mesh.glb.</p>")
    images = []
    for label, path in (("input + 4 sampled views (multiview.png)", run_dir / "multiview.png"),
                        ("turntable", turntable), ("3D optimisation, last validation", max(run_dir.glob("validation/*.png"), default=None))):
        if path is not None and Path(path).is_file():
            images.append(f'<figure><img src="{_rel(Path(path), base)}" style="image-rendering:pixelated;height:192px">'
                          f"<figcaption>{html.escape(label)}</figcaption></figure>")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} figure{{display:inline-block;margin:0 1em 1em 0}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}</style></head>
<body data-model-loaded="pending">
<h1>{html.escape(title)}</h1>
<p>Run: <code>{html.escape(str(run_dir))}</code></p>
<h2>Images</h2>
{''.join(images)}
<h2>Mesh (<a href="{_rel(mesh, base) if mesh else ''}">mesh.glb</a>)</h2>
{viewer}
<h2>Metrics</h2>
{_metrics_table(metrics or {})}
{extra}
</body></html>
"""
    atomic_write_text(output, page)
    return output


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
