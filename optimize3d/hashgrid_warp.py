"""The multiresolution hash encoding as fused NVIDIA Warp kernels: one source, compiled for the CPU and CUDA.

    grid = FusedHashGrid(FieldConfig.sd21())   # TorchHashGrid's parameter, layout and values
    h = grid(x01)                              # [N, 3] in [0, 1] -> [N, levels * features]
    h, dh_dx = grid.with_jacobian(x01)         # and d h / d x01 [N, levels * features, 3]

One thread per (point, level) gathers the level's 8 corners, interpolates them trilinearly and, when
asked, the derivatives of the weights (the Jacobian that the closed-form analytic normals need). The
backward kernel recomputes the corners and scatters the gradients of both outputs into the table; it is
written out rather than left to Warp's automatic adjoint, so it takes exactly the derivative the torch
reference takes. Positions get no gradient (the field's points come from fixed cameras); a caller that
needs one gets an error naming hash_implementation=torch, which gives it.

Why Warp and not Triton: Warp compiles the kernel to native code for the CPU too, so the fused path also
speeds up CPU runs, where Triton only has an interpreter meant for tests. The hash is Instant-NGP's in
uint32 arithmetic: for a power-of-two table its low bits equal the torch reference's int64 products,
XOR and modulo, so both implementations index the same rows. Warp runs a CPU launch on one thread and
its CPU atomics are plain adds, so on the CPU the levels are split among torch's intra-op threads (each
level's rows belong to one thread: no two threads add into the same row).
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import warp as wp

from optimize3d.field import PRIMES, FieldConfig, TorchHashGrid

PRIME_Y = wp.constant(wp.uint32(PRIMES[1]))
PRIME_Z = wp.constant(wp.uint32(PRIMES[2]))


@functools.cache
def init_warp() -> None:
    """wp.init(), once, without its banner, and without the one-line 'could not load the CUDA driver'
    warning that the native library prints on every machine without a GPU (torch's view decides)."""
    wp.config.log_level = wp.LOG_WARNING              # no banner, no "Module ... load" lines
    if torch.cuda.is_available():
        wp.init()
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            wp.init()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@wp.func
def corner_row(ix: int, iy: int, iz: int, res: int, dense: int, mask: wp.uint32) -> int:
    """Table row of a corner: the dense (res + 1)^3 layout of small levels, the spatial hash otherwise."""
    if dense != 0:
        return (ix * (res + 1) + iy) * (res + 1) + iz
    h = wp.uint32(ix) ^ (wp.uint32(iy) * PRIME_Y) ^ (wp.uint32(iz) * PRIME_Z)
    return int(h & mask)


@wp.func
def corner_weight(frac: wp.vec3, c: int):
    """Trilinear weight of corner c (offsets x, y, z = bits 2, 1, 0 of c) and its derivative by frac."""
    bx = float((c >> 2) & 1)
    by = float((c >> 1) & 1)
    bz = float(c & 1)
    tx = bx * frac[0] + (1.0 - bx) * (1.0 - frac[0])
    ty = by * frac[1] + (1.0 - by) * (1.0 - frac[1])
    tz = bz * frac[2] + (1.0 - bz) * (1.0 - frac[2])
    return tx * ty * tz, wp.vec3((2.0 * bx - 1.0) * ty * tz, (2.0 * by - 1.0) * tx * tz, (2.0 * bz - 1.0) * tx * ty)


@wp.func
def corner(base: wp.vec3i, frac: wp.vec3, c: int, res: int, dense: int, mask: wp.uint32):
    """Corner c of the cell at `base`: its table row, trilinear weight and the weight's derivative."""
    row = corner_row(base[0] + ((c >> 2) & 1), base[1] + ((c >> 1) & 1), base[2] + (c & 1), res, dense, mask)
    w, dw = corner_weight(frac, c)
    return row, w, dw


@wp.func
def cell(x: wp.array2d(dtype=float), i: int, j: int, levels: wp.array(dtype=int), resolutions: wp.array(dtype=int)):
    """Point i clamped to [0, 1]^3, at the thread's j-th level -> that level, its resolution, the lower
    corner of the point's cell, its place in the cell, and the clamp's derivative (1 inside the box, 0 outside)."""
    level = levels[j]
    res = resolutions[level]
    base = wp.vec3i(0, 0, 0)
    frac = wp.vec3(0.0, 0.0, 0.0)
    inside = wp.vec3(0.0, 0.0, 0.0)
    for k in range(3):
        v = x[i, k]
        if v > 0.0 and v < 1.0:
            inside[k] = 1.0
        p = wp.clamp(v, 0.0, 1.0) * float(res)
        b = wp.min(int(wp.floor(p)), res - 1)
        base[k] = b
        frac[k] = p - float(b)
    return level, res, base, frac, inside


@functools.cache
def kernels(features: int, with_jacobian: bool):
    """The forward and backward kernels for `features` per level, with or without the Jacobian (both
    compile-time constants: the per-point sums stay in registers, and a value-only kernel does none of
    the Jacobian's arithmetic; measured 35% faster for the forward)."""
    Features = wp.types.vector(length=features, dtype=float)
    FeatureJacobian = wp.types.matrix(shape=(features, 3), dtype=float)

    @wp.kernel(module="unique", enable_backward=False)
    def forward(x: wp.array2d(dtype=float), table: wp.array3d(dtype=float), resolutions: wp.array(dtype=int),
                dense: wp.array(dtype=int), levels: wp.array(dtype=int), mask: wp.uint32,
                out: wp.array2d(dtype=float), jacobian: wp.array3d(dtype=float)):
        i, j = wp.tid()
        level, res, base, frac, inside = cell(x, i, j, levels, resolutions)
        value = Features()
        d_value = FeatureJacobian()
        for c in range(8):
            row, w, dw = corner(base, frac, c, res, dense[level], mask)
            for f in range(wp.static(features)):
                e = table[level, row, f]
                value[f] += w * e
                if wp.static(with_jacobian):
                    for k in range(3):
                        d_value[f, k] += dw[k] * e
        for f in range(wp.static(features)):
            out[i, level * features + f] = value[f]
            if wp.static(with_jacobian):
                for k in range(3):
                    jacobian[i, level * features + f, k] = d_value[f, k] * inside[k] * float(res)

    @wp.kernel(module="unique", enable_backward=False)
    def backward(x: wp.array2d(dtype=float), resolutions: wp.array(dtype=int), dense: wp.array(dtype=int),
                 levels: wp.array(dtype=int), mask: wp.uint32, grad_out: wp.array2d(dtype=float),
                 grad_jacobian: wp.array3d(dtype=float), grad_table: wp.array3d(dtype=float)):
        i, j = wp.tid()
        level, res, base, frac, inside = cell(x, i, j, levels, resolutions)
        g = Features()
        g_d = FeatureJacobian()
        for f in range(wp.static(features)):
            g[f] = grad_out[i, level * features + f]
            if wp.static(with_jacobian):
                for k in range(3):
                    g_d[f, k] = grad_jacobian[i, level * features + f, k] * inside[k] * float(res)
        for c in range(8):
            row, w, dw = corner(base, frac, c, res, dense[level], mask)
            for f in range(wp.static(features)):
                if wp.static(with_jacobian):
                    wp.atomic_add(grad_table, level, row, f, w * g[f] + dw[0] * g_d[f, 0] + dw[1] * g_d[f, 1] + dw[2] * g_d[f, 2])
                else:
                    wp.atomic_add(grad_table, level, row, f, w * g[f])

    return forward, backward


@functools.cache
def cpu_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="hashgrid")


class _Encode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x01, table, grid, with_jacobian):
        n, levels, features = x01.shape[0], table.shape[0], table.shape[2]
        out = torch.empty(n, levels * features, device=x01.device, dtype=torch.float32)
        jacobian = torch.empty((n, levels * features, 3) if with_jacobian else (1, 1, 3), device=x01.device,
                               dtype=torch.float32)
        grid.launch(kernels(features, with_jacobian)[0], n, [x01, table.detach(), grid.level_resolution, grid.level_dense],
                    [grid.mask, out, jacobian])
        ctx.save_for_backward(x01)
        ctx.grid, ctx.with_jacobian, ctx.table_shape = grid, with_jacobian, table.shape
        if not with_jacobian:
            ctx.mark_non_differentiable(jacobian)
        return out, jacobian

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_jacobian):
        (x01,) = ctx.saved_tensors
        levels, _, features = ctx.table_shape
        grad_table = torch.empty(ctx.table_shape, device=x01.device, dtype=torch.float32)   # zeroed by launch
        if grad_out is None:
            grad_out = torch.zeros(x01.shape[0], levels * features, device=x01.device)
        use_jacobian = ctx.with_jacobian and grad_jacobian is not None
        if not use_jacobian:
            grad_jacobian = torch.zeros(1, 1, 3, device=x01.device)
        ctx.grid.launch(kernels(features, use_jacobian)[1], x01.shape[0], [x01, ctx.grid.level_resolution, ctx.grid.level_dense],
                        [ctx.grid.mask, grad_out.float().contiguous(), grad_jacobian.float().contiguous(), grad_table],
                        zero_first=grad_table)
        return None, grad_table, None, None


class FusedHashGrid(TorchHashGrid):
    """TorchHashGrid's parameter and values (checkpoints move between the two), computed by Warp."""

    def __init__(self, cfg: FieldConfig):
        super().__init__(cfg)
        init_warp()
        self.mask = wp.uint32(self.table - 1)                  # log2_table_size: always a power of two
        self.register_buffer("level_resolution", torch.tensor(self.resolutions, dtype=torch.int32), persistent=False)
        self.register_buffer("level_dense", torch.tensor([int((r + 1) ** 3 <= self.table) for r in self.resolutions],
                                                         dtype=torch.int32), persistent=False)

    def launch(self, kernel, n: int, level_inputs: list, rest: list, zero_first=None) -> None:
        """Run `kernel` over n points x all levels on the inputs' device: on CUDA one launch on torch's
        current stream; on the CPU the levels dealt round-robin to torch.get_num_threads() threads.
        zero_first: a [levels, ...] tensor zeroed before the kernel runs; on the CPU each thread zeroes its
        own levels, so the rows it then adds into are already in its core's cache (zeroed by torch's own
        threads instead, the backward took 6.2 ms rather than 3.9 for 30k points on 2 cores). The helper
        threads call no torch op: one would give each of them an OpenMP team of its own, and every torch op
        of the process after it ran 40% slower on 2 cores (measured on the tiny UNet's guidance step)."""
        device = level_inputs[0].device
        if zero_first is not None and (n == 0 or device.type == "cuda"):
            zero_first.zero_()
            zero_first = None
        if n == 0:
            return
        wp_device = wp.device_from_torch(device)
        args = [wp.from_torch(t) if isinstance(t, torch.Tensor) else t for t in level_inputs]
        tail = [wp.from_torch(t) if isinstance(t, torch.Tensor) else t for t in rest]
        levels = len(self.resolutions)
        if device.type == "cuda":
            ids = wp.from_torch(torch.arange(levels, dtype=torch.int32, device=device))
            wp.launch(kernel, dim=(n, levels), inputs=[*args, ids, *tail], device=wp_device,
                      stream=wp.stream_from_torch(device))
            return
        threads = max(1, min(torch.get_num_threads(), levels))
        shares = [torch.arange(t, levels, threads, dtype=torch.int32) for t in range(threads)]

        def run(ids):
            if zero_first is not None:
                for level in ids.tolist():
                    zero_first[level].numpy().fill(0)   # numpy, not torch (see above)
            wp.launch(kernel, dim=(n, ids.numel()), inputs=[*args, wp.from_torch(ids), *tail], device=wp_device)
        others = [cpu_pool(threads - 1).submit(run, ids) for ids in shares[1:]]   # ctypes releases the GIL
        run(shares[0])                                                               # this thread takes one share
        for other in others:
            other.result()

    def _encode(self, x01: torch.Tensor, with_jacobian: bool):
        if x01.requires_grad:
            raise ValueError("hash_implementation=fused gives no gradient with respect to positions; "
                             "use hash_implementation=torch")
        if self.embeddings.dtype != torch.float32:
            raise ValueError(f"hash_implementation=fused computes in float32, the table is {self.embeddings.dtype}; "
                             "use hash_implementation=torch")
        return _Encode.apply(x01.float().contiguous(), self.embeddings, self, with_jacobian)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self._encode(x01, False)[0]

    def with_jacobian(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._encode(x01, True)
