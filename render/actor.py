"""The Ray actor of the render stage: one per worker slot, owning one Blender process."""
from __future__ import annotations

from render.supervisor import BlenderWorker, render_one


class RenderActor:
    """A Ray actor owning one `BlenderWorker`: the driver sends it objects one by one."""

    def __init__(self, root_path: str, max_objects: int, max_rss_growth_mb: float):
        self.worker = BlenderWorker(root_path, max_objects, max_rss_growth_mb)

    def render(self, *args) -> dict:
        return render_one(*args, worker=self.worker)

    def close(self) -> dict:
        self.worker.close()
        return {"processes": self.worker.started, "start_seconds": self.worker.start_seconds}
