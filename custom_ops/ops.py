"""``torch.library`` registration of ``cellvta::ms_deform_attn``: fake kernels and autograd.

The schema and the device kernels come from the compiled library (``build.load_library``);
this module adds what makes the op work under ``torch.compile`` (fake kernels) and autograd.
"""

from __future__ import annotations

import threading

import torch

_lock = threading.Lock()
_registered = False


def register() -> None:
    """Register the fake kernels and the autograd formula (idempotent; needs the library loaded)."""
    global _registered
    with _lock:
        if _registered:
            return
        torch.library.register_fake("cellvta::ms_deform_attn")(_forward_fake)
        torch.library.register_fake("cellvta::ms_deform_attn_backward")(_backward_fake)
        torch.library.register_autograd("cellvta::ms_deform_attn", _backward, setup_context=_setup_context)
        _registered = True


def _forward_fake(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """``(N, S, M, D), ..., (N, Lq, M, L, P, 2), (N, Lq, M, L, P) -> (N, Lq, M * D)``."""
    torch._check(value.dim() == 4, lambda: "ms_deform_attn: value must be (N, S, M, D)")
    torch._check(sampling_locations.dim() == 6, lambda: "ms_deform_attn: sampling_locations must be 6-D")
    torch._check(attention_weights.dim() == 5, lambda: "ms_deform_attn: attention_weights must be 5-D")
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


def _backward_fake(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients shaped like value, sampling_locations and attention_weights."""
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output: torch.Tensor) -> tuple:
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = torch.ops.cellvta.ms_deform_attn_backward(
        grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    needs = ctx.needs_input_grad
    return (
        grad_value if needs[0] else None,
        None,
        None,
        grad_locations if needs[3] else None,
        grad_weights if needs[4] else None,
    )
