import collections

import pytest

from render.shards import parse_shards, select, shard_of
from render.sources import ObjectRef


def test_parse_shards():
    assert parse_shards("all", 4) == [0, 1, 2, 3]
    assert parse_shards("0-3,7", 8) == [0, 1, 2, 3, 7]
    assert parse_shards(" 5 , 1-2,2 ", 8) == [1, 2, 5]


@pytest.mark.parametrize("spec,n", [("8", 8), ("3-1", 8), ("a-b", 8), ("-1", 8), ("0", 0), ("1,,2", 4)])
def test_bad_shard_specs(spec, n):
    with pytest.raises(ValueError, match="shards"):
        parse_shards(spec, n)


def test_sharding_is_deterministic_balanced_and_disjoint():
    uids = [f"obj{i:05d}" for i in range(4000)]
    counts = collections.Counter(shard_of(u, 8) for u in uids)
    assert set(counts) == set(range(8)) and min(counts.values()) > 400
    assert [shard_of(u, 8) for u in uids] == [shard_of(u, 8) for u in uids]
    refs = [ObjectRef(u, u, u, "folder") for u in uids]
    parts = [select(refs, [s], 8, None) for s in range(8)]
    assert sum(len(p) for p in parts) == 4000
    assert len({r.uid for p in parts for r, _ in p}) == 4000
    # shard membership does not depend on which other objects are in the list
    assert {r.uid for r, _ in select(refs[:100], [3], 8, None)} <= {r.uid for r, _ in parts[3]}
    assert len(select(refs, [0, 1], 8, 10)) == 10
