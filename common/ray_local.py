"""Start or join Ray. A local Ray binds to loopback only; a cluster is the user's `--address`."""
from __future__ import annotations

import os
import sys


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs) -> None:
    """Join `address` (or the job's cluster when run by `ray job submit`), else start a local Ray
    that listens on 127.0.0.1 only and sends no usage statistics."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]   # set for the entrypoint of `ray job submit`
    # Ray 2.60 binds every interface and advertises eth0 unless this is set before it starts;
    # with it, GCS, raylet, workers and dashboard listen on 127.0.0.1 only (checked with ss -tlnp).
    # A driver joining a cluster on loopback needs it too, or it advertises an address the cluster
    # cannot reach and waits forever.
    # Ray reads it when imported, so it is set before `import ray` (a driver that imported ray earlier
    # and joins 127.0.0.1 swaps in the eth0 address and never connects).
    if not address or _is_loopback(address):
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if not address and "ray" not in sys.modules:
        # Ray 2.60 turns token authentication on for a new local cluster and warns on every run that it
        # did, unless the mode is set explicitly: set it (token, the secure default, kept), before Ray
        # reads its configuration at import.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, **kwargs)
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, **kwargs)


def _is_loopback(address: str) -> bool:
    from urllib.parse import urlsplit
    host = urlsplit(address if "://" in address else f"ray://{address}").hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")
