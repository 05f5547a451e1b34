"""Score distillation with the multi-view diffusion model, and the schedules of the 3D stage.

    guide = MultiViewGuidance(model, clip_embedding, GuidanceConfig())
    loss = guide(images, c2w_gl, step, generator, views=4)   # images [G * V, 3, H, W] in [0, 1]: G groups of V views

One timestep for all views of a step, drawn from a range annealed linearly from t_start at step 0 to
t_end at `t_anneal_steps` (both ends move). Two forms of the update:
  - "x0" (the released code): x0 reconstructed with classifier-free guidance, its std (per group of views)
    rescaled to that of the un-guided (conditional) x0 and mixed `std_rescale` : 1 - std_rescale;
    loss = 0.5 * ||z - sg(x0)||^2 summed / number of views (of all groups).
Each group of V views is one multi-view sample for the UNet (its views attend to each other); all groups of a
step share the timestep.
  - "sds": plain SDS, gradient w(t) (eps_cfg - eps) with w(t) = 1 - alpha_bar_t, as the loss
    0.5 * ||z - sg(z - grad)||^2 summed / number of views.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class GuidanceConfig:
    guidance_scale: float = 10.0
    form: str = "x0"
    """x0 (x0-reconstruction with std rescale, the released code) | sds (plain SDS)."""
    std_rescale: float = 0.5
    t_start: list[float] = field(default_factory=lambda: [0.98, 0.98])
    """[min, max] of the timestep fraction at step 0."""
    t_end: list[float] = field(default_factory=lambda: [0.02, 0.50])
    t_anneal_steps: int = 8000
    """Step at which the range reaches t_end (then stays)."""


def t_range(cfg: GuidanceConfig, step: int) -> tuple[float, float]:
    f = min(1.0, step / max(1, cfg.t_anneal_steps))
    lo = cfg.t_start[0] + (cfg.t_end[0] - cfg.t_start[0]) * f
    hi = cfg.t_start[1] + (cfg.t_end[1] - cfg.t_start[1]) * f
    return lo, hi


def linear_ramp(step: int, start: float, end: float, ramp_steps: int) -> float:
    """start at step 0 -> end at ramp_steps, then end (the orientation-loss weight: 10 -> 1000 over 5000)."""
    return start + (end - start) * min(1.0, step / max(1, ramp_steps))


def distillation_loss(z: torch.Tensor, noise: torch.Tensor, t: int, alphas_cumprod: torch.Tensor,
                      predict: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                      cfg: GuidanceConfig, views: int | None = None) -> torch.Tensor:
    """z [G * V, C, h, w] (with grad): G groups of `views` views (default: one group). predict(x_t) ->
    (eps_cond, eps_uncond), no grad."""
    if cfg.form not in ("x0", "sds"):
        raise ValueError(f"guidance form {cfg.form!r}: expected x0 or sds")
    ab = alphas_cumprod[t].to(z)
    with torch.no_grad():
        x_t = ab.sqrt() * z + (1 - ab).sqrt() * noise
        eps_cond, eps_uncond = predict(x_t)
        eps = eps_uncond + cfg.guidance_scale * (eps_cond - eps_uncond)
        if cfg.form == "sds":
            target = z - (1 - ab) * (eps - noise)
        else:
            x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
            if cfg.std_rescale > 0:
                x0_cond = (x_t - (1 - ab).sqrt() * eps_cond) / ab.sqrt()
                groups = lambda x: x.reshape(-1, views or z.shape[0], *x.shape[1:])  # noqa: E731
                factor = (groups(x0_cond).std((1, 2, 3, 4), keepdim=True) + 1e-8) / (groups(x0).std((1, 2, 3, 4), keepdim=True) + 1e-8)
                x0 = cfg.std_rescale * (groups(x0) * factor).reshape(x0.shape) + (1 - cfg.std_rescale) * x0
            target = x0
    return 0.5 * F.mse_loss(z, target, reduction="sum") / z.shape[0]


class MultiViewGuidance:
    """The fine-tuned model as score model for one object (one CLIP embedding)."""

    def __init__(self, model, clip_embedding: torch.Tensor, cfg: GuidanceConfig, autocast: torch.dtype | None = None):
        """autocast: the diffusion model's own autocast dtype (None: none of its own; an autocast around the
        whole step, as 16-mixed has, still applies)."""
        self.model, self.cfg, self.autocast = model, cfg, autocast
        self.device = next(model.unet.parameters()).device
        self.embedding = model.condition(clip_embedding.to(self.device)).reshape(1, 1, -1)
        self.alphas_cumprod = model.schedule.alphas_cumprod.to(self.device)

    def latents(self, images01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Renders -> what the UNet denoises, as the checkpoint's `inference` switch says: the released code
        resizes bilinearly without antialiasing and encodes a sample of the VAE posterior; the project
        antialiases (renders above the model's size alias otherwise) and takes the posterior mean."""
        size = self.model.cfg.image_size
        released = self.model.cfg.inference == "isotropic3d-release"
        x = F.interpolate(images01, (size, size), mode="bilinear", align_corners=False, antialias=not released) * 2 - 1
        return self.model.encode(x, grad=True, sample=generator if released else None)

    def __call__(self, images01: torch.Tensor, c2w_gl: torch.Tensor, step: int, generator: torch.Generator,
                 views: int | None = None) -> torch.Tensor:
        """images01 [G * views, 3, H, W]: G groups of `views` views (default: all one group)."""
        z = self.latents(images01, generator)
        v, per_group = z.shape[0], views or z.shape[0]
        if v % per_group:
            raise ValueError(f"{v} views are not groups of {per_group}")
        lo, hi = t_range(self.cfg, step)
        n = self.model.schedule.config.num_train_timesteps
        t = int(torch.randint(int(lo * n), int(hi * n) + 1, (1,), generator=generator))
        t = min(t, n - 1)
        noise = torch.randn(z.shape, generator=generator).to(z)
        cams = self.model.cameras(c2w_gl.to(self.device)).repeat(2, 1)
        context = torch.cat([self.embedding.expand(v, 1, -1), torch.zeros_like(self.embedding).expand(v, 1, -1)])

        def predict(x_t):
            with torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext():
                eps = self.model.predict_noise(torch.cat([x_t, x_t]), torch.full((2 * v,), t, device=self.device),
                                               cams, context, per_group)
            return eps.float().chunk(2)

        return distillation_loss(z, noise, t, self.alphas_cumprod, predict, self.cfg, per_group)
