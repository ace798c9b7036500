"""Training transforms and targets (scripts.data.transforms) on real CoNSeP patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, ComputeHoVerMaps
from scipy import ndimage
from scripts.data.datasets import DatasetWriter, dataset_list, instance_types
from scripts.training.losses import CellVTALoss
from scripts.data.prepare import synthetic
from scripts.data.sampling import CellTissueSampler
from scripts.data.transforms import (
    LoadSampled,
    NucleiTargetsd,
    RandColorJitter,
    RandSizedCropd,
    RandSuperpixels,
    RandZoomBlur,
    augmentations,
    hv_maps,
    train_transforms,
    val_transforms,
)

N_TILES = 24


def _items(consep, n=N_TILES, step=17):
    idx = [(i * step) % len(consep["images"]) for i in range(n)]
    return [
        {
            "image": consep["images"][i],
            "inst_map": consep["inst_map"][i],
            "type_map": consep["type_map"][i],
            "tissue": 0,
            "name": str(i),
        }
        for i in idx
    ]


def test_hv_maps_equal_monai_compute_hover_maps(consep):
    for i in range(0, 432, 37):
        expected = ComputeHoVerMaps()(consep["inst_map"][i][None]).numpy()
        np.testing.assert_allclose(hv_maps(consep["inst_map"][i]), expected, atol=1e-6)


def test_hv_zero_at_the_exact_centre_not_one_pixel_off():
    yy, xx = np.mgrid[:64, :64]
    inst = ((xx - 30) ** 2 + (yy - 20) ** 2 <= 81).astype(np.int32)
    hv = hv_maps(inst)
    assert hv[0, 20, 30] == 0 and hv[1, 20, 30] == 0
    assert hv[0, 20, 29] < 0 < hv[0, 20, 31] and hv[1, 19, 30] < 0 < hv[1, 21, 30]
    assert hv[0, 20, 39] == 1 and hv[0, 20, 21] == -1 and hv[1, 29, 30] == 1 and hv[1, 11, 30] == -1
    assert np.all(hv[:, inst == 0] == 0)


def _check_targets(sample: dict, mean: float = 0.5, std: float = 0.5) -> int:
    """HV maps against centres of mass computed by scipy; binary and type maps against the instance map."""
    inst = sample["inst_map"][0].numpy()
    hv = sample["hv_map"].numpy()
    np.testing.assert_array_equal(sample["nuclei_binary_map"][0].numpy(), inst > 0)
    types = sample["nuclei_type_map"][0].numpy()
    assert np.all(types[inst == 0] == 0) and np.all(types[inst > 0] > 0)
    ids = np.unique(inst)[1:]
    centres = ndimage.center_of_mass(np.ones_like(inst), inst, ids)
    for k, (cy, cx) in zip(ids, centres):
        rows, cols = np.nonzero(inst == k)
        for channel, coord, centre in ((0, cols, cx), (1, rows, cy)):
            values = hv[channel, rows, cols]
            far = np.abs(coord - centre) > 0.5
            assert np.all(np.sign(values[far]) == np.sign(coord[far] - centre)), (k, channel)
            near = coord == np.rint(centre)
            side = min(s for s in (coord.max() - centre, centre - coord.min()) if s > 0) if np.ptp(coord) else 1.0
            assert np.all(np.abs(values[near]) <= 0.5 / side + 1e-6)
            if coord.max() - centre > 0.5:
                assert values.max() == pytest.approx(1.0) and values[coord == coord.max()].min() == pytest.approx(1.0)
            if centre - coord.min() > 0.5:
                assert values.min() == pytest.approx(-1.0)
    assert np.all(hv[:, inst == 0] == 0)
    return len(ids)


def test_training_chain_targets_on_real_patches(consep):
    chain = train_transforms()
    chain.set_random_state(7)
    total = 0
    for item in _items(consep):
        out = chain(item)
        assert out["image"].shape == (3, 256, 256) and out["image"].dtype == torch.float32
        assert out["inst_map"].dtype == torch.int32 and out["hv_map"].dtype == torch.float32
        assert out["nuclei_type_map"].dtype == torch.int64 and out["tissue_types"].dtype == torch.int64
        total += _check_targets(out)
    assert total > 300


def test_chain_is_reproducible_with_a_seed(consep):
    item = _items(consep, 1)[0]
    outs = []
    for _ in range(2):
        chain = train_transforms()
        chain.set_random_state(11)
        outs.append([chain(item) for _ in range(5)])
    for a, b in zip(*outs):
        torch.testing.assert_close(a["image"], b["image"])
        torch.testing.assert_close(a["inst_map"], b["inst_map"])


def _geometry_only(ops: list) -> Compose:
    return Compose([op for op in ops if "image" in getattr(op, "keys", ()) and "inst_map" in op.keys])


@pytest.mark.parametrize("always", ["rot_flip", "crop", "elastic"])
def test_geometric_augmentation_keeps_instances_and_types(consep, always):
    ops = _geometry_only(augmentations()).transforms
    names = {"rot_flip": ("RandRotate90d", "RandFlipd"), "crop": ("RandSizedCropd",), "elastic": ("Rand2DElasticd",)}
    chosen = [op for op in ops if type(op).__name__ in names[always]]
    for op in chosen:
        op.prob = 1.0
    chain = Compose([LoadSampled(), *chosen, NucleiTargetsd()])
    chain.set_random_state(3)
    for item in _items(consep, 10):
        ids0, types0 = instance_types(item["inst_map"], item["type_map"], 5)
        out = chain(item)
        inst = out["inst_map"][0]
        ids1, types1 = instance_types(inst, out["nuclei_type_map"][0].astype(np.int32), 5)
        before = dict(zip(ids0.tolist(), types0.tolist()))
        assert set(ids1.tolist()) <= set(before)
        assert all(before[i] == t for i, t in zip(ids1.tolist(), types1.tolist()))
        if always == "rot_flip":
            assert set(ids1.tolist()) == set(before)
            np.testing.assert_array_equal(
                np.sort(np.bincount(inst.ravel())), np.sort(np.bincount(item["inst_map"].ravel()))
            )
        else:
            assert len(ids1) >= 0.3 * len(ids0)
        _check_targets({k: torch.as_tensor(np.asarray(v)) for k, v in out.items() if k != "name"})


def test_sized_crop_cuts_the_same_box_from_all_keys():
    image = np.arange(3 * 64 * 64, dtype=np.float32).reshape(3, 64, 64)
    inst = (np.arange(64 * 64).reshape(1, 64, 64) % 7).astype(np.int32)
    crop = RandSizedCropd(["image", "inst_map"], size=64, side_range=(0.5, 0.5), mode=("nearest", "nearest"), prob=1)
    crop.set_random_state(5)
    out = crop({"image": image, "inst_map": inst})
    top, left, side = crop.cropper._box
    assert side == 32
    np.testing.assert_array_equal(out["image"][:, ::2, ::2], image[:, top : top + 32, left : left + 32])
    np.testing.assert_array_equal(out["inst_map"][:, 1::2, 1::2], inst[:, top : top + 32, left : left + 32])
    assert out["inst_map"].dtype == np.int32


def test_validation_chain_is_load_and_normalise(consep, tmp_path):
    with DatasetWriter(tmp_path, "v", ["background", "a", "b", "c", "d"], ["colon"], 40) as w:
        for i in range(3):
            w.add(f"s{i}", consep["images"][i], consep["inst_map"][i], consep["type_map"][i], "val")
    chain = val_transforms(mean=(0.7, 0.6, 0.5), std=(0.2, 0.25, 0.3))
    for i, item in enumerate(dataset_list(tmp_path, "val")):
        out = chain(item)
        expected = (
            consep["images"][i].transpose(2, 0, 1) / 255.0 - np.array([0.7, 0.6, 0.5])[:, None, None]
        ) / np.array([0.2, 0.25, 0.3])[:, None, None]
        np.testing.assert_allclose(out["image"].numpy(), expected, atol=1e-5)
        np.testing.assert_array_equal(out["inst_map"][0].numpy(), consep["inst_map"][i])
        np.testing.assert_array_equal(out["nuclei_type_map"][0].numpy(), consep["type_map"][i])
        np.testing.assert_allclose(out["hv_map"].numpy(), hv_maps(consep["inst_map"][i]), atol=0)
        assert set(out) == {
            "image",
            "inst_map",
            "nuclei_binary_map",
            "hv_map",
            "nuclei_type_map",
            "tissue_types",
            "name",
        }


def test_load_sampled_names_missing_and_mismatched_files(consep, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.png"):
        LoadSampled()(
            {
                "image": str(tmp_path / "nothing.png"),
                "inst_map": consep["inst_map"][0],
                "type_map": consep["type_map"][0],
            }
        )
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        LoadSampled()(
            {"image": consep["images"][0], "inst_map": str(tmp_path / "nothing.npz"), "type_map": consep["type_map"][0]}
        )
    with pytest.raises(ValueError, match="tile7: inst_map size"):
        LoadSampled()(
            {
                "image": consep["images"][0],
                "inst_map": consep["inst_map"][0][:100],
                "type_map": consep["type_map"][0],
                "name": "tile7",
            }
        )


def test_upscale_for_20x_data(consep):
    item = _items(consep, 1)[0]
    chain = train_transforms(upscale=2.0, augment=False)
    chain.set_random_state(0)
    out = chain(item)
    inst = out["inst_map"][0].numpy()
    assert inst.shape == (256, 256)
    assert set(np.unique(inst)) <= set(np.unique(item["inst_map"]))
    areas_big = np.bincount(inst.ravel())
    areas_src = np.bincount(item["inst_map"].ravel(), minlength=areas_big.size)
    border = np.unique(np.concatenate([inst[0], inst[-1], inst[:, 0], inst[:, -1]]))
    inside = np.setdiff1d(np.unique(inst)[1:], border)
    assert inside.size > 3
    np.testing.assert_allclose(areas_big[inside], 4 * areas_src[inside], rtol=0.15)
    val = val_transforms(upscale=2.0)(item)
    assert val["image"].shape == (3, 512, 512) and _check_targets(val) == len(np.unique(item["inst_map"])) - 1


def test_colour_transforms():
    rng = np.random.default_rng(0)
    image = rng.uniform(0.1, 0.9, (3, 64, 64)).astype(np.float32)
    jitter = RandColorJitter(brightness=0.3, contrast=0, saturation=0, hue=0, prob=1.0)
    jitter.set_random_state(1)
    out = jitter(image).numpy()
    factor = jitter._params[0][1]
    assert factor != 1.0
    np.testing.assert_allclose(out, np.clip(image * factor, 0, 1), atol=1e-6)
    hue = RandColorJitter(brightness=0, contrast=0, saturation=0, hue=0.05, prob=1.0)
    hue.set_random_state(2)
    shifted = hue(image).numpy()
    assert np.abs(shifted - image).max() > 0.05
    np.testing.assert_allclose(shifted.max(0), image.max(0), atol=1e-5)
    np.testing.assert_allclose(shifted.min(0), image.min(0), atol=1e-5)
    flat = np.ones((3, 64, 64), np.float32) * 0.5
    blur = RandZoomBlur(max_factor=1.05, prob=1.0)
    blur.set_random_state(0)
    np.testing.assert_allclose(blur(flat), flat, atol=1e-6)
    sp = RandSuperpixels(p_replace=1.0, n_segments=50, max_size=64, prob=1.0)
    sp.set_random_state(0)
    out = sp(image)
    assert out.shape == image.shape and out.std() < image.std() / 2
    np.testing.assert_allclose(out.mean((1, 2)), image.mean((1, 2)), atol=0.02)


def test_dataloader_batches_from_the_synthetic_layout(tmp_path):
    root = synthetic(str(tmp_path / "synthetic"), n=12, size=96, seed=1)
    data = dataset_list(root, "train")
    chain = train_transforms(size=96)
    loader = DataLoader(Dataset(data, chain), batch_size=4, sampler=CellTissueSampler(data, seed=0), num_workers=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 96, 96) and batch["hv_map"].shape == (4, 2, 96, 96)
    assert batch["nuclei_type_map"].shape == (4, 1, 96, 96) and batch["tissue_types"].shape == (4,)
    assert batch["nuclei_type_map"].max() <= 4 and len(batch["name"]) == 4
    pred = {
        "nuclei_binary_map": torch.zeros(4, 2, 96, 96, requires_grad=True),
        "hv_map": torch.zeros(4, 2, 96, 96, requires_grad=True),
        "nuclei_type_map": torch.zeros(4, 5, 96, 96, requires_grad=True),
        "tissue_types": torch.zeros(4, 2, requires_grad=True),
    }
    terms = CellVTALoss().compute(pred, batch)
    assert terms["tissue_ce"].item() == pytest.approx(np.log(2), rel=1e-5)
    assert terms["hv_mse"].item() == pytest.approx(float((batch["hv_map"] ** 2).mean()), rel=1e-5)


def test_augmentation_parameters_come_from_one_table_and_reject_unknown_names():
    from scripts.data.transforms import AUGMENTATION, augmentation_params

    assert augmentation_params(None) == AUGMENTATION
    changed = {"color_jitter": {"prob": 0.7, "hue": 0.0}, "elastic": {"spacing_fraction": 0.5}}
    ops = augmentations(64, augmentation=changed)
    jitter = next(op for op in ops if type(op).__name__ == "RandColorJitterd")
    assert jitter.prob == 0.7
    assert jitter.inner.ranges == {"brightness": 0.25, "contrast": 0.25, "saturation": 0.1, "hue": 0.0}
    elastic = next(op for op in ops if type(op).__name__ == "Rand2DElasticd")
    assert tuple(elastic.rand_2d_elastic.deform_grid.spacing) == (32, 32) and elastic.prob == 0.2
    noise = next(op for op in ops if type(op).__name__ == "RandGaussianNoised")
    assert noise.rand_gaussian_noise.std == pytest.approx(10**0.5 / 255, rel=1e-12)
    with pytest.raises(ValueError, match=r"unknown augmentation 'blur'"):
        augmentations(64, augmentation={"blur": {"prob": 1.0}})
    with pytest.raises(ValueError, match=r"augmentation#flip: unknown parameters \['axis'\]"):
        augmentations(64, augmentation={"flip": {"axis": 1}})
