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
    finetune = [sys.executable, str(ROOT / "tests" / "ray_two_nodes.py"), sys.executable,
                str(ROOT / "pipelines" / "finetune.py"), "--stage", "1", "--config", "tiny", "--data", str(rendered_demo),
                "--max-steps", "1", "--num-workers", "2", "--address", "{address}", "sample_steps=1", "batch_size=1"]
    r = subprocess.run(finetune + ["--output", str(tmp_path / "local")], capture_output=True, text=True, timeout=300)
    error = [line for line in r.stderr.splitlines() if line.startswith("finetune.py: error:")]
    assert r.returncode == 2 and len(error) == 1, r.stderr[-3000:]
    kind = filesystem_type(rendered_demo)
    assert f"--data {rendered_demo}: on a local filesystem ({kind}) but the Ray cluster has 2 nodes" in error[0]
    assert "--shared-storage" in error[0]
    assert not (tmp_path / "local").exists()

    # --shared-storage: the user vouches for the paths; the prepare step then runs as Ray tasks on both nodes.
    data = tmp_path / "renders"
    shutil.copytree(rendered_demo / "objects", data / "objects")
    prepare = [a if a != str(rendered_demo) else str(data) for a in finetune] + ["--prepare", "--shared-storage"]
    r = subprocess.run(prepare, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"objects": 4, "broken": 0, "encoded": 4, "shards_written": 1}
