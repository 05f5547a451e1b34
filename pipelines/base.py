"""The demo's base model, as the paper starts from MVDream: the tiny multi-view model pre-trained on a larger
procedural family than the demo's (other instances of the same eight shapes, with their own sizes, colours
and stripe textures; seed 1, so no object of the demo, whose objects are seed 0, is among them).

    make base                                         # = python pipelines/base.py
    python pipelines/base.py --output outputs/base-run --publish model/base-tiny
    python pipelines/base.py --data outputs/render --publish my-base    # pre-train on a render root of your own

Stages, each the real script in its own process and cached under OUTPUT/<stage>-<key>/ as the demo's are
(pipelines/demo.py: a killed stage resumes, a rerun redoes nothing): render (render_objaverse.py --source
demo --seed 1; --data takes an existing render root instead), train (finetune.py --stage 1 --config tiny, with a moving average of the weights). Then the
last checkpoint's sampling weights are published to --publish (default: model/base-tiny, the folder the
demo's stage 1 starts from and the repository commits): config.json, unet/ (safetensors), scheduler/ and
base.json (this command, the resolved settings, the objects, the final loss), written under a temporary name
and renamed when complete.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a clone without install

from common.atomic import atomic_write_json, replace_dir  # noqa: E402
from common.config import ConfigError, config_hash, git_commit, load_config, save_config  # noqa: E402
from render.layout import object_dirs  # noqa: E402
from pipelines.demo import RenderStage, TrainStage, latest_checkpoint, render_build, stage, train_build  # noqa: E402

PUBLISHED = ROOT / "model" / "base-tiny"
SCHEMA_VERSION = 1


@dataclass
class BaseConfig:
    render: RenderStage = field(default_factory=lambda: RenderStage(count=48, seed=1))
    """The family: count objects (the eight shapes in turn) drawn with seed 1; the demo's are seed 0."""
    train: TrainStage = field(default_factory=lambda: TrainStage(max_steps=5000, overrides=["ema_decay=0.999"]))
    """finetune.py --stage 1 --config tiny; overrides are TrainConfig fields."""


def stage_keys(cfg: BaseConfig, data: Path | None = None) -> dict[str, str]:
    """data: a render root of the user's instead of the render stage; its key is its resolved path and its
    objects' fingerprints as the prepare step reads them (objects rendered into it, or re-rendered, later
    give the training a new key)."""
    from dataset.prepared import rendered_fingerprints
    from render.settings import SCHEMA_VERSION as RENDER_SCHEMA
    from render.sources import DEMO_VERSION
    if data is not None:
        keys = {"render": config_hash({"data": str(data.resolve()), "objects": rendered_fingerprints(data),
                                       "schema": SCHEMA_VERSION})}
    else:
        keys = {"render": config_hash({"render": cfg.render, "demo": DEMO_VERSION, "schema": [RENDER_SCHEMA, SCHEMA_VERSION]})}
    keys["train"] = config_hash({"after": keys["render"], "train": cfg.train})
    return keys


def check_settings(cfg: BaseConfig) -> None:
    from model.train import TrainConfig
    load_config(TrainConfig, None, ["stage=1", f"max_steps={cfg.train.max_steps}", "val_percent=0", *cfg.train.overrides],
                base=TrainConfig.tiny(1)).validate()
    if cfg.render.seed == 0:
        raise ValueError("render.seed=0: those are the demo's own objects; the base model must not have seen them")


def publish(ckpt: Path, dest: Path, provenance: dict) -> Path:
    """The checkpoint's sampling weights (its moving average when it has one) as a checkpoint folder that
    --init and --checkpoint take (model.checkpoint.export_for_sampling), with base.json; under a temporary
    name, renamed when complete."""
    from model.checkpoint import export_for_sampling
    work = dest.with_name(dest.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    averaged = export_for_sampling(ckpt, work)
    atomic_write_json(work / "base.json", {**provenance, "weights": "moving average" if averaged else "trained"})
    replace_dir(work, dest)
    return dest


def run_base(cfg: BaseConfig, out: Path, publish_to: Path, cmd: str, data: Path | None = None,
             console=sys.stderr) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    keys = stage_keys(cfg, data)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    if data is not None:
        render_dir, render_info = data, {"seconds": None}
    else:
        render_dir, render_info = stage(out, "render", keys["render"], render_build(cfg.render, logs / "render.log", console))
    train_dir, train_info = stage(out, "train", keys["train"], train_build(render_dir, 1, cfg.train, None, 0.0,
                                                                           logs / "train.log", console))
    from model.checkpoint import recorded_state
    ckpt = latest_checkpoint(train_dir)
    state = recorded_state(ckpt)
    objects = sorted(object_dirs(render_dir))
    provenance = {"command": cmd, "settings": dataclasses.asdict(cfg),
                  "keys": keys, "objects": objects, "step": state["step"], "final_loss": state.get("loss"),
                  "seconds": {"render": render_info["seconds"], "train": train_info["seconds"]},
                  "commit": git_commit(ROOT)}
    publish(ckpt, publish_to, provenance)
    return provenance


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=ROOT / "outputs" / "base-run", help="default: outputs/base-run")
    p.add_argument("--publish", type=Path, default=PUBLISHED, help="default: model/base-tiny (what the demo loads)")
    p.add_argument("--data", type=Path, help="a render root to pre-train on instead of rendering the family "
                   "(render.* settings then unused)")
    p.add_argument("--config", type=Path, help="YAML file of BaseConfig fields")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.max_steps=200 render.count=16")
    args = p.parse_args(argv)
    cmd = shlex.join(["python", "pipelines/base.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        cfg = load_config(BaseConfig, args.config, args.overrides)
        check_settings(cfg)
        if args.data is not None and not (args.data / "objects").is_dir():
            raise ValueError(f"--data {args.data}: no objects/ folder (not a render output)")
        args.output.mkdir(parents=True, exist_ok=True)
        save_config(cfg, args.output / "config.yaml")
        t = time.time()
        info = run_base(cfg, args.output, args.publish, cmd, args.data)
    except (ConfigError, ValueError, RuntimeError) as e:
        print(f"base.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: info[k] for k in ("step", "final_loss", "seconds", "keys")}, indent=1))
    print(f"base: {time.time() - t:.0f} s; published {args.publish}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
