"""CLIP embeddings of the reference (random-set) views, computed once and cached on disk.

    store = EmbeddingStore(cache_dir, encoder_identity)
    store.build(objects, encode_fn)            # encodes only what is missing or changed
    emb = store.get(uid)                       # [16, D], one row per random view

One safetensors file per object and encoder, recording the sha256 of each of the 16 PNGs it was
computed from: a re-rendered object (different pixels) is encoded again; a different encoder
(another identity) has its own folder.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from dataset.views import RenderedObject, content_hash
from render.cameras import NUM_VIEWS


class EmbeddingStore:
    def __init__(self, cache_dir: Path, encoder_identity: str):
        key = hashlib.sha256(encoder_identity.encode()).hexdigest()[:16]
        self.dir = Path(cache_dir) / key
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "encoder.txt").write_text(encoder_identity + "\n")
        self.memory: dict[str, torch.Tensor] = {}

    def _file(self, uid: str) -> Path:
        return self.dir / f"{uid}.safetensors"

    def _valid(self, obj: RenderedObject) -> bool:
        f = self._file(obj.uid)
        if not f.exists():
            return False
        try:
            with safe_open(str(f), framework="pt") as st:
                stored = (st.metadata() or {}).get("sha256", "")
        except Exception:
            return False
        return stored == ",".join(content_hash(obj.png("random", i)) for i in range(NUM_VIEWS))

    def build(self, objects: list[RenderedObject], encode: Callable[[list[Image.Image]], torch.Tensor],
              progress: bool = True) -> int:
        """Encode the random views of every object whose cache entry is missing or stale; returns how many."""
        todo = [o for o in objects if not self._valid(o)]
        for obj in tqdm(todo, desc="clip embeddings", unit="obj", disable=not progress or not todo):
            images = []
            for i in range(NUM_VIEWS):
                with Image.open(obj.png("random", i)) as img:
                    images.append(img.convert("RGBA"))
            emb = encode(images).float().contiguous()
            hashes = ",".join(content_hash(obj.png("random", i)) for i in range(NUM_VIEWS))
            tmp = self._file(obj.uid).with_name(f".{obj.uid}.tmp-{os.getpid()}")
            save_file({"random": emb}, str(tmp), metadata={"sha256": hashes})
            tmp.replace(self._file(obj.uid))
        return len(todo)

    def get(self, uid: str) -> torch.Tensor:
        if uid not in self.memory:
            f = self._file(uid)
            if not f.exists():
                raise KeyError(f"{uid}: no cached CLIP embedding in {self.dir} (run build first)")
            with safe_open(str(f), framework="pt") as st:
                self.memory[uid] = st.get_tensor("random")
        return self.memory[uid]
