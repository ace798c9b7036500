"""The network restricted to its per-pixel outputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class SpatialOutputs(nn.Module):
    """The network restricted to its per-pixel outputs, for sliding-window inference over large images.

    Args:
        network: a module returning a dict of ``(B, C, H, W)`` maps and ``(B, T)`` image-level logits.
        keys: the per-pixel outputs kept.
    """

    def __init__(self, network: nn.Module, keys: Sequence[str] = ("nuclei_binary_map", "hv_map", "nuclei_type_map")) -> None:
        super().__init__()
        self.network = network
        self.keys = tuple(keys)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.network(x)
        return {k: out[k] for k in self.keys if k in out}
