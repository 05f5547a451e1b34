"""Prepared training data: each rendered object's CLIP embeddings (its 16 random views) and what the UNet
denoises (all 32 views: the VAE posterior mean x 0.18215, or the image itself for a pixel-space model),
computed once per render root and model identity, in shards, so that training never decodes a PNG, runs
the VAE or CLIP, or rescans the render root.

    from model.prepare import prepare       # the encoding (the model's encoder and VAE) lives with the model
    index = prepare(model_cfg, render_root, PrepareConfig())   # only objects new or re-rendered since last time
    objects = index.objects("train", val_percent=5)            # PreparedObject: read lazily from the shards
    python pipelines/finetune.py --prepare --stage 1 --config sd21 --data R --output RUN --num-workers 8

Layout, RENDER_ROOT/cache/prepared/<digest of the identity>/:
    identity.txt       what the numbers depend on: SCHEMA_VERSION (this code); encoder, its weights and
                       preprocessing; VAE weights; image size; storage dtype
    shards/shard-<digest>.safetensors
                       per object `<uid>/clip` [16, D], `<uid>/latents` [32, C, h, w] (random views 0-15, then
                       fixed 0-15), `<uid>/angles` [32, 3] (azimuth, elevation, distance); metadata: the
                       objects' fingerprints and quality flags (meta.json's, render/quality.py), the broken
                       ones with the reason
    index.json         uid -> shard, broken uid -> reason, uid -> flags; rewritten at the end of every prepare
Which flagged objects training leaves out is SampleConfig.exclude_flags: a rule applied when the index
is read, so changing it prepares nothing again.
An object's fingerprint is the size and modification time of its cameras.json and meta.json (the render
writes both anew when it renders an object): a re-rendered object is prepared again, an unchanged one is
not read. A shard is written under a temporary name and renamed when complete, so a killed prepare
resumes with the shards it finished; with num_workers > 0 every shard is a Ray task (one GPU each with
use_gpu), on whichever nodes have room.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save

from common.atomic import atomic_write_bytes
from common.config import config_hash
from dataset.views import VIEW_SETS, split_of
from render.cameras import NUM_VIEWS
from render.layout import object_dirs

PREPARED_DIR = Path("cache") / "prepared"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ALL_VIEWS = [(s, i) for s in VIEW_SETS for i in range(NUM_VIEWS)]   # the row order of latents and angles
SCHEMA_VERSION = 2
"""Part of every prepared identity: raise it with any change to what the stored numbers are (compositing on
white, resizing, the view order, the latent scale, the shard layout), so that data prepared by older code
is prepared again rather than silently reused. 1: everything before the version existed."""


@dataclass
class PrepareConfig:
    shard_size: int = 256
    """Objects per shard file (and per task)."""
    dtype: str = "float32"
    """Storage of latents and embeddings: float32 (exact), float16 or bfloat16 (half the disk; at sd21 an
    object is 32 x 4 x 32 x 32 latents + 16 x 1024 embeddings: 0.56 MB in float32, 0.28 MB in float16)."""
    batch_views: int = 32
    """Views per VAE / CLIP forward pass."""

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"prepare.dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.shard_size < 1 or self.batch_views < 1:
            raise ValueError("prepare.shard_size and prepare.batch_views: at least 1")


def prepared_dir(render_root: Path, ident: str) -> Path:
    return Path(render_root) / PREPARED_DIR / config_hash(ident)


def fingerprint(obj_dir: Path) -> str:
    parts = []
    for name in ("cameras.json", "meta.json"):
        try:
            st = (obj_dir / name).stat()
            parts.append(f"{st.st_size}:{st.st_mtime_ns}")
        except FileNotFoundError:
            parts.append("missing")
    return "/".join(parts)


def rendered_fingerprints(render_root: Path) -> dict[str, str]:
    """{uid: fingerprint} of every object folder: the bucket listings and two stats per object."""
    if not (Path(render_root) / "objects").is_dir():
        raise FileNotFoundError(f"{render_root}: no objects/ folder (not a render output?)")
    return {uid: fingerprint(path) for uid, path in object_dirs(render_root).items()}


def read_shard_metadata(shards: Path, present: dict[str, str]) -> dict[str, tuple[str, Optional[str], list[str]]]:
    """{uid: (shard name, broken reason or None, quality flags)} of the objects in `present` ({uid:
    fingerprint}) that a finished shard holds with that fingerprint (a re-rendered object's older entry, in
    an older shard, does not count)."""
    known = {}
    for shard in sorted(shards.glob("shard-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            meta = f.metadata() or {}
        flags = json.loads(meta.get("flags", "{}"))
        for uid, fp in json.loads(meta.get("objects", "{}")).items():
            if present.get(uid) == fp:
                known[uid] = (shard.name, None, flags.get(uid, []))
        for uid, (fp, reason) in json.loads(meta.get("broken", "{}")).items():
            if present.get(uid) == fp:
                known[uid] = (shard.name, reason, [])
    return known


def write_shard(out: Path, records: dict[str, tuple], broken: dict[str, tuple[str, str]], dtype: torch.dtype) -> None:
    """One shard file, atomically: records {uid: (fingerprint, clip [16, D], latents [32, C, h, w], angles
    [32, 3], quality flags)}, broken {uid: (fingerprint, reason)}."""
    tensors = {}
    for uid, (_, clip, latents, angles, _) in records.items():
        tensors[f"{uid}/clip"] = clip.to("cpu", dtype).contiguous()
        tensors[f"{uid}/latents"] = latents.to("cpu", dtype).contiguous()
        tensors[f"{uid}/angles"] = angles.to("cpu", torch.float64).contiguous()
    good = {uid: r[0] for uid, r in records.items()}
    flags = {uid: r[4] for uid, r in records.items() if r[4]}
    atomic_write_bytes(out, save(tensors, metadata={"objects": json.dumps(good), "broken": json.dumps(broken),
                                                    "flags": json.dumps(flags)}))


class PreparedIndex:
    """The prepared objects of one render root and model identity (index.json), and their embeddings."""

    def __init__(self, root: Path, entries: dict[str, str], broken: dict[str, str],
                 flags: Optional[dict[str, list[str]]] = None):
        self.root, self.entries, self.broken, self.flags, self.stats = Path(root), entries, broken, flags or {}, {}

    @staticmethod
    def load(render_root: Path, ident: str) -> "PreparedIndex":
        """The index of the data prepared for `ident` (model/prepare.py: identity)."""
        root = prepared_dir(render_root, ident)
        try:
            data = json.loads((root / "index.json").read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{render_root}: not prepared for this model ({ident}); run finetune.py "
                                    "--prepare with the same settings") from None
        return PreparedIndex(root, data["objects"], data["broken"], data.get("flags"))

    def objects(self, split: Optional[str] = None, val_percent: float = 5.0,
                exclude: Sequence[str] = ()) -> list["PreparedObject"]:
        """The objects of a split (None: all), leaving out those with any of the quality flags `exclude`."""
        return [PreparedObject(uid, self.root / "shards" / shard) for uid, shard in self.entries.items()
                if (split is None or split_of(uid, val_percent) == split)
                and not set(exclude) & set(self.flags.get(uid, ()))]

    def get(self, uid: str) -> torch.Tensor:
        """[16, D] CLIP embeddings of the object's random views (float32)."""
        return PreparedObject(uid, self.root / "shards" / self.entries[uid]).clip()


@dataclass
class PreparedObject:
    uid: str
    shard: Path

    def clip(self, ref: Optional[int] = None) -> torch.Tensor:
        with safe_open(str(self.shard), framework="pt") as f:
            emb = f.get_tensor(f"{self.uid}/clip") if ref is None else f.get_slice(f"{self.uid}/clip")[ref:ref + 1][0]
        return emb.float()

    def angles(self) -> torch.Tensor:
        """[32, 3] float64: azimuth, elevation (degrees) and distance of each view, in ALL_VIEWS order."""
        with safe_open(str(self.shard), framework="pt") as f:
            return f.get_tensor(f"{self.uid}/angles")

    def latents(self, views: list[tuple[str, int]]) -> torch.Tensor:
        """[len(views), C, h, w] float32: the views' latents, reading only those rows."""
        with safe_open(str(self.shard), framework="pt") as f:
            rows = f.get_slice(f"{self.uid}/latents")
            return torch.cat([rows[k:k + 1] for k in (ALL_VIEWS.index(v) for v in views)]).float()
