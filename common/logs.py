"""A run's plain-line log: a file beside the run's outputs (and stderr, for a command's own output) for as long
as the run lasts.

    with logging_to(run_dir / "render.log", stderr=True):            # every logger (the root)
        ...
    with logging_to(work / "generate.log", logging.getLogger("generate"), "%(asctime)s %(levelname)s %(message)s"):
        ...
"""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Optional

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def logging_to(path: Path, logger: Optional[logging.Logger] = None, fmt: str = FORMAT, stderr: bool = False):
    """`logger`'s (None: every logger's) INFO and above appended to `path`, and to stderr when asked, inside the
    block. The handlers go afterwards and the level is restored: a second run in one process (a notebook, a Ray
    job, a test) logs to its own file, not to the first one's (logging.basicConfig keeps its first setting)."""
    logger = logger or logging.getLogger()
    handlers = [logging.FileHandler(path)] + ([logging.StreamHandler(sys.stderr)] if stderr else [])
    level = logger.level
    for h in handlers:
        h.setFormatter(logging.Formatter(fmt))
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(level)
        for h in handlers:
            logger.removeHandler(h)
            h.close()
