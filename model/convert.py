"""Convert LDM-format checkpoints (MVDream's sd-v2.1-base-4view.pt, the released isotropic3d.ckpt, or
an SD 2.1 .ckpt/.safetensors) into the project's checkpoint layout (model/checkpoint.py).

    python pipelines/convert_checkpoint.py --input isotropic3d.ckpt --output ckpt/iso3d \
        --camera-featurization isotropic3d-double-radians

    ckpt/iso3d/config.json          ModelConfig (layout, camera featurisation, inference, vae_path, encoder weights)
    ckpt/iso3d/unet/                UNet + camera MLP as diffusers' save_pretrained writes it
    ckpt/iso3d/scheduler/           the noise schedule (diffusers DDPMScheduler config)
    ckpt/iso3d/vae/                 diffusers AutoencoderKL (from first_stage_model.*), when the file has it
    ckpt/iso3d/encoder.safetensors  OpenCLIP image tower (from cond_stage_model.model.visual.*), when present
Paths in config.json are relative to the directory (it can be moved or copied whole).

Key renaming is diffusers' own (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`); MVDream adds
only the camera MLP (`camera_embed.0/2`, which is diffusers' projection class embedding, `label_emb.0.0/2`
in LDM naming) and multi-view attention, which reuses SD's self-attention weights (nothing to convert).
Files are read with safetensors or `torch.load(weights_only=True)`: a file that needs pickle is refused.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from common.atomic import replace_dir
from model.checkpoint import weights_file, write_scheduler, write_unet
from common.config import cache_home, config_hash, file_digest

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
VISUAL_PREFIX = "cond_stage_model.model.visual."
CAMERA_RENAME = {"camera_embed.0.": "label_emb.0.0.", "camera_embed.2.": "label_emb.0.2."}
RAW_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


class ConversionError(ValueError):
    pass


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from .safetensors, or from .ckpt/.pt without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {path}: not a file")
    if path.suffix == ".safetensors":
        try:
            sd = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError, and OSError
            raise ConversionError(f"checkpoint {path}: not a readable safetensors file ({_first_line(e)})") from None
    else:
        with open(path, "rb") as f:
            head = f.read(4)
        # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle stream (0x80 ..)
        if not (head.startswith(b"PK") or head.startswith(b"\x80")):
            raise ConversionError(f"checkpoint {path}: not a torch checkpoint (neither a zip archive nor a pickle "
                                  f"stream: it starts with {head!r})")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK"))
        except Exception as e:   # noqa: BLE001 - torch raises UnpicklingError for anything beyond tensors
            if type(e).__name__ == "UnpicklingError":
                raise ConversionError(f"checkpoint {path}: needs pickle to load (it holds more than tensors), refused; "
                                      "save its state_dict to .safetensors with a tool you trust") from None
            raise ConversionError(f"checkpoint {path}: not a torch checkpoint ({_first_line(e)})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]                       # Lightning-style wrapper
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ConversionError(f"checkpoint {path}: not a flat state dict of tensors")
    return sd


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def convert_unet_state(sd: dict, unet) -> dict[str, torch.Tensor]:
    """LDM UNet (+ camera MLP) keys -> the diffusers keys of `unet`; every key mapped, none left, shapes equal."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    ldm = {}
    for key, value in sd.items():
        if key.startswith(UNET_PREFIX):
            name = key[len(UNET_PREFIX):]
            for old, new in CAMERA_RENAME.items():
                if name.startswith(old):
                    name = new + name[len(old):]
            ldm[UNET_PREFIX + name] = value
    if not ldm:
        raise ConversionError(f"no {UNET_PREFIX}* keys: not an LDM / MVDream checkpoint")
    if UNET_PREFIX + "label_emb.0.0.weight" not in ldm:
        raise ConversionError("no camera embedding (model.diffusion_model.camera_embed.*): not a multi-view "
                              "(MVDream / Isotropic3D) checkpoint")
    converted = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    check_state(converted, unet.state_dict(), len(ldm), "UNet")
    return converted


def convert_vae_state(sd: dict, vae) -> Optional[dict[str, torch.Tensor]]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    ldm = {k: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    if not ldm:
        return None
    converted = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    check_state(converted, vae.state_dict(), len(ldm), "VAE")
    return converted


def check_state(converted: dict, expected: dict, source_count: int, what: str) -> None:
    missing = sorted(set(expected) - set(converted))
    extra = sorted(set(converted) - set(expected))
    wrong = [(k, tuple(converted[k].shape), tuple(expected[k].shape)) for k in set(converted) & set(expected)
             if converted[k].shape != expected[k].shape]
    if missing or extra or wrong or len(converted) != source_count:
        raise ConversionError(f"{what}: {len(missing)} keys not mapped (e.g. {missing[:2]}), {len(extra)} unexpected "
                              f"(e.g. {extra[:2]}), {len(wrong)} shape mismatches (e.g. {wrong[:2]}), "
                              f"{source_count - len(converted)} source keys left over")


def extract_visual(sd: dict) -> Optional[dict[str, torch.Tensor]]:
    """Isotropic3D's image tower, `cond_stage_model.model.visual.*` -> open_clip `visual.*` names."""
    visual = {"visual." + k[len(VISUAL_PREFIX):]: v for k, v in sd.items() if k.startswith(VISUAL_PREFIX)}
    return visual or None


def convert(input_path: Path, output: Path, camera_featurization: Optional[str] = None,
            clip_weights: Optional[str] = None, model_cfg=None) -> Path:
    """Write a checkpoint directory; returns it. camera_featurization None: isotropic3d-double-radians
    when the file carries the image tower (the released Isotropic3D checkpoint), else mvdream; the
    released checkpoint also gets the released inference conventions (inference: isotropic3d-release)."""
    from model.mvmodel import FEATURIZATIONS, ModelConfig, MultiViewModel
    from model.unet import build_unet
    if camera_featurization is not None and camera_featurization not in FEATURIZATIONS:
        raise ConversionError(f"camera featurization {camera_featurization!r}: expected one of {FEATURIZATIONS}")
    sd = read_state_dict(input_path)
    clip_weights = str(Path(clip_weights).resolve()) if clip_weights else None
    cfg = model_cfg or ModelConfig.sd21()
    with torch.device("meta"):
        unet = build_unet(cfg.unet)
    unet_state = convert_unet_state(sd, unet)
    output = Path(output)
    tmp = output.with_name(f".tmp-{output.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_unet(tmp, unet, unet_state)
    write_scheduler(tmp)
    visual = extract_visual(sd)
    if cfg.latent == "vae":
        from diffusers import AutoencoderKL
        with torch.device("meta"):
            vae = MultiViewModel.new_vae(cfg)
        vae_state = convert_vae_state(sd, vae)
        if vae_state is not None:
            real = AutoencoderKL.from_config(vae.config)
            real.load_state_dict(vae_state)
            real.save_pretrained(tmp / "vae", safe_serialization=True)
            cfg = dataclasses.replace(cfg, vae_path="vae")
    if visual is not None:
        save_file({k: v.contiguous() for k, v in visual.items()}, str(tmp / "encoder.safetensors"))
        clip_weights = clip_weights or "encoder.safetensors"
    if clip_weights:
        cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, weights=str(clip_weights)))
    featurization = camera_featurization or ("isotropic3d-double-radians" if visual is not None else "mvdream")
    cfg = dataclasses.replace(cfg, camera_featurization=featurization,
                              inference="isotropic3d-release" if visual is not None else cfg.inference)
    (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    (tmp / "source.json").write_text(json.dumps({"converted_from": str(Path(input_path).resolve()),
                                                 "digest": file_digest(input_path)}, indent=2))
    replace_dir(tmp, output)
    return output


def is_raw_checkpoint(path: Path) -> bool:
    return Path(path).is_file() and Path(path).suffix in RAW_SUFFIXES


def default_cache() -> Path:
    """Where files given directly (--init, --checkpoint) are converted: $ISO3D_CACHE/converted
    (default ~/.cache/iso3d/converted)."""
    return cache_home() / "converted"


def as_checkpoint_dir(path: Path, cache_root: Optional[Path] = None, **kwargs) -> Path:
    """A checkpoint directory as is; an original .ckpt/.pt/.safetensors converted once into
    cache_root/<name>-<digest>/ (reused afterwards)."""
    path = Path(path)
    cache_root = cache_root or default_cache()
    if not is_raw_checkpoint(path):
        return path
    layout = kwargs.get("model_cfg")
    out = Path(cache_root) / f"{path.stem}-{file_digest(path)}{'-' + config_hash(layout.unet)[:8] if layout else ''}"
    if weights_file(out) is not None:
        return out
    return convert(path, out, **kwargs)
