"""The render output folder and its manifest.

    root = RenderRoot(Path("renders"))   # objects/<bb>/<uid>/, logs/, manifest.jsonl

Completeness is the atomic rename of `objects/<bb>/.tmp-<uid>-*` to `objects/<bb>/<uid>` (render/layout.py);
an object whose folder exists and whose manifest line (or, failing that, meta.json) carries the current
settings key is complete and skipped on a rerun (render/scheduler.py: plan).
"""
from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path

from common.atomic import append_line
from render.layout import object_dir, object_dirs


class RenderRoot:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.objects = self.path / "objects"
        self.logs = self.path / "logs"
        self.manifest = self.path / "manifest.jsonl"
        for d in (self.objects, self.logs):
            d.mkdir(parents=True, exist_ok=True)

    def is_complete(self, uid: str, key: str) -> bool:
        try:
            meta = json.loads((object_dir(self.path, uid) / "meta.json").read_text())
        except (OSError, ValueError):
            return False
        return meta.get("settings_key") == key

    def object_uids(self) -> set[str]:
        """The complete objects' uids (one listing per bucket, render/layout.py)."""
        return set(object_dirs(self.path))

    def record(self, entry: dict) -> None:
        append_line(self.manifest, json.dumps(entry, sort_keys=True))

    def latest(self) -> dict[str, dict]:
        """The manifest's last line per uid."""
        out: dict[str, dict] = {}
        if self.manifest.exists():
            for line in self.manifest.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    out[entry["uid"]] = entry
        return out

    def _work_in_progress(self, pattern: str) -> list[Path]:
        """Matches of `pattern` in objects/ and in its buckets (render/layout.py), where renders are built."""
        return [*self.objects.glob(pattern), *self.objects.glob(f"*/{pattern}")]

    def clean_stale(self) -> int:
        """Remove temporary folders whose owner is gone (its lock is free); returns how many."""
        removed = 0
        for d in self._work_in_progress(".tmp-*"):
            if d.suffix == ".lock" or not d.is_dir():
                continue
            lock = d.with_name(d.name + ".lock")
            with open(lock, "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue   # a live task is writing it
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
            lock.unlink(missing_ok=True)
        for d in self._work_in_progress(".trash-*"):
            shutil.rmtree(d, ignore_errors=True)
        for lock in self._work_in_progress(".tmp-*.lock"):
            if not lock.with_suffix("").exists():
                lock.unlink(missing_ok=True)
        return removed
