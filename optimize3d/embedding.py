"""The input picture's CLIP embedding, cached per (the picture's pixels, encoder identity and preprocessing)."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from common.config import config_hash


def clip_embedding(picture: Image.Image, image_sha: str, model_cfg, cache: Path) -> torch.Tensor:
    """The picture's CLIP embedding, cached per (the picture's pixels, encoder identity and preprocessing)."""
    from common.atomic import atomic_write_bytes
    from model.encoder import ImageEncoder, encoder_identity
    from safetensors.torch import save as save_bytes
    path = cache / f"{image_sha[:16]}-{config_hash(encoder_identity(model_cfg.encoder, model_cfg.inference))}.safetensors"
    if path.is_file():
        return load_file(str(path))["embedding"]
    emb = ImageEncoder(model_cfg.encoder, model_cfg.inference).encode([picture])[0]
    atomic_write_bytes(path, save_bytes({"embedding": emb.contiguous()}))
    return emb
