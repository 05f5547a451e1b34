"""The whole view-conditioned model: UNet + latent codec + noise schedule + camera featurisation,
its training loss (stage 1, and stage 2 with Explicit Multi-view Attention) and its DDIM sampler.

    model = MultiViewModel(ModelConfig.tiny())
    loss = model.loss(batch, stage=2, generator=g)
    views = model.sample(clip_embedding, target_cameras, steps=50, guidance=10.0)   # [V, 3, H, W]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler

from model.encoder import EncoderConfig
from model.unet import UNetConfig, build_unet, camera_features, multiview_forward

NUM_TRAIN_TIMESTEPS = 1000
LATENT_SCALE = 0.18215


@dataclass
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    latent: str = "vae"
    """vae: SD's AutoencoderKL (sd21). pixel: the UNet works on the image itself (tiny)."""
    vae_path: Optional[str] = None
    """Local diffusers AutoencoderKL folder; None = random weights (only for tests and benchmarks)."""
    image_size: int = 256
    camera_featurization: str = "mvdream"
    """mvdream: flattened c2w with unit translation. isotropic3d-double-radians: the released
    checkpoint's quirk (degrees converted to radians twice; see the real-weights issue)."""

    @staticmethod
    def tiny() -> "ModelConfig":
        # Pixel space: a 32 px image is already the 32x32 grid sd21's latents have, and a tiny VAE
        # would need training of its own before the UNet could learn anything on CPU.
        return ModelConfig(unet=UNetConfig.tiny(), encoder=EncoderConfig.tiny(), latent="pixel", image_size=32)

    @staticmethod
    def sd21() -> "ModelConfig":
        return ModelConfig()


def double_radians_features(c2w_gl: torch.Tensor) -> torch.Tensor:
    """The released Isotropic3D sampler's featurisation: it converts degrees to radians twice, so a camera
    at (azimuth, elevation) degrees is embedded as the camera at (azimuth * pi/180, elevation * pi/180)
    *degrees*: every view a small perturbation of el = az = 0. The angles are read off the camera
    position, so any camera-to-world matrix can be given."""
    import math

    from render.cameras import c2w_blender
    pos = c2w_gl[:, :3, 3].double()
    dist = pos.norm(dim=-1)
    az = torch.rad2deg(torch.atan2(pos[:, 1], pos[:, 0])) % 360.0      # the sampler's azimuths are in [0, 360)
    el = torch.rad2deg(torch.asin((pos[:, 2] / dist).clamp(-1, 1)))
    quirky = [c2w_blender(math.radians(a), math.radians(e), 1.0) for a, e in zip(az.tolist(), el.tolist())]
    return camera_features(torch.tensor(quirky, dtype=c2w_gl.dtype, device=c2w_gl.device))


def noise_schedule() -> DDPMScheduler:
    """SD 2.1 / MVDream: scaled-linear betas 0.00085 -> 0.012, 1000 steps, epsilon prediction."""
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False)


class MultiViewModel(torch.nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.latent not in ("vae", "pixel"):
            raise ValueError(f"latent {cfg.latent!r}: expected vae or pixel")
        self.cfg = cfg
        self.unet = build_unet(cfg.unet)
        self.vae = None
        if cfg.latent == "vae":
            self.vae = AutoencoderKL.from_pretrained(cfg.vae_path) if cfg.vae_path else self.new_vae()
            self.vae.requires_grad_(False).eval()
        self.schedule = noise_schedule()

    @staticmethod
    def new_vae() -> AutoencoderKL:
        """SD's VAE layout (embed_dim 4, ch 128, ch_mult 1,2,4,4) with random weights."""
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                             layers_per_block=2, sample_size=256)

    # ------------------------------------------------------------------ pieces
    def encode(self, images: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> what the UNet denoises. grad=True: differentiable (score
        distillation backpropagates through the VAE encoder into the renders)."""
        if self.vae is None:
            return images
        with torch.set_grad_enabled(grad):
            return self.vae.encode(images).latent_dist.mean * LATENT_SCALE

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents.clamp(-1, 1)
        with torch.no_grad():
            return self.vae.decode(latents / LATENT_SCALE).sample.clamp(-1, 1)

    def cameras(self, c2w_gl: torch.Tensor) -> torch.Tensor:
        """[N, 4, 4] Blender/OpenGL camera-to-world -> [N, 16], as this checkpoint's featurisation does."""
        if self.cfg.camera_featurization == "mvdream":
            return camera_features(c2w_gl)
        if self.cfg.camera_featurization == "isotropic3d-double-radians":
            return double_radians_features(c2w_gl)
        raise ValueError(f"camera_featurization {self.cfg.camera_featurization!r}: expected mvdream or "
                         "isotropic3d-double-radians")

    def predict(self, x: torch.Tensor, t: torch.Tensor, cams16: torch.Tensor, context: torch.Tensor, views: int):
        return multiview_forward(self.unet, x, t, cams16, context, views)

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict, stage: int, generator: torch.Generator, cond_dropout: float = 0.1):
        """The training loss (so that DDP wraps the whole step)."""
        return self.loss(batch, stage, generator, cond_dropout)

    def loss(self, batch: dict, stage: int, generator: torch.Generator, cond_dropout: float = 0.1,
             return_parts: bool = False):
        """Epsilon-prediction MSE on the target views. Stage 2 appends each object's clean reference
        latent as one more view (timestep 0, camera el = az = 0) that joins the multi-view attention
        and is left out of the loss."""
        target = batch["target"]                                  # [B, V, 3, H, W]
        b, v = target.shape[:2]
        device = target.device
        x0 = self.encode(target.flatten(0, 1)).unflatten(0, (b, v))
        noise = torch.randn(x0.shape, generator=generator, device="cpu").to(device)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (b,), generator=generator, device="cpu").to(device)
        xt = self.schedule.add_noise(x0.flatten(0, 1), noise.flatten(0, 1), t.repeat_interleave(v)).unflatten(0, (b, v))
        cams = self.cameras(batch["target_cameras"].flatten(0, 1)).unflatten(0, (b, v))
        tt = t[:, None].expand(b, v)
        emb = batch["clip_embedding"]
        keep = (torch.rand(b, generator=generator) >= cond_dropout).to(device, emb.dtype)
        emb = emb * keep[:, None]                                 # dropped condition = the zero embedding
        if stage == 2:
            ref = self.encode(batch["reference"])[:, None]
            xt = torch.cat([xt, ref], 1)
            cams = torch.cat([cams, self.cameras(batch["reference_camera"])[:, None]], 1)
            tt = torch.cat([tt, torch.zeros_like(t)[:, None]], 1)
        elif stage != 1:
            raise ValueError(f"stage {stage}: expected 1 or 2")
        views = xt.shape[1]
        context = emb[:, None, None, :].expand(b, views, 1, emb.shape[-1]).flatten(0, 1)
        pred = self.predict(xt.flatten(0, 1), tt.flatten(0, 1), cams.flatten(0, 1), context, views)
        pred = pred.unflatten(0, (b, views))
        loss = F.mse_loss(pred[:, :v].float(), noise.float())    # the reference view (stage 2) is excluded
        return (loss, pred) if return_parts else loss

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, clip_embedding: torch.Tensor, c2w_gl: torch.Tensor, steps: int = 50, guidance: float = 10.0,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Views [V, 3, H, W] in [-1, 1] from one CLIP embedding [D] and V cameras [V, 4, 4]:
        DDIM (eta 0) with classifier-free guidance against the zero embedding."""
        device = next(self.unet.parameters()).device
        v = c2w_gl.shape[0]
        ddim = DDIMScheduler.from_config(self.schedule.config, set_alpha_to_one=False, steps_offset=1)
        ddim.set_timesteps(steps)
        size = self.cfg.unet.sample_size
        x = torch.randn((v, self.cfg.unet.in_channels, size, size), generator=generator).to(device)
        cams = self.cameras(c2w_gl.to(device)).repeat(2, 1)
        emb = clip_embedding.to(device).reshape(1, 1, -1)
        context = torch.cat([emb.expand(v, 1, -1), torch.zeros_like(emb).expand(v, 1, -1)])
        for t in ddim.timesteps:
            eps = self.predict(torch.cat([x, x]), t.repeat(2 * v).to(device), cams, context, v)
            cond, uncond = eps.chunk(2)
            x = ddim.step(uncond + guidance * (cond - uncond), t, x).prev_sample
        return self.decode(x)

