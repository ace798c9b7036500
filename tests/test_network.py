"""CellVTA / CellViT networks: sizes, shapes, gradients, the class-token fix, loading and conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from custom_ops import IMPL_ENV
from scripts.model.backbones import PRESETS, create_vit
from scripts.model.convert import convert_official_key
from scripts.model.network import CellVTA, CellViT
from scripts.model.weights import load_weights

OFFICIAL_KEYS = Path(__file__).resolve().parents[2] / "shared" / "docs" / "official_cellvta_keys.json"
SMALL = {"backbone": "vit-s", "vit_kwargs": {"depth": 4}, "num_nuclei_classes": 5, "num_tissue_classes": 3}


def small_cellvta(**kw) -> CellVTA:
    torch.manual_seed(0)
    return CellVTA(**{**SMALL, **kw}).eval()


def images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_uni_preset_parameter_counts_match_the_official_model():
    model = CellVTA("uni", num_nuclei_classes=6, num_tissue_classes=19, device="meta")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == 387_769_437
    assert trainable == 84_420_701
    frozen_vit = sum(p.numel() for n, p in model.encoder.vit.named_parameters() if not n.startswith("norm."))
    assert total - trainable == frozen_vit == 303_348_736


def test_every_official_key_maps_with_its_shape():
    if not OFFICIAL_KEYS.exists():
        pytest.skip(f"official key list not found at {OFFICIAL_KEYS}")
    official = json.loads(OFFICIAL_KEYS.read_text())["keys"]
    ours = {k: list(v.shape) for k, v in CellVTA("uni", 6, 19, device="meta").state_dict().items()}
    mapped = {convert_official_key(k): shape for k, shape in official.items()}
    assert len(mapped) == len(official) == 898
    assert mapped == ours


@pytest.mark.parametrize("size,batch", [(256, 2), (512, 1)])
def test_output_shapes(size, batch):
    with torch.no_grad():
        out = small_cellvta()(images(batch, size), return_features=True)
    assert out["nuclei_binary_map"].shape == (batch, 2, size, size)
    assert out["hv_map"].shape == (batch, 2, size, size)
    assert out["nuclei_type_map"].shape == (batch, 5, size, size)
    assert out["tissue_types"].shape == (batch, 3)
    assert out["features"].shape == (batch, 384, size // 16, size // 16)


def test_the_uni_preset_runs_on_the_meta_device(monkeypatch):
    """Shapes of a full-size model without its memory: the compiled MSDA op (autocast check, dispatch, fake kernel)
    takes meta tensors."""
    monkeypatch.setenv(IMPL_ENV, "compiled")
    model = CellVTA("uni", num_nuclei_classes=6, num_tissue_classes=19, device="meta").eval()
    out = model(torch.empty(2, 3, 256, 256, device="meta"), return_features=True)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "nuclei_binary_map": (2, 2, 256, 256), "hv_map": (2, 2, 256, 256), "nuclei_type_map": (2, 6, 256, 256),
        "tissue_types": (2, 19), "features": (2, 1024, 16, 16)}
    assert all(v.device.type == "meta" for v in out.values())


def test_non_square_input_and_a_patch14_backbone():
    model = CellVTA(backbone="dinov2-s", vit_kwargs={"depth": 4}, num_nuclei_classes=3, num_tissue_classes=0).eval()
    with torch.no_grad():
        out = model(images(1, 64)[..., :48])
    assert out["nuclei_type_map"].shape == (1, 3, 64, 48) and "tissue_types" not in out


def test_cellvit_output_shapes():
    torch.manual_seed(0)
    model = CellViT(**SMALL).eval()
    with torch.no_grad():
        out = model(images(2, 128))
    assert out["hv_map"].shape == (2, 2, 128, 128) and out["tissue_types"].shape == (2, 3)


def test_backward_reaches_only_trainable_parameters():
    model = small_cellvta().train()
    out = model(images(2, 64))
    sum(v.float().pow(2).mean() for v in out.values()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "encoder.vit.blocks.0.attn.qkv.weight" in frozen and "encoder.vit.norm.weight" not in frozen
    assert not any(n.startswith(("encoder.spm", "encoder.interactions", "decoder")) for n in frozen)


@pytest.mark.parametrize("policy,trains_vit_blocks,trains_adapter",
                         [("full", True, True), ("decoder_only", False, False)])
def test_freeze_policies(policy, trains_vit_blocks, trains_adapter):
    model = CellVTA(**SMALL, freeze=policy, device="meta")
    grads = dict((n, p.requires_grad) for n, p in model.named_parameters())
    assert grads["encoder.vit.blocks.0.attn.qkv.weight"] is trains_vit_blocks
    assert grads["encoder.spm.fc1.weight"] is trains_adapter
    assert grads["decoder.branches.hv_map.decoder0_header.2.weight"] and grads["encoder.head.weight"]


def test_tissue_logits_depend_on_the_image_unless_the_official_defect_is_reproduced():
    x = images(2, 64)
    with torch.no_grad():
        fixed = small_cellvta()(x)["tissue_types"]
        official = small_cellvta(cls_through_blocks=False)(x)["tissue_types"]
    assert (fixed[0] - fixed[1]).abs().max() > 1e-4
    assert torch.equal(official[0], official[1])


def test_deformable_detr_init_survives_construction():
    attn = small_cellvta().encoder.interactions[0].injector.attn
    assert attn.sampling_offsets.bias.abs().max() == 4.0  # radial grid, point 4 at distance 4
    assert attn.attention_weights.weight.abs().max() == 0
    overwritten = small_cellvta(official_init=True).encoder.interactions[0].injector.attn
    assert overwritten.sampling_offsets.bias.abs().max() == 0


def test_both_msda_implementations_give_the_same_network_output(monkeypatch):
    model, x = small_cellvta(), images(1, 128)
    outs = {}
    for impl in ("reference", "compiled"):
        monkeypatch.setenv(IMPL_ENV, impl)
        with torch.no_grad():
            outs[impl] = model(x)
    for key in outs["reference"]:
        torch.testing.assert_close(outs["compiled"][key], outs["reference"][key], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_bfloat16_autocast_stays_close_to_float32():
    model, x = small_cellvta(), images(1, 128)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    for key in ("nuclei_binary_map", "hv_map", "nuclei_type_map"):
        scale = ref[key].abs().max()
        assert (low[key].float() - ref[key]).abs().max() <= 0.05 * scale, key


def test_timm_format_vit_weights_load_and_a_misspelt_key_is_named(tmp_path):
    vit, _ = create_vit("vit-s", depth=4)
    state = {k: torch.randn_like(v) for k, v in vit.state_dict().items()}
    good = tmp_path / "vit.pth"
    torch.save(state, good)
    model = load_weights(CellVTA(**SMALL), pretrained=str(good))
    torch.testing.assert_close(model.encoder.vit.blocks[3].mlp.fc2.weight, state["blocks.3.mlp.fc2.weight"])
    bad_state = dict(state)
    bad_state["blocks.0.attn.qkv.wieght"] = bad_state.pop("blocks.0.attn.qkv.weight")
    bad = tmp_path / "bad.pth"
    torch.save(bad_state, bad)
    with pytest.raises(KeyError, match=r"blocks\.0\.attn\.qkv\.wieght") as err:
        load_weights(CellVTA(**SMALL), pretrained=str(bad))
    assert "blocks.0.attn.qkv.weight" in str(err.value)


def test_an_official_format_checkpoint_is_converted_and_loaded(tmp_path, caplog):
    source = small_cellvta(cls_through_blocks=False)
    inverse = {convert_official_key(k): k for k in _official_names(source.state_dict())}
    official_state = {inverse[k]: v for k, v in source.state_dict().items()}
    path = tmp_path / "official.pth"
    torch.save({"arch": "CellViTUNIAdapter", "model_state_dict": official_state, "config": {"data.num_classes": 5}},
               path)
    torch.manual_seed(1)
    with caplog.at_level("INFO", logger="scripts.model.weights"):
        loaded = load_weights(CellVTA(**SMALL), checkpoint=str(path)).eval()
    assert loaded.encoder.cls_through_blocks is False and loaded.mean == loaded.std == (0.5, 0.5, 0.5)
    assert sum("cls_through_blocks=False, official_normalization=True" in r.message for r in caplog.records) == 1
    x = images(1, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["hv_map"], source(x)["hv_map"])
    with pytest.raises(ValueError, match=r"official.pth: official CellVTA weights need cls_through_blocks=False, but "
                                         r"the network was built with cls_through_blocks=True"):
        load_weights(CellVTA(**SMALL, cls_through_blocks=True), checkpoint=str(path))
    with pytest.raises(ValueError, match="need official_normalization=True"):
        load_weights(CellVTA(**SMALL, official_normalization=False), checkpoint=str(path))


def _official_names(state: dict) -> list[str]:
    """Official names of our keys (the converter's inverse, built from its own rules)."""
    names = []
    for key in state:
        if key.startswith("encoder.vit."):
            names.append("encoder." + key[len("encoder.vit."):])
        elif key.startswith("decoder.branches."):
            branch, rest = key[len("decoder.branches."):].split(".", 1)
            official = {"nuclei_binary_map": "nuclei_binary_map_decoder", "hv_map": "hv_map_decoder",
                        "nuclei_type_map": "nuclei_type_maps_decoder"}[branch]
            names.append(f"{official}.{rest}")
        elif key.startswith("decoder."):
            names.append(key[len("decoder."):])
        else:
            names.append(key)
    return names


def test_presets_cover_the_foundation_models():
    for name in ("uni", "uni2-h", "virchow2", "h-optimus-0", "dinov2-s", "dinov2-b", "dinov2-l", "vit-s", "vit-b",
                 "vit-l"):
        assert name in PRESETS
    for name, tokens in (("uni2-h", 9), ("virchow2", 5), ("h-optimus-0", 5)):
        vit, _ = create_vit(name, device="meta")
        assert vit.num_prefix_tokens == tokens, name


def test_inference_preparation_keeps_the_outputs():
    from scripts.model.precision import prepare_for_inference

    model, x = small_cellvta(), images(1, 128)
    with torch.no_grad():
        ref = model(x)
    dtype = prepare_for_inference(model, torch.device("cpu"), torch.bfloat16)
    assert dtype == torch.bfloat16 and model.encoder.spm.fc1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        low = model(x.to(dtype=dtype, memory_format=torch.channels_last))
    for key in ("nuclei_binary_map", "hv_map", "nuclei_type_map"):
        assert (low[key].float() - ref[key]).abs().max() <= 0.05 * ref[key].abs().max(), key
