"""Fine-tune the multi-view diffusion model: stage 1 (image-CLIP conditioning) or stage 2 (Explicit Multi-view
Attention, the paper's "EMA": not an exponential moving average).

    python pipelines/finetune.py --stage 1 --config tiny --data outputs/render --output runs/stage1
    python pipelines/finetune.py --stage 2 --config tiny --data outputs/render --output runs/stage2 \
        --init runs/stage1/checkpoints/step-000200
    python pipelines/finetune.py --stage 1 --config sd21 --data /shared/renders --output /shared/s1 \
        --num-workers 8 --address auto --init sd-v2.1-base-4view.pt model.encoder.weights=/models/vit-h-14.bin
    python pipelines/finetune.py ... --resume latest            # continue a killed run exactly

--num-workers 0 trains in this process; N >= 1 runs N Ray Train (DDP) workers, locally (127.0.0.1)
or on the cluster given by --address. Extra `key.sub=value` arguments override TrainConfig fields.
Writes OUTPUT/config.yaml, cmd.txt, checkpoints/step-N/, validation/step-N.png, tensorboard/.
Training first brings DATA/cache/prepared/ up to date for the model (CLIP embeddings and latents of every
view, sharded; only objects new or re-rendered since the last time); --prepare does only that, as its own
step (e.g. on GPU workers: --num-workers N --gpu).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without install

from common.atomic import atomic_write_text  # noqa: E402
from common.config import ConfigError, load_config, save_config  # noqa: E402
from model import checkpoint  # noqa: E402
from model.prepare import prepare  # noqa: E402
from model.convert import as_checkpoint_dir, is_raw_checkpoint  # noqa: E402
from model.train import TrainConfig, connect_ray, train  # noqa: E402

PRESETS = ("tiny", "small", "sd21")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=[1, 2], required=True)
    p.add_argument("--config", default="tiny", help="tiny | small | sd21 | PATH.yaml (TrainConfig fields over the tiny "
                   "preset). small: sd21's code paths at CPU size, for tests (needs model.vae_path and "
                   "model.encoder.weights, or an --init checkpoint that brings them)")
    p.add_argument("--data", type=Path, required=True, help="a render output (pipelines/render_objaverse.py --output)")
    p.add_argument("--output", type=Path, help="run directory (not needed with --prepare)")
    p.add_argument("--prepare", action="store_true", help="only bring the prepared data of --data up to date for "
                   "this model (CLIP embeddings and latents of every view, in shards; Ray tasks with --num-workers), "
                   "print what was done as JSON, and exit; training does the same first unless --no-prepare")
    p.add_argument("--no-prepare", action="store_true", help="train on the prepared data as it is, without "
                   "listing the render root (objects rendered since the last prepare are not used)")
    p.add_argument("--init", help="where to start from: a checkpoint directory (its whole model configuration comes "
                                  "with it: layout, VAE, encoder weights, featurisation, inference conventions; model.* "
                                  "overrides still win), a run directory (its latest checkpoint), or an original LDM "
                                  "file (sd-v2.1-base-4view.pt, isotropic3d.ckpt), converted once")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--resume", help="latest | PATH: continue from a checkpoint of this run")
    p.add_argument("--num-workers", type=int, default=0, help="0: this process; N: Ray Train DDP workers")
    p.add_argument("--address", help="Ray cluster (default: a local Ray on 127.0.0.1)")
    p.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker")
    p.add_argument("--shared-storage", action="store_true", help="on a multi-node cluster, every path the workers "
                   "open (--data, --output, --init, model.vae_path, model.encoder.weights) is on storage every node "
                   "mounts (needed only where the filesystem type does not say so; see also ISO3D_SHARED_FILESYSTEMS)")
    p.add_argument("--max-failures", type=int, default=3, help="Ray Train: worker failures survived (all workers "
                   "restart from the last checkpoint) before the run fails")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    return p.parse_args(argv)


def resolve(args) -> tuple[TrainConfig, str | None]:
    """The run's configuration and the checkpoint directory it starts from. Layers: the preset, then the
    --init checkpoint's model configuration, then the --config file, then the command line."""
    if args.config in PRESETS:
        base, path = getattr(TrainConfig, args.config)(args.stage), None
    elif Path(args.config).is_file():
        base, path = TrainConfig.tiny(args.stage), Path(args.config)
    else:
        raise ValueError(f"--config {args.config}: neither a preset ({', '.join(PRESETS)}) nor a YAML file")
    overrides = [f"stage={args.stage}"] + ([f"max_steps={args.max_steps}"] if args.max_steps else []) + args.overrides
    cfg = load_config(TrainConfig, path, overrides, base=base)
    init = None
    if args.init:
        init = Path(args.init)
        if is_raw_checkpoint(init):          # an original MVDream / Isotropic3D / SD file: converted once
            init = as_checkpoint_dir(init, model_cfg=cfg.model)
        init = checkpoint.find(init, "--init")
        base.model = checkpoint.model_config(init)
        cfg = load_config(TrainConfig, path, overrides, base=base)
    cfg.validate()
    if not (args.data / "objects").is_dir():
        raise ValueError(f"--data {args.data}: no objects/ folder (not a render output)")
    if args.output is None and not args.prepare:
        raise ValueError("--output: required (the run directory), except with --prepare")
    if args.stage == 2 and not init and not args.resume and not args.prepare:
        raise ValueError("--stage 2 starts from a stage-1 checkpoint: give --init")
    return cfg, None if init is None else str(init)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg, args.init = resolve(args)
        if args.num_workers:         # a multi-node cluster without shared storage is refused before anything is written
            connect_ray(args.address, args.num_workers, args.data, args.output, args.shared_storage, cfg.model,
                        args.init)
    except (ConfigError, ValueError, FileNotFoundError) as e:      # ConversionError is a ValueError
        print(f"finetune.py: error: {e}", file=sys.stderr)
        return 2
    if args.prepare:
        stats = prepare(cfg.model, args.data, cfg.prepare, num_workers=args.num_workers, use_gpu=args.gpu).stats
        print(json.dumps(stats))
        return 0
    args.output.mkdir(parents=True, exist_ok=True)
    save_config(cfg, args.output / "config.yaml")
    atomic_write_text(args.output / "cmd.txt", shlex.join([sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)]) + "\n")
    try:
        train(cfg, args.data, args.output, init=args.init, resume=args.resume, num_workers=args.num_workers,
              address=args.address, use_gpu=args.gpu, max_failures=args.max_failures,
              shared_storage=args.shared_storage, prepare_data=not args.no_prepare)
    except FileNotFoundError as e:
        print(f"finetune.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
