"""Write files and directories so that a crash or kill never leaves a half-written artifact.

A file is written to `<name>.tmp-<pid>` in the same directory, flushed, fsynced and renamed.
A directory is built under a temporary name and renamed into place as the last step.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary sibling of `path` to write (by any means: a download, a library's save); once the
    block ends without an exception it is fsynced and renamed to `path`, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def append_line(path: str | Path, line: str) -> None:
    """Append one line with a single write() on an O_APPEND descriptor (no interleaving)."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp_dir: str | Path, final_dir: str | Path) -> None:
    """Move a finished `tmp_dir` to `final_dir`, replacing an older one if present.

    A kill between the two renames leaves no `final_dir` (so the work is redone), never a mix.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    trash = None
    if final_dir.exists():
        trash = final_dir.with_name(f".trash-{final_dir.name}-{uuid.uuid4().hex[:6]}")
        os.rename(final_dir, trash)
    os.rename(tmp_dir, final_dir)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
