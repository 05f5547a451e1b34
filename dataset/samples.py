"""Training samples: 30% single-view branch, 70% multi-view branch.

    ds = MultiViewDataset(index.objects("train"), cfg=SampleConfig(image_size=32))   # prepared (dataset/prepared.py)
    loader = DataLoader(ds, batch_sampler=BranchBatchSampler(len(ds), batch_size=4, seed=0))

single: reference and target are two different random-set views (V = 1).
multi:  reference is a random-set view; targets are 4 fixed-set views 90 deg apart from a random
        start azimuth (V = 4).
Target cameras are relative to the reference's azimuth (elevation kept); the reference camera is
el = az = 0. Cameras are camera-to-world 4x4 in Blender/OpenGL convention (what MVDream embeds).
Every draw is fixed by (seed, epoch, batch, position), so a resumed run sees the same samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from dataset.prepared import ALL_VIEWS, PreparedObject
from render.cameras import NUM_VIEWS, c2w_blender


@dataclass
class SampleConfig:
    image_size: int = 256
    """Pixels of reference and targets (resized from the renders if they differ)."""
    single_view_probability: float = 0.3
    multi_views: int = 4
    exclude_flags: list[str] = field(default_factory=lambda: ["nearly_empty", "dark", "magenta"])
    """Objects whose render carries any of these quality flags (meta.json "quality", render/quality.py) are
    left out of training: a speck in most views, renders black, mostly missing-texture pink. Also:
    missing_textures, unlit, unlit_black (an unlit material whose colour is only in emissiveFactor)."""


class MultiViewDataset(Dataset):
    """Samples of rendered objects (dataset.views.RenderedObject: images from the PNGs, embeddings from
    `embeddings.get(uid)`) or of prepared ones (dataset.prepared.PreparedObject: latents and embeddings from
    the shards; the sample's "encoded" is then True)."""

    def __init__(self, objects: list, embeddings=None, cfg: SampleConfig = None):
        if not objects:
            raise ValueError("no rendered objects to train on")
        self.objects, self.embeddings, self.cfg = objects, embeddings, cfg or SampleConfig()

    def __len__(self) -> int:
        return len(self.objects)

    def __getitem__(self, key: tuple[int, str, int]) -> dict:
        index, branch, seed = key
        obj = self.objects[index]
        rng = np.random.default_rng(seed)
        ref = int(rng.integers(NUM_VIEWS))
        if branch == "single":
            other = int(rng.integers(NUM_VIEWS - 1))
            targets = [("random", other + (other >= ref))]
        elif branch == "multi":
            step = NUM_VIEWS // self.cfg.multi_views
            start = int(rng.integers(NUM_VIEWS))
            targets = [("fixed", (start + k * step) % NUM_VIEWS) for k in range(self.cfg.multi_views)]
        else:
            raise ValueError(f"branch {branch!r}: expected single or multi")
        prepared = isinstance(obj, PreparedObject)
        if prepared:
            table = obj.angles().tolist()
            angle = lambda s, i: table[ALL_VIEWS.index((s, i))]  # noqa: E731  (azimuth, elevation, distance)
            views = obj.latents(targets + [("random", ref)])
            target, reference, clip = views[:-1], views[-1], obj.clip(ref)
        else:
            angle = lambda s, i: (*obj.angles(s, i), obj.cameras[s][i]["distance"])  # noqa: E731
            size = self.cfg.image_size
            target = torch.stack([obj.image(s, i, size) for s, i in targets])
            reference = obj.image("random", ref, size)
            clip = self.embeddings.get(obj.uid)[ref] if self.embeddings is not None else None
        ref_az, _, distance = angle("random", ref)
        cams = [c2w_blender((angle(s, i)[0] - ref_az) % 360.0, angle(s, i)[1], distance) for s, i in targets]
        sample = {
            "uid": obj.uid,
            "branch": branch,
            "seed": seed,
            "encoded": prepared,
            "reference_view": ref,
            "target_views": targets,
            "target": target,
            "target_cameras": torch.tensor(np.stack(cams), dtype=torch.float32),
            "reference": reference,
            "reference_camera": torch.tensor(c2w_blender(0.0, 0.0, distance), dtype=torch.float32),
        }
        if clip is not None:
            sample["clip_embedding"] = clip
        return sample


class BranchBatchSampler(Sampler):
    """Batches of one branch each (V differs between branches), drawn with p(single) = 0.3."""

    def __init__(self, num_objects: int, batch_size: int, single_view_probability: float = 0.3, seed: int = 0,
                 epoch: int = 0, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.p = num_objects, batch_size, single_view_probability
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, self.n // (self.batch_size * self.world_size))

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n)
        for b in range(len(self)):
            branch = "single" if rng.random() < self.p else "multi"
            start = (b * self.world_size + self.rank) * self.batch_size
            idx = [int(order[(start + k) % self.n]) for k in range(self.batch_size)]
            base = int(rng.integers(2**62))
            # Seeds by position in the global batch: each rank's k-th object draws its own views, and
            # N ranks x batch b draw exactly what 1 rank x batch N*b draws.
            yield [(i, branch, base + self.rank * self.batch_size + k) for k, i in enumerate(idx)]


def collate(samples: list[dict]) -> dict:
    out = {"uid": [s["uid"] for s in samples], "branch": samples[0]["branch"], "seed": [s["seed"] for s in samples],
           "encoded": samples[0]["encoded"]}
    for key in ("target", "target_cameras", "reference", "reference_camera", "clip_embedding"):
        if key in samples[0]:
            out[key] = torch.stack([s[key] for s in samples])
    return out
