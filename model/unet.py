"""The multi-view UNet: diffusers' UNet2DConditionModel + multi-view self-attention + camera MLP.

    unet = build_unet(UNetConfig.tiny())                       # or UNetConfig.sd21()
    eps = multiview_forward(unet, x, t, cameras16, context, num_views=4)   # x: [B*V, C, H, W]

Multi-view ("3D") self-attention (MVDream): the first self-attention (attn1) of every transformer
block attends jointly over all views of one object, tokens (B*V, HW, C) -> (B, V*HW, C); cross-
attention and feed-forward stay per view; the weights are SD's own self-attention weights. The camera
MLP (16 -> time-embedding width -> same, SiLU) is diffusers' "projection" class embedding, so its
output is added to the time embedding, as MVDream does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

CAMERA_DIM = 16


@dataclass
class UNetConfig:
    sample_size: int = 32
    """Latent (sd21) or pixel (tiny) height = width of the UNet's input."""
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    down_block_types: list[str] = field(default_factory=lambda: ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    up_block_types: list[str] = field(default_factory=lambda: ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    layers_per_block: int = 2
    attention_head_dim: list[int] = field(default_factory=lambda: [5, 10, 20, 20])
    """diffusers' name for the number of heads per level (SD 2.x: 64 channels per head)."""
    cross_attention_dim: int = 1024
    """Width of the one conditioning token (the CLIP image embedding)."""
    norm_num_groups: int = 32
    use_linear_projection: bool = True
    multiview_attention: bool = True
    """False: every view attends only to itself (an ordinary per-image UNet)."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: the sd21 preset's 24 objects x 4 views per GPU peak at
    22.7 GB with it on an H100 (bench/results/gpu-nvidia-h100-80gb-hbm3.json). Off for tiny (CPU speed)."""

    @staticmethod
    def sd21() -> "UNetConfig":
        return UNetConfig()

    @staticmethod
    def tiny() -> "UNetConfig":
        """Pixel space, 32 px, attention only at 16x16 (multi-view attention at 32x32 costs 8x on CPU)."""
        return UNetConfig(sample_size=32, in_channels=3, out_channels=3, block_out_channels=[32, 64],
                          down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                          up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=1,
                          attention_head_dim=[2, 4], cross_attention_dim=64, norm_num_groups=8,
                          gradient_checkpointing=False)

    @staticmethod
    def small() -> "UNetConfig":
        """The tiny layout on 16x16x4 VAE latents, with sd21's gradient checkpointing."""
        return UNetConfig(**{**UNetConfig.tiny().__dict__, "sample_size": 16, "in_channels": 4, "out_channels": 4,
                             "gradient_checkpointing": True})


class MultiViewAttnProcessor:
    """Self-attention over the tokens of all `num_views` views of each object (set before forward)."""

    def __init__(self):
        self.num_views = 1
        self.inner = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        v = self.num_views
        if v == 1 or hidden_states.ndim != 3:
            return self.inner(attn, hidden_states, None, attention_mask, temb)
        bv, n, c = hidden_states.shape
        if bv % v:
            raise ValueError(f"batch of {bv} images is not a multiple of num_views={v}")
        joint = hidden_states.reshape(bv // v, v * n, c)
        out = self.inner(attn, joint, None, attention_mask, temb)
        return out.reshape(bv, n, c)


def build_unet(cfg: UNetConfig) -> UNet2DConditionModel:
    unet = UNet2DConditionModel(
        sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.block_out_channels), down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types), layers_per_block=cfg.layers_per_block,
        attention_head_dim=tuple(cfg.attention_head_dim), cross_attention_dim=cfg.cross_attention_dim,
        norm_num_groups=cfg.norm_num_groups, use_linear_projection=cfg.use_linear_projection,
        class_embed_type="projection", projection_class_embeddings_input_dim=CAMERA_DIM)
    if cfg.multiview_attention:
        # set_attn_processor empties the dict it is given: build a fresh one.
        unet.set_attn_processor({name: MultiViewAttnProcessor() if name.endswith("attn1.processor") else AttnProcessor2_0()
                                 for name in unet.attn_processors})
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def multiview_forward(unet: UNet2DConditionModel, x: torch.Tensor, timesteps: torch.Tensor, cameras: torch.Tensor,
                      context: torch.Tensor, num_views: int) -> torch.Tensor:
    """x [B*V, C, H, W], timesteps [B*V], cameras [B*V, 16], context [B*V, 1, D] -> noise prediction."""
    for proc in unet.attn_processors.values():
        if isinstance(proc, MultiViewAttnProcessor):
            proc.num_views = num_views
    return unet(x, timesteps, encoder_hidden_states=context, class_labels=cameras).sample


def camera_features(c2w_gl: torch.Tensor) -> torch.Tensor:
    """[N, 4, 4] camera-to-world (Blender/OpenGL convention) -> [N, 16], translation scaled to unit
    length, as MVDream's camera embedding expects."""
    c = c2w_gl.clone()
    c[:, :3, 3] = F.normalize(c[:, :3, 3], dim=-1)
    return c.reshape(-1, 16)
