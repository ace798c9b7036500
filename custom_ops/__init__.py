"""Multi-scale deformable attention (MSDA) for CellVTA's adapter.

``ms_deform_attn`` is the one public function; ``MSDeformAttn`` the layer built on it.
"""

from __future__ import annotations

import torch

from .reference import ms_deform_attn_reference


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """``(N, S, M, D), (L, 2), (L,), (N, Lq, M, L, P, 2), (N, Lq, M, L, P) -> (N, Lq, M * D)``."""
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


from .module import MSDeformAttn  # noqa: E402  (the module needs ms_deform_attn defined)

__all__ = ["MSDeformAttn", "ms_deform_attn", "ms_deform_attn_reference"]
