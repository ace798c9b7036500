"""Encoder families (SAM, hierarchical timm models, ViT skip blocks): shapes, freezing, strict weight loading."""

from __future__ import annotations

import pytest
import timm
import torch

from scripts.model.backbones import create_backbone, image_statistics
from scripts.model.encoders import embed_tokens, run_blocks
from scripts.model.network import CellVTA, CellViT
from scripts.model.weights import expected_image_statistics, load_weights

# small members of each family (random weights; the presets' full sizes are counted on the meta device)
TINY_SAM = {"depth": 4, "embed_dim": 64, "num_heads": 2, "global_attn_indexes": (1, 3)}
TINY = {
    "sam-b": TINY_SAM,
    "convnext-t": {"dims": (16, 32, 64, 128), "depths": (1, 1, 1, 1)},
    "convnextv2-t": {"dims": (16, 32, 64, 128), "depths": (1, 1, 1, 1)},
    "swinv2-t": {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2)},
    "maxvit-t": {"embed_dim": (32, 32, 64, 64), "depths": (1, 1, 1, 1), "stem_width": 16},
    "resnet50": {"layers": [1, 1, 1, 1]},
}


def images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tiny(cls, backbone: str, **kw):
    torch.manual_seed(0)
    return cls(backbone=backbone, vit_kwargs=TINY[backbone], num_nuclei_classes=4, num_tissue_classes=3,
               freeze="full", **kw).eval()


@pytest.mark.parametrize("backbone", ["vit-s", "sam-b", "uni2-h"])
def test_token_embedding_matches_timm_forward_intermediates(backbone):
    kwargs = TINY_SAM if backbone == "sam-b" else {"depth": 2, "embed_dim": 48, "num_heads": 2}
    torch.manual_seed(0)
    vit, _, _ = create_backbone(backbone, **kwargs)
    vit.eval()
    size = 64 if backbone != "uni2-h" else 56  # patch 14: a 4 x 4 grid
    x = images(2, size)
    with torch.no_grad():
        tokens, prefix = embed_tokens(vit, x)
        seq = run_blocks(vit, vit.blocks, torch.cat([prefix, tokens], 1), (4, 4))
        expected = vit.forward_intermediates(x, indices=[len(vit.blocks) - 1], intermediates_only=True)[0]
    assert prefix.shape[1] == {"vit-s": 1, "sam-b": 0, "uni2-h": 9}[backbone]
    torch.testing.assert_close(seq[:, prefix.shape[1]:].transpose(1, 2).reshape(expected.shape), expected)


FAMILIES = [(CellVTA, "sam-b"), (CellViT, "sam-b"), (CellViT, "convnext-t"), (CellViT, "convnextv2-t"),
            (CellViT, "swinv2-t"), (CellViT, "maxvit-t"), (CellViT, "resnet50")]


def check_maps(model, size: int) -> None:
    with torch.no_grad():
        out = model(images(1, size), return_features=True)
    assert out["nuclei_binary_map"].shape == (1, 2, size, size)
    assert out["hv_map"].shape == (1, 2, size, size)
    assert out["nuclei_type_map"].shape == (1, 4, size, size)
    assert out["tissue_types"].shape == (1, 3)
    assert out["features"].shape == (1, model.encoder.embed_dim, size // 16, size // 16)
    assert torch.isfinite(out["hv_map"]).all()


@pytest.mark.parametrize("cls,backbone", [f for f in FAMILIES if f[1] != "maxvit-t"])
def test_every_family_returns_the_four_maps_on_a_small_input(cls, backbone):
    check_maps(tiny(cls, backbone), 64)


@pytest.mark.slow
@pytest.mark.parametrize("cls,backbone", FAMILIES)
def test_every_family_returns_the_four_maps_at_256_and_512(cls, backbone):
    model = tiny(cls, backbone)
    for size in (256, 512):
        check_maps(model, size)


def test_hierarchical_encoders_use_their_native_strides():
    convnext = tiny(CellViT, "convnext-t").encoder
    assert convnext.feature_strides == (4, 4, 8, 16) and convnext.feature_channels == (16, 16, 32, 64)
    assert convnext.fuse is not None  # the stride-32 stage joins the bottleneck
    resnet = tiny(CellViT, "resnet50").encoder
    assert resnet.feature_strides == (2, 4, 8, 16) and resnet.feature_channels == (64, 256, 512, 1024)


def test_unsupported_input_sizes_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"input size 320x320: the maxvit-t encoder needs sizes that are multiples "
                                         r"of 256"):
        tiny(CellViT, "maxvit-t")(images(1, 320))
    with pytest.raises(ValueError, match=r"input size 272x272: the convnext-t encoder needs sizes that are multiples "
                                         r"of 32"):
        tiny(CellViT, "convnext-t")(images(1, 272))
    with torch.no_grad():  # Swin V2 pads its windows: any multiple of 32
        assert tiny(CellViT, "swinv2-t")(images(1, 96))["hv_map"].shape == (1, 2, 96, 96)
    with pytest.raises(TypeError, match="hierarchical .* use_adapter false"):
        CellVTA("convnext-t", device="meta")


# --- parameter counts and freezing (full-size presets, meta device) ------------------------------------------------

SAM_B_ENCODER = 89_670_912  # SAM ViT-B image encoder
SAM_B_NECK = 768 * 256 + 2 * 256 + 256 * 256 * 9 + 2 * 256


def counts(model) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


def test_sam_parameter_counts_and_freezing():
    cellvit = CellViT("sam-b", num_nuclei_classes=6, num_tissue_classes=19, device="meta")
    vit = sum(p.numel() for p in cellvit.encoder.vit.parameters())
    assert vit == SAM_B_ENCODER
    total, trainable = counts(cellvit)
    assert total - trainable == SAM_B_ENCODER - SAM_B_NECK  # the neck feeds the tissue head and trains
    assert cellvit.encoder.head.in_features == 256
    adapter = CellVTA("sam-b", num_nuclei_classes=6, num_tissue_classes=19, device="meta")
    assert sum(p.numel() for p in adapter.encoder.vit.parameters()) == SAM_B_ENCODER - SAM_B_NECK  # no neck
    total, trainable = counts(adapter)
    assert total - trainable == SAM_B_ENCODER - SAM_B_NECK
    assert adapter.encoder.groups == [range(0, 3), range(3, 6), range(6, 9), range(9, 12)]


@pytest.mark.parametrize("backbone,encoder", [("convnext-t", 27_818_592), ("resnet50", 23_508_032),
                                              ("swinv2-t", 27_576_618)])
def test_hierarchical_parameter_counts_under_each_policy(backbone, encoder):
    frozen = CellViT(backbone, num_nuclei_classes=6, num_tissue_classes=19, device="meta")
    total, trainable = counts(frozen)
    assert sum(p.numel() for p in frozen.encoder.backbone.parameters()) == encoder
    assert total - trainable == encoder
    _, all_trainable = counts(CellViT(backbone, 6, 19, freeze="full", device="meta"))
    assert all_trainable == total
    decoder_only = CellViT(backbone, 6, 19, freeze="decoder_only", device="meta")
    _, decoder_trainable = counts(decoder_only)
    fuse = sum(p.numel() for p in decoder_only.encoder.fuse.parameters())
    assert decoder_trainable == trainable - fuse


# --- strict loading ------------------------------------------------------------------------------------------------

def _sam_official_format(state: dict) -> dict:
    """timm SAM names -> segment-anything's, with the prompt encoder and mask decoder around them."""
    out = {f"image_encoder.{k.replace('mlp.fc', 'mlp.lin')}": v for k, v in state.items()}
    out["prompt_encoder.point_embeddings.0.weight"] = torch.zeros(1, 256)
    out["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    return out


def test_sam_weights_load_strictly_from_segment_anything_and_timm_formats(tmp_path):
    torch.manual_seed(3)
    source, _, _ = create_backbone("sam-b", **TINY_SAM)
    state = {k: torch.randn_like(v) for k, v in source.state_dict().items()}
    official, timm_file = tmp_path / "sam_vit_b.pth", tmp_path / "samvit.pth"
    torch.save(_sam_official_format(state), official)
    torch.save(state, timm_file)
    for path in (official, timm_file):
        cellvit = load_weights(tiny(CellViT, "sam-b"), pretrained=path)
        torch.testing.assert_close(cellvit.encoder.vit.blocks[1].attn.rel_pos_h, state["blocks.1.attn.rel_pos_h"])
        torch.testing.assert_close(cellvit.encoder.vit.neck[2].weight, state["neck.2.weight"])
        adapter = load_weights(tiny(CellVTA, "sam-b"), pretrained=path)  # no neck: its keys are not used
        torch.testing.assert_close(adapter.encoder.vit.blocks[3].mlp.fc2.weight, state["blocks.3.mlp.fc2.weight"])
    bad = _sam_official_format(state)
    bad["image_encoder.blocks.0.attn.qkv.wieght"] = bad.pop("image_encoder.blocks.0.attn.qkv.weight")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match=r"bad.pth: weights of the 'sam-b' encoder do not match; missing "
                                       r"\['blocks.0.attn.qkv.weight'\], unexpected \['blocks.0.attn.qkv.wieght'\]"):
        load_weights(tiny(CellViT, "sam-b"), pretrained=tmp_path / "bad.pth")


def test_hierarchical_weights_load_from_a_timm_checkpoint_and_a_misspelt_key_is_named(tmp_path):
    torch.manual_seed(4)
    full = timm.create_model("convnext_tiny", **TINY["convnext-t"])  # with its classifier, as timm saves it
    state = {k: torch.randn_like(v) for k, v in full.state_dict().items()}
    torch.save(state, tmp_path / "convnext.pth")
    model = load_weights(tiny(CellViT, "convnext-t"), pretrained=tmp_path / "convnext.pth")
    torch.testing.assert_close(model.encoder.backbone.stages_2.blocks[0].conv_dw.weight,
                               state["stages.2.blocks.0.conv_dw.weight"])
    state["stages.1.downsample.1.wieght"] = state.pop("stages.1.downsample.1.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match=r"stages\.1\.downsample\.1\.wieght"):
        load_weights(tiny(CellViT, "convnext-t"), pretrained=tmp_path / "bad.pth")


def test_hipt_dino_checkpoint_is_unwrapped(tmp_path):
    torch.manual_seed(5)
    model = CellViT("hipt-256", 4, 3, vit_kwargs={"depth": 4}, freeze="full")
    state = {f"backbone.{k}": torch.randn_like(v) for k, v in model.encoder.vit.state_dict().items()}
    state["head.mlp.0.weight"] = torch.zeros(2048, 384)  # DINO's projection head
    torch.save({"teacher": state, "student": {}}, tmp_path / "vit256_small_dino.pth")
    load_weights(model, pretrained=tmp_path / "vit256_small_dino.pth")
    torch.testing.assert_close(model.encoder.vit.cls_token, state["backbone.cls_token"])
    assert model.mean == model.std == (0.5, 0.5, 0.5)


# --- skip blocks -----------------------------------------------------------------------------------------------------

def test_skip_blocks_choose_the_activations_that_reach_the_decoder():
    torch.manual_seed(0)
    model = CellViT("vit-s", 4, 0, freeze="full", vit_kwargs={"depth": 8}, skip_blocks=[0, 2, 5, 7]).eval()
    vit, x = model.encoder.vit, images(1, 64)
    seen, decoder_in = {}, {}
    hooks = [b.register_forward_hook(lambda _m, _i, out, i=i: seen.__setitem__(i, out))
             for i, b in enumerate(vit.blocks)]
    hooks += [getattr(model.decoder, f"decoder{i}").register_forward_hook(
        lambda _m, inputs, _o, i=i: decoder_in.__setitem__(i, inputs[0])) for i in (1, 2, 3)]
    hooks.append(model.decoder.branches["hv_map"].bottleneck_upsampler.register_forward_hook(
        lambda _m, inputs, _o: decoder_in.__setitem__(4, inputs[0])))

    def block_map(block: int) -> torch.Tensor:
        return seen[block][:, 1:].transpose(1, 2).reshape(1, 384, 4, 4)

    with torch.no_grad():
        model(x)
        for i, block in zip((1, 2, 3, 4), (0, 2, 5, 7)):
            torch.testing.assert_close(decoder_in[i], block_map(block))
        model.encoder.skip_blocks = [1, 3, 5, 7]  # the quarters, same weights
        model(x)
        for i, block in zip((1, 2, 3, 4), (1, 3, 5, 7)):
            torch.testing.assert_close(decoder_in[i], block_map(block))
    assert (block_map(1) - block_map(0)).abs().max() > 0.1
    for hook in hooks:
        hook.remove()
    adapter = CellVTA("vit-s", 4, 0, vit_kwargs={"depth": 8}, skip_blocks=[0, 2, 5, 7], device="meta")
    assert adapter.encoder.groups == [range(0, 1), range(1, 3), range(3, 6), range(6, 8)]
    with pytest.raises(ValueError, match=r"must end at the last block \(7\)"):
        CellVTA("vit-s", 4, 0, vit_kwargs={"depth": 8}, skip_blocks=[0, 2, 4, 6], device="meta")
    with pytest.raises(ValueError, match="4 strictly increasing block indices in \\[0, 8\\)"):
        CellViT("vit-s", 4, 0, vit_kwargs={"depth": 8}, skip_blocks=[0, 2, 2, 8], device="meta")


def test_forward_is_forward_features_then_forward_head():
    model, x = tiny(CellViT, "convnext-t"), images(1, 64)
    with torch.no_grad():
        features, tissue = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(x, features, tissue)["hv_map"], model(x)["hv_map"])


def test_image_statistics_are_known_without_building_the_network(tmp_path):
    assert image_statistics("h-optimus-1")[0] == (0.707223, 0.578729, 0.703617)
    assert image_statistics("sam-b") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert expected_image_statistics("uni", None, None) == image_statistics("uni")
    assert expected_image_statistics("uni", True, None) == ((0.5,) * 3, (0.5,) * 3)
    torch.save({"model_state_dict": {"nuclei_binary_map_decoder.x": torch.zeros(1)}}, tmp_path / "official.pth")
    assert expected_image_statistics("uni", None, tmp_path / "official.pth") == ((0.5,) * 3, (0.5,) * 3)
