"""Checks for a network with dict outputs, which ``monai.bundle verify_net_in_out`` cannot do.

``verify_net_io`` builds the network of a config, runs a random batch of the metadata's input shape and
checks every output named in ``metadata.json`` (``network_data_format#outputs``): present, no extra keys,
channel count, spatial shape, dtype. ``compare_torchscript`` checks that an exported TorchScript model
(``python -m monai.bundle ckpt_export network_def --use_trace True --converter_kwargs "{'strict': False}" ...``)
gives the eager network's outputs. The traced graph calls the MSDA op through ``torch.ops.cellvta``: load
it with ``load_torchscript`` (or ``custom_ops.build.load_library()`` before ``torch.jit.load``).

Command line, from ``bundles/cellvta``::

    python -m scripts.export verify_net_io --config_file configs/inference.yaml
    python -m scripts.export compare_torchscript --ts_file models/model.ts --config_file configs/inference.yaml
    python -m scripts.export verify_net_io --config_file configs/inference.yaml
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.utils import get_equivalent_dtype
from torch import nn

IO_PREFIX = "_meta_#network_data_format"
_SYMBOLIC = re.compile(r"^(\d+)\*n$")


def fake_spatial_shape(spec: Sequence[int | str], n: int = 8) -> tuple[int, ...]:
    """Concrete sizes for a metadata ``spatial_shape`` such as ``["32*n", "32*n"]`` (``n`` substituted)."""
    out = []
    for dim in spec:
        if isinstance(dim, int) or str(dim).isdigit():
            out.append(int(dim))
            continue
        match = _SYMBOLIC.match(str(dim).replace(" ", ""))
        if match is None:
            raise ValueError(f"spatial_shape entry {dim!r} is neither an integer nor of the form '<k>*n'")
        out.append(int(match.group(1)) * n)
    return tuple(out)


def check_outputs(
    outputs: Mapping[str, torch.Tensor], spec: Mapping[str, Mapping[str, Any]], batch: int, spatial: Sequence[int]
) -> list[str]:
    """Differences between a network's dict ``outputs`` and the metadata's output ``spec``.

    Args:
        outputs: name -> tensor ``(B, C, *spatial)`` for image outputs, ``(B, C)`` when the spec's
            ``spatial_shape`` is empty.
        spec: ``network_data_format#outputs`` of ``metadata.json``.
        batch: the input batch size ``B``.
        spatial: the input spatial size; image outputs must have it.

    Returns:
        one message per problem (empty when the outputs match).
    """
    problems = []
    if not isinstance(outputs, Mapping):
        return [f"the network returned {type(outputs).__name__}, the metadata describes a dict {sorted(spec)}"]
    for extra in sorted(set(outputs) - set(spec)):
        problems.append(f"output '{extra}' is not described in the metadata")
    for name, desc in spec.items():
        if name not in outputs:
            problems.append(f"output '{name}' is missing (the network returned {sorted(outputs)})")
            continue
        out = outputs[name]
        expected = (batch, int(desc["num_channels"]), *(tuple(spatial) if desc.get("spatial_shape") else ()))
        if tuple(out.shape) != expected:
            problems.append(f"output '{name}' has shape {tuple(out.shape)}, expected {expected}")
        dtype = get_equivalent_dtype(desc["dtype"], torch.Tensor)
        if out.dtype != dtype:
            problems.append(f"output '{name}' has dtype {out.dtype}, expected {dtype}")
    return problems


def _parser(config_file: str | Sequence[str], meta_file: str | Sequence[str], override: Mapping[str, Any]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.read_meta(meta_file)
    for k, v in override.items():
        parser[k] = v
    return parser


def _random_input(parser: ConfigParser, batch: int, n: int) -> torch.Tensor:
    desc = parser.get(f"{IO_PREFIX}#inputs#image")
    shape = (batch, int(desc["num_channels"]), *fake_spatial_shape(desc["spatial_shape"], n))
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=get_equivalent_dtype(desc["dtype"], torch.Tensor))


def verify_net_io(
    config_file: str | Sequence[str],
    meta_file: str | Sequence[str] = "configs/metadata.json",
    net_id: str = "network_def",
    batch: int = 2,
    n: int = 8,
    **override: Any,
) -> None:
    """Run the config's network on a random batch and check its dict outputs against the metadata.

    Args:
        config_file: the bundle config(s) defining ``net_id``.
        meta_file: the metadata file(s).
        net_id: id of the network in the config.
        batch: batch size of the random input.
        n: value of ``n`` in symbolic spatial shapes (``"32*n"`` -> 256 for n = 8).
        override: config overrides, e.g. ``_meta_#network_data_format#outputs#nuclei_type_map#num_channels=5``.

    Raises ValueError listing every difference.
    """
    parser = _parser(config_file, meta_file, override)
    net: nn.Module = parser.get_parsed_content(net_id).eval()
    x = _random_input(parser, batch, n)
    with torch.no_grad():
        outputs = net(x)
    problems = check_outputs(outputs, parser.get(f"{IO_PREFIX}#outputs"), batch, x.shape[2:])
    if problems:
        raise ValueError(f"{config_file}: network '{net_id}' does not match {meta_file}:\n  " + "\n  ".join(problems))


def load_torchscript(ts_file: str) -> torch.jit.ScriptModule:
    """Load an exported model on CPU; the MSDA op it calls (``torch.ops.cellvta``) is loaded first."""
    from custom_ops.build import load_library

    load_library()
    return torch.jit.load(ts_file, map_location="cpu").eval()


def compare_torchscript(
    ts_file: str,
    config_file: str | Sequence[str],
    ckpt_file: str = "models/model.pt",
    meta_file: str | Sequence[str] = "configs/metadata.json",
    net_id: str = "network_def",
    batch: int = 1,
    n: int = 8,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    **override: Any,
) -> dict[str, float]:
    """Largest absolute difference per output between a TorchScript export and the eager network.

    The eager network is built from ``config_file`` with the weights of ``ckpt_file``; both run on CPU.

    Raises ValueError when an output is missing or differs beyond ``atol + rtol * |eager|``.
    """
    parser = _parser(config_file, meta_file, override)
    net: nn.Module = parser.get_parsed_content(net_id)
    net.load_state_dict(torch.load(ckpt_file, map_location="cpu", weights_only=True))
    net = net.cpu().eval()
    scripted = load_torchscript(ts_file)
    x = _random_input(parser, batch, n)
    with torch.no_grad():
        eager, traced = net(x), scripted(x)
    diffs: dict[str, float] = {}
    for name, ref in eager.items():
        if name not in traced:
            raise ValueError(f"{ts_file}: output '{name}' missing (it has {sorted(traced)})")
        diffs[name] = float((traced[name] - ref).abs().max())
        if not torch.allclose(traced[name], ref, atol=atol, rtol=rtol):
            raise ValueError(f"{ts_file}: output '{name}' differs from the eager network by up to {diffs[name]:.3g}")
    return diffs


if __name__ == "__main__":
    from monai.utils import optional_import

    fire, _ = optional_import("fire")
    fire.Fire({"verify_net_io": verify_net_io, "compare_torchscript": compare_torchscript})
