"""Multi-scale deformable attention (MSDA) for CellVTA's adapter.

``ms_deform_attn`` is the one public function; ``MSDeformAttn`` the layer built on it.

Which implementation runs is decided by ``implementation()``: the compiled kernels
(``cellvta::ms_deform_attn``, built on first use) when they build and support the device,
otherwise the pure-PyTorch reference, with one warning saying why. The environment variable
``CELLVTA_MSDA_IMPL=reference|compiled`` forces one; forcing ``compiled`` raises if it cannot run.
Importing this package never compiles anything.
"""

from __future__ import annotations

import os
import warnings

import torch

from .checks import prepare_inputs
from .reference import ms_deform_attn_reference

IMPL_ENV = "CELLVTA_MSDA_IMPL"
_CHOICES = ("auto", "compiled", "reference")
_warned: set[str] = set()


@torch.compiler.assume_constant_result
def implementation(device_type: str = "cpu") -> str:
    """``"compiled"`` or ``"reference"``: what ``ms_deform_attn`` runs for tensors on ``device_type``.

    Builds and loads the compiled library on its first call (cached afterwards).

    Raises:
        ValueError: ``CELLVTA_MSDA_IMPL`` holds an unknown value.
        custom_ops.build.BuildError: ``CELLVTA_MSDA_IMPL=compiled`` but the kernels cannot be built or
            have no kernel for ``device_type``.
    """
    choice = os.environ.get(IMPL_ENV, "").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{IMPL_ENV}={os.environ[IMPL_ENV]!r}: expected one of {', '.join(_CHOICES)}")
    if choice == "reference":
        return "reference"
    from . import build

    try:
        build.load_library()
        if not torch._C._dispatch_has_kernel_for_dispatch_key("cellvta::ms_deform_attn", device_type.upper()):
            raise build.BuildError(f"the compiled MSDA library has no kernel for {device_type} tensors")
    except build.BuildError as exc:
        if choice == "compiled":
            raise
        reason = str(exc)
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(
                f"custom_ops: using the pure-PyTorch MSDA reference (slower) because {reason}",
                RuntimeWarning,
                stacklevel=3,
            )
        return "reference"
    return "compiled"


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention (bundles/cellvta/docs/architecture.md).

    Bilinear sampling equals ``grid_sample(mode="bilinear", padding_mode="zeros",
    align_corners=False)`` at ``grid = 2 * loc - 1``. Under ``torch.autocast`` half-precision
    inputs are cast to float32 and the output is float32; outside autocast, half-precision inputs
    are computed in float32 and the output is cast back to value's dtype.

    Args:
        value: ``(N, S, M, D)`` values of all levels, flattened row-major and concatenated.
        spatial_shapes: ``(L, 2)`` int64 ``(H, W)`` per level.
        level_start_index: ``(L,)`` int64 start of each level along ``S``.
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)``; outside ``[0, 1]`` reads zeros.
        attention_weights: ``(N, Lq, M, L, P)``.

    Returns:
        ``(N, Lq, M * D)``.
    """
    device_type = value.device.type if isinstance(value, torch.Tensor) else "cpu"
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return ms_deform_attn(
                _as_float32(value), spatial_shapes, level_start_index,
                _as_float32(sampling_locations), _as_float32(attention_weights),
            )
    if isinstance(value, torch.Tensor) and value.dtype in _HALF_DTYPES:
        out = ms_deform_attn(_as_float32(value), spatial_shapes, level_start_index,
                             _as_float32(sampling_locations), _as_float32(attention_weights))
        return out.to(value.dtype)
    args = prepare_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if implementation(device_type) == "compiled":
        return torch.ops.cellvta.ms_deform_attn(*args)
    return ms_deform_attn_reference(*args)


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _as_float32(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, torch.Tensor) and t.dtype in _HALF_DTYPES:
        return t.float()
    return t


from .module import MSDeformAttn  # noqa: E402  (the module needs ms_deform_attn defined)

__all__ = ["IMPL_ENV", "MSDeformAttn", "implementation", "ms_deform_attn", "ms_deform_attn_reference"]
