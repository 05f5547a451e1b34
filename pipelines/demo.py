"""The whole suite on a laptop: procedural objects -> Blender renders -> tiny model fine-tuned in
stage 1 and stage 2 -> two objects' images -> meshes, evaluated against their renders and meshes, on a page.

    python pipelines/demo.py                          # outputs/demo-run/ (7.5 minutes measured on 2 cores)
    python pipelines/demo.py --force stage2           # redo stage 2 and what depends on it
    python pipelines/demo.py render.resolution=48 generate.steps=200

Each stage runs the real pipeline script (render_objaverse.py, finetune.py, evaluate.py) as its own
process; its progress bars go to the console, its log (plain lines) to OUTPUT/logs/<stage>.log. Its
output is OUTPUT/<stage>-<key>/, where the key hashes the stage's settings and the keys of the stages
it reads: a second run finds every directory and redoes nothing (the report keeps the times of the run
that did the work); a changed setting gives its stage, and every stage after it, a new key; nothing
upstream is redone. A stage is built in <stage>-<key>.partial/ and renamed when it succeeds; a killed
stage resumes there and is never taken for a finished one. Settings are checked before anything runs.
Stage 1 starts from the committed base model, model/base-tiny (pipelines/base.py; base=null: random weights).
Two objects are generated, each from its fixed view 0: one *seen* in training (a pipeline that works
must reproduce what it was trained on) and one *held out* (val_percent's split; the honest case at
this scale). metrics.json and report.html compare each with its renders and source mesh, beside the
demo's targets (TARGETS).
"""
from __future__ import annotations

import argparse
import codecs
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
from render.layout import object_dir, object_dirs  # noqa: E402

STAGES = ("render", "stage1", "stage2", "generate")
ROLES = ("seen", "held_out")
SCHEMA_VERSION = 2
# What the seen object must reach at this scale (metric path, comparison, threshold); the held-out object
# is reported against the same numbers.
TARGETS = (("2d.psnr", ">=", 18.0), ("3d.silhouette_iou", ">=", 0.85), ("3d.volume_iou", ">=", 0.6),
           ("3d.colour_error", "<=", 0.1))
log = logging.getLogger("demo")


@dataclass
class RenderStage:
    count: int = 8
    """Procedural demo objects: 8 = one of each shape (box, sphere, cylinder, cone, capsule, torus, table,
    snowman); val_percent of them are held out of training."""
    resolution: int = 64
    samples: int = 16
    denoiser: str = "fast"
    seed: int = 0


@dataclass
class TrainStage:
    max_steps: int = 600
    overrides: list[str] = field(default_factory=list)
    """Extra finetune.py overrides (TrainConfig fields), e.g. ["lr=0.001"]."""


@dataclass
class GenerateStage:
    steps: int = 300
    seen: Optional[str] = None
    """uid of a training object to reproduce; None = the first one."""
    held_out: Optional[str] = None
    """uid of a held-out object to generate; None = the first one."""
    overrides: list[str] = field(default_factory=list)
    """Extra generate.py overrides (GenerateConfig fields)."""


@dataclass
class DemoConfig:
    render: RenderStage = field(default_factory=RenderStage)
    stage1: TrainStage = field(default_factory=TrainStage)
    stage2: TrainStage = field(default_factory=lambda: TrainStage(max_steps=100))
    generate: GenerateStage = field(default_factory=GenerateStage)
    base: Optional[str] = "model/base-tiny"
    """The checkpoint stage 1 starts from, as the paper's starts from MVDream: the tiny model pre-trained on
    a larger procedural family that holds none of the demo's objects (pipelines/base.py, `make base`);
    a relative path is taken from the repository root. null: stage 1 starts from random weights."""
    val_percent: float = 5.0
    """Share of the objects (by uid hash) left out of training; of the 8 default objects it holds out
    exactly one, demo2-0-005-torus."""


def base_checkpoint(cfg: DemoConfig) -> Path:
    path = ROOT / cfg.base
    if not (path / "config.json").is_file():
        raise ValueError(f"base={cfg.base}: no checkpoint there (config.json missing); `make base` re-makes it, "
                         "base=null starts stage 1 from random weights")
    return path


def stage_keys(cfg: DemoConfig) -> dict[str, str]:
    from render.settings import SCHEMA_VERSION as RENDER_SCHEMA
    from model import checkpoint
    from render.sources import DEMO_VERSION
    keys = {"render": config_hash({"render": cfg.render, "demo": DEMO_VERSION, "schema": [RENDER_SCHEMA, SCHEMA_VERSION]})}
    base = None if cfg.base is None else checkpoint.identity(base_checkpoint(cfg))
    keys["stage1"] = config_hash({"after": keys["render"], "train": cfg.stage1, "val": cfg.val_percent, "base": base})
    keys["stage2"] = config_hash({"after": keys["stage1"], "train": cfg.stage2, "val": cfg.val_percent})
    # What the 3D stage writes and how it is scored are part of its key: a changed mesh format or metric redoes it.
    from optimize3d.evaluate import METRICS_VERSION
    from optimize3d.export import EXPORT_SCHEMA
    keys["generate"] = config_hash({"after": keys["stage2"], "generate": cfg.generate, "val": cfg.val_percent,
                                    "schema": [EXPORT_SCHEMA, METRICS_VERSION]})
    return keys


def check_settings(cfg: DemoConfig) -> None:
    """Each stage's overrides resolved as its script will resolve them: a bad setting stops the demo
    before anything is run or written."""
    from model.train import TrainConfig
    from optimize3d.config import GenerateConfig
    for no, tcfg in ((1, cfg.stage1), (2, cfg.stage2)):
        load_config(TrainConfig, None, [f"stage={no}", f"max_steps={tcfg.max_steps}", f"val_percent={cfg.val_percent}",
                                        *tcfg.overrides], base=TrainConfig.tiny(no)).validate()
    load_config(GenerateConfig, None, [f"steps={cfg.generate.steps}", *cfg.generate.overrides],
                base=GenerateConfig.tiny()).validate()
    if cfg.base is not None:
        base_checkpoint(cfg)
    if cfg.render.count < 2:
        raise ValueError(f"render.count={cfg.render.count}: the demo needs a seen and a held-out object")


class PlainLog:
    """A child's output: passed to the console as it comes (progress bars), and to the log file as plain
    lines (a progress bar's carriage-return updates collapse to its last state when its line ends)."""

    def __init__(self, path: Path, console):
        self.file, self.console, self.pending = open(path, "a"), console, ""

    def feed(self, text: str) -> None:
        if self.console is not None:
            self.console.write(text)
            self.console.flush()
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.file.write(line.rstrip("\r").split("\r")[-1] + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.pending:
            self.file.write(self.pending.rstrip("\r").split("\r")[-1] + "\n")
        self.file.close()


def run_script(script: str, args: list, log_path: Path, console=sys.stderr) -> None:
    """A pipeline script in its own process: progress on the console, plain lines in log_path (its tail
    is shown on failure)."""
    cmd = [sys.executable, str(ROOT / "pipelines" / script), *map(str, args)]
    log.info("$ %s", " ".join(cmd))
    out = PlainLog(log_path, console)
    out.feed(f"$ {' '.join(cmd)}\n")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    try:
        while chunk := proc.stdout.read1(4096):                   # whatever has arrived, without waiting for more
            out.feed(decoder.decode(chunk))
        out.feed(decoder.decode(b"", final=True))
    finally:
        code = proc.wait()
        out.close()
    if code:
        tail = log_path.read_text().splitlines()[-15:]
        raise RuntimeError(f"{script} failed (exit {code}); log {log_path}:\n" + "\n".join(tail))


def stage(out: Path, name: str, key: str, build: Callable[[Path], None]) -> tuple[Path, dict]:
    """OUTPUT/<name>-<key>/: reuse when complete, else build in .partial and rename.
    -> (dir, {"seconds": of the run that built it, "cached": whether this run reused it})"""
    final = out / f"{name}-{key}"
    work = out / f"{name}-{key}.partial"
    if final.is_dir():
        built = json.loads((final / "stage.json").read_text()) if (final / "stage.json").is_file() else {}
        return final, {"seconds": built.get("seconds"), "cached": True}
    work.mkdir(parents=True, exist_ok=True)
    t = time.time()
    build(work)
    # The scripts recorded their command lines (and the evaluation its rows) with the .partial path, which stops
    # existing at the rename.
    for record in [*work.rglob("cmd.txt"), *work.glob("objects/*.json")]:
        record.write_text(record.read_text().replace(str(work), str(final)))
    seconds = round(time.time() - t, 1)
    atomic_write_json(work / "stage.json", {"seconds": seconds, "key": key})
    replace_dir(work, final)
    return final, {"seconds": seconds, "cached": False}


def render_args(r: RenderStage) -> list:
    """render_objaverse.py's arguments for the render stage, less --output."""
    return ["--source", "demo", "--demo-count", r.count, "--resolution", r.resolution, "--samples", r.samples,
            "--denoiser", r.denoiser, "--seed", r.seed]


def render_build(r: RenderStage, log_path: Path, console) -> Callable[[Path], None]:
    """The render stage's build: the procedural objects through render_objaverse.py."""
    return lambda w: run_script("render_objaverse.py", [*render_args(r), "--output", w], log_path, console)


def train_build(render_dir: Path, stage_no: int, tcfg: TrainStage, init: Optional[Path], val_percent: float,
                log_path: Path, console) -> Callable[[Path], None]:
    """A fine-tuning stage's build: finetune.py with the tiny preset, resuming a killed run of its own."""
    def build(w: Path):
        args = ["--stage", stage_no, "--config", "tiny", "--data", render_dir, "--output", w, "--max-steps", tcfg.max_steps]
        if init is not None:
            args += ["--init", init]
        if (w / "checkpoints").is_dir() and any((w / "checkpoints").glob("step-*")):
            args += ["--resume", "latest"]                       # a killed stage continues
        run_script("finetune.py", args + [f"val_percent={val_percent}", *tcfg.overrides], log_path, console)
    return build


def latest_checkpoint(run: Path) -> Path:
    from model.checkpoint import latest
    ck = latest(run / "checkpoints")
    if ck is None:
        raise RuntimeError(f"{run}: training wrote no checkpoint")
    return ck


def demo_objects(render_dir: Path, cfg: DemoConfig) -> dict[str, str]:
    """{"seen": a training object's uid, "held_out": a held-out object's uid}."""
    from dataset.views import split_of
    uids = sorted(object_dirs(render_dir))
    chosen = {}
    for role, split, setting in (("seen", "train", cfg.generate.seen), ("held_out", "val", cfg.generate.held_out)):
        group = [u for u in uids if split_of(u, cfg.val_percent) == split]
        if setting is not None:
            if setting not in group:
                raise ValueError(f"generate.{role}={setting}: not a {split} object of this render ({', '.join(group) or 'none'})")
            chosen[role] = setting
        elif not group:
            raise ValueError(f"val_percent={cfg.val_percent}: no {split} object among {len(uids)}; change it or render more")
        else:
            chosen[role] = group[0]
    return chosen


def targets_met(metrics: dict) -> dict[str, dict]:
    """{metric path: {"value", "target", "met"}} for TARGETS."""
    out = {}
    for path, op, threshold in TARGETS:
        section, name = path.split(".")
        value = metrics.get(section, {}).get(name)
        met = value is not None and (value >= threshold if op == ">=" else value <= threshold)
        out[path] = {"value": value, "target": f"{op} {threshold}", "met": bool(met)}
    return out


def conditioning_check(objects: dict) -> dict:
    """PSNR of each object's sampled views (same noise seed for both) against each object's ground truth:
    if the CLIP condition matters, each row is highest on its own object."""
    import numpy as np
    from dataset.views import RenderedObject
    from optimize3d.evaluate import psnr, sampled_view_pairs
    out = {}
    for role, obj in objects.items():
        row = {}
        for other, truth in objects.items():
            pairs = sampled_view_pairs(Path(obj["run"]), RenderedObject.open(Path(truth["ground_truth"])))
            row[other] = float(np.mean([psnr(a, b) for a, b in pairs]))
        out[role] = {"psnr_against": row, "own_is_closest": max(row, key=row.get) == role}
    return out


def run_demo(cfg: DemoConfig, out: Path, force: Optional[str] = None, console=sys.stderr) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    keys = stage_keys(cfg)
    # --force removes the forced stages' outputs before anything runs: a forced run killed half-way must not
    # leave a later stage's old output to be reused by the next run.
    for name in STAGES[STAGES.index(force):] if force else ():
        shutil.rmtree(out / f"{name}-{keys[name]}", ignore_errors=True)
        shutil.rmtree(out / f"{name}-{keys[name]}.partial", ignore_errors=True)
    stages = {}
    log_dir = out / "logs"
    log_dir.mkdir(exist_ok=True)

    def timed(name, build):
        log.info("%-8s ...", name)
        d, info = stage(out, name, keys[name], build)
        stages[name] = info
        log.info("%-8s %s %s (%s s%s)", name, "cached" if info["cached"] else "done  ", d.name, info["seconds"],
                 ", from the run that built it" if info["cached"] else "")
        return d

    render_dir = timed("render", render_build(cfg.render, log_dir / "render.log", console))
    chosen = demo_objects(render_dir, cfg)          # before training: a bad choice fails at once
    stage1 = timed("stage1", train_build(render_dir, 1, cfg.stage1, None if cfg.base is None else base_checkpoint(cfg),
                                         cfg.val_percent, log_dir / "stage1.log", console))
    stage2 = timed("stage2", train_build(render_dir, 2, cfg.stage2, latest_checkpoint(stage1), cfg.val_percent,
                                         log_dir / "stage2.log", console))

    def generate(w: Path):
        # pipelines/evaluate.py on the two chosen objects: the same generate runs and metrics as any evaluation
        # (fixed view 0 in, preprocess.frame=false, the source mesh from the render's sources/demo/).
        run_script("evaluate.py", ["--objects", render_dir, "--uids", *chosen.values(), "--checkpoint",
                                   latest_checkpoint(stage2), "--output", w, "--steps", cfg.generate.steps,
                                   *cfg.generate.overrides], log_dir / "generate.log", console)

    gen_dir = timed("generate", generate)
    objects = {}
    for role, uid in chosen.items():
        row = json.loads((gen_dir / "objects" / f"{uid}.json").read_text())
        if row["status"] == "failed":
            raise RuntimeError(f"{uid} ({role}): {row['error']}")
        metrics = row["metrics"]
        objects[role] = {"object": uid, "run": row["run"], "ground_truth": str(object_dir(render_dir, uid)),
                         "2d": metrics["2d"], "3d": metrics["3d"], "targets": targets_met(metrics)}
        if row["status"] == "no_surface":
            objects[role]["error"] = row["error"]
    from pipelines.report import tensorboard_scalars, write_demo_report
    losses = {name: tensorboard_scalars(d / "tensorboard", "loss") for name, d in (("stage1", stage1), ("stage2", stage2))}
    summary = {"objects": objects, "conditioning": conditioning_check(objects), "stages": stages, "keys": keys,
               "losses": losses,
               "seconds": {s: stages[s]["seconds"] for s in STAGES}, "cached": {s: stages[s]["cached"] for s in STAGES}}
    atomic_write_json(out / "metrics.json", summary)
    write_demo_report(summary, out / "report.html")
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
        check_settings(cfg)
        args.output.mkdir(parents=True, exist_ok=True)
        save_config(cfg, args.output / "config.yaml")
        t = time.time()
        summary = run_demo(cfg, args.output, args.force)
    except (ConfigError, ValueError, RuntimeError) as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("objects", "seconds", "cached", "keys")}, indent=1))
    print(f"demo: {time.time() - t:.0f} s; report: {args.output / 'report.html'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
