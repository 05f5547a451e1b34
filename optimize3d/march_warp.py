"""The torch marcher's occupancy test, pruning rule and compositing as NVIDIA Warp kernels (march.marcher=fused).

    keep = occupied_mask(grid.binaries, x, radius)                   # [N] bool, as march.occupied
    seen = visible_mask(sigma, dt, start, count, alpha_threshold, early_stop_eps)      # as march.visible
    values, opacity, depth, weights = composite(sigma, values, t, dt, start, count, alpha_threshold, early_stop_eps)

Samples are packed: each ray's `count` samples from `start`, front to back (what nonzero() of the torch
marcher's [rays, samples] mask gives). The torch marcher applies the released pruning rule (alpha under
alpha_threshold, or behind early_stop_eps of transmittance: dropped) with a first pass of densities
without gradients, then evaluates the rest and composites them in dense [rays, samples] tensors. The
fused marcher does the same with one thread per ray for the rule and for the compositing, so the dense
scatter, gathers and cumulative products go (march.first_pass). Without a first pass it evaluates every
candidate in an occupied cell once, with gradients, and the compositing kernel applies the rule itself:
it keeps the running transmittance of all samples (the rule's) and of the kept ones (the weights'), and
composites only the kept ones. The weights are nerfacc's (transmittance exp(-sum of sigma * dt in front),
alpha 1 - exp(-sigma * dt)), so both marchers give the same images and gradients (tested). A dropped
sample gets weight 0 and no gradient, as an unevaluated one.
"""
from __future__ import annotations

import functools

import torch
import warp as wp

from optimize3d.hashgrid_warp import init_warp


@wp.kernel(enable_backward=False)
def occupied_kernel(x: wp.array2d(dtype=float), binaries: wp.array(dtype=wp.uint8), res: int, radius: float,
                    out: wp.array(dtype=wp.uint8)):
    i = wp.tid()
    inside = int(1)
    lin = int(0)
    for k in range(3):
        c = int(wp.floor((x[i, k] / radius + 1.0) / 2.0 * float(res)))   # march.occupied's arithmetic, in its order
        if c < 0 or c >= res:
            inside = 0
        lin = lin * res + wp.clamp(c, 0, res - 1)
    out[i] = wp.uint8(inside * int(binaries[lin]))


@wp.kernel(enable_backward=False)
def visible_kernel(sigma: wp.array(dtype=float), dt: wp.array(dtype=float), start: wp.array(dtype=int),
                   count: wp.array(dtype=int), alpha_threshold: float, early_stop_eps: float,
                   out: wp.array(dtype=wp.uint8)):
    r = wp.tid()
    all_transmittance = float(1.0)
    for i in range(start[r], start[r] + count[r]):
        alpha = 1.0 - wp.exp(-sigma[i] * dt[r])
        out[i] = wp.uint8(int(alpha >= alpha_threshold and all_transmittance >= early_stop_eps))
        all_transmittance = all_transmittance * (1.0 - alpha)


@functools.cache
def composite_kernels(channels: int):
    Values = wp.types.vector(length=channels, dtype=float)

    @wp.kernel(module="unique", enable_backward=False)
    def forward(sigma: wp.array(dtype=float), values: wp.array2d(dtype=float), t: wp.array(dtype=float),
                dt: wp.array(dtype=float), start: wp.array(dtype=int), count: wp.array(dtype=int),
                alpha_threshold: float, early_stop_eps: float,
                out_values: wp.array2d(dtype=float), out_opacity: wp.array(dtype=float),
                out_depth: wp.array(dtype=float), weights: wp.array(dtype=float), kept: wp.array(dtype=wp.uint8)):
        r = wp.tid()
        step = dt[r]
        all_transmittance = float(1.0)    # over every sample (the rule's, march.visible's cumulative product)
        optical_depth = float(0.0)        # over the kept ones (the weights')
        acc = Values()
        opacity = float(0.0)
        depth = float(0.0)
        for i in range(start[r], start[r] + count[r]):
            alpha = 1.0 - wp.exp(-sigma[i] * step)
            keep = alpha >= alpha_threshold and all_transmittance >= early_stop_eps
            all_transmittance = all_transmittance * (1.0 - alpha)
            w = float(0.0)
            if keep:
                w = wp.exp(-optical_depth) * alpha
                optical_depth = optical_depth + sigma[i] * step
                for c in range(wp.static(channels)):
                    acc[c] += w * values[i, c]
                opacity += w
                depth += w * t[i]
            weights[i] = w
            kept[i] = wp.uint8(int(keep))
        for c in range(wp.static(channels)):
            out_values[r, c] = acc[c]
        out_opacity[r] = opacity
        out_depth[r] = depth

    @wp.kernel(module="unique", enable_backward=False)
    def backward(sigma: wp.array(dtype=float), values: wp.array2d(dtype=float), t: wp.array(dtype=float),
                 dt: wp.array(dtype=float), start: wp.array(dtype=int), count: wp.array(dtype=int),
                 weights: wp.array(dtype=float), kept: wp.array(dtype=wp.uint8),
                 grad_values: wp.array2d(dtype=float), grad_opacity: wp.array(dtype=float),
                 grad_depth: wp.array(dtype=float), grad_weights: wp.array(dtype=float),
                 grad_sigma: wp.array(dtype=float), grad_sample_values: wp.array2d(dtype=float)):
        # w_i = exp(-sum_{j<i} s_j dt) (1 - exp(-s_i dt)) over the kept samples, so with G_i = dL/dw_i:
        # dL/ds_k = dt (T_{k+1} G_k - sum_{i>k} G_i w_i), T_{k+1} = exp(-sum_{j<=k} s_j dt)
        r = wp.tid()
        step = dt[r]
        g = Values()
        for c in range(wp.static(channels)):
            g[c] = grad_values[r, c]
        total = float(0.0)
        for i in range(start[r], start[r] + count[r]):
            if kept[i] != wp.uint8(0):
                big_g = grad_weights[i] + grad_opacity[r] + grad_depth[r] * t[i]
                for c in range(wp.static(channels)):
                    big_g += g[c] * values[i, c]
                total += big_g * weights[i]
        optical_depth = float(0.0)
        prefix = float(0.0)
        for i in range(start[r], start[r] + count[r]):
            gs = float(0.0)
            w = weights[i]
            if kept[i] != wp.uint8(0):
                big_g = grad_weights[i] + grad_opacity[r] + grad_depth[r] * t[i]
                for c in range(wp.static(channels)):
                    big_g += g[c] * values[i, c]
                optical_depth = optical_depth + sigma[i] * step
                prefix += big_g * w
                gs = step * (wp.exp(-optical_depth) * big_g - (total - prefix))
            grad_sigma[i] = gs
            for c in range(wp.static(channels)):
                grad_sample_values[i, c] = w * g[c]

    return forward, backward


def _launch(kernel, n: int, inputs: list, device: torch.device) -> None:
    if n == 0:
        return
    args = [wp.from_torch(a.detach()) if isinstance(a, torch.Tensor) else a for a in inputs]
    stream = wp.stream_from_torch(device) if device.type == "cuda" else None
    wp.launch(kernel, dim=n, inputs=args, device=wp.device_from_torch(device), stream=stream)


def occupied_mask(binaries: torch.Tensor, x: torch.Tensor, radius: float) -> torch.Tensor:
    """march.occupied in one kernel: whether each point [N, 3] lies in an occupied cell of a one-level grid's
    binaries [1, res, res, res] (outside the box: False)."""
    init_warp()
    res = binaries.shape[-1]
    out = torch.empty(x.shape[0], dtype=torch.uint8, device=x.device)
    _launch(occupied_kernel, x.shape[0], [x.float().contiguous(), binaries.reshape(-1).to(torch.uint8),
                                          res, float(radius), out], x.device)
    return out.bool()


def visible_mask(sigma: torch.Tensor, dt: torch.Tensor, start: torch.Tensor, count: torch.Tensor,
                 alpha_threshold: float, early_stop_eps: float) -> torch.Tensor:
    """march.visible's rule on packed samples (densities [S] without gradients, each ray's step dt [R]) -> [S]
    bool: alpha at least alpha_threshold, and the transmittance of every sample in front at least early_stop_eps."""
    init_warp()
    out = torch.empty(sigma.shape[0], dtype=torch.uint8, device=sigma.device)
    _launch(visible_kernel, start.shape[0], [sigma.float().contiguous(), dt.float().contiguous(), start.int().contiguous(),
                                             count.int().contiguous(), float(alpha_threshold), float(early_stop_eps), out],
            sigma.device)
    return out.bool()


class _Composite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sigma, values, t, dt, start, count, alpha_threshold, early_stop_eps):
        n_rays, n, channels = start.shape[0], sigma.shape[0], values.shape[1]
        dev = sigma.device
        sigma32, values32 = sigma.detach().float().contiguous(), values.detach().float().contiguous()
        out_values = torch.empty(n_rays, channels, device=dev)
        out_opacity, out_depth = torch.empty(n_rays, device=dev), torch.empty(n_rays, device=dev)
        weights, kept = torch.empty(n, device=dev), torch.empty(n, dtype=torch.uint8, device=dev)
        _launch(composite_kernels(channels)[0], n_rays,
                [sigma32, values32, t, dt, start, count, float(alpha_threshold), float(early_stop_eps),
                 out_values, out_opacity, out_depth, weights, kept], dev)
        ctx.save_for_backward(sigma32, values32, t, dt, start, count, weights, kept)
        ctx.dtypes = sigma.dtype, values.dtype
        return out_values, out_opacity, out_depth, weights

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values, grad_opacity, grad_depth, grad_weights):
        sigma, values, t, dt, start, count, weights, kept = ctx.saved_tensors
        zeros = lambda like, g: g.float().contiguous() if g is not None else torch.zeros_like(like)  # noqa: E731
        n_rays, channels = start.shape[0], values.shape[1]
        grad_sigma, grad_sample_values = torch.empty_like(sigma), torch.empty_like(values)
        _launch(composite_kernels(channels)[1], n_rays,
                [sigma, values, t, dt, start, count, weights, kept,
                 zeros(torch.empty(n_rays, channels, device=sigma.device), grad_values),
                 zeros(torch.empty(n_rays, device=sigma.device), grad_opacity),
                 zeros(torch.empty(n_rays, device=sigma.device), grad_depth), zeros(weights, grad_weights),
                 grad_sigma, grad_sample_values], sigma.device)
        return (grad_sigma.to(ctx.dtypes[0]), grad_sample_values.to(ctx.dtypes[1]),
                None, None, None, None, None, None)


def composite(sigma: torch.Tensor, values: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, start: torch.Tensor,
              count: torch.Tensor, alpha_threshold: float, early_stop_eps: float):
    """Packed samples (each ray's `count` samples from `start`, front to back): densities [S], values [S, C],
    distances t [S]; the step of each ray dt [R] -> values [R, C], opacity [R], depth [R], weights [S]
    (0 where the rule drops a sample). Gradients flow to sigma and values."""
    init_warp()
    return _Composite.apply(sigma, values, t.float().contiguous(), dt.float().contiguous(),
                            start.int().contiguous(), count.int().contiguous(), alpha_threshold, early_stop_eps)
