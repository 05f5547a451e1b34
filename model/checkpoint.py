"""Checkpoints (DESIGN.md section 3): a directory per step, complete only once renamed into place.

    checkpoints/step-000100/
      config.json          the resolved model configuration (camera featurisation included)
      model.safetensors    UNet + camera MLP (frozen CLIP and VAE are referenced by config, not copied)
      training_state/      optimizer.pt, scheduler.pt (loaded with weights_only=True), state.json
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.atomic import replace_dir

STEP_DIR = re.compile(r"^step-(\d+)$")


def save(ckpt_root: Path, step: int, model, optimizer=None, scheduler=None, extra: dict | None = None) -> Path:
    final = Path(ckpt_root) / f"step-{step:06d}"
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "training_state").mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2))
    save_file({k: v.detach().contiguous().cpu() for k, v in model.unet.state_dict().items()}, str(tmp / "model.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "training_state" / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "training_state" / "scheduler.pt")
    (tmp / "training_state" / "state.json").write_text(json.dumps({"step": step, **(extra or {})}))
    replace_dir(tmp, final)
    return final


def latest(ckpt_root: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in Path(ckpt_root).glob("step-*") if (m := STEP_DIR.match(p.name))]
    return max(found)[1] if found else None


def resolve(spec: str, ckpt_root: Path) -> Path:
    """'latest' or a path -> a complete checkpoint directory (a clear error otherwise)."""
    path = latest(ckpt_root) if spec == "latest" else Path(spec)
    if path is None:
        raise FileNotFoundError(f"--resume latest: no checkpoint in {ckpt_root}")
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"checkpoint {path}: no model.safetensors (not a checkpoint directory)")
    return path


def load_model_weights(model, path: Path) -> None:
    state = load_file(str(Path(path) / "model.safetensors"))
    missing, unexpected = model.unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: does not fit this model ({len(missing)} missing keys, e.g. "
                         f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")


def load_training_state(path: Path, optimizer, scheduler) -> int:
    ts = Path(path) / "training_state"
    optimizer.load_state_dict(torch.load(ts / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ts / "scheduler.pt", weights_only=True))
    return json.loads((ts / "state.json").read_text())["step"]


def load_model(path: Path):
    """A checkpoint directory -> (MultiViewModel with its weights, in eval mode, on the CPU)."""
    from omegaconf import OmegaConf

    from model.mvmodel import ModelConfig, MultiViewModel
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"checkpoint {path}: expected a directory with config.json and model.safetensors")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), json.loads((path / "config.json").read_text())))
    model = MultiViewModel(cfg)
    load_model_weights(model, path)
    return model.eval().requires_grad_(False)


def identity(path: Path) -> str:
    """What a checkpoint's outputs depend on, cheaply: its config and its weights file's digest."""
    from common.config import config_hash, file_digest
    path = Path(path)
    return config_hash([(path / "config.json").read_text(), file_digest(path / "model.safetensors")])
