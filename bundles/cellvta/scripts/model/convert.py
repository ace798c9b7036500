"""Conversion of the released official CellVTA checkpoints (``CellViTUNIAdapter``) to ``CellVTA``.

Official key prefixes map as follows; everything else keeps its name:

| official | ours |
|---|---|
| ``encoder.{cls_token,pos_embed,patch_embed,blocks,norm}`` | ``encoder.vit.…`` |
| ``decoder0..3`` | ``decoder.decoder0..3`` |
| ``nuclei_binary_map_decoder`` / ``hv_map_decoder`` / ``nuclei_type_maps_decoder`` | ``decoder.branches.{nuclei_binary_map,hv_map,nuclei_type_map}`` |

Official weights were trained with the class token kept out of the ViT blocks and with 0.5/0.5
normalisation: build the network with ``cls_through_blocks=False, official_normalization=True``.
"""

from __future__ import annotations

import re

import torch

_VIT_PARTS = ("cls_token", "pos_embed", "patch_embed", "blocks", "norm")
_BRANCHES = {
    "nuclei_binary_map_decoder": "decoder.branches.nuclei_binary_map",
    "hv_map_decoder": "decoder.branches.hv_map",
    "nuclei_type_maps_decoder": "decoder.branches.nuclei_type_map",
}


def is_official_state_dict(state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` uses the official key names (its branches are ``*_decoder``)."""
    return any(key.startswith(tuple(_BRANCHES)) for key in state)


def convert_official_key(key: str) -> str:
    """Our name of one official state-dict key."""
    head, _, rest = key.partition(".")
    if head == "encoder":
        part = rest.split(".", 1)[0]
        return f"encoder.vit.{rest}" if part in _VIT_PARTS else key
    if head in _BRANCHES:
        return f"{_BRANCHES[head]}.{rest}"
    if re.fullmatch(r"decoder[0-3]", head):
        return f"decoder.{key}"
    raise KeyError(f"official CellVTA key {key!r} has no counterpart")


def convert_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every key of an official CellVTA state dict (shapes are identical)."""
    return {convert_official_key(key): value for key, value in state.items()}
