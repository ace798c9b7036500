"""Macenko stain normalisation (checked against torchstain's own normalisation on real CoNSeP tiles), HED stain
augmentation, and stain normalisation inside tile and whole-slide inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

from scripts.data.stain import MacenkoNormalizer, NormalizeStaind, RandHEStain, RandHEStaind
from scripts.slides.pyramid import write_pyramidal_tiff
from scripts.slides.wsi import WSISettings, run_slide

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cellvta"
OTHER_STAINS = [[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]]  # another lab's H&E (Ruifrok & Johnston's vectors)


@pytest.fixture(scope="module")
def tiles(consep_npz) -> np.ndarray:
    with np.load(consep_npz) as data:
        return data["images"][:16:2]


def test_macenko_equals_torchstain_per_image_and_undoes_a_change_of_stains(tiles):
    reference = NumpyMacenkoNormalizer()
    normalizer = MacenkoNormalizer()
    for tile in tiles:
        np.testing.assert_array_equal(normalizer(tile), reference.normalize(tile, stains=False)[0])
    restain = MacenkoNormalizer(stains=OTHER_STAINS, max_concentrations=[1.5, 1.3])
    raw, normalised = [], []
    for tile in tiles:
        other = restain(tile)
        raw.append(np.abs(other.astype(int) - tile).mean())
        normalised.append(np.abs(normalizer(other).astype(int) - normalizer(tile)).mean())
    assert np.mean(raw) > 10 and np.mean(normalised) < 0.5 * np.mean(raw), (np.mean(raw), np.mean(normalised))
    # a reference image as the target: the reference itself comes back nearly unchanged
    own = MacenkoNormalizer(reference=tiles[0])
    assert np.abs(own(tiles[0]).astype(int) - tiles[0]).mean() < 5
    # glass has no stain to estimate: left as it is; one source fitted for many tiles maps them all alike
    glass = np.full((64, 64, 3), 245, np.uint8)
    assert normalizer(glass) is glass
    slide_wide = MacenkoNormalizer()
    assert slide_wide.fit_source(tiles) and not MacenkoNormalizer().fit_source(glass)
    np.testing.assert_array_equal(slide_wide(np.concatenate(tiles[:2], axis=1)),
                                  np.concatenate([slide_wide(tiles[0]), slide_wide(tiles[1])], axis=1))
    d = NormalizeStaind(keys="image")({"image": tiles[1], "label": 7})
    np.testing.assert_array_equal(d["image"], normalizer(tiles[1]))
    assert d["label"] == 7
    with pytest.raises(ValueError, match="too few stained pixels"):
        MacenkoNormalizer(reference=glass)


def test_hed_augmentation_is_seeded_keeps_glass_and_moves_stained_pixels(tiles):
    image = tiles[0].transpose(2, 0, 1).astype(np.float32) / 255
    image[:, :8, :8] = 1.0  # glass
    assert RandHEStain(prob=0.0)(image) is image
    aug = RandHEStain(sigma=0.2, bias=0.0, prob=1.0).set_random_state(5)
    out = aug(torch.as_tensor(image))
    assert isinstance(out, torch.Tensor) and out.shape == image.shape and out.dtype == torch.float32
    out = out.numpy()
    again = RandHEStain(sigma=0.2, bias=0.0, prob=1.0).set_random_state(5)(image)
    np.testing.assert_array_equal(out, again)
    assert np.abs(out[:, :8, :8] - 1.0).max() < 1e-5  # no stain, nothing to scale
    stained = image.mean(axis=0) < 0.6
    assert np.abs(out - image).mean(axis=0)[stained].mean() > 0.01
    assert np.abs(RandHEStain(sigma=0.0, bias=0.0, prob=1.0)(image) - image).mean() < 2e-3  # HED round trip
    d = RandHEStaind(keys=["a", "b"], sigma=0.2, prob=1.0).set_random_state(1)({"a": image, "b": image.copy()})
    np.testing.assert_array_equal(d["a"], d["b"])  # one draw for every key
    assert np.abs(d["a"] - image).max() > 0.01


class SeenTiles:
    """Records the tiles it is given (by origin) and finds no nuclei."""

    num_classes = 2

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int], np.ndarray] = {}

    def __call__(self, tiles: np.ndarray, origins: np.ndarray):
        from scripts.slides.predictors import PredictedMaps

        self.seen.update({(int(x), int(y)): t.copy() for (x, y), t in zip(origins, tiles)})
        zeros = np.zeros(tiles.shape[:3], np.float32)
        return PredictedMaps(zeros, np.zeros((len(tiles), 2, *zeros.shape[1:]), np.float32), zeros.astype(np.uint8))


def test_whole_slide_normalisation_shows_the_network_a_restained_slide_as_the_original(tiles, tmp_path):
    image = np.concatenate([np.concatenate(tiles[:4], axis=1), np.concatenate(tiles[4:8], axis=1)], axis=0)
    restained = MacenkoNormalizer(stains=OTHER_STAINS, max_concentrations=[1.2, 1.6])(image)
    settings = WSISettings(postprocess_workers=0, min_tissue_fraction=0.0, chunk_tiles=4)
    normalised = WSISettings(**{**settings.__dict__, "stain_normalization": True})
    seen = {}
    for name, pixels in [("original", image), ("restained", restained)]:
        write_pyramidal_tiff(tmp_path / f"{name}.tif", pixels, mpp=0.25, min_size=10_000)
        for label, s in [("raw", settings), ("normalised", normalised)]:
            seen[name, label] = SeenTiles()
            run_slide(tmp_path / f"{name}.tif", tmp_path / label, seen[name, label], ["background", "nucleus"], s)

    def gap(label: str) -> float:
        a, b = seen["original", label].seen, seen["restained", label].seen
        assert a.keys() == b.keys() and len(a) == 15
        return float(np.mean([np.abs(a[k].astype(int) - b[k]).mean() for k in a]))

    assert gap("raw") > 10 and gap("normalised") < 0.5 * gap("raw"), (gap("raw"), gap("normalised"))
    assert np.abs(seen["original", "normalised"].seen[0, 0].astype(int) - image[:256, :256]).mean() > 1


def test_tile_inference_preprocessing_normalises_as_the_transform_does_by_hand(tiles, tmp_path):
    import cv2
    from monai.bundle import ConfigParser

    from scripts.data.transforms import LoadTile

    cv2.imwrite(str(tmp_path / "a.png"), tiles[2][..., ::-1])
    cv2.imwrite(str(tmp_path / "ref.png"), tiles[5][..., ::-1])
    sample = {"image": str(tmp_path / "a.png"), "path": str(tmp_path / "a.png"), "name": "a"}

    def preprocess(**overrides) -> np.ndarray:
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "configs" / c) for c in ("common.yaml", "inference.yaml")])
        parser.update({"bundle_root": str(tmp_path), "input_dir": str(tmp_path), "checkpoint": None,
                       "official_normalization": True, **overrides})  # 0.5/0.5: image = 2 * rgb - 1
        return parser.get_parsed_content("preprocessing")(sample)["image"].numpy()

    off = preprocess()
    np.testing.assert_allclose(off, LoadTile()(tiles[2]) * 2 - 1, atol=1e-6)
    for target, normalizer in [
        ({}, MacenkoNormalizer()),
        ({"stain_vectors": OTHER_STAINS, "stain_max_concentrations": [1.5, 1.3]},
         MacenkoNormalizer(OTHER_STAINS, [1.5, 1.3])),
        ({"stain_reference": str(tmp_path / "ref.png")}, MacenkoNormalizer(reference=tiles[5])),
    ]:
        by_hand = LoadTile()(normalizer(tiles[2])) * 2 - 1
        on = preprocess(stain_normalization=True, **target)
        np.testing.assert_allclose(on, by_hand, atol=1e-6)
        assert np.abs(on - off).mean() > 0.02
    # channel-first float images (as loaded) give what the uint8 image gives
    d = NormalizeStaind(keys="image", reference=str(tmp_path / "ref.png"))({"image": LoadTile()(tiles[2])})
    np.testing.assert_array_equal(np.rint(d["image"] * 255).astype(np.uint8),
                                  MacenkoNormalizer(reference=tiles[5])(tiles[2]).transpose(2, 0, 1))
    with pytest.raises(ValueError, match="ref_glass.png: too few stained pixels"):
        cv2.imwrite(str(tmp_path / "ref_glass.png"), np.full((64, 64, 3), 245, np.uint8))
        MacenkoNormalizer(reference=tmp_path / "ref_glass.png")
    with pytest.raises(ValueError, match="3 x 2"):
        MacenkoNormalizer(stains=[0.5, 0.7, 0.4])
