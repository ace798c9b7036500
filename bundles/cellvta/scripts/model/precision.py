"""Inference precision: which floating type a device runs the network in, and the conversion to it.

On CPU the network is converted once (no per-call weight casts, as autocast would do): the weights of every
linear and convolution layer are stored in the low precision (convolutions channels-last) and cast their input
to it, while what carries or rescales a residual stream stays float32: normalisation layers, LayerScale and the
adapter's injection scales (``gamma``), the position embedding, class/register tokens and the adapter's level
embedding. A residual sum of a float32 stream and a low-precision branch is float32, so the ViT's token stream,
the adapter's pyramid stream and their normalisations accumulate in float32, as under autocast.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

NORMALISATIONS = (nn.LayerNorm, nn.GroupNorm, _BatchNorm)
STREAM_PARAMETERS = ("gamma", "pos_embed", "cls_token", "reg_token", "level_embed")
"""Names of the parameters added to, or scaling, a residual stream: kept float32."""


def default_precision(device: torch.device) -> torch.dtype:
    """bfloat16 on CPUs with native bf16 instructions (AVX512-BF16/AMX) and on CUDA with bf16, else float16 on
    CUDA and float32 on other CPUs."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _cast_to_weight_dtype(module: nn.Module, args: Sequence[object]) -> tuple[object, ...]:
    """Forward pre-hook of a low-precision linear or convolution: floating inputs in the weight's dtype."""
    dtype = module.weight.dtype
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def convert_to_low_precision(model: nn.Module, dtype: torch.dtype) -> None:
    """Store ``model``'s linear and convolution layers in ``dtype`` (in place), residual streams in float32.

    Every ``nn.Linear`` and convolution gets its weights (and bias) in ``dtype``, convolution weights
    channels-last, and a forward pre-hook casting its input to ``dtype``; every other parameter or buffer is
    in ``dtype`` too except normalisation layers and :data:`STREAM_PARAMETERS`, which stay float32. Parameter
    names and shapes (the state dict's keys) are unchanged.
    """
    for module in model.modules():
        normalisation = isinstance(module, NORMALISATIONS)
        for name, param in module.named_parameters(recurse=False):
            if not (normalisation or name in STREAM_PARAMETERS):
                param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and not normalisation:
                setattr(module, name, buffer.to(dtype))
        if isinstance(module, (nn.Linear, _ConvNd)):
            if isinstance(module, _ConvNd) and module.weight.dim() == 4:
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
            module.register_forward_pre_hook(_cast_to_weight_dtype)


def prepare_for_inference(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> torch.dtype:
    """Move ``model`` (in place) to ``device`` in eval mode, in ``dtype`` (default ``default_precision``).

    On CPU a low ``dtype`` converts the model once (:func:`convert_to_low_precision`); on CUDA the weights stay
    float32 and the caller runs the forward under ``torch.autocast`` at the returned dtype.

    Returns:
        The dtype inputs should be given in (CPU) or the autocast dtype (CUDA).
    """
    default = default_precision(device)
    dtype = dtype or default
    model.eval().to(device)
    if device.type == "cpu" and dtype != torch.float32:
        if default == torch.float32:
            warnings.warn(f"{dtype} inference on a CPU without native bf16 instructions (AVX512-BF16, AMX): the CPU "
                          "emulates it, several times slower than float32 (the default here)", stacklevel=2)
        convert_to_low_precision(model, dtype)
    return dtype
