"""The output folder of a generate/reconstruct run: .partial until complete, one process at a time."""
import fcntl
import json
import logging
import threading

import pytest

from optimize3d.export import ExportConfig, export_key
from optimize3d.rundir import LOCK_SUFFIX, run_directory


def test_a_second_run_of_the_same_result_waits_then_finds_it_made(tmp_path):
    final, cfg, log = tmp_path / "photo-abc", ExportConfig(), logging.getLogger("test")
    inside, release, seen = threading.Event(), threading.Event(), {}

    def first():
        with run_directory(final, cfg, log, "generate.log") as work:
            seen["first"] = work
            inside.set()
            release.wait()
            (work / "export.json").write_text(json.dumps({"export_key": export_key(cfg)}))

    def second():
        with run_directory(final, cfg, log, "generate.log") as work:
            seen["second"] = work
    a = threading.Thread(target=first)
    a.start()
    inside.wait()
    assert seen["first"] == final.with_name("photo-abc.partial")
    with open(final.with_name(final.name + LOCK_SUFFIX), "a") as lock, pytest.raises(BlockingIOError):
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)          # held for the whole block
    b = threading.Thread(target=second)
    b.start()
    release.set()
    a.join()
    b.join()
    assert seen["second"] is None                                  # cached: it waited, it did not start a second run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo-abc", "photo-abc.lock"]


def test_a_run_that_fails_keeps_its_partial_folder_and_frees_the_lock(tmp_path):
    final, cfg, log = tmp_path / "photo-abc", ExportConfig(), logging.getLogger("test")
    with pytest.raises(RuntimeError):
        with run_directory(final, cfg, log, "generate.log") as work:
            (work / "nerf").mkdir()
            raise RuntimeError("killed")
    assert (tmp_path / "photo-abc.partial" / "nerf").is_dir() and not final.exists()
    with run_directory(final, cfg, log, "generate.log") as work:        # resumed, the lock free again
        assert (work / "nerf").is_dir()
    assert final.is_dir() and not (tmp_path / "photo-abc.partial").exists()
