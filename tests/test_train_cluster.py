"""Fine-tuning on a Ray cluster of two nodes (both on this machine, 127.0.0.1): a run whose workers may land
on either node refuses node-local storage in one line, before it writes anything: the data and run
directories, a checkpoint --init converted into a node-local $ISO3D_CACHE, weights files on a node-local
disk; --shared-storage (the user's word that the paths are shared) lets it run (here the prepare step, as
Ray tasks on the cluster)."""
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common.ray_local import filesystem_type, is_shared_filesystem
from tests.conftest import ROOT


def test_filesystem_types(monkeypatch):
    monkeypatch.delenv("ISO3D_SHARED_FILESYSTEMS", raising=False)
    assert not is_shared_filesystem(filesystem_type(ROOT))         # this machine's own disk
    assert all(is_shared_filesystem(k) for k in ("nfs4", "lustre", "fuse.juicefs", "fuse.gcsfuse", "cephfs"))
    assert not any(is_shared_filesystem(k) for k in ("ext4", "xfs", "tmpfs", "overlay", "btrfs"))
    monkeypatch.setenv("ISO3D_SHARED_FILESYSTEMS", " panfs, xfs ")      # the user's word for a site's filesystems
    assert is_shared_filesystem("panfs") and is_shared_filesystem("xfs") and not is_shared_filesystem("ext4")


def test_two_nodes_refuse_local_storage_then_prepare_with_shared_storage(rendered_demo, tmp_path):
    import os
    import torch
    from tests.ldm_layout import unet_keys
    from tests.test_convert import TINY_LDM
    data = tmp_path / "renders"
    shutil.copytree(rendered_demo / "objects", data / "objects")
    # finetune.py's main, run by the helper (the driver that joins the cluster) for each command in turn
    finetune = ["finetune", "--stage", "1", "--config", "tiny", "--data", str(data), "--max-steps", "1", "--num-workers",
                "2", "--address", "{address}", "sample_steps=1", "batch_size=1"]
    # The third command: this machine's disk declared shared (as a user would for a site's own filesystem), the
    # cache and a weights file on /dev/shm (tmpfs, node-local): what the workers would open from there is refused.
    g = torch.Generator().manual_seed(0)
    ldm = tmp_path / "tiny-4view.pt"
    torch.save({k: torch.randn(shape, generator=g) * 0.1 for k, shape in unet_keys(**TINY_LDM).items()}, ldm)
    node_local = Path(tempfile.mkdtemp(prefix="iso3d-test-", dir="/dev/shm"))
    (node_local / "clip.safetensors").write_bytes(b"weights")
    local_init = [f"ISO3D_CACHE={node_local / 'cache'}", f"ISO3D_SHARED_FILESYSTEMS={filesystem_type(tmp_path)}",
                  *finetune, "model.unet.multiview_attention=true", f"model.encoder.weights={node_local / 'clip.safetensors'}",
                  "--output", str(tmp_path / "run"), "--init", str(ldm)]
    # One cluster for the three commands: the refusal, then (--shared-storage: the user vouches for the paths)
    # the prepare step as Ray tasks on both nodes, then the node-local init and weights.
    logs = tmp_path / "logs"
    try:
        r = subprocess.run([sys.executable, str(ROOT / "tests" / "ray_two_nodes.py"), str(logs),
                            *finetune, "--output", str(tmp_path / "local"), "--then", *finetune, "--prepare",
                            "--shared-storage", "--then", *local_init],
                           capture_output=True, text=True, timeout=600, env={**os.environ, "ISO3D_SHARED_FILESYSTEMS": ""})
        converted = list((node_local / "cache" / "converted").iterdir())
    finally:
        shutil.rmtree(node_local)
    assert r.returncode == 0, r.stderr[-3000:]
    refused, prepared, init = [((logs / f"{i}.rc").read_text(), (logs / f"{i}.out").read_text(),
                                (logs / f"{i}.err").read_text()) for i in (0, 1, 2)]
    error = [line for line in refused[2].splitlines() if line.startswith("finetune.py: error:")]
    assert refused[0] == "2" and len(error) == 1, refused[2][-3000:]
    kind = filesystem_type(data)
    assert (f"--data {data} ({kind}), --output {tmp_path / 'local'} ({kind}): on a node-local filesystem but the Ray "
            "cluster has 2 nodes") in error[0]
    assert "--shared-storage" in error[0]
    assert not (tmp_path / "local").exists()
    assert prepared[0] == "0", prepared[2][-3000:]
    assert json.loads(prepared[1].strip().splitlines()[-1]) == {"objects": 4, "broken": 0, "encoded": 4, "shards_written": 1}
    error = [line for line in init[2].splitlines() if line.startswith("finetune.py: error:")]
    assert init[0] == "2" and len(error) == 1, init[2][-3000:]
    assert len(converted) == 1
    assert error[0].startswith(f"finetune.py: error: --init (as converted or given) {converted[0]} (tmpfs), "
                               f"model.encoder.weights {node_local / 'clip.safetensors'} (tmpfs): on a node-local "
                               "filesystem"), error[0]
    assert not (tmp_path / "run").exists()
