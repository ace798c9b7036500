"""The one loader of weights: encoder weights (ViT, SAM, hierarchical) and whole-network checkpoints.

``load_weights(network, checkpoint=None, pretrained=None)`` is what every workflow and both apps call after
building a network (``scripts.model.network``): ``pretrained`` holds the encoder's weights (a local file or
``hf-hub:<repo>``), ``checkpoint`` the whole network's (a bundle checkpoint, or an official CellVTA one).
Loading is strict: every key of the target must be present with its shape and no other key may be left,
and a mismatch names the keys.

Formats recognised:

* bundle checkpoints: our state dict (``models/model.pt``), or a dict holding it under ``model``,
  ``model_state_dict`` or ``state_dict`` (``models/checkpoint_epoch=N.pt``);
* official CellVTA checkpoints (the trainer's dict with ``arch``, ``model_state_dict``, ``config``):
  renamed by ``scripts.model.convert``. Their weights need ``cls_through_blocks=False`` and
  ``official_normalization=True`` (and were trained from ``official_init``): ``load_weights`` sets these
  switches, logs it once, and refuses a network built with a contradicting explicit setting;
* ViT weights in timm names (the preset's ``checkpoint_entry``/``strip_prefixes`` unwrap e.g. HIPT's DINO
  checkpoint; classifier keys ``head.*``/``fc_norm.*`` are dropped);
* SAM image encoders in the segment-anything format (``image_encoder.*``; the prompt encoder and mask
  decoder are dropped, names mapped by timm's SAM filter) or in timm names; the neck's keys are dropped
  when the network does not use the neck;
* hierarchical encoders: a timm checkpoint of the full model (its classifier is dropped; every other key
  is checked against the full timm model, then renamed to its ``features_only`` wrapper's names).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer_sam import checkpoint_filter_fn as sam_filter
from torch import nn

from .backbones import get_preset, image_statistics
from .convert import convert_official_state_dict, is_official_state_dict

logger = logging.getLogger(__name__)

OFFICIAL_SWITCHES = {"cls_through_blocks": False, "official_normalization": True, "official_init": True}
_CONTAINERS = ("model_state_dict", "state_dict", "model")


def read_checkpoint(path: str | Path, entry: str | None = None) -> dict[str, Any]:
    """The object stored in a checkpoint file (.bin, .pth, .pt, .safetensors), or its ``entry``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read, or has no ``entry``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling and format errors alike
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if entry is not None:
        if not isinstance(obj, dict) or entry not in obj:
            raise ValueError(f"{path}: no {entry!r} entry in the checkpoint")
        obj = obj[entry]
    return obj


def read_state_dict(path: str | Path, entry: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from ``entry`` and from the common containers.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds no state dict.
    """
    state = read_checkpoint(path, entry)
    for key in _CONTAINERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return state


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


def checkpoint_switches(checkpoint: str | Path | None) -> dict[str, bool]:
    """The switches a whole-network checkpoint's weights need: ``OFFICIAL_SWITCHES`` for an official
    CellVTA checkpoint, ``{}`` for a bundle checkpoint or none."""
    if not checkpoint:
        return {}
    return dict(OFFICIAL_SWITCHES) if is_official_state_dict(read_state_dict(checkpoint)) else {}


def expected_image_statistics(backbone: str, official_normalization: bool | None = None,
                              checkpoint: str | Path | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` a network of ``backbone`` loaded with ``checkpoint`` expects, without building it.

    ``official_normalization=None`` follows the checkpoint (0.5 / 0.5 for official weights).
    """
    if official_normalization is None:
        official_normalization = checkpoint_switches(checkpoint).get("official_normalization", False)
    return image_statistics(backbone, official_normalization)


def _hub_state_dict(name: str, backbone: str, family: str) -> dict[str, torch.Tensor]:
    """Weights of a ``hf-hub:`` model through timm (needs network access to the hub).

    Raises:
        RuntimeError: the hub cannot be reached, with the reason.
    """
    preset = get_preset(backbone)
    extra = {"features_only": True} if family == "hierarchical" else {"num_classes": 0}
    try:
        model = timm.create_model(name, pretrained=True, **{**preset.kwargs, **extra})
    except Exception as exc:  # network, authentication and missing-model errors alike
        raise RuntimeError(f"could not load {name!r} from the Hugging Face hub: {exc}") from exc
    return model.state_dict()


def _hierarchical_state_dict(path: str, backbone: str, network_kwargs: dict,
                             target: nn.Module) -> dict[str, torch.Tensor]:
    """A timm checkpoint of the full model, checked key by key against it, in the names of ``target``.

    Keys are compared with the full timm model's (classifier excluded); ``target`` is its ``features_only``
    wrapper, whose top-level sequential modules are flattened (``stages.0`` -> ``stages_0``).

    Raises:
        KeyError: missing and unexpected keys, named.
    """
    preset = get_preset(backbone)
    full = timm.create_model(preset.model_name, device="meta", **{**preset.kwargs, **network_kwargs})
    classifier = full.pretrained_cfg.get("classifier") or ""

    def kept(key: str) -> bool:
        return not (classifier and key.startswith(f"{classifier}."))

    state = {k: v for k, v in read_state_dict(path).items() if kept(k)}
    expected = {k for k in full.state_dict() if kept(k)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(f"{path}: weights of the {backbone!r} encoder do not match; missing {missing[:10]}, "
                       f"unexpected {unexpected[:10]}")
    return {k: state[k if k in expected else k.replace("_", ".", 1)] for k in target.state_dict()}


def encoder_state_dict(network: nn.Module, source: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The encoder module that pretrained weights go to, and the weights of ``source`` in its names."""
    family, backbone = network.family, network.backbone
    if family == "hierarchical":
        target = network.encoder.backbone
        if source.startswith("hf-hub:"):
            return target, _hub_state_dict(source, backbone, family)
        return target, _hierarchical_state_dict(source, backbone, network.vit_kwargs, target)
    target = network.encoder.vit
    preset = get_preset(backbone)
    if source.startswith("hf-hub:"):
        state = _hub_state_dict(source, backbone, family)
    else:
        state = read_state_dict(source, preset.checkpoint_entry)
    for prefix in preset.strip_prefixes:
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    if family == "sam" and any(k.startswith("image_encoder.") for k in state):
        state = sam_filter(state, target)
    dropped = ["head.", "fc_norm."]
    if family == "sam" and isinstance(target.neck, nn.Identity):
        dropped.append("neck.")
    return target, {k: v for k, v in state.items() if not k.startswith(tuple(dropped))}


def _apply_switches(network: nn.Module, needed: dict[str, bool], source: str) -> None:
    """Set the switches the weights need; refuse contradicting explicit settings.

    Raises:
        ValueError: the network was built with a setting the weights contradict.
    """
    applied = []
    for name in ("cls_through_blocks", "official_normalization"):
        if name not in needed:
            continue
        requested = network.requested.get(name)
        if requested is not None and bool(requested) != needed[name]:
            raise ValueError(f"{source}: official CellVTA weights need {name}={needed[name]}, but the network was "
                             f"built with {name}={requested}; leave {name} unset (null) or set it to {needed[name]}")
        applied.append(f"{name}={needed[name]}")
    if "cls_through_blocks" in needed:
        network.encoder.cls_through_blocks = needed["cls_through_blocks"]
    if "official_normalization" in needed:
        network.set_official_normalization(needed["official_normalization"])
    if applied:
        logger.info("%s: official CellVTA checkpoint; set %s (its weights need them; the official "
                    "initialisation is replaced by the loaded weights)", source, ", ".join(applied))


def load_weights(network: nn.Module, checkpoint: str | Path | None = None,
                 pretrained: str | Path | None = None) -> nn.Module:
    """Load encoder weights, then a whole-network checkpoint, strictly, into a network built by
    ``scripts.model.network``.

    Args:
        network: a ``CellVTA`` or ``CellViT``.
        checkpoint: whole-network weights: a bundle checkpoint or an official CellVTA checkpoint (which also
            sets the switches its weights need, see the module docstring). ``None``: none.
        pretrained: the encoder's weights: a local file or ``hf-hub:<repo>``. ``None``: none.

    Returns:
        ``network`` (so that configs can chain ``.to(device)``).

    Raises:
        FileNotFoundError: a file does not exist.
        KeyError / ValueError: keys or shapes that do not match, named; a switch the weights contradict.
        RuntimeError: the hub cannot be reached.
    """
    if pretrained:
        pretrained = str(pretrained)
        target, state = encoder_state_dict(network, pretrained)
        load_exactly(target, state, f"{pretrained}: weights of the {network.backbone!r} encoder")
    if checkpoint:
        checkpoint = str(checkpoint)
        state = read_state_dict(checkpoint)
        if is_official_state_dict(state):
            _apply_switches(network, OFFICIAL_SWITCHES, checkpoint)
            state = convert_official_state_dict(state)
        load_exactly(network, state, f"{checkpoint}: network weights")
    return network

