import collections

import pytest

from render.quality import render_statistics
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


def test_plan_reads_meta_json_only_for_folders_the_manifest_does_not_vouch_for(tmp_path, monkeypatch):
    """Start-up work grows linearly: one listing of objects/ and one read of the manifest. Of three
    objects, `done` (folder + ok line) is skipped without a read, `recovered` (a folder whose run was
    killed before its line) is read once and gets its line, `absent` and `stale` (other settings) render."""
    import json
    from render.output import RenderRoot
    from render.scheduler import plan
    from render.layout import object_dir
    root = RenderRoot(tmp_path)
    for uid, key in (("done", "k1"), ("recovered", "k1"), ("stale", "k0")):
        object_dir(root.path, uid).mkdir(parents=True)
        (object_dir(root.path, uid) / "meta.json").write_text(json.dumps({"settings_key": key, "sha256": "x"}))
    root.record({"uid": "done", "status": "ok", "settings_key": "k1"})
    root.record({"uid": "stale", "status": "ok", "settings_key": "k0"})
    reads = []
    original = RenderRoot.is_complete
    monkeypatch.setattr(RenderRoot, "is_complete", lambda self, uid, key: reads.append(uid) or original(self, uid, key))
    refs = [(ObjectRef(u, u, u, "folder"), 0) for u in ("absent", "done", "recovered", "stale")]
    todo, skipped = plan(root, refs, "k1")
    assert [r.uid for r, _ in todo] == ["absent", "stale"] and skipped == 2
    assert reads == ["recovered", "stale"]
    assert root.latest()["recovered"]["recovered"] is True and root.latest()["recovered"]["status"] == "ok"
    reads.clear()
    assert plan(root, refs, "k1")[1] == 2 and reads == ["stale"]          # now vouched for by its line


def test_objects_are_nested_in_256_buckets_and_older_flat_roots_still_read(tmp_path):
    import json
    from render.layout import bucket, object_dir, object_dirs
    uids = [f"{i:032x}" for i in range(2000)]
    assert len({bucket(u) for u in uids}) == 256 and bucket(uids[0]) == bucket(uids[0])
    new = object_dir(tmp_path, "abc")
    assert new == tmp_path / "objects" / bucket("abc") / "abc"
    new.mkdir(parents=True)
    (new / "meta.json").write_text("{}")
    (tmp_path / "objects" / "old").mkdir()                          # the layout before the buckets
    (tmp_path / "objects" / "old" / "meta.json").write_text(json.dumps({}))
    (tmp_path / "objects" / bucket("abc") / ".tmp-xyz").mkdir()     # work in progress: not an object
    assert object_dirs(tmp_path) == {"abc": new, "old": tmp_path / "objects" / "old"}
    assert object_dir(tmp_path, "old") == tmp_path / "objects" / "old"
    nested_old = tmp_path / "objects" / bucket("old") / "old"       # re-rendered since: the nested one wins
    nested_old.mkdir(parents=True)
    assert object_dir(tmp_path, "old") == nested_old and object_dirs(tmp_path)["old"] == nested_old


def test_render_statistics_count_status_reasons_flags_and_rank_suspects():
    q = lambda lum, flags: {"mean_luminance": lum, "colour_spread": 0.1, "nearly_empty_fraction": 0.0,  # noqa: E731
                            "magenta_fraction": 0.0, "flags": flags}
    latest = {"a": {"status": "ok", "quality": q(0.5, [])},
              "b": {"status": "ok", "quality": q(0.02, ["dark"])},
              "c": {"status": "ok", "quality": q(0.01, ["dark", "unlit_black"])},
              "d": {"status": "ok", "quality": q(0.001, ["dark"])},
              "e": {"status": "ok"},                                    # rendered before quality figures existed
              "f": {"status": "failed", "reason": "timeout", "error": "no result after 900 s"},
              "g": {"status": "failed", "reason": "timeout", "error": "later"}}
    stats = render_statistics(latest, suspects_shown=2)
    assert stats["status"] == {"ok": 5, "failed": 2} and stats["failures"] == {"timeout": 2}
    assert stats["failure_examples"] == {"timeout": {"uid": "f", "error": "no result after 900 s"}}
    assert stats["flags"] == {"dark": 3, "unlit_black": 1} and stats["without_quality_figures"] == 1
    assert stats["flagged"] == 3 and [s["uid"] for s in stats["suspects"]] == ["c", "d"]   # most flags, then darkest
    assert stats["figures"]["mean_luminance"]["min"] == 0.001 and stats["figures"]["mean_luminance"]["max"] == 0.5


PARENT = """
import os, subprocess, sys, time
r, w = os.pipe()
child = subprocess.Popen([sys.executable, "-m", "render.worker", str(w), str(os.getpid())], pass_fds=(w,),
                         stdin=int(sys.argv[1]), start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_blender_worker_dies_with_its_supervisor_and_refuses_an_orphaned_start():
    """The worker sets its own death signal (no preexec_fn in the multi-threaded supervisor): SIGKILL of the
    process that started it kills it too; started with a parent pid that is not its parent (the supervisor
    died before the worker ran), it exits at once, before reading a job."""
    import os
    import signal
    import subprocess
    import sys
    import psutil
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    jobs_r, jobs_w = os.pipe()         # the worker's stdin, held open here: it cannot end by reading EOF
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(jobs_r)], stdout=subprocess.PIPE, cwd=root, text=True,
                              pass_fds=(jobs_r,))
    os.close(jobs_r)
    worker = psutil.Process(int(parent.stdout.readline()))
    assert worker.is_running() and worker.ppid() == parent.pid
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    gone, alive = psutil.wait_procs([worker], timeout=60)
    os.close(jobs_w)
    assert not alive, "the worker outlived its supervisor"
    r, w = os.pipe()
    orphan = subprocess.run([sys.executable, "-m", "render.worker", str(w), str(os.getpid() + 10**6)], pass_fds=(w,),
                            cwd=root, stdin=subprocess.DEVNULL, timeout=60)
    os.close(r), os.close(w)
    assert orphan.returncode == 1
