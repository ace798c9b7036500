"""CellVTA loss terms (scripts.training.losses) against MONAI and direct numpy formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.apps.pathology.losses import HoVerNetLoss
from monai.losses import DiceLoss, TverskyLoss
from scipy import ndimage
from scripts.training.losses import (
    DEFAULT_WEIGHTS,
    CellVTALoss,
    dice_per_class,
    focal_tversky_per_class,
    msge,
    one_hot,
    sobel_kernels,
)
from scripts.data.transforms import hv_maps


def _random_batch(seed: int = 0, b: int = 2, c: int = 5, t: int = 3, size: int = 32) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    inst = torch.zeros(b, 1, size, size, dtype=torch.int64)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    types = torch.zeros_like(inst)
    for i in range(b):
        for k in range(1, 6):
            cy, cx, r = torch.randint(4, size - 4, (2,), generator=g).tolist() + [
                torch.randint(2, 5, (1,), generator=g).item()
            ]
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            inst[i, 0][disk] = k
            types[i, 0][disk] = 1 + (k % (c - 1))
    target = {
        "nuclei_binary_map": (inst > 0).long(),
        "hv_map": torch.stack([torch.from_numpy(hv_maps(inst[i, 0].numpy())) for i in range(b)]),
        "nuclei_type_map": types,
        "tissue_types": torch.randint(0, t, (b,), generator=g),
    }
    pred = {
        "nuclei_binary_map": torch.randn(b, 2, size, size, generator=g) * 2,
        "hv_map": torch.randn(b, 2, size, size, generator=g) * 0.5,
        "nuclei_type_map": torch.randn(b, c, size, size, generator=g) * 2,
        "tissue_types": torch.randn(b, t, generator=g),
    }
    return pred, target


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_dice_matches_monai_dice_loss():
    pred, target = _random_batch(1)
    logits, labels = pred["nuclei_type_map"], target["nuclei_type_map"]
    ours = dice_per_class(logits.softmax(1), one_hot(labels, 5))
    monai = DiceLoss(softmax=True, to_onehot_y=True, batch=True, smooth_nr=1e-3, smooth_dr=1e-3, reduction="none")
    torch.testing.assert_close(ours, monai(logits, labels).flatten())
    fg = DiceLoss(softmax=True, to_onehot_y=True, batch=True, smooth_nr=1e-3, smooth_dr=1e-3, include_background=False)
    terms = CellVTALoss().compute(pred, target)
    torch.testing.assert_close(terms["nt_dice"], fg(logits, labels))


def test_focal_tversky_matches_monai_tversky_loss():
    pred, target = _random_batch(2)
    logits, labels = pred["nuclei_type_map"], target["nuclei_type_map"]
    tversky = TverskyLoss(
        softmax=True,
        to_onehot_y=True,
        batch=True,
        alpha=0.3,
        beta=0.7,
        smooth_nr=1e-6,
        smooth_dr=1e-6,
        reduction="none",
    )
    expected = tversky(logits, labels).flatten() ** (4 / 3)
    torch.testing.assert_close(focal_tversky_per_class(logits.softmax(1), one_hot(labels, 5)), expected)
    terms = CellVTALoss().compute(pred, target)
    torch.testing.assert_close(terms["nt_ft"], expected[1:].mean())
    np_expected = tversky(pred["nuclei_binary_map"], target["nuclei_binary_map"]).flatten()[1] ** (4 / 3)
    torch.testing.assert_close(terms["np_ft"], np_expected)


def _numpy_msge(pred: np.ndarray, true: np.ndarray, focus: np.ndarray, cross: bool) -> float:
    r = np.arange(-2, 3, dtype=np.float64)
    kx = np.array([[x / (x * x + y * y) if (x, y) != (0, 0) else 0.0 for x in r] for y in r])
    kernels = (kx.T, kx) if cross else (kx, kx.T)
    total = 0.0
    for b in range(pred.shape[0]):
        for c in range(2):
            diff = pred[b, c].astype(np.float64) - true[b, c]
            grad = ndimage.correlate(diff, kernels[c], mode="constant", cval=0.0)
            total += float((focus[b, 0] * grad**2).sum())
    return total / (2 * focus.sum() + 1e-8)


@pytest.mark.parametrize("cross", [False, True])
def test_msge_matches_a_numpy_formula(cross):
    pred, target = _random_batch(3)
    ours = msge(pred["hv_map"], target["hv_map"], target["nuclei_binary_map"], cross_derivatives=cross)
    expected = _numpy_msge(pred["hv_map"].numpy(), target["hv_map"].numpy(), target["nuclei_binary_map"].numpy(), cross)
    assert ours.item() == pytest.approx(expected, rel=1e-5)


def test_msge_equals_monai_hovernet_loss_up_to_the_kernel_gain(consep):
    """MONAI's HoVerNetLoss MSGE uses normalised 5x5 Sobel kernels (a unit ramp has gradient 1); HoVer-Net's
    kernel gives a unit ramp the gradient 12. So ours is 12**2 = 144 times MONAI's on a linear field, and close
    to that on real HV maps, only when both differentiate the x-map along x and the y-map along y."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    ramp = torch.stack([0.03 * xx, -0.05 * yy])[None]
    inside = torch.zeros(1, 1, 32, 32)
    inside[..., 4:28, 4:28] = 1
    flat = torch.zeros_like(ramp)
    monai_ramp = HoVerNetLoss()._mse_gradient_loss(ramp, flat, inside[:, 0])
    assert msge(ramp, flat, inside).item() == pytest.approx(144 * monai_ramp.item(), rel=1e-5)
    assert msge(ramp, flat, inside, cross_derivatives=True).item() < 1e-9

    inst = consep["inst_map"][:4]
    hv = torch.from_numpy(np.stack([hv_maps(i) for i in inst]))
    interior = (ndimage.minimum_filter(inst, size=(1, 7, 7)) == ndimage.maximum_filter(inst, size=(1, 7, 7))) & (
        inst > 0
    )
    focus = torch.from_numpy(interior)[:, None]
    zero = torch.zeros_like(hv)
    for i in range(4):
        monai = HoVerNetLoss()._mse_gradient_loss(hv[i : i + 1], zero[i : i + 1], focus[i : i + 1, 0].float())
        assert 130 < (msge(hv[i : i + 1], zero[i : i + 1], focus[i : i + 1]) / monai).item() < 165
    kx, _ = sobel_kernels()
    assert kx[2, 3] == 1 and kx[2, 4] == 0.5 and kx[1, 3] == 0.5
    assert msge(hv, zero, focus) > 10 * msge(hv, zero, focus, cross_derivatives=True)


def test_cross_entropy_terms_match_numpy():
    pred, target = _random_batch(4)
    logits = pred["nuclei_type_map"].numpy().astype(np.float64)
    labels = target["nuclei_type_map"][:, 0].numpy()
    p = _np_softmax(logits)
    picked = np.take_along_axis(p, labels[:, None], 1)
    expected = -np.log(picked).mean()
    terms = CellVTALoss().compute(pred, target)
    assert terms["nt_ce"].item() == pytest.approx(expected, rel=1e-5)
    official = CellVTALoss(official_compat=True).compute(pred, target)
    assert official["nt_ce"].item() == pytest.approx(-np.log(np.clip(picked, 1e-7, 1 - 1e-7)).mean(), rel=1e-5)
    tissue = pred["tissue_types"].numpy().astype(np.float64)
    tp = _np_softmax(tissue)[np.arange(2), target["tissue_types"].numpy()]
    assert terms["tissue_ce"].item() == pytest.approx(-np.log(tp).mean(), rel=1e-5)


def test_official_compat_reproduces_the_reference_defects():
    pred, target = _random_batch(5)
    official = CellVTALoss(official_compat=True).compute(pred, target)
    np_probs = _np_softmax(pred["nuclei_binary_map"].numpy().astype(np.float64))
    twice = _np_softmax(np_probs)
    t = np.stack([1 - target["nuclei_binary_map"][:, 0].numpy(), target["nuclei_binary_map"][:, 0].numpy()], 1)
    tp, fn, fp = (twice * t).sum(), (t * (1 - twice)).sum(), ((1 - t) * twice).sum()
    expected_ft = (1 - (tp + 1e-6) / (tp + 0.7 * fn + 0.3 * fp + 1e-6)) ** (4 / 3)
    assert official["np_ft"].item() == pytest.approx(expected_ft, rel=1e-5)
    dice = [
        1 - (2 * (np_probs[:, c] * t[:, c]).sum() + 1e-3) / (np_probs[:, c].sum() + t[:, c].sum() + 1e-3)
        for c in (0, 1)
    ]
    assert official["np_dice"].item() == pytest.approx(sum(dice), rel=1e-5)
    nt = _np_softmax(_np_softmax(pred["nuclei_type_map"].numpy().astype(np.float64)))
    tt = one_hot(target["nuclei_type_map"], 5).numpy()
    per_class = [
        (
            1
            - ((nt[:, c] * tt[:, c]).sum() + 1e-6)
            / (
                (nt[:, c] * tt[:, c]).sum()
                + 0.7 * (tt[:, c] * (1 - nt[:, c])).sum()
                + 0.3 * ((1 - tt[:, c]) * nt[:, c]).sum()
                + 1e-6
            )
        )
        ** (4 / 3)
        for c in range(5)
    ]
    assert official["nt_ft"].item() == pytest.approx(sum(per_class), rel=1e-5)


def test_perfect_prediction_gives_the_minimum():
    _, target = _random_batch(6)
    perfect = {
        "nuclei_binary_map": 30.0 * one_hot(target["nuclei_binary_map"], 2),
        "hv_map": target["hv_map"].clone(),
        "nuclei_type_map": 30.0 * one_hot(target["nuclei_type_map"], 5),
        "tissue_types": 30.0 * F.one_hot(target["tissue_types"], 3).float(),
    }
    fixed = CellVTALoss().compute(perfect, target)
    for name, value in fixed.items():
        assert value.item() == pytest.approx(0.0, abs=1e-4), name
    official = CellVTALoss(official_compat=True).compute(perfect, target)
    assert official["np_ft"].item() > 0.05 and official["nt_ft"].item() > 0.05
    pred, _ = _random_batch(7)
    assert CellVTALoss()(pred, target) > fixed["loss"] + 1.0


def test_gradients_reach_every_head_and_weights_combine():
    pred, target = _random_batch(8)
    pred = {k: v.clone().requires_grad_(True) for k, v in pred.items()}
    loss_fn = CellVTALoss()
    terms = loss_fn.compute(pred, target)
    assert set(terms) == set(DEFAULT_WEIGHTS) | {"loss"}
    expected = sum(DEFAULT_WEIGHTS[k] * v for k, v in terms.items() if k != "loss")
    torch.testing.assert_close(terms["loss"], expected)
    terms["loss"].backward()
    for name, tensor in pred.items():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, name
    no_tissue = CellVTALoss(weights={"tissue_ce": 0.0, "hv_msge": 1.0}).compute(pred, target)
    assert "tissue_ce" not in no_tissue
    torch.testing.assert_close(no_tissue["loss"], expected - 0.1 * terms["tissue_ce"] - 7.0 * terms["hv_msge"])
    with pytest.raises(ValueError, match="unknown loss terms"):
        CellVTALoss(weights={"dice": 1.0})


def test_focal_tversky_parameters_reach_both_terms():
    pred, target = _random_batch(9)
    # ours weighs false negatives with alpha and false positives with beta; MONAI the other way round
    tversky = TverskyLoss(softmax=True, to_onehot_y=True, batch=True, alpha=0.4, beta=0.6, smooth_nr=1e-6,
                          smooth_dr=1e-6, reduction="none")
    terms = CellVTALoss(alpha=0.6, beta=0.4, gamma=2.0).compute(pred, target)
    expected = tversky(pred["nuclei_type_map"], target["nuclei_type_map"]).flatten() ** 2.0
    torch.testing.assert_close(terms["nt_ft"], expected[1:].mean())
    np_expected = tversky(pred["nuclei_binary_map"], target["nuclei_binary_map"]).flatten()[1] ** 2.0
    torch.testing.assert_close(terms["np_ft"], np_expected)
