"""A cell classifier in tile inference and evaluation: each nucleus is embedded exactly as the cached embeddings
the classifier was trained on, its classes, probabilities and colours reach every output, a classifier of another
network or with other classes is refused naming the file, and without one the outputs are unchanged."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer

from scripts.cells.apply import NucleiClassifier
from scripts.cells.classifier import CellClassifier, load_classifier, predict, save_classifier, train_classifier
from scripts.cells.embeddings import SOURCES, CellEmbedder, FeatureSource, model_fingerprint
from scripts.cells.labels import ClassTable
from scripts.data.datasets import image_digest, read_info, save_class_table
from scripts.data.prepare import SYNTHETIC_CLASSES, synthetic
from scripts.inference.windows import AlignedSlidingWindowInferer
from scripts.inference.writers import overlay, write_geojson
from scripts.model.spatial_outputs import SpatialOutputs
from scripts.nuclei.evaluation import class_lut, evaluate
from scripts.nuclei.postprocess import nuclei_from_instance_map
from scripts.nuclei.postprocess_transforms import HoVerNetPostProcessingd

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cellvta"
TINY = {"backbone": "vit-t", "vit_kwargs": {"depth": 4}, "patch_size": 64, "num_workers": 0}
NEW_CLASSES = ClassTable(["tumour", "immune", "stroma"], [(200, 30, 40), (20, 220, 60), (90, 90, 250)])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Synthetic H&E-like tiles of 64 px (the tiny network's window) with their nuclei."""
    return Path(synthetic(str(tmp_path_factory.mktemp("data") / "synthetic"), n=6, size=64, seed=1))


def _parser(configs: list[str], **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in configs])
    parser.update({**TINY, **overrides})
    return parser


@pytest.fixture(scope="module")
def model_dir(dataset, tmp_path_factory) -> Path:
    """A bundle root whose models/ holds a random tiny network (its foreground bias raised: the nuclei mask
    covers the tile and the random HV maps split it into nuclei) and the dataset's class table."""
    root = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    network = _parser(["common.yaml"], dataset_dir=str(dataset)).get_parsed_content("network_def")
    with torch.no_grad():
        network.decoder.branches["nuclei_binary_map"].decoder0_header[-1].bias[1] += 0.3
    (root / "models").mkdir()
    torch.save(network.state_dict(), root / "models" / "model.pt")
    save_class_table(read_info(dataset), root / "models")
    return root


@pytest.fixture(scope="module")
def network(model_dir, dataset):
    net = _parser(["common.yaml", "inference.yaml"], dataset_dir=str(dataset),
                  bundle_root=str(model_dir)).get_parsed_content("network")
    return net.eval()


def _classifier(path: Path, network, source: str, table: ClassTable = NEW_CLASSES, seed: int = 0,
                images: dict[str, str] | None = None) -> Path:
    """A classifier of ``network``'s ``source`` embeddings trained on random embeddings (any weights will do),
    recording ``images`` ({name: pixel digest}) as the images it has seen."""
    dim = network.encoder.vit.embed_dim if source == "vit" else 64
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(60, dim)).astype(np.float32)
    y = np.arange(60) % len(table.names)
    model = train_classifier(x, y, table.names, hidden=8, epochs=3, seed=seed).model
    return save_classifier(path, model, table, source, model_fingerprint(network), images=images)


def _image(dataset: Path, index: int) -> tuple[np.ndarray, np.ndarray, str]:
    sample = sorted((dataset / "images").glob("*.png"))[index]
    image = cv2.cvtColor(cv2.imread(str(sample)), cv2.COLOR_BGR2RGB)
    with np.load(dataset / "labels" / f"{sample.stem}.npz") as z:
        return image, z["inst_map"], str(sample)


def _normalised(image: np.ndarray, network) -> torch.Tensor:
    """The inference config's pre-processing: (1, 3, H, W), 0-1 scale then the network's statistics."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    return (x - torch.tensor(network.mean).view(1, 3, 1, 1)) / torch.tensor(network.std).view(1, 3, 1, 1)


@pytest.mark.parametrize("source", SOURCES)
def test_one_window_embedding_and_classes_equal_the_cached_embeddings(network, dataset, tmp_path, source):
    """A 64 px tile in one 64 px window: the stitched source map pooled over each nucleus equals CellEmbedder's
    embedding of it (what the classifier was trained on), and each nucleus' class and probability are the
    classifier's softmax of that embedding."""
    image, inst, _ = _image(dataset, 0)
    classifier = NucleiClassifier(_classifier(tmp_path / "classifier.pt", network, source))
    spatial = SpatialOutputs(network, features=classifier.hook(network))
    inferer = AlignedSlidingWindowInferer((64, 64), 2, 0.25, "gaussian", multiple=classifier.scale)
    with torch.no_grad():
        maps = inferer(_normalised(image, network), spatial)
    assert maps["source_features"].shape[-1] == 64 // classifier.scale
    with CellEmbedder(network, source) as embedder:
        cached = embedder(image, inst)
    ids = np.unique(inst)[1:]
    np.testing.assert_array_equal(cached.ids, ids)
    got = classifier.embed(maps["source_features"][0], inst, ids)
    assert np.abs(cached.embeddings).max() > 0.01
    np.testing.assert_allclose(got, cached.embeddings, rtol=1e-5, atol=1e-5)

    nuclei = nuclei_from_instance_map(inst, maps["nuclei_type_map"][0].numpy())
    pred = {"inst_map": inst[None], "type_map": nuclei.type_map(inst)[None], "nuclei": nuclei,
            "source_features": maps["source_features"][0]}
    out = classifier(pred)
    probs = predict(classifier.model, cached.embeddings[np.searchsorted(ids, nuclei.ids)])
    np.testing.assert_array_equal(out["nuclei"].types, probs.argmax(1) + 1)
    np.testing.assert_allclose(out["nuclei"].type_probs, probs.max(1), atol=1e-6)
    assert "source_features" not in out
    k = nuclei.ids[0]
    assert set(np.unique(out["type_map"][0][inst == k])) == {probs.argmax(1)[0] + 1}
    assert classifier.class_names == ["background", *NEW_CLASSES.names]
    assert classifier.colours[1:] == NEW_CLASSES.colours


def test_vit_windows_keep_to_the_token_grid(network, dataset):
    """An 80 x 72 tile in 64 px windows: padded to 80 x 80 on the 16 px grid, each window's tokens land where
    that window's own forward puts them, and the maps are cropped back to the tile."""
    tiles = [_image(dataset, i)[0] for i in range(4)]
    image = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)[:80, :72].copy()
    with FeatureSource(network, "vit") as features:
        spatial = SpatialOutputs(network, features=features)
        inferer = AlignedSlidingWindowInferer((64, 64), 4, 0.25, "constant", multiple=16)
        x = _normalised(image, network)
        with torch.no_grad():
            maps = inferer(x, spatial)
            padded = torch.nn.functional.pad(x, (0, 8, 0, 0))
            corner = spatial(padded[..., 16:80, 16:80])["source_features"]
    assert maps["hv_map"].shape[-2:] == (80, 72) and maps["source_features"].shape[-2:] == (5, 5)
    # windows start at 0 and 16 on both axes; the token at (4, 4) is covered by the (16, 16) window only
    np.testing.assert_allclose(maps["source_features"][0, :, 4, 4], corner[0, :, 3, 3], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="move by 179 px"):
        AlignedSlidingWindowInferer((256, 256), 1, 0.3, multiple=16)


def test_the_decoder_branch_recorded_in_the_classifier_is_the_one_hooked(network, tmp_path):
    """classifier.pt records the decoder branch its embeddings came from: inference hooks that branch, and the
    classifier is refused for another branch's embeddings, naming the file."""
    path = save_classifier(tmp_path / "hv.pt", CellClassifier(64, 3), NEW_CLASSES, "decoder",
                           model_fingerprint(network), "hv_map")
    classifier = NucleiClassifier(path)
    module = network.decoder.branches["hv_map"].decoder0_header[-2]
    hooks = len(module._forward_hooks)
    with classifier.hook(network):
        assert classifier.branch == "hv_map" and len(module._forward_hooks) == hooks + 1
    assert len(module._forward_hooks) == hooks
    with pytest.raises(ValueError, match=r"hv.pt: trained on the 'hv_map' decoder branch's embeddings"):
        load_classifier(path, "decoder", branch="nuclei_type_map")


def _run_inference(model_dir: Path, dataset: Path, images: list[str], out: Path, **overrides) -> None:
    parser = _parser(["common.yaml", "inference.yaml"], dataset_dir=str(dataset), bundle_root=str(model_dir),
                     input_images=images, output_dir=str(out), **overrides)
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("evaluator").run()


@pytest.mark.slow
def test_inference_workflow_writes_the_classifier_classes(model_dir, dataset, network, tmp_path):
    """The inference config with `classifier`: maps in the classifier's ids, GeoJSON names, colours and
    probabilities of the classifier (those of CellEmbedder's embeddings of the detected nuclei), overlays in its
    colours; a classifier of another network is refused naming the file before any output is written."""
    path = _classifier(tmp_path / "classifier.pt", network, "vit")
    images = [_image(dataset, 2)[2], _image(dataset, 5)[2]]
    out = tmp_path / "out"
    _run_inference(model_dir, dataset, images, out, classifier=str(path))
    image, _, _ = _image(dataset, 2)
    stem = Path(images[0]).stem
    with np.load(out / f"{stem}.npz") as z:
        inst, types = z["inst_map"], z["type_map"]
    features = json.loads((out / f"{stem}.geojson").read_text())["features"]
    assert len(features) >= 3
    with CellEmbedder(network, "vit") as embedder:
        cached = embedder(image, inst)
    probs = predict(NucleiClassifier(path).model, cached.embeddings)
    for f in features:
        m = f["properties"]["measurements"]
        row = int(np.argmin(np.hypot(*(cached.centroids - [m["centroid_x"], m["centroid_y"]]).T)))
        cls = int(probs[row].argmax())
        assert f["properties"]["classification"] == {"name": NEW_CLASSES.names[cls],
                                                     "color": list(NEW_CLASSES.colours[cls])}
        assert m["type_probability"] == pytest.approx(float(probs[row, cls]), abs=1e-4)
        assert set(np.unique(types[inst == cached.ids[row]])) == {cls + 1}
    assert types.max() <= len(NEW_CLASSES.names)
    drawn = cv2.cvtColor(cv2.imread(str(out / f"{stem}_overlay.png")), cv2.COLOR_BGR2RGB)
    used = {tuple(NEW_CLASSES.colours[int(p.argmax())]) for p in probs}
    assert used <= {tuple(c) for c in drawn[(drawn != image).any(-1)]}

    other = _parser(["common.yaml"], dataset_dir=str(dataset)).get_parsed_content("network_def")
    foreign = _classifier(tmp_path / "foreign.pt", other, "vit")
    with pytest.raises(RuntimeError) as err:
        _run_inference(model_dir, dataset, images, tmp_path / "refused", classifier=str(foreign))
    assert "foreign.pt: trained on the embeddings of another model" in str(err.value.__cause__)
    assert not (tmp_path / "refused").exists()


def test_inference_without_a_classifier_writes_the_plain_pipeline_outputs(model_dir, dataset, network, tmp_path):
    """Without `classifier` the outputs are those of MONAI's sliding window over the network's maps, the HoVer-Net
    post-processing and the writers' palette (byte for byte for GeoJSON and overlays)."""
    images = [_image(dataset, 4)[2]]
    _run_inference(model_dir, dataset, images, tmp_path / "out")
    image = _image(dataset, 4)[0]
    inferer = SlidingWindowInferer((64, 64), 4, 0.25, "gaussian")
    with torch.no_grad():
        maps = inferer(_normalised(image, network), SpatialOutputs(network))
    presets = _parser(["common.yaml"]).get_parsed_content("postprocessing_presets")
    pred = HoVerNetPostProcessingd(presets=presets)({k: v[0] for k, v in maps.items()})
    stem = Path(images[0]).stem
    write_geojson(tmp_path / "expected.geojson", pred["nuclei"], SYNTHETIC_CLASSES)
    assert (tmp_path / "out" / f"{stem}.geojson").read_bytes() == (tmp_path / "expected.geojson").read_bytes()
    with np.load(tmp_path / "out" / f"{stem}.npz") as z:
        np.testing.assert_array_equal(z["type_map"], pred["type_map"][0])
    drawn = cv2.cvtColor(cv2.imread(str(tmp_path / "out" / f"{stem}_overlay.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(drawn, overlay(image, pred["nuclei"]))


def test_class_lut_maps_by_name_or_class_map_and_names_both_lists():
    dataset = ["background", "a", "b", "c"]
    np.testing.assert_array_equal(class_lut(["c", "a", "b"], dataset), [0, 3, 1, 2])
    np.testing.assert_array_equal(class_lut(["x", "y"], dataset, {"x": "b", "y": "b"}), [0, 2, 2])
    with pytest.raises(ValueError, match=r"clf.pt: classes \['a', 'z'\] are not the dataset's \['a', 'b', 'c'\]"):
        class_lut(["a", "z"], dataset, source="clf.pt")
    with pytest.raises(ValueError, match=r"classes \['y'\] are mapped to no class of the dataset's"):
        class_lut(["x", "y"], dataset, {"x": "a"})
    inst = np.zeros((1, 32, 32), np.int32)
    inst[0, 2:10, 2:10], inst[0, 20:30, 20:30] = 1, 2
    pred_types = np.where(inst == 1, 2, np.where(inst == 2, 1, 0))   # classifier ids: 2 = "a", 1 = "c"
    gt_types = np.where(inst == 1, 1, np.where(inst == 2, 3, 0))
    result = evaluate((inst, pred_types), (inst, gt_types), class_names=dataset, pred_classes=["c", "a", "b"])
    assert result["summary"]["mpq"] == pytest.approx(1.0)
    assert evaluate((inst, pred_types), (inst, gt_types), class_names=dataset)["summary"]["mpq"] < 1


def test_evaluation_workflow_scores_the_classifier_types(model_dir, dataset, network, tmp_path):
    """evaluate.yaml with `classifier`: the saved predicted types are the classifier's classes in the dataset's
    ids (given in another order); a classifier with other classes and no class map is refused naming both lists."""
    classes = SYNTHETIC_CLASSES[1:]
    table = ClassTable(classes[::-1], [(10 * i, 0, 0) for i in range(len(classes))])
    path = _classifier(tmp_path / "same.pt", network, "decoder", table)
    out = tmp_path / "eval"
    parser = _parser(["train.yaml", "evaluate.yaml"], dataset_dir=str(dataset), bundle_root=str(model_dir),
                     ckpt_path=str(model_dir / "models" / "model.pt"), output_dir=str(out), classifier=str(path),
                     eval_split="test")
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("evaluator").run()
    assert json.loads((out / "metrics.json").read_text())["summary"]["n_images"] >= 1
    saved = sorted((out / "predictions").glob("*.npz"))
    sample = saved[0].stem
    with np.load(saved[0]) as z:
        inst, types = z["inst_map"], z["type_map"]
    image = cv2.cvtColor(cv2.imread(str(dataset / "images" / f"{sample}.png")), cv2.COLOR_BGR2RGB)
    with CellEmbedder(network, "decoder") as embedder:
        cached = embedder(image, inst)
    probs = predict(NucleiClassifier(path).model, cached.embeddings)
    typed = 0
    for k, p in zip(cached.ids, probs):
        expected = SYNTHETIC_CLASSES.index(table.names[int(p.argmax())])
        found = set(np.unique(types[inst == k]).tolist())
        assert found <= {0, expected}
        typed += found == {expected}
    assert typed >= 1

    # a classifier that has seen one of the test images, under another name, is refused by the workflow
    seen = _classifier(tmp_path / "seen.pt", network, "decoder", table, images={"renamed": image_digest(image)})
    parser = _parser(["train.yaml", "evaluate.yaml"], dataset_dir=str(dataset), bundle_root=str(model_dir),
                     ckpt_path=str(model_dir / "models" / "model.pt"), output_dir=str(tmp_path / "seen"),
                     classifier=str(seen), eval_split="test")
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("cell_classifier")
    assert re.search(rf"seen.pt: trained on 1 of the {len(saved)} evaluated images \({sample}\)",
                     f"{err.value} {err.value.__cause__}")

    other = _classifier(tmp_path / "other.pt", network, "decoder")
    with pytest.raises(ValueError, match=r"other.pt: classes \['tumour', 'immune', 'stroma'\] are not the dataset's"):
        NucleiClassifier(other, SYNTHETIC_CLASSES)
    mapped = NucleiClassifier(other, SYNTHETIC_CLASSES, {"tumour": classes[0], "immune": classes[1],
                                                         "stroma": classes[1]})
    assert mapped.class_names == SYNTHETIC_CLASSES and mapped.colours is None
