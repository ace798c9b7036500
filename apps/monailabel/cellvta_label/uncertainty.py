"""Epistemic uncertainty of the network on an image: the mutual information between its prediction and the
model, estimated from test-time augmentation (the 8 flips/rotations of the square) or MC dropout samples."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

METHODS = ("tta", "mc_dropout")
TYPE_KEY = "nuclei_type_map"


def dihedral(x: torch.Tensor, index: int) -> torch.Tensor:
    """Element ``index`` (0..7) of the dihedral group on the last two axes: ``index % 4`` quarter turns, then a
    left-right flip when ``index >= 4``."""
    y = torch.rot90(x, index % 4, dims=(-2, -1))
    return torch.flip(y, dims=(-1,)) if index >= 4 else y


def undo_dihedral(y: torch.Tensor, index: int) -> torch.Tensor:
    """Inverse of :func:`dihedral`."""
    if index >= 4:
        y = torch.flip(y, dims=(-1,))
    return torch.rot90(y, -(index % 4), dims=(-2, -1))


def enable_mc_dropout(network: nn.Module) -> int:
    """Put every dropout and drop-path layer with a non-zero rate in training mode (the rest stays in eval).

    Returns:
        The number of stochastic layers.

    Raises:
        ValueError: the network has none (MC dropout would return the same prediction every time).
    """
    count = 0
    for module in network.modules():
        rate = getattr(module, "p", None) if isinstance(module, nn.modules.dropout._DropoutNd) else \
            getattr(module, "drop_prob", None)
        if rate:
            module.train()
            count += 1
    if count == 0:
        raise ValueError("the network has no dropout or drop-path layer with a non-zero rate: use method 'tta', "
                         "or build it with dropout (e.g. overrides {\"network_def\": {..., \"drop_rate\": 0.1}})")
    return count


def mc_dropout_network(network: nn.Module) -> nn.Module:
    """A copy of ``network`` in eval mode with its dropout and drop-path layers active (``network`` is unchanged)."""
    stochastic = copy.deepcopy(network).eval()
    enable_mc_dropout(stochastic)
    return stochastic


@torch.no_grad()
def type_probabilities(network: nn.Module, inferer: Callable, image: torch.Tensor, method: str,
                       samples: int) -> torch.Tensor:
    """Per-pixel class probabilities of ``samples`` stochastic predictions.

    Args:
        network: returns a dict with ``nuclei_type_map`` logits ``(B, C, H, W)``; for ``mc_dropout``, a network
            from :func:`mc_dropout_network`.
        inferer: the bundle's sliding-window inferer, called as ``inferer(x, network)``.
        image: ``(1, 3, H, W)`` normalised image on the network's device.
        method: ``tta`` (sample ``i`` sees the image under dihedral transform ``i % 8``) or ``mc_dropout``.
        samples: number of predictions (``tta``: at most 8 distinct ones).

    Returns:
        ``(samples, C, H, W)`` float32 probabilities, in the frame of ``image``.
    """
    if method not in METHODS:
        raise ValueError(f"uncertainty method {method!r}: expected one of {METHODS}")
    if samples < 2:
        raise ValueError(f"uncertainty needs at least 2 samples, got {samples}")
    if method == "mc_dropout" and not any(m.training for m in network.modules()):
        raise ValueError("mc_dropout needs a network from mc_dropout_network (its dropout layers active)")
    out = []
    for i in range(samples):
        view = dihedral(image, i % 8) if method == "tta" else image
        probs = torch.softmax(inferer(view, network)[TYPE_KEY].float(), dim=1)
        out.append(undo_dihedral(probs, i % 8) if method == "tta" else probs)
    return torch.cat(out, dim=0)


def mutual_information(probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean over pixels of the mutual information (BALD) of ``(S, C, H, W)`` sampled class probabilities:
    entropy of the mean prediction minus the mean entropy of the samples (in nats, >= 0)."""
    mean = probs.mean(0)
    entropy_of_mean = -(mean * torch.log(mean + eps)).sum(0)
    mean_entropy = -(probs * torch.log(probs + eps)).sum(1).mean(0)
    return (entropy_of_mean - mean_entropy).clamp_min(0).mean()
