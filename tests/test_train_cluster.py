"""Fine-tuning on a Ray cluster of two nodes (both on this machine, 127.0.0.1): a run whose workers may land
on either node refuses node-local storage in one line, before it writes anything; --shared-storage (the
user's word that the paths are shared) lets it train across both nodes."""
import json
import subprocess
import sys

from common.ray_local import filesystem_type, is_shared_filesystem
from tests.conftest import ROOT


def test_filesystem_types():
    assert not is_shared_filesystem(filesystem_type(ROOT))         # this machine's own disk
    assert all(is_shared_filesystem(k) for k in ("nfs4", "lustre", "fuse.juicefs", "fuse.gcsfuse", "cephfs"))
    assert not any(is_shared_filesystem(k) for k in ("ext4", "xfs", "tmpfs", "overlay", "btrfs"))


def test_two_nodes_refuse_local_storage_then_train_with_shared_storage(rendered_demo, tmp_path):
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

    r = subprocess.run(finetune + ["--output", str(tmp_path / "shared"), "--shared-storage"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = tmp_path / "shared" / "checkpoints" / "step-000001"
    assert json.loads((ckpt / "training_state" / "state.json").read_text())["step"] == 1
