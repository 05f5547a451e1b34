"""The web app's output folder over time (pipelines/app.py: evict) and its checkpoint policy, without a server."""
import fcntl
import os

from pipelines.app import accepts_any_checkpoint, evict


def make_result(out, stem, key, age, complete=True):
    run = out / f"{stem}-{key}{'' if complete else '.partial'}"
    run.mkdir(parents=True)
    if complete:
        (run / "export.json").write_text("{}")
    (out / f"{stem}-{key}.lock").touch()
    for folder, name in (("inputs", f"{stem}.png"), ("previews", f"{stem}-cfg.png"), ("logs", f"{stem}.log")):
        (out / folder).mkdir(exist_ok=True)
        (out / folder / name).touch()
    for path in (run, out / "inputs" / f"{stem}.png", out / "previews" / f"{stem}-cfg.png", out / "logs" / f"{stem}.log"):
        os.utime(path, (1_000_000 + age, 1_000_000 + age))
    return run


def test_eviction_keeps_the_newest_results_and_never_one_being_made(tmp_path):
    old = make_result(tmp_path, "aaaa", "k1", age=1)
    busy = make_result(tmp_path, "bbbb", "k2", age=2, complete=False)       # a generate.py holds its lock
    abandoned = make_result(tmp_path, "cccc", "k3", age=3, complete=False)  # nobody's: a disconnected run
    newer = make_result(tmp_path, "dddd", "k4", age=4)
    newest = make_result(tmp_path, "eeee", "k5", age=5)
    (tmp_path / "cache" / "clip").mkdir(parents=True)
    for i in range(4):
        (tmp_path / "cache" / "clip" / f"{i}.safetensors").touch()
        os.utime(tmp_path / "cache" / "clip" / f"{i}.safetensors", (i, i))
    with open(tmp_path / "bbbb-k2.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        gone = evict(tmp_path, keep=2)
    assert sorted(gone) == sorted(["aaaa-k1", "cccc-k3.partial", "inputs/aaaa.png", "inputs/cccc.png",
                                   "previews/aaaa-cfg.png", "previews/cccc-cfg.png", "logs/aaaa.log", "logs/cccc.log",
                                   "cache/clip/0.safetensors", "cache/clip/1.safetensors"])
    assert busy.is_dir() and newer.is_dir() and newest.is_dir() and not old.exists() and not abandoned.exists()
    assert (tmp_path / "inputs" / "bbbb.png").exists()                      # the busy run's input stays
    assert not (tmp_path / "aaaa-k1.lock").exists() and (tmp_path / "bbbb-k2.lock").exists()
    assert evict(tmp_path, keep=3) == []                                    # busy no longer, but among the 3 newest


def test_a_server_on_the_network_accepts_only_the_offered_checkpoints_by_default():
    assert accepts_any_checkpoint("127.0.0.1", None) and accepts_any_checkpoint("localhost", None)
    assert not accepts_any_checkpoint("0.0.0.0", None) and not accepts_any_checkpoint("10.1.2.3", None)
    assert accepts_any_checkpoint("0.0.0.0", "any") and not accepts_any_checkpoint("127.0.0.1", "offered")
