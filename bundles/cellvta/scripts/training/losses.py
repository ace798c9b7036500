"""The CellVTA training loss: nuclei (NP), HV-map, nuclei-type (NT) and tissue terms as one module.

Terms (reference section 5.2), all computed from logits:

* ``np_ft``: focal Tversky of the nucleus map, ``np_dice``: Dice of the nucleus map;
* ``hv_mse``: mean squared error of the HV maps, ``hv_msge``: squared error of their 5x5 Sobel gradients
  inside the nuclei;
* ``nt_ce``: cross entropy, ``nt_dice``: Dice, ``nt_ft``: multi-class focal Tversky of the type map;
* ``tissue_ce``: cross entropy of the tissue logits.

``official_compat=False`` (default) fixes the defects of the official code (reference section 11.3):
softmax is applied once, the MSGE differentiates the x-map along x and the y-map along y, and Dice and
focal Tversky are averaged over the foreground classes. ``official_compat=True`` reproduces the official
behaviour: a second softmax inside both focal Tversky terms, the NP focal Tversky pooled over both
channels, cross-direction derivatives in the MSGE, and Dice / multi-class focal Tversky summed over all
classes including background.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_WEIGHTS: dict[str, float] = {
    "np_ft": 1.0,
    "np_dice": 1.0,
    "hv_mse": 2.5,
    "hv_msge": 8.0,
    "nt_ce": 0.5,
    "nt_dice": 0.2,
    "nt_ft": 0.5,
    "tissue_ce": 0.1,
}


def sobel_kernels(size: int = 5, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """HoVer-Net's Sobel-like gradient kernels (size, size).

    ``kx[i, j] = x_j / (x_j**2 + y_i**2)`` differentiates along columns (x) and ``ky = kx.T`` along rows (y),
    with x, y in -size//2..size//2 and the centre set to 0.
    """
    r = torch.arange(-(size // 2), size // 2 + 1, dtype=torch.float64)
    y, x = torch.meshgrid(r, r, indexing="ij")
    denom = x * x + y * y
    denom[size // 2, size // 2] = 1.0
    kx = x / denom
    return kx.to(dtype), kx.T.contiguous().to(dtype)


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """(B, 1, H, W) or (B, H, W) integer labels -> (B, C, H, W) float one-hot."""
    if labels.ndim == 4:
        labels = labels[:, 0]
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()


def dice_per_class(probs: Tensor, target: Tensor, smooth: float = 1e-3) -> Tensor:
    """1 - Dice per channel, sums over batch and pixels: probs and one-hot target (B, C, H, W) -> (C,)."""
    dims = (0, 2, 3)
    inter = (probs * target).sum(dims)
    return 1.0 - (2.0 * inter + smooth) / (probs.sum(dims) + target.sum(dims) + smooth)


def focal_tversky_per_class(
    probs: Tensor, target: Tensor, alpha: float = 0.7, beta: float = 0.3, gamma: float = 4 / 3, smooth: float = 1e-6
) -> Tensor:
    """(1 - Tversky index) ** gamma per channel: probs and one-hot target (B, C, H, W) -> (C,).

    Tversky = (TP + s) / (TP + alpha FN + beta FP + s) with sums over batch and pixels.
    """
    dims = (0, 2, 3)
    tp = (probs * target).sum(dims)
    fn = (target * (1 - probs)).sum(dims)
    fp = ((1 - target) * probs).sum(dims)
    return (1.0 - (tp + smooth) / (tp + alpha * fn + beta * fp + smooth)) ** gamma


def focal_tversky_pooled(
    probs: Tensor, target: Tensor, alpha: float = 0.7, beta: float = 0.3, gamma: float = 4 / 3, smooth: float = 1e-6
) -> Tensor:
    """Focal Tversky with all channels pooled into one set (the official NP term): (B, C, H, W) -> scalar."""
    return focal_tversky_per_class(probs.reshape(1, 1, 1, -1), target.reshape(1, 1, 1, -1), alpha, beta, gamma, smooth)[
        0
    ]


def msge(pred_hv: Tensor, true_hv: Tensor, focus: Tensor, cross_derivatives: bool = False) -> Tensor:
    """Mean squared error of HV-map gradients inside ``focus``.

    Args:
        pred_hv, true_hv: (B, 2, H, W); channel 0 the x-map, channel 1 the y-map.
        focus: (B, 1, H, W) or (B, H, W) nucleus mask.
        cross_derivatives: differentiate the x-map along y and the y-map along x (official behaviour);
            otherwise the x-map along x and the y-map along y (HoVer-Net paper, MONAI ``HoVerNetLoss``).

    Returns:
        sum(focus * (grad pred - grad true)**2) / (sum(focus over both channels) + 1e-8).
    """
    kx, ky = sobel_kernels(5, pred_hv.dtype)
    first, second = (ky, kx) if cross_derivatives else (kx, ky)
    weight = torch.stack([first, second])[:, None].to(pred_hv.device)
    grad = F.conv2d(pred_hv - true_hv, weight, padding=2, groups=2)
    focus = focus.reshape(focus.shape[0], 1, *focus.shape[-2:]).to(grad.dtype).expand_as(grad)
    return (focus * grad * grad).sum() / (focus.sum() + 1e-8)


def _official_xentropy(probs: Tensor, target: Tensor) -> Tensor:
    probs = probs / probs.sum(1, keepdim=True)
    probs = probs.clamp(1e-7, 1.0 - 1e-7)
    return -(target * torch.log(probs)).sum(1).mean()


class CellVTALoss(nn.Module):
    """Weighted sum of the CellVTA loss terms.

    Args:
        weights: term name -> weight; missing names take :data:`DEFAULT_WEIGHTS` (reference section 5.3).
            A weight of 0 drops the term (e.g. ``tissue_ce`` for single-tissue data such as CoNIC).
        official_compat: reproduce the official code's defects (see the module docstring).
        alpha, beta, gamma: focal Tversky weights of false negatives and false positives, and exponent.

    Predictions: ``nuclei_binary_map`` (B, 2, H, W), ``hv_map`` (B, 2, H, W), ``nuclei_type_map`` (B, C, H, W)
    logits and ``tissue_types`` (B, T) logits. Targets: ``nuclei_binary_map`` (B, 1, H, W) int,
    ``hv_map`` (B, 2, H, W), ``nuclei_type_map`` (B, 1, H, W) int, ``tissue_types`` (B,) int.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        official_compat: bool = False,
        alpha: float = 0.7,
        beta: float = 0.3,
        gamma: float = 4 / 3,
    ) -> None:
        super().__init__()
        unknown = set(weights or {}) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; known: {sorted(DEFAULT_WEIGHTS)}")
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        self.official_compat = official_compat
        self.alpha, self.beta, self.gamma = alpha, beta, gamma

    def _ft(self, probs: Tensor, target: Tensor) -> Tensor:
        return focal_tversky_per_class(probs, target, self.alpha, self.beta, self.gamma)

    def _segmentation_terms(self, logits: Tensor, labels: Tensor, prefix: str) -> dict[str, Tensor]:
        target = one_hot(labels, logits.shape[1])
        probs = logits.float().softmax(1)
        terms: dict[str, Tensor] = {}
        if self.official_compat:
            twice = probs.softmax(1)
            if prefix == "np":
                terms["np_ft"] = focal_tversky_pooled(twice, target, self.alpha, self.beta, self.gamma)
            else:
                terms["nt_ce"] = _official_xentropy(probs, target)
                terms["nt_ft"] = self._ft(twice, target).sum()
            terms[f"{prefix}_dice"] = dice_per_class(probs, target).sum()
        else:
            if prefix == "nt":
                terms["nt_ce"] = F.cross_entropy(logits.float(), target.argmax(1))
            terms[f"{prefix}_ft"] = self._ft(probs, target)[1:].mean()
            terms[f"{prefix}_dice"] = dice_per_class(probs, target)[1:].mean()
        return terms

    def compute(self, pred: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """All active terms (unweighted) and ``"loss"``, their weighted sum."""
        terms: dict[str, Tensor] = {}
        terms.update(self._segmentation_terms(pred["nuclei_binary_map"], target["nuclei_binary_map"], "np"))
        hv_pred, hv_true = pred["hv_map"].float(), target["hv_map"].float()
        terms["hv_mse"] = F.mse_loss(hv_pred, hv_true)
        terms["hv_msge"] = msge(hv_pred, hv_true, target["nuclei_binary_map"], cross_derivatives=self.official_compat)
        if "nuclei_type_map" in pred:
            terms.update(self._segmentation_terms(pred["nuclei_type_map"], target["nuclei_type_map"], "nt"))
        if self.weights["tissue_ce"] > 0 and "tissue_types" in pred:
            terms["tissue_ce"] = F.cross_entropy(pred["tissue_types"].float(), target["tissue_types"].long().view(-1))
        terms = {k: v for k, v in terms.items() if self.weights[k] > 0}
        terms["loss"] = sum(self.weights[k] * v for k, v in terms.items())
        return terms

    def forward(self, pred: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Tensor:
        """The total loss (scalar)."""
        return self.compute(pred, target)["loss"]
