"""Pure-PyTorch multi-scale deformable attention: the ground truth and the fallback.

Bilinear sampling is ``F.grid_sample(mode="bilinear", padding_mode="zeros",
align_corners=False)`` with ``grid = 2 * loc - 1``: a location ``(x, y)`` in ``[0, 1]``
maps to the pixel coordinate ``(x * W - 0.5, y * H - 0.5)`` and neighbours outside the
level contribute zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention by ``grid_sample``.

    Args:
        value: ``(N, S, M, D)`` values of all levels, flattened row-major and concatenated.
        spatial_shapes: ``(L, 2)`` int64, ``(H_l, W_l)`` of each level.
        level_start_index: ``(L,)`` int64, offset of each level along ``S``
            (unused here: the levels are split by their sizes, as the kernels check).
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)`` locations.
        attention_weights: ``(N, Lq, M, L, P)`` weights (softmax over ``L * P`` upstream).

    Returns:
        ``(N, Lq, M * D)`` attended values.
    """
    del level_start_index
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_levels = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = value_levels[level].flatten(2).transpose(1, 2).reshape(n * m, d, int(h), int(w))
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N*M, D, Lq, L*P) weighted by (N*M, 1, Lq, L*P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
    out = (stacked * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()
