"""Fine-tuning on a Ray cluster of two nodes (both on this machine, 127.0.0.1): a run whose workers may land
on either node refuses node-local storage in one line, before it writes anything; --shared-storage (the
user's word that the paths are shared) lets it run (here the prepare step, as Ray tasks on the cluster)."""
import json
import shutil
import subprocess
import sys

from common.ray_local import filesystem_type, is_shared_filesystem
from tests.conftest import ROOT


def test_filesystem_types():
    assert not is_shared_filesystem(filesystem_type(ROOT))         # this machine's own disk
    assert all(is_shared_filesystem(k) for k in ("nfs4", "lustre", "fuse.juicefs", "fuse.gcsfuse", "cephfs"))
    assert not any(is_shared_filesystem(k) for k in ("ext4", "xfs", "tmpfs", "overlay", "btrfs"))


def test_two_nodes_refuse_local_storage_then_prepare_with_shared_storage(rendered_demo, tmp_path):
    data = tmp_path / "renders"
    shutil.copytree(rendered_demo / "objects", data / "objects")
    finetune = [sys.executable, str(ROOT / "pipelines" / "finetune.py"), "--stage", "1", "--config", "tiny", "--data",
                str(data), "--max-steps", "1", "--num-workers", "2", "--address", "{address}", "sample_steps=1",
                "batch_size=1"]
    # One cluster for both commands: the refusal, then (--shared-storage: the user vouches for the paths) the
    # prepare step as Ray tasks on both nodes.
    logs = tmp_path / "logs"
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "ray_two_nodes.py"), str(logs),
                        *finetune, "--output", str(tmp_path / "local"), "--then", *finetune, "--prepare", "--shared-storage"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    refused, prepared = [((logs / f"{i}.rc").read_text(), (logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text())
                         for i in (0, 1)]
    error = [line for line in refused[2].splitlines() if line.startswith("finetune.py: error:")]
    assert refused[0] == "2" and len(error) == 1, refused[2][-3000:]
    kind = filesystem_type(data)
    assert f"--data {data}: on a local filesystem ({kind}) but the Ray cluster has 2 nodes" in error[0]
    assert "--shared-storage" in error[0]
    assert not (tmp_path / "local").exists()
    assert prepared[0] == "0", prepared[2][-3000:]
    assert json.loads(prepared[1].strip().splitlines()[-1]) == {"objects": 4, "broken": 0, "encoded": 4, "shards_written": 1}
