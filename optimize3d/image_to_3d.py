"""Image to 3D, one image end to end: preprocess, the 2D model's views, the 3D stage (optimize.py), export.

    cfg = GenerateConfig.tiny()                               # or GenerateConfig.sd21() (the paper)
    result = generate(Path("photo.png"), Path("ckpt/step-000200"), Path("outputs/gen"), cfg)

Output: <out>/<image-stem>-<key>/ with config.yaml, cmd.txt, input.png (the RGBA the model saw, after
optimize3d/preprocess.py's segmentation and framing), multiview.png (that input on white + the 4 sampled
views; each view also in multiview/),
nerf/step-N/ (resumable), validation/step-N.png, mesh.glb, turntable.gif, generate.log, result.json.
The key hashes the image's bytes, the checkpoint, the segmenter file and every setting but `export`: the directory is
built as <name>.partial/ and renamed when complete. A rerun reuses a complete directory (and only
re-exports when `export` settings changed); after a crash it resumes from the last nerf/ checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from common.config import config_hash, file_digest, save_config
from optimize3d.cameras import preview_cameras
from optimize3d.config import GenerateConfig
from optimize3d.embedding import clip_embedding
from optimize3d.export import EmptyMeshError, export_outputs
from optimize3d.fieldstate import latest_nerf, load_nerf
from optimize3d.optimize import build_field, optimize, resolve_device, to_image
from optimize3d.rundir import run_dir_name, run_directory

SCHEMA_VERSION = 2          # 2: the input is preprocessed (segmentation, framing) and saved as input.png
log = logging.getLogger("generate")


def output_key(image_sha: str, checkpoint_id: str, cfg: GenerateConfig) -> str:
    settings = dataclasses.asdict(cfg)
    settings.pop("export")
    segmenter = settings["preprocess"]["segmenter"]           # the file's identity, not where it lies
    settings["preprocess"]["segmenter"] = file_digest(segmenter) if segmenter else ""
    return config_hash({"image": image_sha, "checkpoint": checkpoint_id, "settings": settings, "schema": SCHEMA_VERSION})


def generate(image: Path, checkpoint_dir: Path, out_root: Path, cfg: GenerateConfig, cmd: str = "",
             progress: bool = True, device: Optional[str] = None, model_overrides=()) -> dict:
    """One image -> <out_root>/<stem>-<key>/ (see the module docstring). Returns a summary dict.
    model_overrides: `key=value` ModelConfig fields over the checkpoint's own configuration."""
    from model import checkpoint
    from optimize3d.inputs import image_digest, load_input_image
    from optimize3d.preprocess import preprocess
    from common.atomic import atomic_path, atomic_write_text
    from render.preview import grid as image_grid, on_white

    cfg.validate()
    picture = load_input_image(image)
    image_sha = image_digest(image)
    checkpoint_dir = checkpoint.find(checkpoint_dir, "--checkpoint")
    model_cfg = checkpoint.model_config(checkpoint_dir, model_overrides)
    model_cfg.validate()
    checkpoint_id = checkpoint.identity(checkpoint_dir) + (config_hash(list(model_overrides)) if model_overrides else "")
    key = output_key(image_sha, checkpoint_id, cfg)
    final = Path(out_root) / run_dir_name(image, key)
    t0 = time.time()
    with run_directory(final, cfg.export, log, "generate.log") as work:
        if work is None:
            return {"image": str(image), "output": str(final), "status": "cached", "seconds": time.time() - t0}
        rgba, warnings = preprocess(picture, cfg.preprocess, str(image))
        for w in warnings:
            log.warning(w)
        with atomic_path(work / "input.png") as tmp:
            rgba.save(tmp, format="PNG")
        picture = on_white(rgba)
        dev = resolve_device(device)
        model = checkpoint.load_model(checkpoint_dir, model_cfg).to(dev)
        save_config(cfg, work / "config.yaml")
        if cmd:
            atomic_write_text(work / "cmd.txt", cmd + "\n")
        picture_sha = hashlib.sha256(repr(picture.size).encode() + picture.tobytes()).hexdigest()
        embedding = clip_embedding(picture, picture_sha, model.cfg, Path(out_root) / "cache" / "clip")
        if not (work / "multiview.png").is_file():
            g = torch.Generator().manual_seed(cfg.seed)
            views = model.sample_preview(embedding, preview_cameras(cfg), cfg.preview_steps, cfg.guidance.guidance_scale, g)
            (work / "multiview").mkdir(exist_ok=True)
            for i, v in enumerate(views):                 # azimuths 0, 90, 180, 270 (for evaluation)
                to_image((v + 1) / 2).save(work / "multiview" / f"{i:03d}.png")
            with atomic_path(work / "multiview.png") as tmp:  # written last: marks the views complete
                image_grid([picture.resize((views.shape[-1],) * 2)] + [to_image((v + 1) / 2) for v in views],
                           columns=5).save(tmp, format="PNG")
        if work == final:                             # only the export settings changed
            nerf, grid, _ = build_field(cfg, dev)
            load_nerf(latest_nerf(work / "nerf"), nerf, grid)
        else:
            nerf, grid = optimize(cfg, model, embedding, work, progress=progress)
        try:
            info = export_outputs(nerf, grid, cfg.march, cfg.export, work)
        except EmptyMeshError as e:
            e.run_dir = work          # what an evaluation still scores: the sampled views beside the field
            raise
        log.info("exported %s", json.dumps(info))
    return {"image": str(image), "output": str(final), "status": "ok", "seconds": time.time() - t0,
            "warnings": warnings, **info}
