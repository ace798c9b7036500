"""First-use self-check of the compiled MSDA kernels against the grid_sample reference.

The first time ``ms_deform_attn`` would run the compiled op on a checked device type in a
process, the op and the reference run on a tiny random input on that device (a few
milliseconds): output and the three gradients must agree to ``TOLERANCE`` (relative to the
largest reference value). The verdict is kept for the rest of the process.

``CELLVTA_MSDA_SELF_CHECK`` chooses the checked device types: unset means ``cuda``; a
comma-separated list (``cpu,cuda``) checks those; ``0`` / ``off`` skips the check.
"""

from __future__ import annotations

import os
import threading

import torch

from .inputs import outputs_and_gradients, random_inputs
from .reference import ms_deform_attn_reference

SELF_CHECK_ENV = "CELLVTA_MSDA_SELF_CHECK"
DEFAULT_DEVICE_TYPES = frozenset({"cuda"})
TOLERANCE = 1e-4
_OFF = ("0", "off", "no", "false", "none")

_lock = threading.Lock()
_verdicts: dict[str, str | None] = {}


def checked_device_types() -> frozenset[str]:
    """The device types whose compiled kernels are self-checked before first use (from ``CELLVTA_MSDA_SELF_CHECK``)."""
    raw = os.environ.get(SELF_CHECK_ENV, "").strip().lower()
    if not raw:
        return DEFAULT_DEVICE_TYPES
    if raw in _OFF:
        return frozenset()
    return frozenset(part.strip() for part in raw.split(",") if part.strip())


def failure(device_type: str) -> str | None:
    """Why the compiled op must not be used on ``device_type``, or ``None`` (it agrees, or is not checked).

    Runs :func:`compare` once per device type and process (needs the compiled library loaded).
    """
    if device_type not in checked_device_types():
        return None
    with _lock:
        if device_type not in _verdicts:
            _verdicts[device_type] = compare(torch.device(device_type))
        return _verdicts[device_type]


def compare(device: torch.device, tolerance: float = TOLERANCE) -> str | None:
    """Compare ``cellvta::ms_deform_attn`` with the reference on a tiny float32 input on ``device``.

    Two batches, two heads of 4 channels, two points on levels of 3x5 and 2x2 pixels, four
    queries, with locations outside ``[0, 1]`` and on pixel borders.

    Returns:
        ``None`` when output and gradients agree, else the reason (which quantity, by how much, or
        the error the kernel raised).
    """
    inputs = tuple(t.to(device) for t in random_inputs(2, 2, 2, [(3, 5), (2, 2)], 4, torch.float32, seed=0, channels=4))
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        try:
            ours = outputs_and_gradients(torch.ops.cellvta.ms_deform_attn, inputs)
        except Exception as exc:  # e.g. no kernel image for this GPU architecture
            return f"it raised {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        ref = outputs_and_gradients(ms_deform_attn_reference, inputs)
    for name, a, b in zip(("output", "value gradient", "location gradient", "weight gradient"), ours, ref):
        error = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
        if not error <= tolerance:  # also catches NaN
            return (
                f"its {name} differs from the grid_sample reference by {error:.3g} (tolerance {tolerance:g}) "
                f"on a self-check input on {device}"
            )
    return None
