"""A web app for image to 3D: drop an image, pick a checkpoint, press Generate (Gradio, on 127.0.0.1).

    python pipelines/app.py                                   # the demo's checkpoint, http://127.0.0.1:7860
    python pipelines/app.py --checkpoint runs/stage2 --port 8000
    python pipelines/app.py --host 0.0.0.0                    # other machines may connect: only when you mean it
    python pipelines/app.py --steps 200 export.threshold=8    # settings for every request (generate.py's)
    python pipelines/app.py --segmenter u2net.onnx            # photos: a "remove background" box, on by default
    python pipelines/app.py --host 0.0.0.0 --concurrency 2 --keep-results 500 --max-upload-mb 10

Each request runs `pipelines/generate.py` in its own process with the same output folder and cache as
the command line (default outputs/app/): a second request for the same image, checkpoint and settings
returns the finished result at once; a request that was interrupted resumes. The uploaded image is
saved under its content hash (inputs/<sha256>.png), so its result is found again whatever the file was
called. Before anything runs, the page shows the input as the model will see it (optimize3d/preprocess.py:
the object cut out when "remove background" is ticked, centred and scaled like the training renders). While the
3D stage runs it shows the step, the losses and the field's latest validation views; then the 4 sampled views,
the turntable, the mesh in a 3D viewer and a download of mesh.glb. A bad image is refused with generate.py's
one-line message before any model is loaded; a photo that is not on white gets its warning.

On a network (--host other than loopback) only the checkpoints offered at start are accepted (--checkpoints
any allows a typed path, for a single-user machine). Two requests for the same result run it once (the
second waits on the result's lock, optimize3d/rundir.py); a client that disconnects has its generate.py
stopped (its .partial folder stays, and the next request for that picture resumes it). Uploads are limited
in size, and the output folder keeps the newest --keep-results results (older ones, their inputs,
previews and logs are deleted after each request).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a clone without install
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")     # nothing leaves the machine

from common.atomic import atomic_path, atomic_write_bytes  # noqa: E402
from common.config import ConfigError, config_hash, load_config  # noqa: E402
from optimize3d.inputs import InputImageError, image_digest, load_input_image  # noqa: E402
from optimize3d.preprocess import PreprocessConfig, preprocess  # noqa: E402
from optimize3d.rundir import PARTIAL_SUFFIX, final_of, lock_file  # noqa: E402

DEFAULT_OUTPUT = ROOT / "outputs" / "app"
DEMO_RUN = ROOT / "outputs" / "demo-run"
POLL_SECONDS = 1.0
KEEP_RESULTS = 200
MAX_UPLOAD_MB = 25


def checkpoints(extra: list[Path]) -> list[str]:
    """The checkpoints offered: those given, then the demo's stage-2 and stage-1 runs (newest first)."""
    found = [str(p) for p in extra]
    for pattern in ("stage2-*/checkpoints/step-*", "stage1-*/checkpoints/step-*"):
        runs = sorted(DEMO_RUN.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
        found += [str(p) for p in runs if (p / "config.json").is_file() and str(p) not in found]
    return found


def accepts_any_checkpoint(host: str, choice: str | None) -> bool:
    """--checkpoints any|offered, by default any on loopback (the user's own machine) and offered otherwise:
    a client on the network must not make the server open a path of its choosing."""
    from common.ray_local import is_loopback
    return (choice or ("any" if is_loopback(host) else "offered")) == "any"


def save_upload(path: str, inputs: Path) -> Path:
    """The upload under its content hash: the same picture always maps to the same cached result."""
    target = inputs / f"{image_digest(Path(path))[:16]}{Path(path).suffix.lower() or '.png'}"
    if not target.is_file():
        atomic_write_bytes(target, Path(path).read_bytes())
    return target


def progress_of(output: Path, stem: str) -> tuple[str, str | None]:
    """(step and losses, latest validation image) of the run being built for `stem`, if any."""
    work = max(output.glob(f"{stem}-*{PARTIAL_SUFFIX}"), key=lambda p: p.stat().st_mtime, default=None)
    if work is None:
        return "starting", None
    text = "sampling the 2D views" if not (work / "multiview.png").is_file() else "3D stage starting"
    losses = work / "losses.jsonl"
    if losses.is_file():
        lines = losses.read_text().splitlines()
        if lines:
            last = json.loads(lines[-1])
            text = "3D stage, " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items())
    image = max(work.glob("validation/*.png"), default=None)
    return text, None if image is None else str(image)


def run_generate(image: Path, checkpoint: str, output: Path, extra: list[str]):
    """generate.py in its own process (and process group); yields (status, validation image) while it runs,
    then returns its result dict (generate.py's JSON) or raises RuntimeError with its one-line error. Its
    stdout and stderr go to files, never to a pipe that could fill. Closed before the end (the client
    disconnected), it stops the process."""
    cmd = [sys.executable, str(ROOT / "pipelines" / "generate.py"), "--image", str(image), "--checkpoint", checkpoint,
           "--output", str(output), "--no-progress", *extra]
    logs = output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{image.stem}.log"
    result = logs / f"{image.stem}-{os.getpid()}-{time.monotonic_ns()}.json"
    with open(log, "ab") as err, open(result, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, start_new_session=True)
    try:
        while proc.poll() is None:
            # Yielded every poll, changed or not: Gradio closes a request's generator (which stops its generate.py,
            # below) only at a yield, so a client that went away is noticed within a poll (measured: yielding only
            # changes let disconnected requests run on, and the soak took 40 s, not 30)
            yield progress_of(output, image.stem)
            time.sleep(POLL_SECONDS)
        stdout = result.read_text()
    finally:
        if proc.poll() is None:
            print(f"app.py: a client went away: stopping generate.py (pid {proc.pid}) for {image.name}", file=sys.stderr,
                  flush=True)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        result.unlink(missing_ok=True)
    if proc.returncode != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if "error:" in line]
        raise RuntimeError(lines[-1].split("error:", 1)[1].strip() if lines else f"generate.py failed (log {log})")
    return json.loads(stdout)


def evict(output: Path, keep: int) -> list[str]:
    """Keep the newest `keep` results of the app's output folder (complete ones, and .partial ones no process
    is working on); delete the older ones, then the inputs, previews and logs that no remaining result uses,
    beyond the newest `keep` of each, and CLIP embeddings beyond the newest `keep` (recomputed if needed).
    A result whose lock a generate.py holds is never touched (two requests for an evicted picture arriving
    in the very moment of its deletion may both run it). Returns what went, relative to `output`."""
    runs = [d for d in output.iterdir() if d.is_dir() and ((d / "export.json").is_file() or d.name.endswith(PARTIAL_SUFFIX))]
    runs.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    gone, kept = [], 0
    for d in runs:
        with open(lock_file(final_of(d)), "a") as lock:   # held while deleting: a generate.py starting now waits
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue                                  # a generate.py is making it: neither kept nor deleted
            kept += 1
            if kept > keep:
                shutil.rmtree(d, ignore_errors=True)
                lock_file(final_of(d)).unlink(missing_ok=True)
                gone.append(d.name)
    used = {d.name.split("-", 1)[0] for d in output.iterdir() if d.is_dir()}
    # (logs/*.json: the stdout of requests in flight, never evicted)
    for folder, pattern, needs_use in (("inputs", "*", True), ("previews", "*", True), ("logs", "*.log", True),
                                       ("cache/clip", "*", False)):
        files = sorted((output / folder).glob(pattern), key=lambda f: f.stat().st_mtime, reverse=True) \
            if (output / folder).is_dir() else []
        for f in files[keep:]:
            if not needs_use or f.name.split("-", 1)[0].split(".", 1)[0] not in used:
                f.unlink(missing_ok=True)
                gone.append(f"{folder}/{f.name}")
    return gone


def preprocess_settings(extra: list[str], segmenter: Path | None) -> PreprocessConfig:
    """The preprocess.* settings every request's generate.py gets (remove_background is the page's box)."""
    overrides = [o[len("preprocess."):] for o in extra if o.startswith("preprocess.")]
    cfg = load_config(PreprocessConfig, None, overrides)
    if segmenter is not None:
        cfg.segmenter = str(segmenter)
    cfg.validate()
    return cfg


def preview_input(upload: Path, cfg: PreprocessConfig, previews: Path) -> tuple[Path, list[str]]:
    """The input as the model will see it (generate.py runs the same step again, into its input.png)."""
    rgba, warnings = preprocess(load_input_image(upload), cfg, upload.name)
    path = previews / f"{image_digest(upload)[:16]}-{config_hash(cfg)[:8]}.png"
    with atomic_path(path) as tmp:
        rgba.save(tmp, format="PNG")
    return path, warnings


def handle_request(upload, checkpoint, remove_background: bool, output: Path, settings: PreprocessConfig, extra: list[str],
                   keep: int = KEEP_RESULTS):
    """One press of Generate. Yields the page's (status, input as the model sees it, validation views, sampled
    views, turntable, result, download): first the preprocessed input alone, before generate.py starts."""
    import gradio as gr
    if upload is None:
        raise gr.Error("drop an image first")
    if not checkpoint:
        raise gr.Error("no checkpoint: give --checkpoint, or run `make demo` first")
    flags = ["--remove-background", "--segmenter", settings.segmenter] if remove_background and settings.segmenter else []
    cfg = PreprocessConfig(**{**vars(settings), "remove_background": bool(flags)})
    try:                                               # the CLI's checks and messages, before any model loads
        seen, warnings = preview_input(Path(upload), cfg, output / "previews")
    except InputImageError as e:
        raise gr.Error(str(e))
    image = save_upload(upload, output / "inputs")
    for w in warnings:
        gr.Warning(w)
    yield "preprocessed" + (f" (warning: {warnings[0]})" if warnings else ""), str(seen), None, None, None, None, None
    runs = run_generate(image, checkpoint, output, flags + extra)
    try:
        while True:
            status, validation = next(runs)
            yield status, str(seen), validation, None, None, None, None
    except StopIteration as done:
        result = done.value
    except RuntimeError as e:
        raise gr.Error(str(e))
    finally:
        runs.close()                # the client went away (Gradio closes this generator): generate.py is stopped
    evict(output, keep)
    run = Path(result["output"])
    turntable = next(run.glob("turntable.*"), None)
    status = f"{'cached' if result['status'] == 'cached' else 'done'}: {run}"
    yield (status, str(run / "input.png"), max(run.glob("validation/*.png"), default=None), str(run / "multiview.png"),
           None if turntable is None else str(turntable), str(run / "mesh.glb"), str(run / "mesh.glb"))


def build_app(output: Path, offered: list[str], extra: list[str], segmenter: Path | None = None,
              any_checkpoint: bool = True, concurrency: int = 1, keep: int = KEEP_RESULTS):
    import gradio as gr
    settings = preprocess_settings(extra, segmenter)

    def generate(upload, checkpoint, remove_background):
        yield from handle_request(upload, checkpoint, remove_background, output, settings, extra, keep)

    def show_mesh(path):
        # The viewer gets its value once, from a plain (non-generator) event: Gradio 6.31's Model3D, set by a
        # generator's last yield, receives it twice and never mounts its 3D canvas.
        return path

    # Gradio's own copies of uploads and outputs: deleted hourly once a day old.
    with gr.Blocks(title="iso3d: image to 3D", analytics_enabled=False, delete_cache=(3600, 86400)) as app:
        gr.Markdown("# iso3d: image to 3D\nDrop an image of one object (RGBA, on a plain white background, or a photo "
                    "with 'remove background' ticked), pick a checkpoint, press Generate.")
        with gr.Row():
            with gr.Column():
                upload = gr.Image(type="filepath", label="input image", image_mode=None, elem_id="input-image",
                                  height=256)
                # Without allow_custom_value, Gradio refuses on the server any value not among the choices.
                checkpoint = gr.Dropdown(offered, value=offered[0] if offered else None, allow_custom_value=any_checkpoint,
                                         label="checkpoint (a checkpoint or run directory)", elem_id="checkpoint")
                remove = gr.Checkbox(value=bool(settings.segmenter), interactive=bool(settings.segmenter),
                                     label="remove background" + (f" ({Path(settings.segmenter).name})" if settings.segmenter
                                                                  else " (start the app with --segmenter FILE.onnx)"),
                                     elem_id="remove-background")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Textbox(label="progress", interactive=False, elem_id="status")
                seen = gr.Image(label="what the model sees (preprocessed)", interactive=False, image_mode="RGBA",
                                elem_id="model-input", height=256)
                validation = gr.Image(label="3D stage: latest validation views (albedo, normals)", interactive=False,
                                      height=256, elem_id="validation")
            with gr.Column():
                views = gr.Image(label="input + the model's 4 sampled views", interactive=False, elem_id="views", height=160)
                turntable = gr.Image(label="turntable", interactive=False, elem_id="turntable", height=256)
                mesh = gr.Model3D(label="mesh", elem_id="mesh", clear_color=(1.0, 1.0, 1.0, 1.0), height=400)
                download = gr.File(label="download mesh.glb", interactive=False, elem_id="download")
        result = gr.State()
        button.click(generate, [upload, checkpoint, remove], [status, seen, validation, views, turntable, result, download],
                     concurrency_limit=concurrency, api_name="generate") \
              .then(show_mesh, [result], [mesh])
    return app


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, action="append", default=[],
                   help="a checkpoint (or run) directory to offer first; repeatable (default: the demo's)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="results and cache (default: outputs/app)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--checkpoints", choices=["offered", "any"], help="offered: only the checkpoints offered at start "
                   "are accepted; any: also a path typed into the page (default: any on loopback, offered otherwise)")
    p.add_argument("--concurrency", type=int, default=1, help="requests generating at once (each its own generate.py; "
                   "the others wait in Gradio's queue; default 1)")
    p.add_argument("--keep-results", type=int, default=KEEP_RESULTS, help="results kept in --output, newest first; "
                   f"older ones are deleted with their inputs, previews and logs (default {KEEP_RESULTS})")
    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB, help=f"largest upload accepted (default {MAX_UPLOAD_MB})")
    p.add_argument("--steps", type=int, help="generate.py --steps for every request")
    p.add_argument("--segmenter", type=Path, help="a local ONNX segmenter for rembg (e.g. u2net.onnx): the page's "
                   "'remove background' box, ticked by default")
    p.add_argument("overrides", nargs="*", help="generate.py key=value settings for every request")
    args = p.parse_args(argv)
    for ck in args.checkpoint:
        if not ck.is_dir():
            print(f"app.py: error: --checkpoint {ck}: not a directory", file=sys.stderr)
            return 2
    if args.concurrency < 1 or args.keep_results < 1 or args.max_upload_mb <= 0:
        print("app.py: error: --concurrency and --keep-results: at least 1; --max-upload-mb: above 0", file=sys.stderr)
        return 2
    any_checkpoint = accepts_any_checkpoint(args.host, args.checkpoints)
    extra = (["--steps", str(args.steps)] if args.steps else []) + args.overrides
    segmenter = None if args.segmenter is None else args.segmenter.resolve()
    try:
        preprocess_settings(extra, segmenter)
    except (ConfigError, ValueError) as e:
        print(f"app.py: error: {e}", file=sys.stderr)
        return 2
    offered = checkpoints(args.checkpoint)
    if not offered:
        print("app.py: no checkpoint found (give --checkpoint, or run `make demo`); one can be typed in the page",
              file=sys.stderr)
    app = build_app(args.output.resolve(), offered, extra, segmenter, any_checkpoint, args.concurrency, args.keep_results)
    app.queue().launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False,
                       allowed_paths=[str(args.output.resolve())], max_file_size=int(args.max_upload_mb * 2**20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
