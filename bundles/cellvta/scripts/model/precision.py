"""Inference precision: which floating type a device runs the network in, and the conversion to it."""

from __future__ import annotations

import torch
from torch import nn


def default_precision(device: torch.device) -> torch.dtype:
    """bfloat16 on CPUs with native bf16 instructions (AVX512-BF16/AMX) and on CUDA with bf16, else float16 on
    CUDA and float32 on other CPUs."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def prepare_for_inference(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> torch.dtype:
    """Move ``model`` (in place) to ``device`` in eval mode, in ``dtype`` (default ``default_precision``).

    On CPU the weights are converted to the low precision once and stored channels-last, which
    avoids autocast's per-call weight casts and layout copies; on CUDA the weights stay float32
    and the caller runs the forward under ``torch.autocast`` at the returned dtype.

    Returns:
        The dtype inputs should be given in (CPU) or the autocast dtype (CUDA).
    """
    dtype = dtype or default_precision(device)
    model.eval().to(device)
    if device.type == "cpu":
        model.to(dtype=dtype, memory_format=torch.channels_last)
    return dtype
