"""Checkpoint pruning: which step-N directories survive, and that nothing half-deleted is left to resume from."""
import pytest

from model import checkpoint


def make_steps(root, steps):
    for s in steps:
        (root / f"step-{s:06d}" / "unet").mkdir(parents=True)
        (root / f"step-{s:06d}" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"w")
        (root / f"step-{s:06d}" / "config.json").write_text("{}")


def names(root):
    return sorted(p.name for p in root.iterdir())


def test_prune_keeps_the_newest_every_kth_and_the_protected(tmp_path):
    make_steps(tmp_path, range(500, 5001, 500))
    deleted = checkpoint.prune(tmp_path, keep_last=2, keep_every=2000, protect=[tmp_path / "step-001500"])
    assert names(tmp_path) == ["step-001500", "step-002000", "step-004000", "step-004500", "step-005000"]
    assert [p.name for p in deleted] == ["step-000500", "step-001000", "step-002500", "step-003000", "step-003500"]
    assert checkpoint.latest(tmp_path).name == "step-005000"
    assert checkpoint.prune(tmp_path, keep_last=2, keep_every=2000, protect=[tmp_path / "step-001500"]) == []


def test_prune_finishes_a_prune_killed_between_its_moves_and_refuses_keep_last_0(tmp_path):
    make_steps(tmp_path, [1, 2, 3])
    (tmp_path / "step-000001").rename(tmp_path / ".deleting-step-000001")   # renamed, never removed
    (tmp_path / ".tmp-step-000004").mkdir()                                  # a save in progress: not ours
    checkpoint.prune(tmp_path, keep_last=1)
    assert names(tmp_path) == [".tmp-step-000004", "step-000003"]
    with pytest.raises(ValueError, match="keep_last 0"):
        checkpoint.prune(tmp_path, keep_last=0)
