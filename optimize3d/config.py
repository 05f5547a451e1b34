"""The 3D stage's configuration: GenerateConfig (the sd21 preset is the released isotropic3d-shading.yaml; tiny
runs in minutes on a CPU) and Precision, how a step's arithmetic runs.

    cfg = load_config(GenerateConfig, "my.yaml", ["steps=2000"], base=GenerateConfig.sd21())
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from optimize3d.export import ExportConfig
from optimize3d.field import FieldConfig
from optimize3d.guidance import GuidanceConfig
from optimize3d.march import MarchConfig
from optimize3d.preprocess import PreprocessConfig
from render.cameras import DISTANCE, FOV_DEG

# The renders' camera (distance 1.5, FOV ~49.1) as distance x tan(FOV / 2): the tiny model's training cameras.
TRAINING_RELATIVE_DISTANCE = DISTANCE * math.tan(math.radians(FOV_DEG) / 2)
ELEVATION_SAMPLING = ("uniform", "sphere", "coin")
MIXED_PRECISION = ("16-mixed", "bf16", "auto", "no")


@dataclass
class GenerateConfig:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """What the model sees of the image: segmentation and framing (optimize3d/preprocess.py)."""
    nerf: FieldConfig = field(default_factory=FieldConfig)
    """The field: hash grid + MLPs (optimize3d/field.py)."""
    march: MarchConfig = field(default_factory=MarchConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    steps: int = 10_000
    views: int = 4
    """Views of one camera group: one elevation, FOV and distance; azimuths 360/views apart from a random offset."""
    view_groups: list[int] = field(default_factory=lambda: [2, 1])
    """Independent camera groups per step, per resolution phase (as `resolutions`): the released batch_size
    [8, 4] with n_view 4, i.e. 8 views per step until the first milestone, then 4."""
    elevation_range: list[float] = field(default_factory=lambda: [0.0, 30.0])
    elevation_sampling: str = "coin"
    """uniform (in degrees) | sphere (threestudio's inverse transform asin(2u - 1), u uniform over
    [(lo + 90) / 180, (hi + 90) / 180]: over [0, 30] it reaches only 19.47 deg) | coin (the released code: per
    step one coin, random() < 0.5 -> uniform, else sphere)."""
    fov_range: list[float] = field(default_factory=lambda: [15.0, 60.0])
    relative_distance_range: list[float] = field(default_factory=lambda: [0.8, 1.0])
    """Camera distance = this x 1 / tan(fov / 2): the object keeps its size in the image."""
    resolutions: list[int] = field(default_factory=lambda: [64, 256])
    resolution_milestones: list[int] = field(default_factory=lambda: [5000])
    """resolutions[i + 1] from step resolution_milestones[i] on."""
    shading_start: int = 5000
    """Albedo only before this step; then textureless / lambertian / albedo at random."""
    p_textureless: float = 0.5
    p_lambertian: float = 0.75
    light_distance_range: list[float] = field(default_factory=lambda: [0.8, 1.5])
    orientation_weight: list[float] = field(default_factory=lambda: [10.0, 1000.0])
    """[at step 0, from orientation_ramp_steps on], linear in between; [0, 0] turns the loss off."""
    orientation_ramp_steps: int = 5000
    lr_grid: float = 0.01
    lr_mlp: float = 0.001
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-15
    weight_decay: float = 0.01
    mixed_precision: str = "16-mixed"
    """16-mixed (the released: the whole step, field and renderer included, under fp16 autocast with a gradient
    scaler) | bf16 (the diffusion model alone under bf16 autocast) | auto (bf16 for the diffusion model on a GPU,
    else nothing) | no."""
    seed: int = 22
    """The released config's seed (the tiny preset: 0)."""
    deterministic: bool = False
    """torch's deterministic algorithms during the optimisation: a run killed and resumed then ends with
    exactly the weights of an uninterrupted one (on a CPU at no measurable cost; on a GPU the hash grid's
    3D grid_sample backward has no deterministic version, so results agree to float rounding there)."""
    val_every: int = 500
    ckpt_every: int = 1000
    log_every: int = 10
    preview_steps: int = 50
    """DDIM steps of multiview.png (the 2D model's 4 views from the CLIP embedding)."""
    preview_elevation: float = 30.0

    @staticmethod
    def sd21() -> "GenerateConfig":
        return GenerateConfig()

    @staticmethod
    def tiny() -> "GenerateConfig":
        """Minutes on a CPU with the tiny 32 px model: its training cameras (FOV 49.1 deg, distance 1.5),
        32 px renders, 64 samples per ray, the paper's schedules compressed to `steps`."""
        steps = 300
        return GenerateConfig(
            nerf=FieldConfig.tiny(), march=MarchConfig.tiny(),
            # CFG 2: the tiny model's samples of training objects measured best at 1-2 (PSNR 12-16 dB) and
            # oversaturated at 4 (6-13 dB) and 10 (3-8 dB); the paper's 10 stays the sd21 preset's.
            guidance=GuidanceConfig(t_anneal_steps=int(steps * 0.8), guidance_scale=2.0),
            export=ExportConfig(resolution=96, threshold=5.0, turntable_frames=24, turntable_size=96),
            steps=steps, view_groups=[1], elevation_sampling="uniform",
            fov_range=[FOV_DEG, FOV_DEG], relative_distance_range=[TRAINING_RELATIVE_DISTANCE] * 2,
            resolutions=[32], resolution_milestones=[], shading_start=steps // 2,
            orientation_ramp_steps=steps // 2, lr_grid=0.01, lr_mlp=0.001,
            val_every=100, ckpt_every=100, log_every=10, preview_steps=20, deterministic=True, seed=0,
            mixed_precision="auto")

    def validate(self) -> None:
        self.preprocess.validate()
        if len(self.resolutions) != len(self.resolution_milestones) + 1:
            raise ValueError(f"resolutions {self.resolutions} need one more entry than resolution_milestones "
                             f"{self.resolution_milestones}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision {self.mixed_precision!r}: expected one of {', '.join(MIXED_PRECISION)}")
        if self.steps < 1 or self.views < 1:
            raise ValueError(f"steps {self.steps} and views {self.views} must be at least 1")
        if len(self.view_groups) != len(self.resolutions) or min(self.view_groups) < 1:
            raise ValueError(f"view_groups {self.view_groups}: one count of at least 1 per entry of resolutions "
                             f"{self.resolutions}")
        if self.elevation_sampling not in ELEVATION_SAMPLING:
            raise ValueError(f"elevation_sampling {self.elevation_sampling!r}: expected one of {', '.join(ELEVATION_SAMPLING)}")

    def phase(self, step: int) -> int:
        return sum(step >= m for m in self.resolution_milestones)

    def resolution_at(self, step: int) -> int:
        return self.resolutions[self.phase(step)]

    def views_at(self, step: int) -> int:
        return self.views * self.view_groups[self.phase(step)]


@dataclass
class Precision:
    """How a step runs: `step` autocasts the whole step (render, guidance, losses) and `scaler` scales its loss
    (the released 16-mixed); `guidance` autocasts only the diffusion model."""
    step: Optional[torch.dtype]
    guidance: Optional[torch.dtype]
    scaler: torch.amp.GradScaler

    @staticmethod
    def of(setting: str, device: torch.device) -> "Precision":
        if setting == "16-mixed":
            return Precision(torch.float16, None, torch.amp.GradScaler(device.type))
        bf16 = setting == "bf16" or (setting == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
        return Precision(None, torch.bfloat16 if bf16 else None, torch.amp.GradScaler(device.type, enabled=False))
