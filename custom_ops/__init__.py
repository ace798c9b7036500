"""Multi-scale deformable attention (MSDA) for CellVTA's adapter.

``ms_deform_attn`` is the one public function; ``MSDeformAttn`` the layer built on it.

Which implementation runs is decided by ``implementation()``: the compiled kernels
(``cellvta::ms_deform_attn``, built on first use) when they build and support the device,
otherwise the pure-PyTorch reference, with one warning saying why. On CUDA the compiled op
must first pass a self-check against the reference (``selfcheck``: once per process, a few
milliseconds; ``CELLVTA_MSDA_SELF_CHECK=0`` skips it); if it fails, the reference runs for the
rest of the process. The environment variable ``CELLVTA_MSDA_IMPL=reference|compiled`` forces
one; forcing ``compiled`` raises if it cannot run or fails its self-check.
Importing this package never compiles anything.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import selfcheck
from .checks import check_levels, prepare_inputs
from .reference import ms_deform_attn_reference
from .selfcheck import SELF_CHECK_ENV

IMPL_ENV = "CELLVTA_MSDA_IMPL"
_CHOICES = ("auto", "compiled", "reference")
_warned: set[str] = set()


@torch.compiler.assume_constant_result
def implementation(device_type: str = "cpu") -> str:
    """``"compiled"`` or ``"reference"``: what ``ms_deform_attn`` runs for tensors on ``device_type``.

    Builds and loads the compiled library on its first call (cached afterwards) and, for the device
    types ``selfcheck.checked_device_types()`` (CUDA by default), self-checks it once.

    Raises:
        ValueError: ``CELLVTA_MSDA_IMPL`` holds an unknown value.
        custom_ops.build.BuildError: ``CELLVTA_MSDA_IMPL=compiled`` but the kernels cannot be built,
            have no kernel for ``device_type`` or fail their self-check there.
    """
    choice = os.environ.get(IMPL_ENV, "").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{IMPL_ENV}={os.environ[IMPL_ENV]!r}: expected one of {', '.join(_CHOICES)}")
    if choice == "reference":
        return "reference"
    from . import build

    try:
        build.load_library()
        if not torch._C._dispatch_has_kernel_for_dispatch_key(
                "cellvta::ms_deform_attn", torch._C._dispatch_key_for_device(device_type)):
            cause = build.cuda_build_failure() if device_type == "cuda" else None
            raise build.BuildError(f"the compiled MSDA library has no kernel for {device_type} tensors"
                                   + (f" (its CUDA build failed: {cause})" if cause else ""))
        failure = selfcheck.failure(device_type)
        if failure is not None:
            raise build.BuildError(
                f"the compiled kernel for {device_type} tensors failed its first-use self-check: {failure} "
                f"(this process keeps the reference; {SELF_CHECK_ENV}=0 skips the check)"
            )
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
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
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
        return torch.ops.cellvta.ms_deform_attn(*args)  # checks the level layout in C++
    if not torch.compiler.is_compiling():
        check_levels(args[1], args[2], value.shape[1])
    return ms_deform_attn_reference(*args)


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _as_float32(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, torch.Tensor) and t.dtype in _HALF_DTYPES:
        return t.float()
    return t


from .module import MSDeformAttn  # noqa: E402  (the module needs ms_deform_attn defined)

__all__ = ["IMPL_ENV", "SELF_CHECK_ENV", "MSDeformAttn", "implementation", "ms_deform_attn", "ms_deform_attn_reference"]
