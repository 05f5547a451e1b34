"""dataset/: reading rendered objects, the two training branches, the prepared shards."""
import collections
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.samples import BranchBatchSampler, MultiViewDataset, SampleConfig, collate
from dataset.views import BrokenObject, RenderedObject, scan, split_of
from render.layout import object_dir, object_dirs
from model.encoder import EncoderConfig, ImageEncoder


@pytest.fixture
def render_copy(rendered_demo, tmp_path):
    shutil.copytree(rendered_demo / "objects", tmp_path / "objects")
    return tmp_path


def test_open_and_composite_on_white(rendered_demo):
    objs, broken = scan(rendered_demo)
    assert len(objs) == 4 and broken == {}
    obj = objs[0]
    img = obj.image("fixed", 0)
    alpha = np.asarray(Image.open(obj.png("fixed", 0)))[..., 3]
    assert img.shape == (3, 32, 32) and img.min() >= -1 and img.max() <= 1
    assert torch.all(img[:, torch.from_numpy(alpha == 0)] == 1.0)      # white background
    assert img[:, torch.from_numpy(alpha == 255)].mean() < 0.9           # the object is not white
    assert obj.image("fixed", 0, size=16).shape == (3, 16, 16)


@pytest.mark.parametrize("damage,reason", [
    (lambda d: (d / "fixed" / "007.png").unlink(), "missing view fixed/007.png"),
    (lambda d: (d / "random" / "003.png").write_bytes(b"\x89PNG garbage"), "unreadable view random/003.png"),
    (lambda d: Image.new("RGBA", (20, 20)).save(d / "random" / "001.png"), "random/001.png is (20, 20)"),
    (lambda d: (d / "cameras.json").write_text("{"), "cameras.json unreadable"),
])
def test_broken_objects_are_reported_by_uid_and_left_out(render_copy, damage, reason):
    victim = sorted(object_dirs(render_copy).values())[1]
    damage(victim)
    objs, broken = scan(render_copy)
    assert victim.name not in [o.uid for o in objs] and len(objs) == 3
    assert reason in broken[victim.name] and broken[victim.name].startswith(victim.name)
    with pytest.raises(BrokenObject, match=victim.name):
        RenderedObject.open(victim)


def test_split_is_deterministic_by_uid():
    uids = [f"u{i}" for i in range(4000)]
    val = [u for u in uids if split_of(u, 5.0) == "val"]
    assert 120 < len(val) < 280 and val == [u for u in uids if split_of(u, 5.0) == "val"]


def test_branches_and_relative_cameras(rendered_demo):
    objs, _ = scan(rendered_demo)
    ds = MultiViewDataset(objs, None, SampleConfig(image_size=32))
    single = ds[(0, "single", 1)]
    assert single["target"].shape == (1, 3, 32, 32) and single["target_views"][0][0] == "random"
    assert single["target_views"][0][1] != single["reference_view"]
    multi = ds[(0, "multi", 2)]
    assert multi["target"].shape == (4, 3, 32, 32) and {s for s, _ in multi["target_views"]} == {"fixed"}
    ref_az, _ = objs[0].angles("random", multi["reference_view"])
    pos = multi["target_cameras"][:, :3, 3].numpy()
    az = np.degrees(np.arctan2(pos[:, 1], pos[:, 0])) % 360
    expected = [(objs[0].angles("fixed", i)[0] - ref_az) % 360 for _, i in multi["target_views"]]
    np.testing.assert_allclose(az, expected, atol=1e-4)
    assert np.allclose(np.diff(np.sort(az)), 90, atol=1e-4)
    el = np.degrees(np.arcsin(pos[:, 2] / np.linalg.norm(pos, axis=1)))
    np.testing.assert_allclose(el, 30, atol=1e-4)
    ref_pos = multi["reference_camera"][:3, 3].numpy()
    np.testing.assert_allclose(ref_pos / np.linalg.norm(ref_pos), [1, 0, 0], atol=1e-6)   # el = az = 0
    torch.testing.assert_close(multi["reference"], objs[0].image("random", multi["reference_view"]))
    assert ds[(0, "multi", 2)]["target_views"] == multi["target_views"]   # fixed by the seed


def test_batches_hold_one_branch_and_30_percent_are_single():
    sampler = BranchBatchSampler(1000, 4, seed=3)
    branches = collections.Counter()
    for epoch in range(8):
        sampler.set_epoch(epoch)
        for batch in sampler:
            assert len({b for _, b, _ in batch}) == 1 and len(batch) == 4
            branches[batch[0][1]] += 1
    assert abs(branches["single"] / sum(branches.values()) - 0.3) < 0.05
    a = list(BranchBatchSampler(100, 4, seed=1, rank=0, world_size=2))
    b = list(BranchBatchSampler(100, 4, seed=1, rank=1, world_size=2))
    assert [x[0][1] for x in a] == [x[0][1] for x in b]                  # ranks agree on the branch
    assert not {i for batch in a for i, _, _ in batch} & {i for batch in b for i, _, _ in batch}
    assert list(BranchBatchSampler(100, 4, seed=1)) == list(BranchBatchSampler(100, 4, seed=1))
    # Each rank's k-th object draws its own views (its own seed), and 2 ranks x batch 4 draw exactly the
    # samples of 1 rank x batch 8: the same objects, branches and seeds, rank 0's half first.
    assert all(sa != sb for x, y in zip(a, b) for (_, _, sa), (_, _, sb) in zip(x, y))
    whole = list(BranchBatchSampler(100, 8, seed=1))
    assert whole == [x + y for x, y in zip(a, b)]


def prepare_tiny(root, **kw):
    from dataset.prepared import PrepareConfig
    from model.prepare import prepare
    from model.mvmodel import ModelConfig
    return prepare(ModelConfig.tiny(), root, PrepareConfig(**{"shard_size": 2, **kw}), progress=False)


def test_prepare_encodes_once_then_only_new_and_rerendered_objects(render_copy, monkeypatch):
    """The prepared shards hold exactly what training would compute from the renders; a second prepare
    does nothing; data prepared by code of another schema version is not reused; two new objects are the
    only ones a third prepare encodes; a re-rendered object (its cameras.json and meta.json written anew)
    is encoded again; a broken one is recorded, not retried."""
    import os
    from dataset.prepared import ALL_VIEWS
    objs, _ = scan(render_copy)
    first = prepare_tiny(render_copy)
    assert first.stats == {"objects": 4, "broken": 0, "encoded": 4, "shards_written": 2}
    enc = ImageEncoder(EncoderConfig.tiny())
    for obj, prep in zip(objs, first.objects()):
        assert prep.uid == obj.uid
        torch.testing.assert_close(prep.clip(), enc.encode([obj.rgba("random", i) for i in range(16)]), rtol=0, atol=0)
        views = [("fixed", 3), ("random", 9)]
        torch.testing.assert_close(prep.latents(views), torch.stack([obj.image(s, i, 32) for s, i in views]), rtol=0, atol=0)
        assert prep.angles()[ALL_VIEWS.index(("fixed", 3))].tolist() == [*obj.angles("fixed", 3),
                                                                           obj.cameras["fixed"][3]["distance"]]
    shards = sorted(first.root.glob("shards/*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    assert prepare_tiny(render_copy).stats["encoded"] == 0                      # second run: nothing to do
    assert [p.stat().st_mtime_ns for p in sorted(first.root.glob("shards/*.safetensors"))] == stamps
    with monkeypatch.context() as m:                                             # code that stores other numbers
        m.setattr("model.prepare.SCHEMA_VERSION", 99)
        newer = prepare_tiny(render_copy)
        assert newer.stats["encoded"] == 4 and newer.root != first.root
        assert (newer.root / "identity.txt").read_text().startswith("schema=99|")

    for new, source in (("zz-new-a", objs[0]), ("zz-new-b", objs[1])):
        shutil.copytree(source.path, object_dir(render_copy, new))
    third = prepare_tiny(render_copy)
    assert third.stats == {"objects": 6, "broken": 0, "encoded": 2, "shards_written": 1}
    new_shards = sorted(set(third.root.glob("shards/*.safetensors")) - set(shards))
    assert [third.entries[u] for u in ("zz-new-a", "zz-new-b")] == [new_shards[0].name] * 2

    meta = objs[2].path / "meta.json"
    meta.write_text(meta.read_text() + " ")
    os.utime(meta, ns=(meta.stat().st_atime_ns, meta.stat().st_mtime_ns + 10**9))
    assert prepare_tiny(render_copy).stats["encoded"] == 1                       # the re-rendered object only

    broken = object_dir(render_copy, "zz-broken")
    shutil.copytree(objs[3].path, broken)
    (broken / "fixed" / "007.png").unlink()
    fourth = prepare_tiny(render_copy)
    assert fourth.stats["broken"] == 1 and "missing view fixed/007.png" in fourth.broken["zz-broken"]
    assert "zz-broken" not in {o.uid for o in fourth.objects()}
    again = prepare_tiny(render_copy)
    assert again.stats["encoded"] == 0, (again.stats, fourth.broken, again.broken)                       # recorded, not retried
    # Quality flags travel from meta.json into the index; the exclusion rule is applied when reading it.
    import json
    meta = json.loads((objs[0].path / "meta.json").read_text())
    (objs[0].path / "meta.json").write_text(json.dumps({**meta, "quality": {"flags": ["dark", "unlit"]}}))
    fifth = prepare_tiny(render_copy)
    assert fifth.stats["encoded"] == 1 and fifth.flags == {objs[0].uid: ["dark", "unlit"]}
    assert objs[0].uid not in {o.uid for o in fifth.objects(exclude=SampleConfig().exclude_flags)}
    assert objs[0].uid in {o.uid for o in fifth.objects(exclude=["magenta"])}
    ds = MultiViewDataset(fourth.objects("train", 0.0), cfg=SampleConfig(image_size=32))
    batch = collate([ds[k] for k in next(iter(BranchBatchSampler(len(ds), 2, seed=0)))])
    assert batch["encoded"] and batch["clip_embedding"].shape == (2, 64)


def test_prepare_as_ray_tasks_writes_what_one_process_writes(ray_local, render_copy, tmp_path):
    from safetensors.torch import load_file
    shutil.copytree(render_copy / "objects", tmp_path / "other" / "objects")
    here = prepare_tiny(render_copy)
    from dataset.prepared import PrepareConfig
    from model.prepare import prepare
    from model.mvmodel import ModelConfig
    there = prepare(ModelConfig.tiny(), tmp_path / "other", PrepareConfig(shard_size=2), num_workers=2, progress=False)
    assert there.stats == here.stats and there.entries == here.entries           # the same shards, by name
    for name in set(here.entries.values()):
        a, b = load_file(str(here.root / "shards" / name)), load_file(str(there.root / "shards" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
