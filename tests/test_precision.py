"""The CPU low-precision inference path: what is stored in bf16, float32 residual streams, closeness to autocast."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from scripts.model.network import CellViT, CellVTA
from scripts.model.precision import (
    NORMALISATIONS,
    STREAM_PARAMETERS,
    convert_to_low_precision,
    default_precision,
    prepare_for_inference,
)
from tests.test_network import small_cellvta

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from precision import normalise  # noqa: E402
from realistic_weights import make_realistic  # noqa: E402

KEYS = ("nuclei_binary_map", "hv_map", "nuclei_type_map")


@pytest.fixture(scope="module")
def realistic(consep) -> tuple[CellVTA, torch.Tensor]:
    """The small CellVTA with realistic weights (BatchNorm calibrated on 8 CoNSeP patches) and 2 other tiles."""
    network = small_cellvta()
    make_realistic(network, normalise(consep["images"][-8:, :128, :128], network), seed=0)
    return network, normalise(consep["images"][[0, 200], :64, :64], network)


def test_conversion_stores_compute_in_bf16_and_keeps_streams_exact():
    network = small_cellvta()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    convert_to_low_precision(network, torch.bfloat16)
    after = network.state_dict()
    assert list(after) == list(before)
    assert all(after[k].shape == before[k].shape for k in before)
    kept = set()
    for name, module in network.named_modules():
        for leaf, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            key = f"{name}.{leaf}" if name else leaf
            if not tensor.is_floating_point():
                continue
            if isinstance(module, NORMALISATIONS) or leaf in STREAM_PARAMETERS:
                assert tensor.dtype == torch.float32 and torch.equal(tensor, before[key]), key  # not rounded
                kept.add(leaf)
            else:
                assert tensor.dtype == torch.bfloat16, key
        if isinstance(module, nn.Conv2d):
            assert module.weight.is_contiguous(memory_format=torch.channels_last), name
    assert {"gamma", "pos_embed", "cls_token", "level_embed", "running_var", "weight", "bias"} <= kept


def test_residual_streams_run_in_float32():
    network = small_cellvta()
    convert_to_low_precision(network, torch.bfloat16)
    seen: dict[str, torch.dtype] = {}
    watched = {"block": network.encoder.vit.blocks[-1], "injector": network.encoder.interactions[0].injector,
               "extractor": network.encoder.interactions[0].extractor}
    def record(name: str, output: torch.Tensor) -> None:
        seen[name] = output.dtype

    for name, module in watched.items():
        module.register_forward_hook(lambda m, i, o, name=name: record(name, o))
    x = torch.randn(1, 3, 64, 64).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = network(x)
    assert seen == dict.fromkeys(watched, torch.float32)
    assert set(KEYS) <= set(out) and out["hv_map"].shape == (1, 2, 64, 64)


def test_realistic_weights_keep_activations_of_order_one(realistic):
    network, x = realistic
    rms: list[float] = []

    def record(output: torch.Tensor) -> None:
        rms.append(output.pow(2).mean().sqrt().item())

    hooks = [b.register_forward_hook(lambda m, i, o: record(o)) for b in network.encoder.vit.blocks]
    with torch.inference_mode():
        network(x)
    for h in hooks:
        h.remove()
    assert all(0.3 < r < 3.0 for r in rms), rms
    gammas = torch.cat([i.injector.gamma for i in network.encoder.interactions])
    assert gammas.min() >= 0.05 and gammas.max() <= 0.3
    bn = network.encoder.spm.stem[1]
    assert bn.running_var.min() > 0 and not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


@pytest.mark.slow
def test_cpu_bf16_path_is_as_close_to_float32_as_autocast(realistic):
    """bf16 weights with float32 streams deviate no more than the official bf16 autocast; all-bf16 does."""
    network, x = realistic
    with torch.inference_mode():
        reference = network(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = network(x)
        converted = copy.deepcopy(network)
        convert_to_low_precision(converted, torch.bfloat16)
        low = converted(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
        uniform = copy.deepcopy(network).to(torch.bfloat16)(x.to(torch.bfloat16))

    def error(out: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([(out[k].float() - reference[k]).abs().mean() / reference[k].abs().mean() for k in KEYS])

    assert torch.all(error(low) <= 1.02 * error(autocast)), (error(low), error(autocast))
    assert torch.all(error(uniform) >= 1.1 * error(low)), (error(uniform), error(low))


@pytest.mark.parametrize("backbone, vit_kwargs", [("sam-b", {"depth": 4}), ("convnext-t", None),
                                                  ("swinv2-t", None), ("resnet50", None)])
def test_every_encoder_family_runs_in_the_cpu_bf16_path(backbone, vit_kwargs):
    """SAM's relative-position tables, ConvNeXt's LayerScale, Swin V2's position MLP: no dtype is left mixed."""
    torch.manual_seed(0)
    network = CellViT(backbone, num_nuclei_classes=5, num_tissue_classes=3, vit_kwargs=vit_kwargs).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        reference = network(x)
        convert_to_low_precision(network, torch.bfloat16)
        low = network(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
    for key in KEYS:
        assert low[key].shape == reference[key].shape, key
        assert (low[key].float() - reference[key]).abs().mean() < 0.01 * reference[key].abs().mean(), key


@pytest.mark.skipif(default_precision(torch.device("cpu")) == torch.bfloat16, reason="this CPU has native bf16")
def test_bf16_asked_for_on_a_cpu_that_emulates_it_is_warned_about():
    network = small_cellvta()
    with pytest.warns(UserWarning, match="emulates it"):
        assert prepare_for_inference(network, torch.device("cpu"), torch.bfloat16) == torch.bfloat16
    assert {m.weight.dtype for m in network.modules() if isinstance(m, nn.Linear)} == {torch.bfloat16}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default precision here is float32: nothing to warn about
        assert prepare_for_inference(small_cellvta(), torch.device("cpu")) == torch.float32
