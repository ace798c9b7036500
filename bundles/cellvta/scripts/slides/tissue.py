"""Tissue detection on a slide thumbnail: Otsu's threshold on the HSV saturation, so glass is skipped."""

from __future__ import annotations

import cv2
import numpy as np
from skimage.filters import threshold_otsu

__all__ = ["tissue_mask"]


def tissue_mask(thumbnail: np.ndarray, min_saturation: int = 20, closing: int = 5) -> np.ndarray:
    """Tissue pixels of an RGB thumbnail.

    A pixel is tissue when its saturation exceeds Otsu's threshold of the thumbnail's saturations and
    ``min_saturation`` (so a slide of bare glass, whose saturations are all low, has no tissue). Small gaps are
    closed with a ``closing`` x ``closing`` square.

    Args:
        thumbnail: (H, W, 3) uint8 RGB.
        min_saturation: lowest saturation (0-255) that can be tissue.
        closing: size of the morphological closing, in thumbnail pixels (0: none).

    Returns:
        (H, W) bool.
    """
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3 or thumbnail.dtype != np.uint8:
        raise ValueError(f"thumbnail must be (H, W, 3) uint8 RGB, got {thumbnail.shape} {thumbnail.dtype}")
    saturation = cv2.cvtColor(thumbnail, cv2.COLOR_RGB2HSV)[..., 1]
    threshold = min_saturation
    if saturation.max() > saturation.min():
        threshold = max(threshold, int(threshold_otsu(saturation)))
    mask = (saturation > threshold).astype(np.uint8)
    if closing > 1:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((closing, closing), np.uint8))
    return mask.astype(bool)
