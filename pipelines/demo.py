"""The whole suite on a laptop: procedural objects -> Blender renders -> tiny model fine-tuned in
stage 1 and stage 2 -> the image of a held-out object -> a mesh, evaluated and shown on a page.

    python pipelines/demo.py                          # outputs/demo-run/ (about 12 minutes on 2 cores)
    python pipelines/demo.py --force stage2           # redo stage 2 and what depends on it
    python pipelines/demo.py render.resolution=48 generate.steps=200

Each stage runs the real pipeline script (render_objaverse.py, finetune.py, generate.py) as its own
process. Its output is OUTPUT/<stage>-<key>/, where the key hashes the stage's settings and the keys
of the stages it reads: a second run finds every directory and redoes nothing;
a changed setting gives its stage, and every stage after it, a new key; nothing upstream is redone.
A stage is built in <stage>-<key>.partial/ and renamed when it succeeds; a killed stage resumes there
(renders already complete and checkpoints are kept) and is never taken for a finished one.
The held-out object is the first demo object the training split leaves out (val_percent); its fixed
view 0 is the input image; metrics.json and report.html compare the result with its renders and mesh.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a clone without install

from common.atomic import atomic_write_json, replace_dir  # noqa: E402
from common.config import ConfigError, config_hash, load_config, save_config  # noqa: E402

STAGES = ("render", "stage1", "stage2", "generate")
SCHEMA_VERSION = 1
log = logging.getLogger("demo")


@dataclass
class RenderStage:
    count: int = 16
    """Procedural demo objects (val_percent of them are held out of training)."""
    resolution: int = 64
    samples: int = 16
    denoiser: str = "fast"
    seed: int = 0


@dataclass
class TrainStage:
    max_steps: int = 300
    overrides: list[str] = field(default_factory=list)
    """Extra finetune.py overrides (TrainConfig fields), e.g. ["lr=0.001"]."""


@dataclass
class GenerateStage:
    steps: int = 300
    object: Optional[str] = None
    """uid of the held-out object to reconstruct; None = the first held-out one."""
    overrides: list[str] = field(default_factory=list)
    """Extra generate.py overrides (GenerateConfig fields)."""


@dataclass
class DemoConfig:
    render: RenderStage = field(default_factory=RenderStage)
    stage1: TrainStage = field(default_factory=TrainStage)
    stage2: TrainStage = field(default_factory=lambda: TrainStage(max_steps=100))
    generate: GenerateStage = field(default_factory=GenerateStage)
    val_percent: float = 10.0
    """Share of the objects (by uid hash) left out of training."""


def stage_keys(cfg: DemoConfig) -> dict[str, str]:
    from render.settings import SCHEMA_VERSION as RENDER_SCHEMA
    from render.sources import DEMO_VERSION
    keys = {"render": config_hash({"render": cfg.render, "demo": DEMO_VERSION, "schema": [RENDER_SCHEMA, SCHEMA_VERSION]})}
    keys["stage1"] = config_hash({"after": keys["render"], "train": cfg.stage1, "val": cfg.val_percent})
    keys["stage2"] = config_hash({"after": keys["stage1"], "train": cfg.stage2, "val": cfg.val_percent})
    keys["generate"] = config_hash({"after": keys["stage2"], "generate": cfg.generate})
    return keys


def run_script(script: str, args: list, log_path: Path) -> None:
    """A pipeline script in its own process; its output goes to log_path (tail shown on failure)."""
    cmd = [sys.executable, str(ROOT / "pipelines" / script), *map(str, args)]
    log.info("$ %s", " ".join(cmd))
    with open(log_path, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code:
        tail = log_path.read_text().splitlines()[-15:]
        raise RuntimeError(f"{script} failed (exit {code}); log {log_path}:\n" + "\n".join(tail))


def stage(out: Path, name: str, key: str, force: bool, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """OUTPUT/<name>-<key>/: reuse when complete, else build in .partial and rename. -> (dir, cached)"""
    final = out / f"{name}-{key}"
    work = out / f"{name}-{key}.partial"
    if force:
        shutil.rmtree(final, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    if final.is_dir():
        return final, True
    work.mkdir(parents=True, exist_ok=True)
    build(work)
    replace_dir(work, final)
    return final, False


def latest_checkpoint(run: Path) -> Path:
    from model.checkpoint import latest
    ck = latest(run / "checkpoints")
    if ck is None:
        raise RuntimeError(f"{run}: training wrote no checkpoint")
    return ck


def held_out(render_dir: Path, cfg: DemoConfig) -> str:
    from dataset.views import split_of
    uids = sorted(p.name for p in (render_dir / "objects").iterdir() if p.is_dir())
    if cfg.generate.object:
        if cfg.generate.object not in uids:
            raise ValueError(f"generate.object={cfg.generate.object}: not a rendered object ({', '.join(uids)})")
        return cfg.generate.object
    val = [u for u in uids if split_of(u, cfg.val_percent) == "val"]
    if not val:
        raise ValueError(f"val_percent={cfg.val_percent}: no object of {len(uids)} is held out; raise it or render more")
    return val[0]


def run_demo(cfg: DemoConfig, out: Path, force: Optional[str] = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    keys = stage_keys(cfg)
    forced = set(STAGES[STAGES.index(force):]) if force else set()
    timings, cached = {}, {}
    log_dir = out / "logs"
    log_dir.mkdir(exist_ok=True)

    def timed(name, build):
        t = time.time()
        d, was_cached = stage(out, name, keys[name], name in forced, build)
        timings[name], cached[name] = round(time.time() - t, 1), was_cached
        log.info("%-8s %s %s (%.0f s)", name, "cached" if was_cached else "done  ", d.name, timings[name])
        return d

    r = cfg.render
    render_dir = timed("render", lambda w: run_script("render_objaverse.py", [
        "--source", "demo", "--demo-count", r.count, "--output", w, "--resolution", r.resolution, "--samples", r.samples,
        "--denoiser", r.denoiser, "--seed", r.seed, "--no-progress"], log_dir / "render.log"))

    def train(stage_no: int, tcfg: TrainStage, init: Optional[Path]):
        def build(w: Path):
            args = ["--stage", stage_no, "--config", "tiny", "--data", render_dir, "--output", w,
                    "--max-steps", tcfg.max_steps]
            if init is not None:
                args += ["--init", init]
            if (w / "checkpoints").is_dir() and any((w / "checkpoints").glob("step-*")):
                args += ["--resume", "latest"]                       # a killed stage continues
            run_script("finetune.py", args + [f"val_percent={cfg.val_percent}", *tcfg.overrides], log_dir / f"stage{stage_no}.log")
        return build

    stage1 = timed("stage1", train(1, cfg.stage1, None))
    stage2 = timed("stage2", train(2, cfg.stage2, latest_checkpoint(stage1)))
    uid = held_out(render_dir, cfg)
    obj_dir = render_dir / "objects" / uid
    gt_mesh = render_dir / "sources" / "demo" / f"{uid}.glb"

    def generate(w: Path):
        from optimize3d.evaluate import evaluate_run
        image = w / f"{uid}.png"
        shutil.copyfile(obj_dir / "fixed" / "000.png", image)       # azimuth 0: the run's frame is the object's
        run_script("generate.py", ["--image", image, "--checkpoint", latest_checkpoint(stage2), "--output", w,
                                   "--steps", cfg.generate.steps, "--no-progress", *cfg.generate.overrides],
                   log_dir / "generate.log")
        run = next(p for p in w.iterdir() if p.is_dir() and (p / "mesh.glb").is_file())
        evaluate_run(run, obj_dir, gt_mesh)

    gen_dir = timed("generate", generate)
    run = next(p for p in gen_dir.iterdir() if p.is_dir() and (p / "metrics.json").is_file())
    metrics = json.loads((run / "metrics.json").read_text())
    summary = {**metrics, "object": uid, "run": str(run), "seconds": timings, "cached": cached, "keys": keys}
    atomic_write_json(out / "metrics.json", summary)
    from pipelines.report import write_report
    stages = "".join(f"<tr><td>{s}</td><td>{keys[s]}</td><td>{'cached' if cached[s] else 'ran'}</td><td>{timings[s]}</td></tr>"
                     for s in STAGES)
    write_report(run, out / "report.html", metrics, title=f"iso3d demo: held-out object {uid}",
                 extra="<h2>Stages</h2><table><tr><th>stage</th><th>key</th><th>this run</th><th>seconds</th></tr>"
                       f"{stages}</table><p>Ground truth renders: <code>{obj_dir}</code></p>")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=ROOT / "outputs" / "demo-run", help="default: outputs/demo-run")
    p.add_argument("--force", choices=STAGES, help="redo this stage and every stage after it")
    p.add_argument("--config", type=Path, help="YAML file of DemoConfig fields")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. render.resolution=48 generate.steps=200")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(DemoConfig, args.config, args.overrides)
        args.output.mkdir(parents=True, exist_ok=True)
        save_config(cfg, args.output / "config.yaml")
        t = time.time()
        summary = run_demo(cfg, args.output, args.force)
    except (ConfigError, ValueError, RuntimeError) as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("object", "2d", "3d", "seconds", "cached", "keys")}, indent=1))
    print(f"demo: {time.time() - t:.0f} s; report: {args.output / 'report.html'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
