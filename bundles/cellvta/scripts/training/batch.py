"""Batches for MONAI's trainer and evaluator: the image as network input, the targets as a dict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines import PrepareBatch

TARGET_KEYS = ("nuclei_binary_map", "hv_map", "nuclei_type_map", "tissue_types", "inst_map")


class PrepareBatchDict(PrepareBatch):
    """Split a collated batch into the network input and a dict of targets.

    Args:
        image_key: key of the (B, 3, H, W) float image.
        target_keys: keys copied into the target dict when present in the batch (``inst_map`` (B, 1, H, W),
            ``nuclei_binary_map`` (B, 1, H, W), ``hv_map`` (B, 2, H, W), ``nuclei_type_map`` (B, 1, H, W),
            ``tissue_types`` (B,)).
    """

    def __init__(self, image_key: str = "image", target_keys: Sequence[str] = TARGET_KEYS) -> None:
        self.image_key = image_key
        self.target_keys = tuple(target_keys)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.image_key not in batchdata:
            raise KeyError(f"batch has no '{self.image_key}' (keys: {sorted(map(str, batchdata))})")
        image = torch.as_tensor(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        targets = {
            k: torch.as_tensor(batchdata[k]).to(device=device, non_blocking=non_blocking, **kwargs)
            for k in self.target_keys
            if k in batchdata
        }
        return image, targets
