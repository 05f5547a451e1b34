"""Run a command against a Ray cluster of two nodes on this machine (ray.cluster_utils.Cluster, 1 CPU each,
loopback only): `python tests/ray_two_nodes.py CMD ARGS...`, where `{address}` in ARGS becomes the
cluster's address. Exits with the command's status; the cluster is stopped in every case."""
import os
import secrets
import subprocess
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"    # before Ray is imported: every node on 127.0.0.1
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)    # the command inherits it
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.pop("RAY_ADDRESS", None)

from ray.cluster_utils import Cluster  # noqa: E402

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
try:
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    code = subprocess.run([a.replace("{address}", cluster.address) for a in sys.argv[1:]]).returncode
finally:
    cluster.shutdown()
sys.exit(code)
