"""Encoder backbones: timm model factory, presets with their weight sources, image statistics, freezing.

Three families of timm models are encoders here:

* ``vit``: a timm ``VisionTransformer`` (patch embedding, position embedding resampled to the input grid,
  prefix tokens, a list of token-sequence blocks). The adapter (CellVTA) and CellViT's block skips use it.
  Patch sizes other than 16 (DINOv2, UNI2-h, Virchow, H-optimus use 14): the encoders work on a 1/16 grid,
  so the ViT sees the image resized to ``(H / 16 * p, W / 16 * p)``; its token grid is ``H / 16 x W / 16``.
* ``sam``: timm's ``VisionTransformerSAM`` (SAM's image encoder: windowed attention with relative
  positions, global attention in every quarter's last block, a 256-channel convolutional neck). Its patch is
  16, so its token grid is the adapter's 1/16 grid; windows that do not divide the grid are padded by timm.
* ``hierarchical``: a timm CNN or hierarchical transformer built with ``features_only`` (ConvNeXt V1/V2,
  Swin V2, MaxViT, ResNet): stage outputs at their native strides (2..32), no adapter.

Presets and where their weights come from (``pretrained=`` takes a local file or ``hf-hub:<repo>``; every
key is checked, see ``scripts.model.weights``):

| preset | timm model | weights | key mapping |
|---|---|---|---|
| ``uni`` | ViT-L/16, 224 | ``hf-hub:MahmoodLab/UNI`` (``pytorch_model.bin``) | timm names |
| ``uni2-h`` | ViT-H/14, 8 registers, SwiGLU | ``hf-hub:MahmoodLab/UNI2-h`` | timm names |
| ``virchow`` | ViT-H/14, SwiGLU | ``hf-hub:paige-ai/Virchow`` | timm names |
| ``virchow2`` | ViT-H/14, 4 registers, SwiGLU | ``hf-hub:paige-ai/Virchow2`` | timm names |
| ``prov-gigapath`` | ViT-g/16 (1536-d, 40 blocks) | ``hf-hub:prov-gigapath/prov-gigapath`` | timm names |
| ``h-optimus-0``, ``h-optimus-1`` | ViT-g/14, 4 registers | ``hf-hub:bioptimus/H-optimus-0`` / ``-1`` | timm names |
| ``hipt-256`` | ViT-S/16 | ``vit256_small_dino.pth`` of the HIPT repository | the DINO ``teacher`` entry, ``backbone.`` stripped, DINO head dropped |
| ``sam-b/l/h`` | ``samvit_{base,large,huge}_patch16`` | ``sam_vit_{b,l,h}_*.pth`` of segment-anything, or timm's | ``image_encoder.`` stripped, ``mlp.lin`` -> ``mlp.fc`` (timm's filter) |
| ``dinov2-s/b/l/g`` | ``vit_*_patch14_dinov2`` | timm / ``hf-hub:timm/vit_*_patch14_dinov2.lvd142m`` | timm names |
| ``vit-t/s/b/l`` | ``vit_*_patch16_224`` | timm's ImageNet weights (``hf-hub:timm/...``) | timm names |
| ``convnext-t``, ``convnextv2-t``, ``swinv2-t``, ``maxvit-t``, ``resnet50`` | timm, ``features_only`` | timm's ImageNet weights | timm names |

Any other timm model name works too; its family is found from the model timm builds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from timm.layers import SwiGLUPacked
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_MEAN = (0.5, 0.5, 0.5)
OFFICIAL_STD = (0.5, 0.5, 0.5)
H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)

FAMILIES = ("vit", "sam", "hierarchical")
FREEZE_POLICIES = ("frozen", "full", "decoder_only")


@dataclass(frozen=True)
class BackbonePreset:
    """A timm model, its keyword arguments, its family, its image statistics and where its weights live.

    Attributes:
        model_name: timm model name.
        kwargs: timm keyword arguments of the released weights' architecture.
        mean, std: the image statistics the weights were trained with (RGB in [0, 1]).
        hf_hub: the Hugging Face hub repository of the weights, when there is one.
        family: ``vit``, ``sam`` or ``hierarchical`` (``None``: found from the built model).
        input_multiple: input sizes must be multiples of it (hierarchical encoders; ViTs need 16).
        checkpoint_entry: the entry of a checkpoint file holding the weights (e.g. DINO's ``teacher``).
        strip_prefixes: key prefixes removed from the file's keys (e.g. ``backbone.``).
    """

    model_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hf_hub: str | None = None
    family: str | None = None
    input_multiple: int = 16
    checkpoint_entry: str | None = None
    strip_prefixes: tuple[str, ...] = ()


_SWIGLU = {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}
_GIANT14 = {"img_size": 224, "init_values": 1e-5}

PRESETS: dict[str, BackbonePreset] = {
    "uni": BackbonePreset(
        "vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5}, hf_hub="MahmoodLab/UNI"
    ),
    "uni2-h": BackbonePreset(
        "vit_giant_patch14_224",
        {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
         "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, **_SWIGLU},
        hf_hub="MahmoodLab/UNI2-h",
    ),
    "virchow": BackbonePreset(
        "vit_huge_patch14_224", {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, **_SWIGLU},
        hf_hub="paige-ai/Virchow",
    ),
    "virchow2": BackbonePreset(
        "vit_huge_patch14_224",
        {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4, **_SWIGLU},
        hf_hub="paige-ai/Virchow2",
    ),
    "prov-gigapath": BackbonePreset(
        "vit_giant_patch14_dinov2",
        {"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24, "init_values": 1e-5,
         "mlp_ratio": 5.33334},
        hf_hub="prov-gigapath/prov-gigapath",
    ),
    "h-optimus-0": BackbonePreset("vit_giant_patch14_reg4_dinov2", _GIANT14, H_OPTIMUS_MEAN, H_OPTIMUS_STD,
                                  hf_hub="bioptimus/H-optimus-0"),
    "h-optimus-1": BackbonePreset("vit_giant_patch14_reg4_dinov2", _GIANT14, H_OPTIMUS_MEAN, H_OPTIMUS_STD,
                                  hf_hub="bioptimus/H-optimus-1"),
    "hipt-256": BackbonePreset("vit_small_patch16_224", {"img_size": 224}, OFFICIAL_MEAN, OFFICIAL_STD,
                               checkpoint_entry="teacher", strip_prefixes=("module.", "backbone.")),
    "sam-b": BackbonePreset("samvit_base_patch16", {}, family="sam"),
    "sam-l": BackbonePreset("samvit_large_patch16", {}, family="sam"),
    "sam-h": BackbonePreset("samvit_huge_patch16", {}, family="sam"),
    "dinov2-s": BackbonePreset("vit_small_patch14_dinov2", {"img_size": 518}),
    "dinov2-b": BackbonePreset("vit_base_patch14_dinov2", {"img_size": 518}),
    "dinov2-l": BackbonePreset("vit_large_patch14_dinov2", {"img_size": 518}),
    "dinov2-g": BackbonePreset("vit_giant_patch14_dinov2", {"img_size": 518}),
    "vit-t": BackbonePreset("vit_tiny_patch16_224", {"img_size": 224}),
    "vit-s": BackbonePreset("vit_small_patch16_224", {"img_size": 224}),
    "vit-b": BackbonePreset("vit_base_patch16_224", {"img_size": 224}),
    "vit-l": BackbonePreset("vit_large_patch16_224", {"img_size": 224}),
    "convnext-t": BackbonePreset("convnext_tiny", family="hierarchical", input_multiple=32),
    "convnextv2-t": BackbonePreset("convnextv2_tiny", family="hierarchical", input_multiple=32),
    # Swin V2 pads the windows of any input size (timm's dynamic_img_size)
    "swinv2-t": BackbonePreset("swinv2_tiny_window8_256", {"dynamic_img_size": True}, family="hierarchical",
                               input_multiple=32),
    # MaxViT partitions every stage into 8 x 8 windows and grids: stage 5 (stride 32) must hold whole windows
    "maxvit-t": BackbonePreset("maxvit_tiny_rw_256", family="hierarchical", input_multiple=256),
    "resnet50": BackbonePreset("resnet50", family="hierarchical", input_multiple=32),
}


def get_preset(backbone: str) -> BackbonePreset:
    """The preset named ``backbone``, or a plain preset for any other timm model name."""
    return PRESETS.get(backbone, BackbonePreset(backbone))


def family_of(backbone: str) -> str:
    """``vit``, ``sam`` or ``hierarchical`` for a preset or timm model name (builds nothing for presets).

    Raises:
        ValueError: ``backbone`` is not a timm model name or preset.
    """
    preset = get_preset(backbone)
    if preset.family is not None:
        return preset.family
    if not timm.is_model(preset.model_name):
        raise ValueError(f"backbone {backbone!r} is neither a preset ({', '.join(PRESETS)}) nor a timm model name")
    model = timm.create_model(preset.model_name, pretrained=False, device="meta", **preset.kwargs)
    if isinstance(model, timm.models.VisionTransformer):
        return "vit"
    if isinstance(model, timm.models.vision_transformer_sam.VisionTransformerSAM):
        return "sam"
    return "hierarchical"


def image_statistics(backbone: str,
                     official_normalization: bool = False) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of RGB in [0, 1] the backbone's weights expect, without building anything.

    Args:
        backbone: a preset or timm model name.
        official_normalization: the official CellVTA statistics (0.5 / 0.5) instead.
    """
    if official_normalization:
        return OFFICIAL_MEAN, OFFICIAL_STD
    preset = get_preset(backbone)
    return preset.mean, preset.std


def create_backbone(
    backbone: str,
    drop_path_rate: float = 0.0,
    device: torch.device | str | None = None,
    **overrides: Any,
) -> tuple[nn.Module, BackbonePreset, str]:
    """Build a timm encoder without classifier.

    Args:
        backbone: a preset name (``PRESETS``) or any timm model name.
        drop_path_rate: stochastic depth of its blocks (0 keeps frozen features deterministic).
        device: where to allocate the parameters (``"meta"`` to count them for free).
        overrides: extra timm keyword arguments (e.g. ``depth`` for a small experiment).

    Returns:
        The model, its preset and its family. ViTs are built with ``dynamic_img_size=True`` (any input
        size), hierarchical models with ``features_only=True`` (a list of stage maps).

    Raises:
        ValueError: ``backbone`` is not a timm model name or preset.
    """
    preset = get_preset(backbone)
    family = family_of(backbone)
    kwargs = {**preset.kwargs, **overrides, "drop_path_rate": drop_path_rate}
    if family == "vit":
        kwargs.update(num_classes=0, dynamic_img_size=True)
    elif family == "sam":
        kwargs.update(num_classes=0)
    else:
        kwargs.update(features_only=True)
    model = timm.create_model(preset.model_name, pretrained=False, device=device, **kwargs)
    return model, preset, family


def create_vit(backbone: str, drop_path_rate: float = 0.0, device: torch.device | str | None = None,
               **overrides: Any) -> tuple[nn.Module, BackbonePreset]:
    """A ViT-style encoder (``vit`` or ``sam`` family) and its preset (see ``create_backbone``).

    Raises:
        TypeError: the backbone is hierarchical.
    """
    model, preset, family = create_backbone(backbone, drop_path_rate, device, **overrides)
    if family == "hierarchical":
        raise TypeError(f"backbone {backbone!r} builds a hierarchical {type(model).__name__}, not a ViT: "
                        "it feeds the decoder without the adapter (CellViT, use_adapter false)")
    return model, preset


def apply_freeze_policy(model: nn.Module, policy: str) -> None:
    """Set ``requires_grad`` by policy.

    ``frozen`` (the paper's): the pretrained encoder is frozen except the parts that feed only the tissue
    head (a ViT's final norm, SAM's neck); what is built on it (adapter, skip fusion, decoder, heads) trains.
    ``full``: everything trains. ``decoder_only``: only the decoder and the heads train (frozen-encoder
    ablation: the adapter or fusion is frozen too).

    Args:
        model: a network whose ``encoder`` has ``pretrained_parameters()`` and ``head`` (``None`` or a layer).
        policy: one of ``FREEZE_POLICIES``.
    """
    if policy not in FREEZE_POLICIES:
        raise ValueError(f"freeze policy {policy!r}: expected one of {FREEZE_POLICIES}")
    model.requires_grad_(True)
    if policy == "frozen":
        for param in model.encoder.pretrained_parameters():
            param.requires_grad_(False)
    elif policy == "decoder_only":
        model.encoder.requires_grad_(False)
        if model.encoder.head is not None:
            model.encoder.head.requires_grad_(True)
