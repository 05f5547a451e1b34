"""The frozen open_clip image encoder: one pooled, projected embedding per image = one context token.

    enc = ImageEncoder(EncoderConfig.tiny())                 # random weights: NOT a pretrained CLIP
    enc = ImageEncoder(EncoderConfig(model="ViT-H-14", weights="/models/open_clip_vit_h14.bin"))
    emb = enc.encode([pil_image, ...])                       # [N, embed_dim]

Preprocessing, `preprocessing="project"`: RGBA composited on white, resized to the model's size
(bicubic, antialiased), no crop, CLIP mean/std. `preprocessing="isotropic3d-release"`: what the released
Isotropic3D inference does, number for number (area resize of the RGBA to 256 with OpenCV, composite on
white, kornia's antialiased bicubic align-corners resize to the model's size, CLIP mean/std; needs
opencv-python-headless and kornia). The unconditional embedding is all zeros.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.config import file_digest
from render.preview import on_white

CONFIG_DIR = Path(__file__).parent / "configs"
TINY_MODEL = "iso3d-tiny-vit"
RANDOM_INIT_SEED = 0
INFERENCES = ("project", "isotropic3d-release")   # model.inference: whose conventions (model/mvmodel.py)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class EncoderConfig:
    model: str = "ViT-H-14"
    """open_clip model name (iso3d-tiny-vit is registered from model/configs/)."""
    weights: Optional[str] = None
    """Local weights file (.bin, .pt, .safetensors) for open_clip's loader; None = random weights."""

    @staticmethod
    def tiny() -> "EncoderConfig":
        return EncoderConfig(model=TINY_MODEL, weights=None)


def _register_tiny_config() -> None:
    import open_clip
    open_clip.add_model_config(CONFIG_DIR)


_register_tiny_config()


class ImageEncoder(torch.nn.Module):
    def __init__(self, cfg: EncoderConfig, preprocessing: str = "project"):
        super().__init__()
        import open_clip
        _check(preprocessing)
        self.preprocessing = preprocessing
        if cfg.weights is not None and not Path(cfg.weights).is_file():
            raise FileNotFoundError(f"encoder weights {cfg.weights}: not found")
        # weights_only loading inside open_clip for .bin/.pt; safetensors as such.
        with torch.random.fork_rng(devices=[]):
            # Without weights the encoder is a fixed random projection: seeded, so that fine-tuning and
            # generation (other processes, other machines) embed an image identically.
            torch.manual_seed(RANDOM_INIT_SEED)
            visual_only = _visual_only_weights(cfg.weights)
            model = open_clip.create_model(cfg.model, pretrained=None if visual_only is not None else cfg.weights, device="cpu")
        if visual_only is not None:      # the image tower alone (converted from isotropic3d.ckpt)
            model.visual.load_state_dict(visual_only, strict=True)
        self.visual = model.visual.eval().requires_grad_(False)
        self.image_size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
        self.embed_dim = model.visual.output_dim
        self.identity = encoder_identity(cfg, preprocessing)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return preprocess(images, self.image_size, self.preprocessing).to(next(self.visual.parameters()).device)

    @torch.no_grad()
    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        return self.visual(self.preprocess(images)).float()


def preprocess(images: list[Image.Image], size: int, preprocessing: str = "project") -> torch.Tensor:
    """PIL images (RGBA composited on white; RGB as is) -> [N, 3, size, size], CLIP-normalised."""
    _check(preprocessing)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    if preprocessing == "isotropic3d-release":
        # The released inference, step by step: its prepare_embeddings (OpenCV area resize of the RGBA to
        # 256, composite on white, to [-1, 1]), then its image embedder's preprocess (kornia resize, [0, 1]).
        import cv2
        import kornia
        rgbs = []
        for img in images:
            rgba = cv2.resize(np.asarray(img.convert("RGBA")), (256, 256), interpolation=cv2.INTER_AREA)
            rgba = rgba.astype(np.float32) / 255.0
            rgbs.append(rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:]))
        x = torch.from_numpy(np.stack(rgbs)).permute(0, 3, 1, 2) * 2.0 - 1.0
        x = kornia.geometry.resize(x, (size, size), interpolation="bicubic", align_corners=True, antialias=True)
        return ((x + 1.0) / 2.0 - mean) / std
    arrays = [np.asarray(on_white(img), dtype=np.float32) / 255.0 for img in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return (x - mean) / std


def _check(preprocessing: str) -> None:
    if preprocessing not in INFERENCES:
        raise ValueError(f"preprocessing {preprocessing!r}: expected one of {', '.join(INFERENCES)}")


def encoder_identity(cfg: EncoderConfig, preprocessing: str = "project") -> str:
    """What an embedding depends on: the model, its weights and the preprocessing (cache keys use it)."""
    ident = f"{cfg.model}:{file_digest(cfg.weights) if cfg.weights else f'random-init-seed{RANDOM_INIT_SEED}'}"
    return ident if preprocessing == "project" else f"{ident}:{preprocessing}"


def _visual_only_weights(path: Optional[str]) -> Optional[dict]:
    """The state dict of a .safetensors file holding only `visual.*` keys (prefix removed), else None:
    every other weights file goes through open_clip's own loader."""
    if path is None or not str(path).endswith(".safetensors"):
        return None
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    if not keys or not all(k.startswith("visual.") for k in keys):
        return None
    from safetensors.torch import load_file
    return {k[len("visual."):]: v for k, v in load_file(path).items()}
