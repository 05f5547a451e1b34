"""Start or join Ray. A local Ray binds to loopback only; a cluster is the user's `--address`."""
from __future__ import annotations

import os
import sys
from pathlib import Path


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
    if not address or is_loopback(address):
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


def map_tasks(fn, items: list, address: str | None, cpus_per_task: float, gpus_per_task: float | None,
              desc: str, progress: bool = True):
    """fn(item) as one Ray task per item (no retries), on `address` or a local Ray; yields the results as they
    finish, with a progress bar. gpus_per_task None: 1 when the cluster has GPUs, else 0."""
    init_ray(address)
    import ray
    from tqdm import tqdm
    if gpus_per_task is None:
        gpus_per_task = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    task = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=0)(fn)
    pending = [task.remote(item) for item in items]
    with tqdm(total=len(pending), desc=desc, disable=not progress) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])
            bar.update(1)


def is_loopback(address: str) -> bool:
    from urllib.parse import urlsplit
    host = urlsplit(address if "://" in address else f"ray://{address}").hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


# Filesystems every node of a cluster can mount: network and parallel filesystems, and FUSE mounts (a
# bucket through gcsfuse/s3fs/juicefs, sshfs). Everything else (ext4, xfs, btrfs, zfs, tmpfs, overlay) is
# taken as one machine's own disk.
SHARED_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "cephfs",
                      "glusterfs", "wekafs", "9p", "virtiofs")


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path` (or its nearest existing parent), from /proc/mounts."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    best, kind = "", "unknown"
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def is_shared_filesystem(kind: str) -> bool:
    """A type of SHARED_FILESYSTEMS, a FUSE mount, or one the user names in $ISO3D_SHARED_FILESYSTEMS
    (comma-separated /proc/mounts types: a site's own parallel filesystem, or a disk the user knows every
    node mounts the same)."""
    extra = {k.strip() for k in os.environ.get("ISO3D_SHARED_FILESYSTEMS", "").split(",") if k.strip()}
    return kind in SHARED_FILESYSTEMS or kind in extra or kind.startswith("fuse")


def require_shared_storage(paths: dict[str, Path], assume_shared: bool = False) -> None:
    """On a Ray cluster of several nodes, refuse (ValueError, one line) a path on a node-local filesystem:
    workers on other nodes would write into, or read from, their own disk's copy of it. Call after
    init_ray. assume_shared: the user says the paths are shared (a filesystem this check does not know)."""
    import ray
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2 or assume_shared:
        return
    local = [f"{name} {path} ({kind})" for name, path in paths.items()
             if not is_shared_filesystem(kind := filesystem_type(path))]
    if local:
        raise ValueError(f"{', '.join(local)}: on a node-local filesystem but the Ray cluster has {len(nodes)} nodes, "
                         f"whose workers all open {'it' if len(local) == 1 else 'them'}; put "
                         f"{'it' if len(local) == 1 else 'them'} on storage every node mounts (NFS, Lustre, a bucket "
                         f"through FUSE; $ISO3D_CACHE for converted checkpoints), or pass --shared-storage if it is one")
