"""The radiance field optimised by score distillation: multiresolution hash grid + two small MLPs.

    field = Field(FieldConfig.tiny())
    sigma, albedo = field(points)              # points [N, 3] in the box [-radius, radius]^3
    sigma, albedo, normals = field.with_normals(points)   # unit normals pointing outwards (normal_type)

Density = softplus(raw + blob), blob = blob_density * (1 - |x| / blob_radius): a soft ball at the start
(threestudio's "blob_magic3d" for MVDream). Albedo = sigmoid of the feature MLP's output.

The hash grid has three implementations (nerfstudio's pattern), imported only when used: "fused" (the
NVIDIA Warp kernels of optimize3d/hashgrid_warp.py, CPU and CUDA, equal to "torch" to float rounding and
5-6x faster on a CPU, bench/generate.py), "torch" (pure torch, the reference and fallback) and "tcnn"
(tiny-cuda-nn, when installed). "auto" is "fused" when warp-lang imports, otherwise "torch".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Spatial hash primes of Instant-NGP (the first is 1 so that x maps to itself).
PRIMES = (1, 2654435761, 805459861)


@dataclass
class FieldConfig:
    radius: float = 1.0
    """Half the side of the box the field lives in."""
    levels: int = 16
    features_per_level: int = 2
    log2_table_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 1.4473
    hidden: int = 64
    """Width of the one hidden layer of the density and albedo MLPs."""
    blob_density: float = 10.0
    blob_radius: float = 0.5
    normal_type: str = "analytic"
    """analytic (the released: -grad of the density by autograd, trained through its second derivative) |
    finite_difference (forward differences: 3 more density lookups, first derivatives only)."""
    normal_eps: float = 0.01
    """Finite-difference step of the normals (world units)."""
    hash_implementation: str = "auto"
    """auto | fused | torch | tcnn: auto is fused (Warp) when warp-lang is installed, otherwise torch."""

    @staticmethod
    def sd21() -> "FieldConfig":
        return FieldConfig()

    @staticmethod
    def tiny() -> "FieldConfig":
        # analytic normals, as released: with the fused grid they cost less than finite differences
        # (bench/results/generate-cpu-2core.json: 0.136 against 0.183 s per step on 2 cores)
        return FieldConfig(levels=6, log2_table_size=17, base_resolution=8, per_level_scale=1.45, hidden=32,
                           normal_eps=0.02)


class TorchHashGrid(torch.nn.Module):
    """Instant-NGP's multiresolution hash encoding in plain torch. A level whose (res + 1)^3 grid fits
    the table is stored densely and interpolated by `grid_sample` (trilinear, fast on CPU); larger
    levels gather their 8 corners through the spatial hash and interpolate by hand."""

    def __init__(self, cfg: FieldConfig):
        super().__init__()
        self.table = 2 ** cfg.log2_table_size
        self.features = cfg.features_per_level
        self.resolutions = [math.floor(cfg.base_resolution * cfg.per_level_scale ** level) for level in range(cfg.levels)]
        self.embeddings = torch.nn.Parameter(torch.empty(cfg.levels, self.table, cfg.features_per_level).uniform_(-1e-4, 1e-4))
        self.output_dim = cfg.levels * cfg.features_per_level
        corners = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=torch.int64)
        self.register_buffer("corners", corners, persistent=False)
        self.register_buffer("primes", torch.tensor(PRIMES, dtype=torch.int64), persistent=False)

    def _dense(self, level: int, x01: torch.Tensor) -> torch.Tensor:
        n = self.resolutions[level] + 1
        volume = self.embeddings[level, :n ** 3].T.reshape(1, self.features, n, n, n)   # [1, F, x, y, z]
        grid = (x01 * 2 - 1).flip(-1).view(1, -1, 1, 1, 3)                                # grid_sample: (z, y, x)
        out = F.grid_sample(volume, grid.to(volume.dtype), mode="bilinear", align_corners=True)
        return out.view(self.features, -1).T

    def _hashed(self, level: int, x01: torch.Tensor) -> torch.Tensor:
        pos = x01 * self.resolutions[level]
        base = pos.floor().long().clamp(max=self.resolutions[level] - 1)
        frac = pos - base
        idx = base[:, None, :] + self.corners[None]                                       # [N, 8, 3]
        index = ((idx[..., 0] * self.primes[0]) ^ (idx[..., 1] * self.primes[1]) ^ (idx[..., 2] * self.primes[2])) % self.table
        w = torch.where(self.corners[None].bool(), frac[:, None, :], 1 - frac[:, None, :]).prod(-1)  # [N, 8]
        return (self.embeddings[level][index] * w[..., None].to(self.embeddings.dtype)).sum(1)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        """x01 [N, 3] in [0, 1] -> [N, levels * features]."""
        x01 = x01.clamp(0, 1)
        return torch.cat([self._dense(level, x01) if (res + 1) ** 3 <= self.table else self._hashed(level, x01)
                          for level, res in enumerate(self.resolutions)], -1)

    def with_jacobian(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x01 [N, 3] -> the encoding [N, levels * features] and its derivative with respect to x01
        [N, levels * features, 3], in closed form (the trilinear weights' derivatives): analytic normals
        without a second derivative through grid_sample. Every level gathers its 8 corners here (dense levels
        by their dense index), so values equal forward()'s to float rounding."""
        inside = ((x01 > 0) & (x01 < 1)).to(x01.dtype)                  # clamp's derivative
        x01 = x01.clamp(0, 1)
        values, jacobians = [], []
        for level, res in enumerate(self.resolutions):
            pos = x01 * res
            base = pos.floor().long().clamp(max=res - 1)
            frac = pos - base
            idx = base[:, None, :] + self.corners[None]                                   # [N, 8, 3]
            if (res + 1) ** 3 <= self.table:
                n = res + 1
                index = (idx[..., 0] * n + idx[..., 1]) * n + idx[..., 2]               # _dense's layout
            else:
                index = ((idx[..., 0] * self.primes[0]) ^ (idx[..., 1] * self.primes[1]) ^ (idx[..., 2] * self.primes[2])) % self.table
            corner = self.embeddings[level][index]                                         # [N, 8, F]
            bit = self.corners[None].bool()
            t = torch.where(bit, frac[:, None, :], 1 - frac[:, None, :]).to(corner.dtype)   # [N, 8, 3]
            sign = bit.to(corner.dtype) * 2 - 1
            dw = torch.stack([sign[..., j] * t[..., (j + 1) % 3] * t[..., (j + 2) % 3] for j in range(3)], -1)
            values.append((corner * t.prod(-1)[..., None]).sum(1))
            jacobians.append(torch.einsum("ncf,nck->nfk", corner, dw) * res)
        return torch.cat(values, -1), torch.cat(jacobians, 1) * inside[:, None, :]


class TcnnHashGrid(torch.nn.Module):
    def __init__(self, cfg: FieldConfig):
        super().__init__()
        try:
            import tinycudann as tcnn
        except ImportError as e:
            raise ImportError("hash_implementation=tcnn needs tiny-cuda-nn (pip install "
                              "git+https://github.com/NVlabs/tiny-cuda-nn#subdirectory=bindings/torch); "
                              "use hash_implementation=torch") from e
        self.encoding = tcnn.Encoding(3, {
            "otype": "HashGrid", "n_levels": cfg.levels, "n_features_per_level": cfg.features_per_level,
            "log2_hashmap_size": cfg.log2_table_size, "base_resolution": cfg.base_resolution,
            "per_level_scale": cfg.per_level_scale})
        self.output_dim = cfg.levels * cfg.features_per_level

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.encoding(x01.clamp(0, 1)).float()


def warp_available() -> bool:
    try:
        import warp  # noqa: F401  (only whether it is installed)
    except ImportError:
        return False
    return True


def build_hash_grid(cfg: FieldConfig) -> torch.nn.Module:
    impl = cfg.hash_implementation
    if impl == "auto":
        impl = "fused" if warp_available() else "torch"
    if impl == "torch":
        return TorchHashGrid(cfg)
    if impl == "fused":
        try:
            from optimize3d.hashgrid_warp import FusedHashGrid
        except ImportError as e:
            raise ImportError("hash_implementation=fused needs NVIDIA Warp (pip install warp-lang); "
                              "use hash_implementation=torch") from e
        return FusedHashGrid(cfg)
    if impl == "tcnn":
        return TcnnHashGrid(cfg)
    raise ValueError(f"hash_implementation {cfg.hash_implementation!r}: expected auto, fused, torch or tcnn")


def mlp(inputs: int, hidden: int, outputs: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, outputs))


class Field(torch.nn.Module):
    def __init__(self, cfg: FieldConfig):
        super().__init__()
        self.cfg = cfg
        self.encoding = build_hash_grid(cfg)
        self.density_net = mlp(self.encoding.output_dim, cfg.hidden, 1)
        self.albedo_net = mlp(self.encoding.output_dim, cfg.hidden, 3)

    def grid_parameters(self):
        return list(self.encoding.parameters())

    def mlp_parameters(self):
        return list(self.density_net.parameters()) + list(self.albedo_net.parameters())

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoding((x / self.cfg.radius + 1) / 2)

    def _blob(self, x: torch.Tensor) -> torch.Tensor:
        return self.cfg.blob_density * (1 - x.norm(dim=-1) / self.cfg.blob_radius)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3] -> [N] volume density."""
        return F.softplus(self.density_net(self._encode(x))[:, 0] + self._blob(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, 3] -> density [N], albedo [N, 3] in [0, 1]."""
        h = self._encode(x)
        sigma = F.softplus(self.density_net(h)[:, 0] + self._blob(x))
        return sigma, torch.sigmoid(self.albedo_net(h))

    def with_normals(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[N, 3] -> density [N], albedo [N, 3], unit normals [N, 3] pointing outwards, as normal_type says.
        analytic: -d(density)/dx by autograd; with grad enabled its graph is kept (create_graph), so a loss on
        the normals (orientation, shading) trains the field through the second derivative."""
        if self.cfg.normal_type == "finite_difference":
            sigma, albedo = self(x)
            return sigma, albedo, self.normals(x, sigma)
        if self.cfg.normal_type != "analytic":
            raise ValueError(f"normal_type {self.cfg.normal_type!r}: expected analytic or finite_difference")
        if hasattr(self.encoding, "with_jacobian"):
            return self._closed_form_normals(x)
        training = torch.is_grad_enabled()            # tiny-cuda-nn: autograd's double backward
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            sigma, albedo = self(x)
            (grad,) = torch.autograd.grad(sigma, x, torch.ones_like(sigma), create_graph=training)
        normals = F.normalize(-grad, dim=-1)
        if not training:
            return sigma.detach(), albedo.detach(), normals.detach()
        return sigma, albedo, normals

    def _closed_form_normals(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-d(density)/dx by the chain rule written out: softplus'(raw) (d raw/d enc . d enc/dx + d blob/dx),
        d raw/d enc = W2 diag(relu'(W1 enc + b1)) W1 of the one-hidden-layer density MLP. Only first
        derivatives of torch ops, so a loss on the normals trains the field by plain backward, and
        march.recompute bounds its memory."""
        h, jacobian = self.encoding.with_jacobian((x / self.cfg.radius + 1) / 2)
        first, _, last = self.density_net
        z = first(h)
        raw = last(torch.relu(z))[:, 0] + self._blob(x)
        d_raw_d_h = (last.weight[0] * (z > 0).to(z.dtype)) @ first.weight                   # [N, L*F]
        d_blob_dx = -self.cfg.blob_density / self.cfg.blob_radius * F.normalize(x, dim=-1)
        grad = torch.sigmoid(raw)[:, None] * (torch.einsum("nl,nlk->nk", d_raw_d_h, jacobian.to(h.dtype))
                                              / (2 * self.cfg.radius) + d_blob_dx)
        return F.softplus(raw), torch.sigmoid(self.albedo_net(h)), F.normalize(-grad, dim=-1)

    def normals(self, x: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """Unit normals [N, 3] = -grad(density) / |grad| by forward differences (3 more density lookups;
        `sigma`, the density at x when the caller has it, saves a fourth)."""
        eps = self.cfg.normal_eps
        if sigma is None:
            sigma = self.density(x)
        offsets = torch.eye(3, device=x.device, dtype=x.dtype) * eps
        d = self.density((x[:, None, :] + offsets[None]).reshape(-1, 3)).view(-1, 3)
        return F.normalize(-(d - sigma[:, None]) / eps, dim=-1)
