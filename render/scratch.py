"""Per-process scratch folders of Blender workers (user resources, caches, TMPDIR), owned through an flock,
so that a folder whose task was killed before its `finally` is removed by the next task on the machine.
"""
from __future__ import annotations

import fcntl
import shutil
import tempfile
from pathlib import Path

SCRATCH_PREFIX = "iso3d-render-"
OWNER_FILE = ".owner.lock"


def clean_stale_scratch(tmp_root: str | None = None) -> int:
    """Remove this machine's render scratch folders whose task is gone (a killed task never runs its
    `finally`): a live task holds an flock on the folder's owner file until it ends."""
    removed = 0
    for d in Path(tmp_root or tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        try:
            with open(d / OWNER_FILE, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        except (BlockingIOError, NotADirectoryError, FileNotFoundError, PermissionError):
            continue    # a live task's folder, another user's, or gone meanwhile
    return removed
