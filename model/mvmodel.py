"""The whole view-conditioned model: UNet + latent codec + noise schedule + camera featurisation,
its training loss (stage 1, and stage 2 with Explicit Multi-view Attention) and its DDIM sampler.

    model = MultiViewModel(ModelConfig.tiny())
    loss = model.loss(batch, stage=2, generator=g)
    views = model.sample(clip_embedding, target_cameras, steps=50, guidance=10.0)   # [V, 3, H, W]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler

from common.config import file_digest, stable_seed
from model.encoder import INFERENCES, EncoderConfig
from model.unet import UNetConfig, build_unet, camera_features, multiview_forward

NUM_TRAIN_TIMESTEPS = 1000
LATENT_SCALE = 0.18215
RANDOM_VAE_SEED = 0


FEATURIZATIONS = ("mvdream", "isotropic3d-double-radians")
PREDICTIONS = ("epsilon", "v_prediction")


@dataclass
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    latent: str = "vae"
    """vae: SD's AutoencoderKL (sd21). pixel: the UNet works on the image itself (tiny)."""
    vae_path: Optional[str] = None
    """Local diffusers AutoencoderKL folder (relative paths: to the checkpoint directory that names it).
    None = random weights, refused unless allow_random_weights."""
    vae_block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    """The VAE's layout (SD's: ch 128, ch_mult 1,2,4,4; the image shrinks by 2 per level after the first)."""
    vae_layers_per_block: int = 2
    image_size: int = 256
    camera_featurization: str = "mvdream"
    """mvdream: flattened c2w with unit translation. isotropic3d-double-radians: the released
    checkpoint's quirk (degrees converted to radians twice, in a y-up frame; see double_radians_features)."""
    inference: str = "project"
    """Whose inference conventions to follow where they are not in the weights. isotropic3d-release: the
    released code's (CLIP input area-resized to 256, composited, bicubic align-corners resize to 224 with
    kornia's antialiasing; the 3D stage's renders resized bilinearly without antialiasing and encoded with
    a *sample* of the VAE posterior; the 2D preview sampled with DDIM eta 1). project: the image composited
    and resized once with antialiasing; antialiased render resize and the posterior *mean* (deterministic,
    less gradient noise); DDIM eta 0."""
    embedding_mean: Optional[list[float]] = None
    """Per-dimension mean of the training set's CLIP embeddings; with embedding_std, the condition the UNet
    sees is (embedding - mean) / std. None: the embedding as it is (the sd21 preset, the released model).
    Fine-tuning computes both when TrainConfig.standardize_embeddings is set (the tiny preset: its
    random-weight encoder embeds different objects with cosine ~0.996 to each other, a near-constant
    condition the model would learn to ignore); a checkpoint carries them in config.json."""
    embedding_std: Optional[list[float]] = None
    prediction_type: str = "epsilon"
    """What the UNet predicts: epsilon (SD 2.1, MVDream, the released model) or v_prediction (the tiny
    preset: a small pixel-space model trained for minutes predicts epsilon well and still gets x0 badly
    wrong at high noise, where x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) multiplies its error by up to 15;
    measured at 300 steps: x0 error 0.54 at t = 950, and DDIM samples of training objects were noise)."""
    zero_terminal_snr: bool = False
    """Rescale the betas so that the last timestep is pure noise, as sampling starts (Lin et al., "Common
    Diffusion Noise Schedules and Sample Steps are Flawed": diffusers' rescale_betas_zero_snr), and sample
    with "trailing" timestep spacing, from t = 999. SD's schedule leaves 6.8% of the image's amplitude at
    t = 999, which a model learns to lean on and sampling never gives it. Needs v_prediction (epsilon says
    nothing about x0 at zero SNR). False: SD 2.1 / MVDream / the released model, and the demo: with it in the
    demo's stage 1 the held-out torus sampled at 18.9 dB (14.9 without) as paler blotches, and the seen box's
    mesh colour error rose from 0.17 to 0.24 (README, "Fine-tune")."""
    allow_random_weights: bool = False
    """A VAE model without vae_path, or a non-tiny encoder without weights, is an error unless this is
    true (tests, benchmarks): full-size results from random weights are never silent."""

    @staticmethod
    def tiny() -> "ModelConfig":
        # Pixel space: a 32 px image is already the 32x32 grid sd21's latents have, and a tiny VAE
        # would need training of its own before the UNet could learn anything on CPU.
        return ModelConfig(unet=UNetConfig.tiny(), encoder=EncoderConfig.tiny(), latent="pixel", image_size=32,
                           prediction_type="v_prediction")

    @staticmethod
    def sd21() -> "ModelConfig":
        return ModelConfig()

    @staticmethod
    def small() -> "ModelConfig":
        """Exactly sd21's code paths at a size a CPU trains in seconds: a diffusers AutoencoderKL (2 levels,
        32 px -> 16x16x4 latents; its folder is model.vae_path), an open_clip tower from a weights file
        (model.encoder.weights; the tiny ViT's layout), gradient checkpointing, epsilon prediction, the raw
        embedding. For testing the full-size path, not for results: tiny is the preset that learns on a CPU."""
        return ModelConfig(unet=UNetConfig.small(), encoder=EncoderConfig.tiny(), latent="vae",
                           vae_block_out_channels=[32, 64], vae_layers_per_block=1, image_size=32)

    def validate(self) -> None:
        """Checks that need no file read beyond existence: run before any long work starts."""
        from model.encoder import TINY_MODEL
        if self.latent not in ("vae", "pixel"):
            raise ValueError(f"model.latent {self.latent!r}: expected vae or pixel")
        if self.camera_featurization not in FEATURIZATIONS:
            raise ValueError(f"model.camera_featurization {self.camera_featurization!r}: expected one of {', '.join(FEATURIZATIONS)}")
        if self.prediction_type not in PREDICTIONS:
            raise ValueError(f"model.prediction_type {self.prediction_type!r}: expected one of {', '.join(PREDICTIONS)}")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError(f"model.zero_terminal_snr needs model.prediction_type=v_prediction, not {self.prediction_type!r}: "
                             "at zero SNR an epsilon prediction says nothing about the image")
        if self.inference not in INFERENCES:
            raise ValueError(f"model.inference {self.inference!r}: expected one of {', '.join(INFERENCES)}")
        if self.latent == "vae" and self.vae_path is None and not self.allow_random_weights:
            raise ValueError("model.vae_path is not set: this model needs VAE weights (a diffusers AutoencoderKL folder, "
                             "e.g. the vae/ of a converted checkpoint); set model.vae_path=DIR, or "
                             "model.allow_random_weights=true for tests and benchmarks")
        if self.vae_path is not None and not (Path(self.vae_path) / "config.json").is_file():
            raise ValueError(f"model.vae_path {self.vae_path}: no config.json (not a diffusers AutoencoderKL folder)")
        if self.encoder.weights is None and self.encoder.model != TINY_MODEL and not self.allow_random_weights:
            raise ValueError(f"model.encoder.weights is not set: {self.encoder.model} needs its weights file (open_clip "
                             ".bin/.pt/.safetensors); set model.encoder.weights=FILE, or model.allow_random_weights=true "
                             "for tests and benchmarks")
        if self.encoder.weights is not None and not Path(self.encoder.weights).is_file():
            raise ValueError(f"model.encoder.weights {self.encoder.weights}: not a file")
        stats = (self.embedding_mean, self.embedding_std)
        if (stats[0] is None) != (stats[1] is None) or (stats[0] is not None and len(stats[0]) != len(stats[1])):
            raise ValueError("model.embedding_mean and model.embedding_std: give both, of the same length, or neither")
        if stats[1] is not None and min(stats[1]) <= 0:
            raise ValueError("model.embedding_std: every entry must be > 0")


def _released_lookat(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """The released code's y-up look-at camera at (elevation, azimuth) degrees, flipped to z-up: in this
    project's frame that is the camera at azimuth - 90 degrees (its azimuth 0 looks along -y, ours along -x)."""
    from render.cameras import c2w_blender
    return c2w_blender(azimuth_deg - 90.0, elevation_deg, 1.0)


def double_radians_features(c2w_gl: torch.Tensor) -> torch.Tensor:
    """The released Isotropic3D guidance's featurisation. It gets the elevation E and azimuth A (degrees) of
    a camera, converts them to radians and hands them to a look-at helper that converts *again*, so the
    camera embedded is the one at elevation E*pi/180 and azimuth A*pi/180 *degrees*: every view a small
    perturbation of one matrix. A and E are read off the camera position (A in [0, 360)), so any
    camera-to-world matrix can be given; the distance is dropped (unit translation)."""
    pos = c2w_gl[:, :3, 3].double()
    dist = pos.norm(dim=-1)
    az = torch.rad2deg(torch.atan2(pos[:, 1], pos[:, 0])) % 360.0
    el = torch.rad2deg(torch.asin((pos[:, 2] / dist).clamp(-1, 1)))
    quirky = [_released_lookat(math.radians(a), math.radians(e)) for a, e in zip(az.tolist(), el.tolist())]
    return torch.tensor(np.stack(quirky).reshape(-1, 16), dtype=c2w_gl.dtype, device=c2w_gl.device)


def released_preview_features(views: int = 4, elevation: float = 15.0) -> torch.Tensor:
    """[views, 16]: the cameras of the released 2D sampler's preview (azimuths 360/views apart from 0,
    elevation 15). Its helper converts the elevation to radians once more for each successive view, so
    view k sits at elevation 15 * (pi/180)^(k+2) radians; azimuth A at A * (pi/180)^2."""
    feats, el = [], elevation
    for k in range(views):
        el = math.radians(el)                      # the helper's loop: once per view, cumulatively
        feats.append(_released_lookat(math.radians(k * 360.0 / views), el))
    return torch.tensor(np.stack(feats).reshape(-1, 16), dtype=torch.float32)


def noise_schedule(prediction_type: str = "epsilon", zero_terminal_snr: bool = False) -> DDPMScheduler:
    """SD 2.1 / MVDream: scaled-linear betas 0.00085 -> 0.012, 1000 steps, epsilon prediction (v for tiny);
    zero_terminal_snr: those betas rescaled so that alpha_cumprod[999] = 0, sampled with trailing spacing."""
    extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if zero_terminal_snr else {}
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False, **extra)


def load_vae(cfg: ModelConfig) -> Optional[AutoencoderKL]:
    """The frozen VAE of a latent-space model (None for pixel space): from cfg.vae_path, else random weights."""
    if cfg.latent != "vae":
        return None
    vae = AutoencoderKL.from_pretrained(cfg.vae_path) if cfg.vae_path else MultiViewModel.new_vae(cfg)
    return vae.requires_grad_(False).eval()


def vae_identity(cfg: ModelConfig) -> str:
    """What a latent depends on besides the image: the VAE's weights (a digest) or its random layout."""
    if cfg.latent != "vae":
        return "pixel"
    if cfg.vae_path is None:
        return f"vae:random-init-seed{RANDOM_VAE_SEED}:{cfg.vae_block_out_channels}x{cfg.vae_layers_per_block}"
    weights = sorted(Path(cfg.vae_path).glob("diffusion_pytorch_model*"))
    if not weights:
        raise FileNotFoundError(f"model.vae_path {cfg.vae_path}: no diffusion_pytorch_model weights")
    return "vae:" + ",".join(file_digest(w) for w in weights)


def vae_encode(vae: Optional[AutoencoderKL], images: torch.Tensor, grad: bool = False,
               sample: Optional[torch.Generator] = None) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1] -> what the UNet denoises: the VAE posterior's mean x 0.18215 (or a sample of
    it drawn with the generator `sample`); the images themselves in pixel space (vae None). grad=True:
    differentiable (score distillation backpropagates through the VAE encoder into the renders)."""
    if vae is None:
        return images
    with torch.set_grad_enabled(grad):
        posterior = vae.encode(images).latent_dist
        return (posterior.mean if sample is None else posterior.sample(generator=sample)) * LATENT_SCALE


class MultiViewModel(torch.nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.unet = build_unet(cfg.unet)
        self.vae = load_vae(cfg)
        self.schedule = noise_schedule(cfg.prediction_type, cfg.zero_terminal_snr)

    @staticmethod
    def new_vae(cfg: Optional[ModelConfig] = None) -> AutoencoderKL:
        """The configured VAE layout (default SD's: embed_dim 4, ch 128, ch_mult 1,2,4,4) with random weights,
        the same in every process (seeded by RANDOM_VAE_SEED: prepared latents and the model agree)."""
        cfg = cfg or ModelConfig()
        levels = len(cfg.vae_block_out_channels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_VAE_SEED)
            return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                 block_out_channels=tuple(cfg.vae_block_out_channels),
                                 down_block_types=("DownEncoderBlock2D",) * levels,
                                 up_block_types=("UpDecoderBlock2D",) * levels,
                                 layers_per_block=cfg.vae_layers_per_block, sample_size=cfg.image_size)

    # ------------------------------------------------------------------ pieces
    def encode(self, images: torch.Tensor, grad: bool = False, sample: Optional[torch.Generator] = None) -> torch.Tensor:
        return vae_encode(self.vae, images, grad, sample)

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
        raise ValueError(f"camera_featurization {self.cfg.camera_featurization!r}: expected one of {FEATURIZATIONS}")

    def preview_features(self, c2w_gl: torch.Tensor) -> torch.Tensor:
        """Features of the 4 preview views (azimuths 0/90/180/270): with the released featurisation, exactly
        the released sampler's four preview cameras; otherwise the cameras given."""
        if self.cfg.camera_featurization == "isotropic3d-double-radians":
            if c2w_gl.shape[0] != 4:
                raise ValueError(f"the released preview has 4 views, {c2w_gl.shape[0]} cameras given")
            return released_preview_features().to(c2w_gl)
        return self.cameras(c2w_gl)

    def sample_preview(self, clip_embedding: torch.Tensor, c2w_gl: torch.Tensor, steps: int, guidance: float,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The 4 preview views (azimuths 0/90/180/270 given as c2w_gl) as this checkpoint's conventions
        sample them: the released model with its sampler's own cameras (preview_features) and DDIM eta 1."""
        eta = 1.0 if self.cfg.inference == "isotropic3d-release" else 0.0
        return self.sample(clip_embedding, c2w_gl, steps, guidance, generator, features=self.preview_features(c2w_gl), eta=eta)

    def condition(self, clip_embedding: torch.Tensor) -> torch.Tensor:
        """[..., D] CLIP embedding -> the condition the UNet attends to: standardised with the checkpoint's
        statistics when it has them (ModelConfig.embedding_mean/std). The unconditional condition (CFG,
        dropout) is the zero vector after this step."""
        if self.cfg.embedding_mean is None:
            return clip_embedding
        mean = torch.tensor(self.cfg.embedding_mean, dtype=clip_embedding.dtype, device=clip_embedding.device)
        std = torch.tensor(self.cfg.embedding_std, dtype=clip_embedding.dtype, device=clip_embedding.device)
        if clip_embedding.shape[-1] != mean.shape[0]:
            raise ValueError(f"CLIP embedding of {clip_embedding.shape[-1]} numbers; the model's statistics have {mean.shape[0]}")
        return (clip_embedding - mean) / std

    def predict(self, x: torch.Tensor, t: torch.Tensor, cams16: torch.Tensor, context: torch.Tensor, views: int):
        """The UNet's output: epsilon or v, as cfg.prediction_type says."""
        return multiview_forward(self.unet, x, t, cams16, context, views)

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cams16: torch.Tensor, context: torch.Tensor, views: int):
        """Epsilon whatever the UNet predicts (v = sqrt(a) eps - sqrt(1 - a) x0, so eps = sqrt(a) v + sqrt(1 - a) x_t)."""
        out = self.predict(x, t, cams16, context, views)
        if self.cfg.prediction_type == "epsilon":
            return out
        a = self.schedule.alphas_cumprod.to(x.device)[t.long()].view(-1, 1, 1, 1).to(out.dtype)
        return a.sqrt() * out + (1 - a).sqrt() * x.to(out.dtype)

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict, stage: int, generator: torch.Generator, cond_dropout: float = 0.1):
        """The training loss (so that DDP wraps the whole step)."""
        return self.loss(batch, stage, generator, cond_dropout)

    def loss(self, batch: dict, stage: int, generator: torch.Generator, cond_dropout: float = 0.1,
             return_parts: bool = False):
        """Epsilon- (or v-) prediction MSE on the target views (images, or latents when batch["encoded"]). Stage 2 appends each object's clean reference
        latent as one more view (timestep 0, camera el = az = 0) that joins the multi-view attention
        and is left out of the loss."""
        target = batch["target"]                                  # [B, V, 3, H, W]
        b, v = target.shape[:2]
        device = target.device
        # Prepared data (dataset/prepared.py) arrives encoded; images from the renders are encoded here.
        encode = (lambda x: x) if batch.get("encoded") else self.encode
        x0 = encode(target.flatten(0, 1)).unflatten(0, (b, v))
        # Each object draws its noise, timestep and condition dropout from its own generator, seeded by
        # its sample seed (batch["seed"], from the sampler) or else drawn from `generator`: an object's
        # draws do not depend on which rank or batch it lands in (N ranks x b = 1 rank x N*b).
        seeds = batch.get("seed") or torch.randint(0, 2**62, (b,), generator=generator).tolist()
        gens = [torch.Generator().manual_seed(stable_seed(int(s), "diffusion")) for s in seeds]
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
        t = torch.cat([torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), generator=g) for g in gens]).to(device)
        xt = self.schedule.add_noise(x0.flatten(0, 1), noise.flatten(0, 1), t.repeat_interleave(v)).unflatten(0, (b, v))
        cams = self.cameras(batch["target_cameras"].flatten(0, 1)).unflatten(0, (b, v))
        tt = t[:, None].expand(b, v)
        emb = self.condition(batch["clip_embedding"])
        keep = (torch.cat([torch.rand(1, generator=g) for g in gens]) >= cond_dropout).to(device, emb.dtype)
        emb = emb * keep[:, None]                                 # dropped condition = the zero embedding
        if stage == 2:
            ref = encode(batch["reference"])[:, None]
            xt = torch.cat([xt, ref], 1)
            cams = torch.cat([cams, self.cameras(batch["reference_camera"])[:, None]], 1)
            tt = torch.cat([tt, torch.zeros_like(t)[:, None]], 1)
        elif stage != 1:
            raise ValueError(f"stage {stage}: expected 1 or 2")
        views = xt.shape[1]
        context = emb[:, None, None, :].expand(b, views, 1, emb.shape[-1]).flatten(0, 1)
        pred = self.predict(xt.flatten(0, 1), tt.flatten(0, 1), cams.flatten(0, 1), context, views)
        pred = pred.unflatten(0, (b, views))
        target = noise if self.cfg.prediction_type == "epsilon" else self.schedule.get_velocity(
            x0.flatten(0, 1), noise.flatten(0, 1), t.repeat_interleave(v)).unflatten(0, (b, v))
        loss = F.mse_loss(pred[:, :v].float(), target.float())   # the reference view (stage 2) is excluded
        return (loss, pred) if return_parts else loss

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, clip_embedding: torch.Tensor, c2w_gl: torch.Tensor, steps: int = 50, guidance: float = 10.0,
               generator: Optional[torch.Generator] = None, features: Optional[torch.Tensor] = None,
               eta: float = 0.0) -> torch.Tensor:
        """Views [V, 3, H, W] in [-1, 1] from one CLIP embedding [D] and V cameras [V, 4, 4] (or their
        features [V, 16] as given, e.g. preview_features()): DDIM (eta 0 deterministic, 1 as the released
        preview) with classifier-free guidance against the zero embedding."""
        device = next(self.unet.parameters()).device
        v = c2w_gl.shape[0]
        ddim = DDIMScheduler.from_config(self.schedule.config, set_alpha_to_one=False, steps_offset=1)
        ddim.set_timesteps(steps)
        size = self.cfg.unet.sample_size
        x = torch.randn((v, self.cfg.unet.in_channels, size, size), generator=generator).to(device)
        cams = (self.cameras(c2w_gl.to(device)) if features is None else features.to(device)).repeat(2, 1)
        emb = self.condition(clip_embedding.to(device)).reshape(1, 1, -1)
        context = torch.cat([emb.expand(v, 1, -1), torch.zeros_like(emb).expand(v, 1, -1)])
        for t in ddim.timesteps:
            eps = self.predict(torch.cat([x, x]), t.repeat(2 * v).to(device), cams, context, v)
            cond, uncond = eps.chunk(2)
            x = ddim.step(uncond + guidance * (cond - uncond), t, x, eta=eta, generator=generator).prev_sample
        return self.decode(x)

