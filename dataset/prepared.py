"""Prepared training data: each rendered object's CLIP embeddings (its 16 random views) and what the UNet
denoises (all 32 views: the VAE posterior mean x 0.18215, or the image itself for a pixel-space model),
computed once per render root and model identity, in shards, so that training never decodes a PNG, runs
the VAE or CLIP, or rescans the render root.

    index = prepare(model_cfg, render_root, PrepareConfig())   # only objects new or re-rendered since last time
    objects = index.objects("train", val_percent=5)            # PreparedObject: read lazily from the shards
    python pipelines/finetune.py --prepare --stage 1 --config sd21 --data R --output RUN --num-workers 8

Layout, RENDER_ROOT/cache/prepared/<digest of the identity>/:
    identity.txt       what the numbers depend on: encoder, its weights and preprocessing; VAE weights;
                       image size; storage dtype
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

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save

from common.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from common.config import config_hash, from_dict
from dataset.views import VIEW_SETS, BrokenObject, RenderedObject, split_of
from render.cameras import NUM_VIEWS
from render.layout import object_dir, object_dirs

PREPARED_DIR = Path("cache") / "prepared"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ALL_VIEWS = [(s, i) for s in VIEW_SETS for i in range(NUM_VIEWS)]   # the row order of latents and angles


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


def identity(model_cfg, cfg: PrepareConfig) -> str:
    from model.encoder import encoder_identity
    from model.mvmodel import vae_identity
    return (f"clip={encoder_identity(model_cfg.encoder, model_cfg.inference)}|latents={vae_identity(model_cfg)}"
            f"@{model_cfg.image_size}px|dtype={cfg.dtype}")


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


def prepare_shard(model_cfg_dict: dict, render_root: str, uids: list[str], fingerprints: dict[str, str],
                  out: str, cfg_dict: dict) -> dict:
    """Encode the objects `uids` and write the shard `out` (atomically); returns counts. One task."""
    from model.encoder import ImageEncoder
    from model.mvmodel import ModelConfig, load_vae, vae_encode
    model_cfg, cfg = from_dict(ModelConfig, model_cfg_dict), from_dict(PrepareConfig, cfg_dict)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    encoder = ImageEncoder(model_cfg.encoder, model_cfg.inference).to(device)
    vae = load_vae(model_cfg)
    vae = vae.to(device) if vae is not None else None
    dtype, size = DTYPES[cfg.dtype], model_cfg.image_size
    records, broken = {}, {}
    for uid in uids:
        try:
            obj = RenderedObject.open(object_dir(Path(render_root), uid))
        except BrokenObject as e:
            broken[uid] = (fingerprints[uid], str(e))
            continue
        clip = encoder.encode([obj.rgba("random", i) for i in range(NUM_VIEWS)])
        images = torch.stack([obj.image(s, i, size) for s, i in ALL_VIEWS])
        latents = torch.cat([vae_encode(vae, chunk.to(device)) for chunk in images.split(cfg.batch_views)])
        angles = [[*obj.angles(s, i), obj.cameras[s][i]["distance"]] for s, i in ALL_VIEWS]
        try:
            meta = json.loads((obj.path / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}
        flags = meta.get("quality", {}).get("flags", [])        # render/quality.py; none before it existed
        records[uid] = (fingerprints[uid], clip, latents, torch.tensor(angles, dtype=torch.float64), flags)
    write_shard(Path(out), records, broken, dtype)
    return {"prepared": len(records), "broken": len(broken)}


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


def prepare(model_cfg, render_root: Path, cfg: PrepareConfig, num_workers: int = 0, use_gpu: bool = False,
            progress: bool = True) -> "PreparedIndex":
    """Bring the prepared data of render_root up to date for this model: encode only the objects that are
    new or re-rendered since the last prepare (num_workers 0: in this process; N: Ray tasks, in the Ray
    this process joined, else a local one on 127.0.0.1). Returns the index; index.stats says what this call did."""
    cfg.validate()
    ident = identity(model_cfg, cfg)
    root = prepared_dir(render_root, ident)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "identity.txt", ident + "\n")
    present = rendered_fingerprints(render_root)
    known = read_shard_metadata(root / "shards", present)
    todo = sorted(uid for uid in present if uid not in known)
    chunks = [todo[i:i + cfg.shard_size] for i in range(0, len(todo), cfg.shard_size)]
    jobs = []
    for chunk in chunks:
        fps = {u: present[u] for u in chunk}
        name = f"shard-{config_hash([ident, fps])}.safetensors"
        jobs.append((chunk, fps, str(root / "shards" / name)))
    args = (dataclasses.asdict(model_cfg), str(Path(render_root).resolve()))
    from tqdm import tqdm
    bar = tqdm(total=len(todo), desc="prepare", unit="obj", disable=not progress or not todo)
    if num_workers == 0 or not jobs:
        for chunk, fps, out in jobs:
            prepare_shard(*args, chunk, fps, out, dataclasses.asdict(cfg))
            bar.update(len(chunk))
    else:
        from common.ray_local import init_ray
        init_ray(None, num_cpus=num_workers)    # no-op when this process already joined or started a Ray
        import ray
        task = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1, max_retries=2)(prepare_shard)
        pending = {task.remote(*args, chunk, fps, out, dataclasses.asdict(cfg)): len(chunk) for chunk, fps, out in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ray.get(done[0])
            bar.update(pending.pop(done[0]))
    bar.close()
    known = read_shard_metadata(root / "shards", present)
    entries = {uid: known[uid][0] for uid in sorted(known) if known[uid][1] is None}
    broken = {uid: known[uid][1] for uid in sorted(known) if known[uid][1] is not None}
    flags = {uid: known[uid][2] for uid in entries if known[uid][2]}
    atomic_write_json(root / "index.json", {"identity": ident, "objects": entries, "broken": broken, "flags": flags})
    index = PreparedIndex(root, entries, broken, flags)
    index.stats = {"objects": len(entries), "broken": len(broken), "encoded": len(todo), "shards_written": len(jobs)}
    return index


class PreparedIndex:
    """The prepared objects of one render root and model identity (index.json), and their embeddings."""

    def __init__(self, root: Path, entries: dict[str, str], broken: dict[str, str],
                 flags: Optional[dict[str, list[str]]] = None):
        self.root, self.entries, self.broken, self.flags, self.stats = Path(root), entries, broken, flags or {}, {}

    @staticmethod
    def load(model_cfg, render_root: Path, cfg: PrepareConfig) -> "PreparedIndex":
        ident = identity(model_cfg, cfg)
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
