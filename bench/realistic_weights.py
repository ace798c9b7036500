"""Realistic weights for precision measurements: a random network whose activations behave like a trained one's.

A freshly initialised CellVTA is a poor subject for measuring precision: its LayerScale starts at 1e-5 (the ViT
blocks add almost nothing to the token stream), its biases are zero and its BatchNorm statistics describe no
data. :func:`make_realistic` moves a network, in place and seeded, to the state of a trained one: LayerScale and
injection scales (``gamma``) of order 0.1, non-zero biases, normalisation weights around 1, and BatchNorm running
statistics measured on real images, so that activations stay of order 1 through the whole network.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from scripts.model.precision import NORMALISATIONS

GAMMA_RANGE = (0.05, 0.3)  # |LayerScale| of trained ViT-L pathology encoders
BIAS_STD = 0.05
NORM_WEIGHT_STD = 0.1


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size]


@torch.no_grad()
def make_realistic(network: nn.Module, images: torch.Tensor, seed: int = 0, batch_size: int = 4) -> nn.Module:
    """Perturb ``network``'s scales, biases and norm weights, then calibrate its BatchNorm statistics.

    Args:
        network: a CellVTA / CellViT (any encoder), float32.
        images: ``(N, 3, H, W)`` normalised real images (the network's mean and std): BatchNorm running means
            and variances become their averages over these images (cumulative, every image weighted alike).
        seed: the perturbation's seed.

    Returns:
        ``network``, in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)

    def draw(like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator).to(like)

    for name, param in network.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gamma":
            low, high = GAMMA_RANGE
            param.copy_(low + (high - low) * torch.rand(param.shape, generator=generator).to(param))
        elif leaf == "bias":
            param.add_(BIAS_STD * draw(param))
    for module in network.modules():
        if isinstance(module, NORMALISATIONS) and module.weight is not None:
            module.weight.mul_(1 + NORM_WEIGHT_STD * draw(module.weight))

    network.eval()
    batch_norms = [m for m in network.modules() if isinstance(m, _BatchNorm)]
    momenta = [bn.momentum for bn in batch_norms]
    for bn in batch_norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
        bn.train()
    for batch in _batches(images, batch_size):
        network(batch)
    for bn, momentum in zip(batch_norms, momenta):
        bn.momentum = momentum
    return network.eval()
