"""Run commands against a Ray cluster of two nodes on this machine (ray.cluster_utils.Cluster, 1 CPU each,
loopback only), started once for all of them:

    python tests/ray_two_nodes.py OUT_DIR CMD ARGS... [--then CMD ARGS...]...

`{address}` in ARGS becomes the cluster's address. Command i's exit status, stdout and stderr go to
OUT_DIR/i.rc, i.out and i.err; the cluster is stopped in every case."""
import os
import secrets
import subprocess
import sys
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"    # before Ray is imported: every node on 127.0.0.1
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)    # the commands inherit it
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.pop("RAY_ADDRESS", None)

from ray.cluster_utils import Cluster  # noqa: E402

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
        r = subprocess.run([a.replace("{address}", cluster.address) for a in cmd], capture_output=True, text=True)
        (out / f"{i}.out").write_text(r.stdout)
        (out / f"{i}.err").write_text(r.stderr)
        (out / f"{i}.rc").write_text(str(r.returncode))
finally:
    cluster.shutdown()
