"""What turns a batch of slide tiles into the maps post-processing needs.

:class:`NetworkPredictor` runs CellVTA / CellViT (bfloat16 weights on capable CPUs, autocast on CUDA). A
predictor takes ``(B, T, T, 3)`` uint8 RGB tiles and their top-left ``(x, y)`` in analysed-image pixels and
returns :class:`PredictedMaps`; the whole-slide pipeline accepts any callable of that shape (the tests use a
ground-truth oracle).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..model.precision import prepare_for_inference
from .tile_cells import PredictedMaps

__all__ = ["NetworkPredictor", "PredictedMaps"]


class NetworkPredictor:
    """CellVTA or CellViT on tiles.

    Args:
        network: the network, weights loaded; it is moved to ``device`` and put in eval mode.
        device: where to run.
        num_classes: classes of the type branch, background included.
        embeddings: also return the network's 1/16 bottleneck map (``features``) for per-nucleus embeddings.
        dtype: inference precision (default: :func:`.inference.default_precision`).
    """

    def __init__(self, network: nn.Module, device: torch.device | str, num_classes: int,
                 embeddings: bool = False, dtype: torch.dtype | None = None) -> None:
        self.device = torch.device(device)
        self.network = network
        self.dtype = prepare_for_inference(network, self.device, dtype)
        self.num_classes = num_classes
        self.embeddings = embeddings
        self._mean = torch.as_tensor(network.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self._std = torch.as_tensor(network.std, dtype=torch.float32).view(1, 3, 1, 1) * 255

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray, origins: np.ndarray) -> PredictedMaps:
        x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float()
        x = ((x - self._mean) / self._std).to(self.device)
        if self.device.type == "cpu":
            x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
            out = self.network(x, return_features=self.embeddings)
        else:
            with torch.autocast(self.device.type, dtype=self.dtype):
                out = self.network(x, return_features=self.embeddings)
        nuclei = torch.softmax(out["nuclei_binary_map"].float(), dim=1)[:, 1]
        types = out["nuclei_type_map"].float().argmax(dim=1).to(torch.uint8)
        features = out["features"].float().cpu().numpy() if self.embeddings else None
        return PredictedMaps(nuclei.cpu().numpy(), out["hv_map"].float().cpu().numpy(), types.cpu().numpy(), features)

