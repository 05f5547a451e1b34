"""Training benchmark (tiny configuration, CPU): prints JSON.

    python bench/train.py --data outputs/demo/render      # any render output at >= 32 px

Step time and peak RSS with and without multi-view attention, and data-loader samples/s against
training steps/s (is the loader the bottleneck?).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.samples import MultiViewDataset  # noqa: E402
from dataset.views import scan  # noqa: E402
from model.mvmodel import MultiViewModel  # noqa: E402
from model.train import Batches, TrainConfig, prepare_embeddings  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    report = {"device": "cpu", "threads": torch.get_num_threads()}
    for multiview in (True, False):
        cfg = TrainConfig.tiny(1)
        cfg.model.unet.multiview_attention = multiview
        objs, _ = scan(args.data)
        ds = MultiViewDataset(objs, prepare_embeddings(cfg, args.data, objs), cfg.data)
        batches = Batches(ds, cfg, 0, 1)
        t = time.perf_counter()
        data = [batches.get(m) for m in range(args.steps)]
        load_s = time.perf_counter() - t
        samples = sum(b["target"].shape[0] for b in data)
        torch.manual_seed(0)
        model = MultiViewModel(cfg.model)
        opt = torch.optim.AdamW(model.unet.parameters(), lr=cfg.lr)
        model(data[0], 1, torch.Generator().manual_seed(0)).backward()  # warm-up
        opt.zero_grad()
        t = time.perf_counter()
        for m, batch in enumerate(data):
            model(batch, 1, torch.Generator().manual_seed(m)).backward()
            opt.step()
            opt.zero_grad()
        step_s = (time.perf_counter() - t) / args.steps
        report["multiview" if multiview else "per_view"] = {
            "seconds_per_step": step_s, "steps_per_second": 1 / step_s, "batch_objects": cfg.batch_size,
            "loader_samples_per_second": samples / load_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
