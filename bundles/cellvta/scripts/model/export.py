"""Export checks for a network with dict outputs, which ``monai.bundle verify_net_in_out`` cannot do, and ONNX export.

``verify_net_io`` builds the network of a config, runs a random batch of the metadata's input shape and
checks every output named in ``metadata.json`` (``network_data_format#outputs``): present, no extra keys,
channel count, spatial shape, dtype. ``compare_torchscript`` checks that an exported TorchScript model
(``python -m monai.bundle ckpt_export network_def --use_trace True --converter_kwargs "{'strict': False}" ...``)
gives the eager network's outputs. The traced graph calls the MSDA op through ``torch.ops.cellvta``: load
it with ``load_torchscript`` (or ``custom_ops.build.load_library()`` before ``torch.jit.load``).

ONNX has no deformable-attention operator, but the pure-PyTorch MSDA (``custom_ops.reference``) is made of
``grid_sample`` and tensor algebra, which ONNX expresses (``GridSample``, opset >= 16). ``export_onnx``
therefore exports with ``CELLVTA_MSDA_IMPL=reference``: ``torch.export`` in strict mode (the reference reads
the level sizes with ``tolist()``, which non-strict export cannot trace), then ``torch.onnx`` (dynamo),
opset 18. The batch size stays free; the tile size is fixed at export (the level sizes become constants).
``compare_onnx`` runs the file with onnxruntime on CPU against the eager network. ``onnx``, ``onnxscript``
and ``onnxruntime`` are needed only for these two.

Command line, from ``bundles/cellvta``::

    python -m scripts.model.export verify_net_io --config_file "['configs/common.yaml','configs/inference.yaml']"
    python -m scripts.model.export compare_torchscript --ts_file models/model.ts \\
        --config_file "['configs/common.yaml','configs/inference.yaml']"
    python -m scripts.model.export export_onnx --config_file "['configs/common.yaml','configs/inference.yaml']" \\
        --onnx_file models/model.onnx
    python -m scripts.model.export compare_onnx --onnx_file models/model.onnx \\
        --config_file "['configs/common.yaml','configs/inference.yaml']"
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.utils import get_equivalent_dtype, optional_import
from torch import nn

from custom_ops import IMPL_ENV

ort, _ = optional_import("onnxruntime")

IO_PREFIX = "_meta_#network_data_format"
ONNX_OPSET = 18
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


def _parser(config_file: str | Sequence[str], meta_file: str | Sequence[str],
            override: Mapping[str, Any]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.read_meta(meta_file)
    for k, v in override.items():
        parser[k] = v
    return parser


def _random_input(parser: ConfigParser, batch: int, n: int) -> torch.Tensor:
    desc = parser.get(f"{IO_PREFIX}#inputs#image")
    shape = (batch, int(desc["num_channels"]), *fake_spatial_shape(desc["spatial_shape"], n))
    return torch.randn(shape, generator=torch.Generator().manual_seed(0),
                       dtype=get_equivalent_dtype(desc["dtype"], torch.Tensor))


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
        n: value of ``n`` in symbolic spatial shapes (``"16*n"`` -> 128 for n = 8).
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


def _eager_network(parser: ConfigParser, net_id: str, ckpt_file: str) -> nn.Module:
    """The config's network with the weights of ``ckpt_file``, on CPU in eval mode."""
    if not Path(ckpt_file).is_file():
        raise FileNotFoundError(f"{ckpt_file}: checkpoint not found")
    net: nn.Module = parser.get_parsed_content(net_id)
    net.load_state_dict(torch.load(ckpt_file, map_location="cpu", weights_only=True))
    return net.cpu().eval()


def _differences(
    eager: Mapping[str, torch.Tensor], exported: Mapping[str, torch.Tensor], file: str, atol: float, rtol: float
) -> dict[str, float]:
    """Largest absolute difference per output; ValueError when one is missing or beyond ``atol + rtol * |eager|``."""
    diffs: dict[str, float] = {}
    for name, ref in eager.items():
        if name not in exported:
            raise ValueError(f"{file}: output '{name}' missing (it has {sorted(exported)})")
        out = exported[name]
        if tuple(out.shape) != tuple(ref.shape):
            raise ValueError(f"{file}: output '{name}' has shape {tuple(out.shape)}, "
                             f"the eager network {tuple(ref.shape)}")
        diffs[name] = float((out - ref).abs().max())
        if not torch.allclose(out, ref, atol=atol, rtol=rtol):
            raise ValueError(f"{file}: output '{name}' differs from the eager network by up to {diffs[name]:.3g}")
    return diffs


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
    net = _eager_network(parser, net_id, ckpt_file)
    scripted = load_torchscript(ts_file)
    x = _random_input(parser, batch, n)
    with torch.no_grad():
        return _differences(net(x), scripted(x), ts_file, atol, rtol)


@contextmanager
def msda_implementation(name: str) -> Iterator[None]:
    """Run the block with ``CELLVTA_MSDA_IMPL=name`` (``reference`` or ``compiled``); the old value is restored."""
    previous = os.environ.get(IMPL_ENV)
    os.environ[IMPL_ENV] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(IMPL_ENV, None)
        else:
            os.environ[IMPL_ENV] = previous


def export_onnx_model(
    net: nn.Module, onnx_file: str, spatial_size: Sequence[int], opset: int = ONNX_OPSET, max_batch: int = 1024
) -> list[str]:
    """Write ``net`` as an ONNX model whose multi-scale deformable attention is ``GridSample``.

    Args:
        net: a network taking ``(B, 3, H, W)`` and returning a dict of tensors; exported on CPU in eval mode.
        onnx_file: the ``.onnx`` file to write (weights above 2 GB go to ``<onnx_file>.data`` beside it).
        spatial_size: ``(H, W)`` of the tiles the model will take (fixed in the ONNX graph).
        opset: ONNX opset (``GridSample`` needs >= 16).
        max_batch: largest batch size; the batch dimension stays free between 1 and this.

    Returns:
        the output names, in the model's output order (the keys of the network's dict).

    The files appear at once: they are written into a temporary folder beside ``onnx_file`` and moved.
    """
    if opset < 16:
        raise ValueError(f"opset {opset}: ONNX GridSample, which the deformable attention needs, exists from opset 16")
    if len(spatial_size) != 2 or any(int(s) % 16 for s in spatial_size):
        raise ValueError(f"spatial_size {tuple(spatial_size)}: expected (H, W), multiples of 16")
    net = net.cpu().eval()
    example = torch.zeros(2, 3, *map(int, spatial_size))
    target = Path(onnx_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    with msda_implementation("reference"), torch.no_grad():
        names = list(net(example))
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},), strict=True)
        onnx_program = torch.onnx.export(program, (example,), input_names=["image"], output_names=names,
                                         opset_version=opset, dynamo=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        onnx_program.save(str(staging / target.name))
        for written in staging.iterdir():
            os.replace(written, target.parent / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names


def run_onnx(onnx_file: str, image: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    """Run an exported model with onnxruntime on CPU.

    Args:
        onnx_file: a file of :func:`export_onnx_model`.
        image: ``(B, 3, H, W)`` float32 normalised image batch, H and W as at export.

    Returns:
        output name -> array, e.g. ``nuclei_binary_map`` ``(B, 2, H, W)``.
    """
    if not Path(onnx_file).is_file():
        raise FileNotFoundError(f"{onnx_file}: ONNX model not found")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    x = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    expected = model_input.shape
    if x.ndim != len(expected) or any(isinstance(e, int) and e != s for e, s in zip(expected, x.shape)):
        raise ValueError(f"{onnx_file}: input of shape {tuple(x.shape)} does not fit the exported shape {expected}")
    outputs = session.run(None, {model_input.name: x.astype(np.float32, copy=False)})
    return {o.name: value for o, value in zip(session.get_outputs(), outputs)}


def export_onnx(
    config_file: str | Sequence[str],
    onnx_file: str = "models/model.onnx",
    ckpt_file: str = "models/model.pt",
    meta_file: str | Sequence[str] = "configs/metadata.json",
    net_id: str = "network_def",
    n: int = 16,
    opset: int = ONNX_OPSET,
    **override: Any,
) -> list[str]:
    """Export the config's network with the weights of ``ckpt_file`` to ONNX, for tiles of the metadata's
    input ``spatial_shape`` at ``n`` (``"16*n"`` -> 256 for n = 16). Returns the output names."""
    parser = _parser(config_file, meta_file, override)
    net = _eager_network(parser, net_id, ckpt_file)
    size = fake_spatial_shape(parser.get(f"{IO_PREFIX}#inputs#image")["spatial_shape"], n)
    return export_onnx_model(net, onnx_file, size, opset)


def compare_onnx(
    onnx_file: str,
    config_file: str | Sequence[str],
    ckpt_file: str = "models/model.pt",
    meta_file: str | Sequence[str] = "configs/metadata.json",
    net_id: str = "network_def",
    batch: int = 2,
    n: int = 16,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    **override: Any,
) -> dict[str, float]:
    """Largest absolute difference per output between the ONNX model (onnxruntime, CPU) and the eager network.

    Raises ValueError when an output is missing or differs beyond ``atol + rtol * |eager|``.
    """
    parser = _parser(config_file, meta_file, override)
    net = _eager_network(parser, net_id, ckpt_file)
    x = _random_input(parser, batch, n)
    exported = {k: torch.from_numpy(v) for k, v in run_onnx(onnx_file, x).items()}
    with torch.no_grad():
        return _differences(net(x), exported, onnx_file, atol, rtol)


if __name__ == "__main__":
    fire, _ = optional_import("fire")
    fire.Fire({"verify_net_io": verify_net_io, "compare_torchscript": compare_torchscript,
               "export_onnx": export_onnx, "compare_onnx": compare_onnx})
