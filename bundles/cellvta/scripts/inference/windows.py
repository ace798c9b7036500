"""MONAI's sliding window on a pixel grid, so that coarse outputs (a ViT's 1/16 token map) are stitched exactly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer

__all__ = ["AlignedSlidingWindowInferer"]


class AlignedSlidingWindowInferer(SlidingWindowInferer):
    """MONAI's ``SlidingWindowInferer`` whose windows all start on multiples of ``multiple`` pixels.

    MONAI stitches an output at ``1/s`` of the input's resolution by scaling each window's position by ``1/s``
    and truncating, which misplaces it unless the position is a multiple of ``s``; and it pads an image smaller
    than the window on both sides by half the difference. With ``multiple > 1`` the input is zero-padded at its
    bottom and right to a multiple of ``multiple`` and at least one window, and the windows' stride must be a
    multiple of ``multiple``: every window then starts on the grid. Outputs at the input's resolution are cropped
    back to it; coarser outputs keep the padded extent.

    ``multiple = 1`` is MONAI's inferer unchanged.

    Args:
        roi_size, sw_batch_size, overlap, mode: MONAI's (``roi_size`` positive, a multiple of ``multiple``).
        multiple: the grid (16 for a ViT's tokens).
        kwargs: MONAI's other arguments.

    Raises:
        ValueError: ``roi_size`` or the stride ``int(roi_size * (1 - overlap))`` is not a multiple of ``multiple``.
    """

    def __init__(self, roi_size: Sequence[int] | int, sw_batch_size: int = 1, overlap: Sequence[float] | float = 0.25,
                 mode: str = "constant", multiple: int = 1, **kwargs: Any) -> None:
        super().__init__(roi_size, sw_batch_size, overlap, mode, **kwargs)
        self.multiple = int(multiple)
        if self.multiple > 1:
            rois = [roi_size] * 2 if isinstance(roi_size, int) else list(roi_size)
            overlaps = [overlap] * len(rois) if isinstance(overlap, (int, float)) else list(overlap)
            for roi, o in zip(rois, overlaps):
                stride = int(roi * (1 - o))
                if roi <= 0 or roi % self.multiple or stride % self.multiple:
                    raise ValueError(f"windows of {roi} px overlapping by {o} move by {stride} px: outputs at "
                                     f"1/{self.multiple} need both multiples of {self.multiple} (e.g. overlap 0.25 "
                                     f"with 256 px windows)")
            self.rois = rois

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        """``(B, C, H, W)`` -> the network's outputs stitched (a tensor or a dict of them)."""
        if self.multiple == 1:
            return super().__call__(inputs, network, *args, **kwargs)
        size = tuple(inputs.shape[2:])
        padded = [max(roi, -(-s // self.multiple) * self.multiple) for s, roi in zip(size, self.rois)]
        x = F.pad(inputs, (0, padded[1] - size[1], 0, padded[0] - size[0]))

        def coarse_last(window: torch.Tensor, *a: Any, **k: Any) -> Any:
            """MONAI stitches a dict's outputs in sorted key order and resizes its window weights for a coarser
            output in place, so the outputs at the window's resolution must come first: keys prefixed 0 / 1."""
            out = network(window, *a, **k)
            if not isinstance(out, dict):
                return out
            return {f"{int(v.shape[2:] != window.shape[2:])}{key}": v for key, v in out.items()}

        out = super().__call__(x, coarse_last, *args, **kwargs)

        def crop(t: torch.Tensor) -> torch.Tensor:
            return t[..., :size[0], :size[1]] if tuple(t.shape[2:]) == tuple(padded) else t

        return {k[1:]: crop(v) for k, v in out.items()} if isinstance(out, dict) else crop(out)
