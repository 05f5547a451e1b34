"""The prepare step: each rendered object's CLIP embeddings and latents, computed with the model's frozen
encoder and VAE and stored in dataset/prepared.py's shards (which training reads without the model).

    index = prepare(model_cfg, render_root, PrepareConfig())   # only objects new or re-rendered since last time
    index = load_index(model_cfg, render_root, PrepareConfig())  # what an earlier prepare left, as it is
    python pipelines/finetune.py --prepare --stage 1 --config sd21 --data R --num-workers 8 --gpu

Here, not in dataset/, because it runs the model: the flow of imports stays render -> dataset -> model.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from common.atomic import atomic_write_json, atomic_write_text
from common.config import config_hash, from_dict
from dataset.prepared import (ALL_VIEWS, DTYPES, SCHEMA_VERSION, PrepareConfig, PreparedIndex, prepared_dir,
                              read_shard_metadata, rendered_fingerprints, write_shard)
from dataset.views import BrokenObject, RenderedObject
from model.encoder import ImageEncoder, encoder_identity
from model.mvmodel import ModelConfig, load_vae, vae_encode, vae_identity
from render.cameras import NUM_VIEWS
from render.layout import object_dir


def identity(model_cfg, cfg: PrepareConfig) -> str:
    """What the prepared numbers depend on; its digest names their folder (dataset/prepared.py: prepared_dir)."""
    return (f"schema={SCHEMA_VERSION}|clip={encoder_identity(model_cfg.encoder, model_cfg.inference)}|latents={vae_identity(model_cfg)}"
            f"@{model_cfg.image_size}px|dtype={cfg.dtype}")


def load_index(model_cfg, render_root: Path, cfg: PrepareConfig) -> PreparedIndex:
    return PreparedIndex.load(render_root, identity(model_cfg, cfg))


def prepare_shard(model_cfg_dict: dict, render_root: str, uids: list[str], fingerprints: dict[str, str],
                  out: str, cfg_dict: dict) -> dict:
    """Encode the objects `uids` and write the shard `out` (atomically); returns counts. One task."""
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
