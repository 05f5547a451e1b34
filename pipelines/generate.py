"""Image to 3D: a NeRF optimised by score distillation with a fine-tuned checkpoint, exported as a mesh.

    python pipelines/generate.py --image photo.png --checkpoint runs/stage2/checkpoints/step-000100
    python pipelines/generate.py --images photos/ --checkpoint CKPT --config sd21 --output out/
    python pipelines/generate.py --image a.png --checkpoint CKPT --steps 200 export.threshold=8 nerf.hidden=64
    python pipelines/generate.py --views OUTPUT/objects/BB/UID # reconstruction from posed views, no model

Input: PNG, JPEG or WebP, preprocessed as the model was trained (optimize3d/preprocess.py): an RGBA image keeps
its alpha; an RGB photo needs --remove-background --segmenter u2net.onnx (rembg, a local file), else it is taken
as the object on white (a warning says so when its border is not white; --strict makes it an error); then the
object is centred and scaled to the renders' framing (preprocess.frame=false keeps the image's own).
Only the image's CLIP embedding conditions the model.
Output per image (OUTPUT/<stem>-<key>/): config.yaml, cmd.txt, input.png (what the model saw), multiview.png
(that input + the 2D model's 4 views),
nerf/ (resumable), validation/, mesh.glb, turntable.gif, generate.log, losses.jsonl, export.json.
A rerun with the same image, checkpoint and settings reuses the result; a killed run resumes.
--images runs one Ray task per image (local Ray on 127.0.0.1, or the cluster given by --address).
--config auto picks tiny (a model of at most 64 px: the tiny and small presets) or sd21 from the
checkpoint's model. Extra `key.sub=value` arguments override GenerateConfig fields (optimize3d/config.py),
e.g. export.threshold=8 or export.format=obj.
--views fits the same field, marcher, renderer and export to posed RGBA views by a photometric loss
(optimize3d/reconstruct.py; overrides are ReconstructConfig fields, --config auto = tiny on a CPU, sd21
on a GPU): a rendered object (render/'s layout) or any folder with a cameras.json in that layout.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without install

from common.config import ConfigError, load_config  # noqa: E402
from model.convert import as_checkpoint_dir, is_raw_checkpoint  # noqa: E402
from optimize3d.export import EmptyMeshError  # noqa: E402
from optimize3d.inputs import FORMATS, InputImageError, load_input_image  # noqa: E402
from optimize3d.config import GenerateConfig  # noqa: E402
from optimize3d.image_to_3d import generate  # noqa: E402
from optimize3d.optimize import resolve_device  # noqa: E402
from optimize3d.preprocess import input_warnings, load_segmenter, preprocess  # noqa: E402
from optimize3d.reconstruct import ReconstructConfig, reconstruct  # noqa: E402

SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", type=Path, help="one image (PNG/JPEG/WebP; a photo needs --remove-background)")
    src.add_argument("--images", type=Path, help="a folder of images: one Ray task each")
    src.add_argument("--views", type=Path, help="reconstruct from posed views instead (no model): a rendered object "
                     "folder or any folder with cameras.json + <view set>/NNN.png in render/'s layout")
    p.add_argument("--checkpoint", type=Path, help="required with --image/--images: a checkpoint directory (finetune.py, convert_checkpoint.py; "
                   "its model configuration comes with it, model.* overrides win), a run directory (its latest checkpoint), "
                   "or an original LDM file such as isotropic3d.ckpt (converted once into $ISO3D_CACHE/converted)")
    p.add_argument("--output", type=Path, default=Path("outputs/generate"), help="default: %(default)s")
    p.add_argument("--config", default="auto", help="auto | tiny | sd21 | PATH.yaml (GenerateConfig fields over the preset; "
                   "ReconstructConfig with --views)")
    p.add_argument("--steps", type=int, help="optimisation steps (tiny: 300, sd21: 10000)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--address", help="--images: Ray cluster (default: a local Ray on 127.0.0.1)")
    p.add_argument("--gpus-per-task", type=float, default=None,
                   help="--images: GPUs per image task (default: 1 when the Ray cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-task", type=float, default=1.0, help="--images: CPUs per image task")
    p.add_argument("--remove-background", action="store_true",
                   help="cut the object out of an image without alpha with --segmenter (preprocess.remove_background)")
    p.add_argument("--segmenter", type=Path, help="a local ONNX segmenter for rembg, e.g. u2net.onnx (preprocess.segmenter; "
                   "isnet files also need preprocess.segmenter_session=dis_custom)")
    p.add_argument("--strict", action="store_true", help="an RGB image with a non-white background is an error, not a warning")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="key.sub=value: GenerateConfig fields, or model.* (ModelConfig fields "
                   "over the checkpoint's, e.g. model.vae_path=DIR)")
    return p.parse_args(argv)


def model_overrides(args) -> list[str]:
    return [o[len("model."):] for o in args.overrides if o.startswith("model.")]


def resolve_model(args):
    """The model configuration the checkpoint brings, with model.* overrides applied; args.checkpoint becomes
    the checkpoint directory (an original file converted, a run directory resolved to its latest)."""
    from model import checkpoint
    if is_raw_checkpoint(args.checkpoint):           # an original LDM file: converted once, then reused
        args.checkpoint = as_checkpoint_dir(args.checkpoint)
    args.checkpoint = checkpoint.find(args.checkpoint, "--checkpoint")
    model_cfg = checkpoint.model_config(args.checkpoint, model_overrides(args))
    model_cfg.validate()
    return model_cfg


def load_preset(cls, preset: str, args, overrides: list[str]):
    """cls's preset (tiny | sd21), or a YAML file over tiny; then the overrides, --steps and --seed."""
    path = None
    if preset not in ("tiny", "sd21"):
        path, preset = Path(preset), "tiny"
        if not path.is_file():
            raise ValueError(f"--config {path}: not a file (expected auto, tiny, sd21 or a YAML file)")
    overrides = list(overrides)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = load_config(cls, path, overrides, base=getattr(cls, preset)())
    cfg.validate()
    return cfg


def preprocess_flags(args) -> list[str]:
    """--remove-background, --segmenter and --strict as the preprocess.* settings they stand for."""
    flags = ["preprocess.remove_background=true"] if args.remove_background else []
    if args.segmenter is not None:
        flags.append(f"preprocess.segmenter={args.segmenter.resolve()}")     # Ray tasks run elsewhere
    return flags + (["preprocess.strict=true"] if args.strict else [])


def resolve_config(args, model_cfg) -> GenerateConfig:
    """--config auto: the tiny preset (CPU scale) for a model of at most 64 px (the tiny and small models),
    sd21 otherwise."""
    preset = args.config
    if preset == "auto":
        preset = "tiny" if model_cfg.image_size <= 64 else "sd21"
    overrides = [o for o in args.overrides if not o.startswith("model.")] + preprocess_flags(args)
    return load_preset(GenerateConfig, preset, args, overrides)


def check_inputs(args, cfg: GenerateConfig) -> None:
    """Before any model loads: a bad image or segmenter is an error, what the model will not see as it expects a
    warning. One --image is preprocessed in full; --images only checked (each task preprocesses its own)."""
    warnings = []
    if args.image is not None:
        warnings = preprocess(load_input_image(args.image), cfg.preprocess, str(args.image))[1]
    else:
        if cfg.preprocess.remove_background:
            load_segmenter(cfg.preprocess)
        for path in list_images(args.images):
            try:
                warnings += input_warnings(load_input_image(path), cfg.preprocess, str(path))
            except InputImageError:
                pass                                   # its task reports it; the other images still run
    for w in warnings:
        print(f"generate.py: warning: {w}", file=sys.stderr)


def resolve_reconstruct_config(args) -> ReconstructConfig:
    """--config auto: sd21 (the paper's field) on a GPU, tiny on a CPU."""
    if any(o.startswith("model.") for o in args.overrides):
        raise ValueError("model.* overrides: --views uses no model")
    if preprocess_flags(args):
        raise ValueError("--remove-background, --segmenter, --strict: --views takes posed views, not an image")
    preset = args.config
    if preset == "auto":
        preset = "sd21" if resolve_device(args.device).type == "cuda" else "tiny"
    return load_preset(ReconstructConfig, preset, args, args.overrides)


def warn_if_full_size_on_cpu(args, model_cfg, cfg) -> None:
    """One line before the work starts: a full-size run on a CPU takes days, not minutes."""
    if args.image is not None and resolve_device(args.device).type == "cpu" and (model_cfg.latent == "vae" or max(cfg.resolutions) > 64):
        print(f"generate.py: note: the full-size path ({model_cfg.latent} latents, {cfg.steps} steps up to "
              f"{max(cfg.resolutions)} px) on a CPU: at the paper's settings expect days (an H100 does 0.2-3 steps/s, "
              f"bench/results/gpu-*.json)", file=sys.stderr)


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ValueError(f"--images {folder}: not a folder")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
    if not images:
        raise ValueError(f"--images {folder}: no {'/'.join(FORMATS)} files")
    return images


def run_many(images, args, cfg, cmd) -> list[dict]:
    from common.ray_local import map_tasks
    checkpoint, output = args.checkpoint.resolve(), args.output.resolve()

    def one(image: str) -> dict:
        try:
            return generate(Path(image), checkpoint, output, cfg, cmd=cmd, progress=False,
                            device=args.device, model_overrides=model_overrides(args))
        except (InputImageError, EmptyMeshError, FileNotFoundError, ValueError) as e:
            return {"image": image, "status": "failed", "error": str(e)}

    return list(map_tasks(one, [str(p.resolve()) for p in images], args.address, args.cpus_per_task,
                          args.gpus_per_task, "images", not args.no_progress))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cmd = shlex.join([sys.executable, str(Path(__file__).resolve()), *argv])
    try:
        if args.views is not None:
            cfg = resolve_reconstruct_config(args)
            result = reconstruct(args.views, args.output, cfg, cmd=cmd, progress=not args.no_progress, device=args.device)
            print(json.dumps(result, indent=1))
            return 0
        if args.checkpoint is None:
            raise ValueError("--checkpoint is required with --image and --images")
        model_cfg = resolve_model(args)
        cfg = resolve_config(args, model_cfg)
        warn_if_full_size_on_cpu(args, model_cfg, cfg)
        check_inputs(args, cfg)
        if args.image is not None:
            results = [generate(args.image, args.checkpoint, args.output, cfg, cmd=cmd,
                                progress=not args.no_progress, device=args.device, model_overrides=model_overrides(args))]
        else:
            results = run_many(list_images(args.images), args, cfg, cmd)
    except (ConfigError, InputImageError, EmptyMeshError, ValueError, FileNotFoundError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(results if args.images else results[0], indent=1))
    failed = [r for r in results if r["status"] == "failed"]
    for r in failed:
        print(f"generate.py: error: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
