"""Training benchmark: is the data loader fast enough, and what does multi-view attention cost? Prints JSON.

    python bench/train.py                           # loader at sd21 sizes + tiny step, on this machine
    python bench/train.py --data outputs/demo/render --sd21-attention   # + the tiny step on real renders,
                                                    #   and sd21's UNet (fp32, CPU) with and without it

loader: micro-batches of the sd21 preset's shape (24 objects of 4 views, 4x32x32 latents, 1024-d CLIP
embeddings) read from float16 shards as `prepare` writes them (random numbers, --objects objects), through
the training DataLoader with 0, 1, 2 workers: objects/s, against the objects/s one H100 trains stage 1 at
(the newest bench/results/gpu-*.json): `ratio_to_h100_step` is the margin (goal >= 5).
attention: seconds per training step with multi-view attention and with per-view attention (the same
UNet, every view attending only to itself), and the overhead in percent (goal <= 10).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402,F401  (before torch: see common/__init__.py)
import torch  # noqa: E402

from dataset.prepared import PreparedIndex, write_shard  # noqa: E402
from model.prepare import prepare  # noqa: E402
from dataset.samples import MultiViewDataset, SampleConfig  # noqa: E402
from model.mvmodel import ModelConfig, MultiViewModel  # noqa: E402
from model.train import Batches, TrainConfig  # noqa: E402
from model.unet import UNetConfig  # noqa: E402
from render.cameras import NUM_VIEWS  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def synthetic_index(root: Path, objects: int, shard_size: int = 256, latent=(4, 32, 32), clip_dim: int = 1024) -> PreparedIndex:
    """Shards in prepare's format holding random latents and embeddings and plausible cameras."""
    rng = np.random.default_rng(0)
    (root / "shards").mkdir(parents=True)
    entries = {}
    for first in range(0, objects, shard_size):
        records = {}
        for k in range(first, min(objects, first + shard_size)):
            angles = np.stack([rng.uniform(0, 360, 2 * NUM_VIEWS), rng.uniform(-10, 40, 2 * NUM_VIEWS),
                               np.full(2 * NUM_VIEWS, 1.5)], 1)
            records[f"obj-{k:07d}"] = ("synthetic", torch.randn(NUM_VIEWS, clip_dim), torch.randn(2 * NUM_VIEWS, *latent),
                                       torch.from_numpy(angles), [])
        name = f"shard-{first:07d}.safetensors"
        write_shard(root / "shards" / name, records, {}, torch.float16)
        entries.update({uid: name for uid in records})
    return PreparedIndex(root, entries, {})


def loader_throughput(objects: int, micro_batches: int) -> dict:
    cfg = TrainConfig.sd21(1)
    out = {"objects_per_micro_batch": cfg.batch_size, "shard_objects": objects, "dtype": "float16", "workers": {}}
    with tempfile.TemporaryDirectory() as d:
        index = synthetic_index(Path(d), objects)
        ds = MultiViewDataset(index.objects(), cfg=SampleConfig(image_size=256))
        for workers in (0, 1, 2):
            it = iter(Batches(ds, cfg, 0, 1).loader(0, micro_batches + 1, workers))
            next(it)                                            # worker start-up is paid once per run
            t = time.perf_counter()
            n = sum(len(next(it)["uid"]) for _ in range(micro_batches))
            out["workers"][workers] = {"objects_per_second": round(n / (time.perf_counter() - t), 1)}
    gpu = sorted(p for p in RESULTS.glob("gpu-*.json") if "before" not in p.name)
    if gpu:
        step = json.loads(gpu[-1].read_text())["training"]["stage1"]
        need = step["objects_per_micro_batch"] / step["seconds_per_micro_batch"]
        out["h100_stage1_objects_per_second"] = round(need, 1)
        out["h100_source"] = gpu[-1].name
        # Results measured before the prepare step encoded every view with the VAE inside the step: a step on
        # prepared latents is faster, so the ratios below are then upper bounds.
        out["h100_step_included_vae_encode"] = step.get("vae_in_step", True)
        for row in out["workers"].values():
            row["ratio_to_h100_step"] = round(row["objects_per_second"] / need, 1)
    return out


def step_time(model_cfg: ModelConfig, batch: dict, steps: int) -> float:
    torch.manual_seed(0)
    model = MultiViewModel(model_cfg)
    opt = torch.optim.AdamW(model.unet.parameters(), lr=1e-5)
    model(batch, 1, torch.Generator().manual_seed(0)).backward()   # warm-up
    opt.zero_grad()
    t = time.perf_counter()
    for m in range(steps):
        model(batch, 1, torch.Generator().manual_seed(m)).backward()
        opt.step()
        opt.zero_grad()
    return (time.perf_counter() - t) / steps


def attention_overhead(model_cfg: ModelConfig, batch: dict, steps: int) -> dict:
    row = {}
    for multiview in (True, False):
        cfg = dataclasses.replace(model_cfg, unet=dataclasses.replace(model_cfg.unet, multiview_attention=multiview))
        row["multiview_s" if multiview else "per_view_s"] = round(step_time(cfg, batch, steps), 4)
    row["overhead_percent"] = round(100 * (row["multiview_s"] / row["per_view_s"] - 1), 1)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="a render output: the tiny step on its prepared objects (else random)")
    p.add_argument("--objects", type=int, default=512, help="objects in the synthetic sd21-size shards")
    p.add_argument("--micro-batches", type=int, default=20)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sd21-attention", action="store_true", help="also sd21's UNet, fp32 on this CPU (minutes)")
    args = p.parse_args()
    report = {"device": "cpu", "threads": torch.get_num_threads(), "loader": loader_throughput(args.objects, args.micro_batches)}
    tiny = TrainConfig.tiny(1)
    if args.data:
        ds = MultiViewDataset(prepare(tiny.model, args.data, tiny.prepare, progress=False).objects(), cfg=tiny.data)
        batches = Batches(ds, tiny, 0, 1)
        batch = next(b for b in map(batches.get, range(100)) if b["branch"] == "multi")    # 4 views attend jointly
    else:
        batch = {"target": torch.randn(tiny.batch_size, 4, 3, 32, 32), "encoded": True, "seed": list(range(tiny.batch_size)),
                 "target_cameras": torch.eye(4).expand(tiny.batch_size, 4, 4, 4).clone(),
                 "clip_embedding": torch.randn(tiny.batch_size, 64)}
    report["attention_tiny"] = {"objects": tiny.batch_size, "views": batch["target"].shape[1],
                                **attention_overhead(tiny.model, batch, args.steps)}
    if args.sd21_attention:
        sd21 = dataclasses.replace(ModelConfig.sd21(), allow_random_weights=True, unet=UNetConfig.sd21())
        big = {"target": torch.randn(1, 4, 4, 32, 32), "encoded": True, "seed": [0],
               "target_cameras": torch.eye(4).expand(1, 4, 4, 4).clone(), "clip_embedding": torch.randn(1, 1024)}
        report["attention_sd21_fp32_cpu"] = {"objects": 1, "views": 4, "gradient_checkpointing": True,
                                            **attention_overhead(sd21, big, 2)}
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
