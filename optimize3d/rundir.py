"""The output folder of one image-to-3D (or reconstruction) run: its name, its life from .partial to
complete, and one process at a time per result.

    with run_directory(out / run_dir_name(image, key), cfg.export, log, "generate.log") as work:
        if work is None: ...            # complete already (cached)
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
from pathlib import Path

from common.atomic import replace_dir
from common.logs import logging_to
from optimize3d.export import ExportConfig, export_key

LOCK_SUFFIX = ".lock"
PARTIAL_SUFFIX = ".partial"


def run_dir_name(image: Path, key: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", image.stem)[:64].strip("._") or "image"
    return f"{stem}-{key}"


def lock_file(final: Path) -> Path:
    """The lock a run of `final` holds (a .partial folder's too: lock_file(final_of(partial)))."""
    return final.with_name(final.name + LOCK_SUFFIX)


def final_of(run: Path) -> Path:
    """A run folder, complete or .partial -> the complete one's path."""
    return run.with_name(run.name.removesuffix(PARTIAL_SUFFIX))


@contextlib.contextmanager
def run_directory(final: Path, export_cfg: ExportConfig, logger: logging.Logger, log_name: str):
    """An output directory's life, for generate() and reconstruct(). Yields None when `final` is complete
    with these export settings (the result is cached); else the directory to work in: `final` itself
    when only the export settings changed (re-export in place), otherwise <final>.partial (resumed if a
    killed run left it), renamed to `final` when the block completes. `logger` also writes to log_name
    there for the duration. One process at a time: the block holds an flock on <final>.lock, and a second
    process asking for the same result waits for it, then finds the result made (a killed holder's lock
    is released by the kernel, and the next one resumes its .partial)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file(final), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process making %s", final)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield from _run_directory(final, export_cfg, logger, log_name)


def _run_directory(final: Path, export_cfg: ExportConfig, logger: logging.Logger, log_name: str):
    if final.is_dir():
        done = json.loads((final / "export.json").read_text()) if (final / "export.json").is_file() else {}
        if done.get("export_key") == export_key(export_cfg):
            yield None
            return
        work = final
    else:
        work = final.with_name(final.name + PARTIAL_SUFFIX)
    work.mkdir(parents=True, exist_ok=True)
    with logging_to(work / log_name, logger, "%(asctime)s %(levelname)s %(message)s"):
        yield work
    if work is not final:
        replace_dir(work, final)
