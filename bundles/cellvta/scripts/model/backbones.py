"""Foundation ViT backbones: timm model factory, presets, strict checkpoint loading, freezing.

The adapter needs a plain timm ``VisionTransformer``: its patch embedding, position embedding
(resampled to the input grid, as timm does with ``dynamic_img_size``), prefix tokens (class and
register tokens) and list of blocks. Any such timm model works; the presets below name the
pathology foundation models and a few plain sizes.

Patch sizes other than 16 (DINOv2, UNI2-h, Virchow2, H-optimus-0 use 14): the adapter works on
a 1/16 grid, so the ViT branch sees the image resized to ``(H / 16 * p, W / 16 * p)``; its token
grid is then ``H / 16 x W / 16`` for any patch size ``p``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import SwiGLUPacked
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_MEAN = (0.5, 0.5, 0.5)
OFFICIAL_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackbonePreset:
    """A timm model name, its keyword arguments and the image statistics it was trained with."""

    model_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hf_hub: str | None = None


PRESETS: dict[str, BackbonePreset] = {
    "uni": BackbonePreset(
        "vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5}, hf_hub="MahmoodLab/UNI"
    ),
    "uni2-h": BackbonePreset(
        "vit_giant_patch14_224",
        {
            "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
            "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "mlp_layer": SwiGLUPacked,
            "act_layer": nn.SiLU, "reg_tokens": 8,
        },
        hf_hub="MahmoodLab/UNI2-h",
    ),
    "virchow2": BackbonePreset(
        "vit_huge_patch14_224",
        {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "mlp_layer": SwiGLUPacked,
         "act_layer": nn.SiLU, "reg_tokens": 4},
        hf_hub="paige-ai/Virchow2",
    ),
    "h-optimus-0": BackbonePreset(
        "vit_giant_patch14_reg4_dinov2",
        {"img_size": 224, "init_values": 1e-5},
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        hf_hub="bioptimus/H-optimus-0",
    ),
    "dinov2-s": BackbonePreset("vit_small_patch14_dinov2", {"img_size": 518}),
    "dinov2-b": BackbonePreset("vit_base_patch14_dinov2", {"img_size": 518}),
    "dinov2-l": BackbonePreset("vit_large_patch14_dinov2", {"img_size": 518}),
    "vit-t": BackbonePreset("vit_tiny_patch16_224", {"img_size": 224}),
    "vit-s": BackbonePreset("vit_small_patch16_224", {"img_size": 224}),
    "vit-b": BackbonePreset("vit_base_patch16_224", {"img_size": 224}),
    "vit-l": BackbonePreset("vit_large_patch16_224", {"img_size": 224}),
}

FREEZE_POLICIES = ("frozen", "full", "decoder_only")


def create_vit(
    backbone: str,
    drop_path_rate: float = 0.0,
    device: torch.device | str | None = None,
    **overrides: Any,
) -> tuple[timm.models.VisionTransformer, BackbonePreset]:
    """Build a timm ViT without classifier, ready for any input size.

    Args:
        backbone: a preset name (``PRESETS``) or any timm ViT model name.
        drop_path_rate: stochastic depth of the ViT blocks (0 keeps frozen features deterministic).
        device: where to allocate the parameters (``"meta"`` to count them for free).
        overrides: extra timm keyword arguments (e.g. ``depth`` for a small experiment).

    Returns:
        The model (``num_classes=0``, ``dynamic_img_size=True``) and its preset.
    """
    preset = PRESETS.get(backbone, BackbonePreset(backbone))
    kwargs = {**preset.kwargs, **overrides, "num_classes": 0, "dynamic_img_size": True,
              "drop_path_rate": drop_path_rate}
    model = timm.create_model(preset.model_name, pretrained=False, device=device, **kwargs)
    if not isinstance(model, timm.models.VisionTransformer):
        raise TypeError(f"backbone {backbone!r} builds a {type(model).__name__}, not a timm VisionTransformer")
    return model, preset


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (.bin, .pth, .pt, .safetensors), unwrapped from common containers.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return state


def vit_state_dict_from_hub(name: str, backbone: str) -> dict[str, torch.Tensor]:
    """Weights of a ``hf-hub:`` model through timm (needs network access to the hub).

    Raises:
        RuntimeError: the hub cannot be reached, with the reason.
    """
    preset = PRESETS.get(backbone, BackbonePreset(backbone))
    try:
        model = timm.create_model(name, pretrained=True, **{**preset.kwargs, "num_classes": 0,
                                                            "dynamic_img_size": True})
    except Exception as exc:  # network, authentication and missing-model errors alike
        raise RuntimeError(f"could not load {name!r} from the Hugging Face hub: {exc}") from exc
    return model.state_dict()


def load_vit_weights(vit: nn.Module, source: str | Path, backbone: str) -> None:
    """Load ViT weights strictly: every key of ``vit`` must be present, with the right shape.

    Args:
        vit: the timm ViT.
        source: a local file or ``hf-hub:<repo>``.
        backbone: the preset name (for hub models).

    Raises:
        KeyError: keys missing from the checkpoint or unknown to the ViT, named.
        ValueError: shape mismatches, named.
    """
    source = str(source)
    state = vit_state_dict_from_hub(source, backbone) if source.startswith("hf-hub:") else read_state_dict(source)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
    load_exactly(vit, state, f"{source}: ViT weights of the {backbone!r} backbone")


def load_exactly(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``module`` when both hold the same keys with the same shapes.

    Raises:
        KeyError: missing and unexpected keys, named (``what`` says which weights).
        ValueError: shape mismatches, named.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{what} do not match; missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                       f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}")
    wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{what}: shapes differ: {wrong[:10]}")
    module.load_state_dict(state, strict=True)


def apply_freeze_policy(model: nn.Module, policy: str) -> None:
    """Set ``requires_grad`` by policy.

    ``frozen`` (the paper's): the ViT's patch embedding, tokens, position embedding and blocks
    are frozen; its final norm, the adapter, the decoder and the heads train. ``full``:
    everything trains. ``decoder_only``: only the decoder and heads train (frozen-encoder ablation).

    Args:
        model: a ``CellVTA`` or ``CellViT`` (has ``encoder.vit`` and ``decoder``).
        policy: one of ``FREEZE_POLICIES``.
    """
    if policy not in FREEZE_POLICIES:
        raise ValueError(f"freeze policy {policy!r}: expected one of {FREEZE_POLICIES}")
    model.requires_grad_(True)
    if policy == "full":
        return
    vit = model.encoder.vit
    if policy == "frozen":
        for name, module in vit.named_children():
            if name != "norm":
                module.requires_grad_(False)
        for name, param in vit.named_parameters(recurse=False):
            param.requires_grad_(False)
    else:
        model.encoder.requires_grad_(False)
        model.encoder.head.requires_grad_(True)
