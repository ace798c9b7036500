"""Tile inference with a tiny network on real CoNSeP tiles: the tissue head's probabilities per image (npz and
tissue.csv) against the network called by hand, and stain normalisation inside the run against the transform applied
by hand before it."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from scripts.data.datasets import DatasetInfo, save_class_table
from scripts.data.stain import MacenkoNormalizer

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cellvta"
TISSUES = ["colon", "lung", "skin"]
TINY = {"backbone": "vit-t", "vit_kwargs": {"depth": 4}, "patch_size": 64, "num_workers": 0, "amp": False,
        "official_normalization": True}


def parser_for(root: Path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in ("common.yaml", "inference.yaml")])
    parser.update({"bundle_root": str(root), "dataset_dir": str(root / "models"), **TINY, **overrides})
    return parser


def as_input(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> the network's (B, 3, H, W) input under 0.5 / 0.5 normalisation."""
    return torch.as_tensor(images.transpose(0, 3, 1, 2) / 255.0, dtype=torch.float32) * 2 - 1


@pytest.fixture(scope="module")
def root(consep, tmp_path_factory) -> Path:
    """A bundle root whose models/ holds a random tiny network with a 3-class tissue head whose logits are spread
    (x 10) and centred on real tiles, so that windows get clearly different probabilities."""
    root = tmp_path_factory.mktemp("root")
    save_class_table(DatasetInfo("tiny", ["background", "nucleus"], TISSUES, 40), root / "models")
    torch.manual_seed(0)
    network = parser_for(root, checkpoint=None).get_parsed_content("network_def").eval()
    (head,) = [m for n, m in network.named_modules() if isinstance(m, torch.nn.Linear) and m.out_features == 3]
    with torch.no_grad():
        logits = network(as_input(consep["images"][::40, :64, :64]))["tissue_types"]
        head.weight *= 10
        head.bias.copy_(10 * (head.bias - logits.mean(0)))
    torch.save(network.state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture(scope="module")
def images(consep) -> dict[str, np.ndarray]:
    """One window (64 x 64), and two windows side by side (64 x 112) over two different real tiles."""
    two = np.concatenate([consep["images"][7][100:164, 20:76], consep["images"][200][:64, :56]], axis=1)
    return {"one": consep["images"][0][:64, :64], "two": two}


def write(folder: Path, images: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        cv2.imwrite(str(folder / f"{name}.png"), image[..., ::-1])
    return folder


def infer(root: Path, folder: Path, out: Path, **overrides) -> dict[str, dict[str, np.ndarray]]:
    parser = parser_for(root, input_dir=str(folder), output_dir=str(out), **overrides)
    parser.get_parsed_content("evaluator").run()
    result = {}
    for path in sorted(out.glob("*.npz")):
        with np.load(path) as z:
            result[path.stem] = {k: z[k] for k in z.files}
    return result


def head_probabilities(root: Path, image: np.ndarray) -> np.ndarray:
    """The tissue head's softmax on one (64, 64, 3) window, the network called directly."""
    network = parser_for(root).get_parsed_content("network").eval()
    with torch.no_grad():
        return torch.softmax(network(as_input(image[None]))["tissue_types"].double(), dim=1)[0].numpy()


@pytest.mark.slow
def test_tissue_probabilities_per_image_equal_the_head_on_its_windows(root, images, tmp_path):
    out = tmp_path / "out"
    result = infer(root, write(tmp_path / "tiles", images), out)
    one, left, right = (head_probabilities(root, x) for x in
                        (images["one"], images["two"][:, :64], images["two"][:, 48:]))
    assert np.abs(left - right).max() > 0.05  # the two windows disagree: their mean is a real test
    np.testing.assert_allclose(result["one"]["tissue_probabilities"], one, atol=1e-5)
    # two windows overlapping by 16 px: the blending weights are mirror images, so each window counts for half
    np.testing.assert_allclose(result["two"]["tissue_probabilities"], (left + right) / 2, atol=1e-5)
    with (out / "tissue.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["one", "two"]
    assert list(rows[0]) == ["name", "tissue", "p_colon", "p_lung", "p_skin"]
    for row in rows:
        p = np.array([float(row[f"p_{t}"]) for t in TISSUES])
        np.testing.assert_allclose(p, result[row["name"]]["tissue_probabilities"], atol=1e-6)
        assert row["tissue"] == TISSUES[int(np.argmax(p))] and abs(p.sum() - 1) < 1e-5
    assert not list(out.glob("*.tmp*")) and not list(out.glob(".*"))


@pytest.mark.slow
def test_stain_normalisation_in_the_run_equals_normalising_the_tiles_first(root, images, tmp_path):
    target = {"stain_vectors": [[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]], "stain_max_concentrations": [1.5, 1.3]}
    originals = write(tmp_path / "tiles", images)
    normaliser = MacenkoNormalizer(target["stain_vectors"], target["stain_max_concentrations"])
    by_hand = write(tmp_path / "normalised", {k: normaliser(v) for k, v in images.items()})
    inside = infer(root, originals, tmp_path / "inside", stain_normalization=True, **target)
    before = infer(root, by_hand, tmp_path / "before")
    raw = infer(root, originals, tmp_path / "raw")
    for name in images:
        for key in ("inst_map", "type_map"):
            np.testing.assert_array_equal(inside[name][key], before[name][key])
        np.testing.assert_allclose(inside[name]["tissue_probabilities"], before[name]["tissue_probabilities"],
                                   atol=1e-6)
    assert max(np.abs(inside[n]["tissue_probabilities"] - raw[n]["tissue_probabilities"]).max() for n in images) > 1e-3
