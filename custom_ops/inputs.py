"""Random MSDA inputs that exercise the awkward cases: unequal levels, outside locations, pixel borders."""

from __future__ import annotations

import torch


def random_inputs(
    batch: int,
    heads: int,
    points: int,
    levels: list[tuple[int, int]],
    queries: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    channels: int = 8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of ``ms_deform_attn`` on the CPU, drawn from their own generator (the global RNG is untouched).

    A quarter of the locations lie exactly on pixel borders ``k / W``, ``k / H`` (0 and 1 included)
    and about a third of the rest fall outside ``[0, 1]``; attention weights sum to 1 per head.

    Args:
        batch, heads, points, queries: ``N``, ``M``, ``P``, ``Lq``.
        levels: ``(H, W)`` of each level.
        dtype: floating dtype of value, locations and weights.
        seed: generator seed.
        channels: ``D`` per head.

    Returns:
        ``value (N, S, M, D), spatial_shapes (L, 2) int64, level_start_index (L,) int64,
        sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P)``.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.int64)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(batch, int(sizes.sum()), heads, channels, generator=g, dtype=dtype)
    loc = torch.rand(batch, queries, heads, len(levels), points, 2, generator=g, dtype=dtype) * 1.6 - 0.3
    border = torch.rand(loc.shape[:-1], generator=g) < 0.25
    for level, (h, w) in enumerate(levels):
        kx = torch.randint(0, w + 1, loc.shape[:3] + (points,), generator=g).to(dtype) / w
        ky = torch.randint(0, h + 1, loc.shape[:3] + (points,), generator=g).to(dtype) / h
        sel = border[:, :, :, level]
        loc[:, :, :, level, :, 0] = torch.where(sel, kx, loc[:, :, :, level, :, 0])
        loc[:, :, :, level, :, 1] = torch.where(sel, ky, loc[:, :, :, level, :, 1])
    weights = torch.rand(batch, queries, heads, len(levels), points, generator=g, dtype=dtype)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return value, shapes, starts, loc, weights


def outputs_and_gradients(fn, inputs: tuple[torch.Tensor, ...], seed: int = 1) -> list[torch.Tensor]:
    """``[output, grad value, grad locations, grad weights]`` of ``fn(*inputs)`` for a random output gradient.

    The output gradient is drawn on the CPU from ``seed`` and moved to the output's device, so two
    implementations given the same inputs receive the same gradient.
    """
    value, shapes, starts, loc, weights = (t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs)
    out = fn(value, shapes, starts, loc, weights)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
    out.backward(grad)
    return [out.detach(), value.grad, loc.grad, weights.grad]
