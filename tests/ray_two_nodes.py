"""Run pipeline commands against a Ray cluster of two nodes on this machine (ray.cluster_utils.Cluster, 1 CPU each,
loopback only), started once for all of them:

    python tests/ray_two_nodes.py OUT_DIR [VAR=VALUE...] SCRIPT ARGS... [--then [VAR=VALUE...] SCRIPT ARGS...]...

SCRIPT is a pipelines/ script's name (finetune): its main(ARGS) runs in this process, which is then the driver
that joins the cluster, as `python pipelines/SCRIPT.py ARGS` would (one interpreter and one model-stack import
for all the commands, not one each). VAR=VALUE: environment for that command only. `{address}` in ARGS becomes
the cluster's address. Command i's exit status, stdout and stderr go to OUT_DIR/i.rc, i.out and i.err; the
cluster is stopped in every case."""
import os
import re
import secrets
import sys
from pathlib import Path
from unittest import mock

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"    # before Ray is imported: every node on 127.0.0.1
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.pop("RAY_ADDRESS", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402,F401  (before torch, as every entry point)
from ray.cluster_utils import Cluster  # noqa: E402

from tests.conftest import run_main  # noqa: E402  (main in this process, output captured)


def run(i: int, cmd: list, address: str, out: Path) -> None:
    env = {}
    while re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", cmd[0]):
        name, value = cmd.pop(0).split("=", 1)
        env[name] = value
    with mock.patch.dict(os.environ, env):
        code, stdout, stderr = run_main(cmd[0], [a.replace("{address}", address) for a in cmd[1:]])
    (out / f"{i}.out").write_text(stdout)
    (out / f"{i}.err").write_text(stderr)
    (out / f"{i}.rc").write_text(str(code))


out = Path(sys.argv[1])
commands, current = [], []
for arg in sys.argv[2:]:
    if arg == "--then":
        commands.append(current)
        current = []
    else:
        current.append(arg)
commands.append(current)
out.mkdir(parents=True, exist_ok=True)
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
try:
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    for i, cmd in enumerate(commands):
        run(i, cmd, cluster.address, out)
finally:
    import ray
    ray.shutdown()
    cluster.shutdown()
