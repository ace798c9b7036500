"""Input checks of ``ms_deform_attn``, shared by every implementation."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def prepare_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check the inputs and return them contiguous, with int64 level tensors on value's device.

    The level layout is not checked here: the compiled kernels check it themselves (in C++, also
    under ``torch.compile``) and the reference path calls :func:`check_levels`.

    Args:
        value: ``(N, S, M, D)`` float32 or float64.
        spatial_shapes: ``(L, 2)`` integer ``(H, W)`` per level, all positive.
        level_start_index: ``(L,)`` integer, the exclusive cumulative sum of ``H * W``.
        sampling_locations: ``(N, Lq, M, L, P, 2)`` of value's dtype and device.
        attention_weights: ``(N, Lq, M, L, P)`` of value's dtype and device.

    Raises:
        TypeError: a non-tensor, a wrong or mixed dtype.
        ValueError: inconsistent shapes or devices.
    """
    named = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, M, D), got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), "
            f"got shape {tuple(sampling_locations.shape)}"
        )
    n, _, m, _ = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    if sampling_locations.shape[0] != n or sampling_locations.shape[2] != m:
        raise ValueError(
            f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} must share N={n} and M={m} "
            f"with value {tuple(value.shape)}"
        )
    if tuple(attention_weights.shape) != (n, lq, m, levels, points):
        raise ValueError(
            f"ms_deform_attn: attention_weights must be (N, Lq, M, L, P) = {(n, lq, m, levels, points)}, "
            f"got {tuple(attention_weights.shape)}"
        )
    if tuple(spatial_shapes.shape) != (levels, 2):
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must be (L, 2) = ({levels}, 2), got {tuple(spatial_shapes.shape)}"
        )
    if tuple(level_start_index.shape) != (levels,):
        raise ValueError(
            f"ms_deform_attn: level_start_index must be (L,) = ({levels},), got {tuple(level_start_index.shape)}"
        )

    dtypes = {name: named[name].dtype for name in ("value", "sampling_locations", "attention_weights")}
    if len(set(dtypes.values())) != 1 or value.dtype not in FLOAT_DTYPES:
        listed = ", ".join(f"{k} {v}" for k, v in dtypes.items())
        raise TypeError(
            f"ms_deform_attn: value, sampling_locations and attention_weights must share one dtype, float32 or "
            f"float64; got {listed} (under torch.autocast half precision inputs are cast to float32)"
        )
    for name in ("spatial_shapes", "level_start_index"):
        t = named[name]
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"ms_deform_attn: {name} must be an integer tensor (int64), got {t.dtype}")
    for name in ("sampling_locations", "attention_weights"):
        if named[name].device != value.device:
            raise ValueError(f"ms_deform_attn: {name} is on {named[name].device} but value is on {value.device}")

    spatial_shapes = spatial_shapes.to(device=value.device, dtype=torch.int64)
    level_start_index = level_start_index.to(device=value.device, dtype=torch.int64)
    return (
        value.contiguous(),
        spatial_shapes.contiguous(),
        level_start_index.contiguous(),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
    )


def check_levels(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, s: int) -> None:
    """Check that levels ``(L, 2)`` with starts ``(L,)`` tile the ``S`` values exactly, in order.

    The reference path's check; the compiled kernels run the same check in C++ (``check_inputs``).
    """
    offset = 0
    for level, ((h, w), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        if h <= 0 or w <= 0:
            raise ValueError(f"ms_deform_attn: spatial_shapes[{level}] = ({h}, {w}) must be positive")
        if start != offset:
            raise ValueError(
                f"ms_deform_attn: level_start_index[{level}] = {start} is inconsistent with spatial_shapes "
                f"(the preceding levels end at {offset})"
            )
        offset += h * w
    if offset != s:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes {spatial_shapes.tolist()} describe {offset} values but value has S = {s}"
        )
