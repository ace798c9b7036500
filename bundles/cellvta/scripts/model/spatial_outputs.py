"""The network restricted to its per-pixel outputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class SpatialOutputs(nn.Module):
    """The network restricted to its per-pixel outputs, for sliding-window inference over large images.

    Args:
        network: a module returning a dict of ``(B, C, H, W)`` maps and ``(B, T)`` image-level logits.
        keys: the per-pixel outputs kept.
        tissue_key: when given and the network has a tissue head (``tissue_types`` logits), the outputs also hold
            under this key the head's softmax as a ``(B, T, H, W)`` map, constant over the input, so that a sliding
            window blends the windows' tissue probabilities like any map.
        features: called as ``features(H, W)`` after each forward on a ``(B, 3, H, W)`` input, it returns a
            ``(B, D, H / s, W / s)`` map added to the outputs under ``features_key`` (the cell classifier's
            embedding source, ``scripts.cells.embeddings.FeatureSource``, hooked on ``network``); None: none.
        features_key: the key of that map (a coarser map is stitched by
            ``scripts.inference.windows.AlignedSlidingWindowInferer``).
    """

    def __init__(self, network: nn.Module, keys: Sequence[str] = ("nuclei_binary_map", "hv_map", "nuclei_type_map"),
                 tissue_key: str | None = None,
                 features: Callable[[int, int], torch.Tensor] | None = None,
                 features_key: str = "source_features") -> None:
        super().__init__()
        self.network = network
        self.keys = tuple(keys) + ((tissue_key,) if tissue_key else ())
        self.tissue_key = tissue_key
        self.features = features
        self.features_key = features_key

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.network(x)
        if self.tissue_key is not None and "tissue_types" in out:
            probabilities = torch.softmax(out["tissue_types"].float(), dim=1)[:, :, None, None]
            out = {**out, self.tissue_key: probabilities.expand(-1, -1, *x.shape[-2:]).contiguous()}
        maps = {k: out[k] for k in self.keys if k in out}
        if self.features is not None:
            maps[self.features_key] = self.features(*x.shape[-2:])
        return maps
