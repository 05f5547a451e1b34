"""Checkpoints: a directory per step, complete only once renamed into place.

    checkpoints/step-000100/
      config.json          the resolved model configuration (camera featurisation, inference conventions, VAE and
                           encoder weights; relative paths are relative to this directory)
      unet/                UNet + camera MLP as diffusers' save_pretrained writes them
      unet_ema/            the same with the exponential moving average of the trained weights, when training
                           keeps one (TrainConfig.ema_decay > 0): what sampling, generate and --init load
      scheduler/           the noise schedule (diffusers DDPMScheduler)
      vae -> ...           a link to the frozen VAE folder the model uses (not a copy)
      training_state/      optimizer.pt, scheduler.pt (loaded with weights_only=True), state.json, ema.json

diffusers' own tooling reads `unet/` with UNet2DConditionModel.from_pretrained; what it does not know
is the multi-view attention (model/unet.py: MultiViewAttnProcessor on every attn1) and that
`class_labels` is the 16-number camera feature (model/mvmodel.py). Checkpoints written before `unet/`
existed hold the same state dict as `model.safetensors`; they still load.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from common.atomic import replace_dir

STEP_DIR = re.compile(r"^step-(\d+)$")
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
EMA_WEIGHTS = Path("unet_ema") / "diffusion_pytorch_model.safetensors"
LEGACY_WEIGHTS = Path("model.safetensors")


def write_unet(ckpt: Path, unet, state: Optional[dict] = None, folder: str = "unet") -> None:
    """`ckpt/<folder>/` as save_pretrained writes it; `state` (else the UNet's own) as its weights, so a UNet
    on the meta device (a conversion) needs no memory for its parameters."""
    if state is None:
        unet.save_pretrained(Path(ckpt) / folder, safe_serialization=True)
        return
    unet.save_config(Path(ckpt) / folder)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
              str(Path(ckpt) / folder / UNET_WEIGHTS.name), metadata={"format": "pt"})


def write_scheduler(ckpt: Path, prediction_type: str = "epsilon", zero_terminal_snr: bool = False) -> None:
    from model.mvmodel import noise_schedule
    noise_schedule(prediction_type, zero_terminal_snr).save_pretrained(Path(ckpt) / "scheduler")


def trained_names(model) -> list[str]:
    """The UNet parameters training updates (and EMAModel averages), in named_parameters order."""
    return [n for n, p in model.unet.named_parameters() if p.requires_grad]


def sampling_weights(path: Path) -> Optional[Path]:
    """The weights a checkpoint samples with: its moving average (unet_ema/) when it has one, else weights_file."""
    return Path(path) / EMA_WEIGHTS if (Path(path) / EMA_WEIGHTS).is_file() else weights_file(path)


def ema_state(model, ema) -> dict:
    """The UNet's state dict with every trained parameter replaced by its moving average (diffusers'
    EMAModel over the parameters that require grad, in named_parameters order)."""
    state = dict(model.unet.state_dict())
    state.update(zip(trained_names(model), ema.shadow_params))
    return state


def load_ema(path: Path, model, ema) -> None:
    """A checkpoint's moving average and its step count into `ema` (resume)."""
    path = Path(path)
    if not (path / EMA_WEIGHTS).is_file():
        raise FileNotFoundError(f"checkpoint {path}: no unet_ema/ to resume the moving average from "
                                "(it was trained with ema_decay=0)")
    state = load_file(str(path / EMA_WEIGHTS))
    ema.shadow_params = [state[n].to(p.device, p.dtype) for n, p in zip(trained_names(model), ema.shadow_params)]
    ema.optimization_step = json.loads((path / "training_state" / "ema.json").read_text())["optimization_step"]


def save(ckpt_root: Path, step: int, model, optimizer=None, scheduler=None, extra: dict | None = None,
         ema=None) -> Path:
    final = Path(ckpt_root) / f"step-{step:06d}"
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "training_state").mkdir(parents=True)
    cfg = model.cfg
    if cfg.vae_path is not None:
        # Frozen weights stay out of checkpoints: a link to the VAE folder, and an absolute path in config.json.
        vae = Path(cfg.vae_path).resolve()
        os.symlink(vae, tmp / "vae", target_is_directory=True)
        cfg = dataclasses.replace(cfg, vae_path=str(vae))
    if cfg.encoder.weights is not None:
        cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, weights=str(Path(cfg.encoder.weights).resolve())))
    (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    write_unet(tmp, model.unet)
    if ema is not None:
        write_unet(tmp, model.unet, ema_state(model, ema), folder="unet_ema")
        (tmp / "training_state" / "ema.json").write_text(json.dumps(
            {"optimization_step": ema.optimization_step, "decay": ema.decay, "power": ema.power,
             "decay_now": ema.get_decay(ema.optimization_step)}))
    write_scheduler(tmp, cfg.prediction_type, cfg.zero_terminal_snr)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "training_state" / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "training_state" / "scheduler.pt")
    (tmp / "training_state" / "state.json").write_text(json.dumps({"step": step, **(extra or {})}))
    replace_dir(tmp, final)
    return final


def prune(ckpt_root: Path, keep_last: int, keep_every: int = 0, protect=()) -> list[Path]:
    """Delete the checkpoints of `ckpt_root` that are neither among the `keep_last` newest, nor at a step
    that is a multiple of `keep_every` (0: none kept that way), nor in `protect` (the one a run resumed
    from). Each goes in two moves: renamed out of the step-N pattern first (so `latest` never picks a
    half-deleted one), then removed. Returns the deleted paths (their old names), oldest first."""
    if keep_last < 1:
        raise ValueError(f"keep_last {keep_last}: expected >= 1 (the newest checkpoint is the one a resume needs)")
    found = sorted((int(m.group(1)), p) for p in Path(ckpt_root).glob("step-*") if (m := STEP_DIR.match(p.name)))
    kept = {p for _, p in found[-keep_last:]} | {Path(p).resolve() for p in protect}
    deleted = []
    for step, p in found:
        if p in kept or p.resolve() in kept or (keep_every and step % keep_every == 0):
            continue
        doomed = p.with_name(f".deleting-{p.name}")
        os.replace(p, doomed)
        shutil.rmtree(doomed)
        deleted.append(p)
    for leftover in Path(ckpt_root).glob(".deleting-step-*"):    # a prune killed between its two moves
        shutil.rmtree(leftover, ignore_errors=True)
    return deleted


def latest(ckpt_root: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in Path(ckpt_root).glob("step-*") if (m := STEP_DIR.match(p.name))]
    return max(found)[1] if found else None


def weights_file(path: Path) -> Optional[Path]:
    """The UNet weights of a checkpoint directory (unet/, or the older model.safetensors), else None."""
    for rel in (UNET_WEIGHTS, LEGACY_WEIGHTS):
        if (Path(path) / rel).is_file():
            return Path(path) / rel
    return None


def find(path: Path, what: str = "checkpoint") -> Path:
    """A checkpoint directory as is; a run directory (finetune.py --output) -> its latest checkpoint.
    Anything else: one line naming `path` and what is wrong (FileNotFoundError)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path}: does not exist")
    if path.is_dir() and weights_file(path) is not None:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{what} {path}: no config.json beside its weights (an incomplete checkpoint)")
        return path
    if path.is_dir() and (path / "checkpoints").is_dir():
        step = latest(path / "checkpoints")
        if step is None:
            raise FileNotFoundError(f"{what} {path}: a run directory without any checkpoint yet")
        return find(step, what)
    kind = "a directory" if path.is_dir() else "a file"
    raise FileNotFoundError(f"{what} {path}: {kind}, but not a checkpoint directory (config.json + unet/), a run "
                            "directory (checkpoints/step-N/) or an original LDM checkpoint (.ckpt/.pt/.safetensors)")


def resolve(spec: str, ckpt_root: Path) -> Path:
    """'latest' or a path -> a complete checkpoint directory (a clear error otherwise)."""
    path = latest(ckpt_root) if spec == "latest" else Path(spec)
    if path is None:
        raise FileNotFoundError(f"--resume latest: no checkpoint in {ckpt_root}")
    return find(path, "--resume")


def load_model_weights(model, path: Path, moving_average: bool = True) -> None:
    """The checkpoint's UNet weights into model; moving_average: its unet_ema/ when it has one (what
    sampling and fine-tuning from it use; a resume loads the trained weights with moving_average=False)."""
    weights = sampling_weights(path) if moving_average else weights_file(path)
    if weights is None:
        raise FileNotFoundError(f"checkpoint {path}: no UNet weights (unet/ or model.safetensors)")
    state = load_file(str(weights))
    missing, unexpected = model.unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: does not fit this model ({len(missing)} missing keys, e.g. "
                         f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")


def load_training_state(path: Path, optimizer, scheduler) -> int:
    ts = Path(path) / "training_state"
    optimizer.load_state_dict(torch.load(ts / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ts / "scheduler.pt", weights_only=True))
    return recorded_state(path)["step"]


def recorded_state(path: Path) -> dict:
    """What save() recorded beside the training state: {"step": N, ...the extra it was given, e.g. "loss"}."""
    return json.loads((Path(path) / "training_state" / "state.json").read_text())


def export_for_sampling(path: Path, dest: Path) -> bool:
    """The checkpoint at `path` as a folder without training state, for --init and --checkpoint: config.json,
    unet/ holding its sampling weights (the moving average when it has one), scheduler/, and its vae link.
    `dest` must not exist (build it under a temporary name and rename it). -> whether the weights are the
    moving average."""
    path, dest = Path(path), Path(dest)
    weights = sampling_weights(path)
    (dest / UNET_WEIGHTS.parent).mkdir(parents=True)
    shutil.copy2(path / "config.json", dest / "config.json")
    shutil.copy2(path / UNET_WEIGHTS.parent / "config.json", dest / UNET_WEIGHTS.parent / "config.json")
    shutil.copy2(weights, dest / UNET_WEIGHTS)
    shutil.copytree(path / "scheduler", dest / "scheduler")
    if (path / "vae").is_symlink():
        os.symlink(os.readlink(path / "vae"), dest / "vae", target_is_directory=True)
    return weights == path / EMA_WEIGHTS


def model_config(path: Path, overrides=()):
    """The ModelConfig a checkpoint directory brings (its config.json; relative weight paths resolved
    against the directory; its own vae/ and encoder.safetensors when the config names none), then
    `key=value` overrides of ModelConfig fields (they win)."""
    from common.config import from_dict, load_config
    from model.mvmodel import ModelConfig
    path = Path(path)
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"checkpoint {path}: config.json unreadable ({type(e).__name__})") from None
    cfg = from_dict(ModelConfig, saved, "checkpoint config.json")
    if cfg.vae_path is None and cfg.latent == "vae" and (path / "vae" / "config.json").is_file():
        cfg.vae_path = "vae"
    if cfg.encoder.weights is None and (path / "encoder.safetensors").is_file():
        cfg.encoder.weights = "encoder.safetensors"
    if cfg.vae_path is not None:
        cfg.vae_path = str((path / cfg.vae_path).resolve())
    if cfg.encoder.weights is not None:
        cfg.encoder.weights = str((path / cfg.encoder.weights).resolve())
    return load_config(ModelConfig, None, list(overrides), base=cfg) if overrides else cfg


def load_model(path: Path, model_cfg=None):
    """A checkpoint directory -> (MultiViewModel with its weights, in eval mode, on the CPU). model_cfg:
    the configuration to build (default: the one the checkpoint brings)."""
    from model.mvmodel import MultiViewModel
    path = find(path)
    model = MultiViewModel(model_cfg or model_config(path))
    load_model_weights(model, path)
    return model.eval().requires_grad_(False)


def identity(path: Path) -> str:
    """What a checkpoint's outputs depend on, cheaply: its config and its weights file's digest."""
    from common.config import config_hash, file_digest
    path = find(path)
    return config_hash([(path / "config.json").read_text(), file_digest(sampling_weights(path))])
