"""Shards: which objects a machine renders, deterministic across machines and list orders.

    chosen = select(refs, parse_shards("0-3,7", 8), num_shards=8, limit=None)   # [(ref, shard)]
"""
from __future__ import annotations

import hashlib

from render.sources import ObjectRef


def shard_of(uid: str, num_shards: int) -> int:
    """Deterministic shard of an object: independent of list order, machine and Python's hash seed."""
    return int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "little") % num_shards


def parse_shards(spec: str, num_shards: int) -> list[int]:
    """'all' or a list like '0-3,7' -> sorted shard indices, each checked against num_shards."""
    if num_shards < 1:
        raise ValueError(f"--num-shards {num_shards}: expected at least 1")
    if spec.strip() == "all":
        return list(range(num_shards))
    shards: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            lo_i, hi_i = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ValueError(f"--shards {spec!r}: {part!r} is not a number or a range like 0-3") from None
        if lo_i > hi_i or lo_i < 0 or hi_i >= num_shards:
            raise ValueError(f"--shards {spec!r}: {part!r} is outside 0..{num_shards - 1} (--num-shards {num_shards})")
        shards.update(range(lo_i, hi_i + 1))
    return sorted(shards)


def select(refs: list[ObjectRef], shards: list[int], num_shards: int, limit: int | None) -> list[tuple[ObjectRef, int]]:
    wanted = set(shards)
    chosen = [(r, shard_of(r.uid, num_shards)) for r in refs]
    chosen = [(r, s) for r, s in chosen if s in wanted]
    return chosen[:limit] if limit is not None else chosen
