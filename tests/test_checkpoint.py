"""Checkpoints: which step-N directories pruning keeps, that nothing half-deleted is left to resume from, and the
noise schedule a checkpoint carries."""
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


def test_a_zero_terminal_snr_model_is_pure_noise_at_999_and_its_checkpoint_samples_from_999(tmp_path):
    """model.zero_terminal_snr: Lin et al.'s rescaled betas. SD's scaled-linear schedule ends at sqrt(alpha_cumprod)
    = 0.068265 (their Table 1), the rescaled one at 0, with alpha_cumprod[0] kept; the checkpoint's scheduler/ is
    what diffusers loads, and its DDIM starts at t = 999 (trailing spacing: 999, 749, 499, 249 for 4 steps, where
    SD's leading spacing gives 750, 500, 250, 0). The model config round-trips; epsilon prediction is refused."""
    import dataclasses
    from diffusers import DDIMScheduler
    from model.mvmodel import ModelConfig, MultiViewModel
    sd = MultiViewModel(ModelConfig.tiny()).schedule.alphas_cumprod
    assert float(sd[-1].sqrt()) == pytest.approx(0.068265, abs=1e-6)
    cfg = dataclasses.replace(ModelConfig.tiny(), zero_terminal_snr=True)
    model = MultiViewModel(cfg)
    zero = model.schedule.alphas_cumprod
    assert float(zero[-1]) == 0.0 and float(zero[0]) == pytest.approx(float(sd[0]), rel=1e-6)
    assert bool((zero[1:] < zero[:-1]).all())
    checkpoint.save(tmp_path, 1, model)
    ckpt = tmp_path / "step-000001"
    assert checkpoint.model_config(ckpt).zero_terminal_snr is True
    for folder, first in ((ckpt, [999, 749, 499, 249]), (None, [750, 500, 250, 0])):
        if folder is None:
            checkpoint.write_scheduler(tmp_path / "sd", "v_prediction")
            folder = tmp_path / "sd"
        ddim = DDIMScheduler.from_pretrained(folder / "scheduler")
        ddim.set_timesteps(4)
        assert ddim.timesteps.tolist() == first
    with pytest.raises(ValueError, match="zero_terminal_snr needs model.prediction_type=v_prediction"):
        MultiViewModel(dataclasses.replace(ModelConfig.tiny(), zero_terminal_snr=True, prediction_type="epsilon"))
