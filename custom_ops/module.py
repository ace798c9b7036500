"""``MSDeformAttn``: the multi-scale deformable attention layer (Deformable-DETR design)."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with a value/output width ``ratio * d_model``.

    Args:
        d_model: query and output width ``C``.
        n_levels: number of value levels ``L``.
        n_heads: attention heads ``M``.
        n_points: sampling points ``P`` per head and level.
        ratio: the value projection has ``ratio * d_model`` channels (CellVTA uses 0.5).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, ratio: float = 1.0):
        super().__init__()
        value_dim = int(d_model * ratio)
        if value_dim % n_heads:
            raise ValueError(f"value width {value_dim} (d_model * ratio) must be divisible by n_heads={n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, value_dim)
        self.output_proj = nn.Linear(value_dim, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR initialisation: offsets on a radial grid, uniform attention, Xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from queries to sampled values.

        Args:
            query: ``(N, Lq, C)``.
            reference_points: ``(N or 1, Lq, L or 1, 2)`` normalised ``(x, y)`` in ``[0, 1]``.
            input_flatten: ``(N, S, C)`` values of all levels, flattened and concatenated.
            input_spatial_shapes: ``(L, 2)`` int64 ``(H, W)`` per level.
            input_level_start_index: ``(L,)`` int64 start of each level in ``S``.
            input_padding_mask: optional ``(N, S)`` bool, True where the value is padding.

        Returns:
            ``(N, Lq, C)``.
        """
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, -1)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        normaliser = input_spatial_shapes.flip(-1).to(offsets.dtype)  # (L, 2) as (W, H)
        locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        out = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights)
        return self.output_proj(out)
