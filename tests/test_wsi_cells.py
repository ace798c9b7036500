"""Whole-slide embeddings (the cell-embedding sources), a cell classifier typing a slide's nuclei, and the
tissue head's per-slide map and class fractions (with resumption)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from scripts.cells.classifier import predict, save_classifier, train_classifier
from scripts.cells.embeddings import CellEmbedder
from scripts.cells.labels import ClassTable
from scripts.model.network import CellViT
from scripts.nuclei.postprocess import nuclei_from_instance_map
from scripts.slides.predictors import NetworkPredictor, PredictedMaps
from scripts.slides.pyramid import write_pyramidal_tiff
from scripts.slides.tile_cells import pool_features
from scripts.slides.tiling import TileGrid
from scripts.slides.tissue_map import TISSUE_PALETTE, UNANALYSED
from scripts.slides.wsi import WSISettings, run_slide
from scripts.cells.embeddings import pool_cells
from tests.oracle import GroundTruthPredictor

CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle-shaped"]
TISSUES = ["tumour", "stroma", "necrosis"]
SETTINGS = WSISettings(postprocess_workers=0, chunk_tiles=2, min_tissue_fraction=0.0)
SMALL_TILES = {"tile_size": 128, "overlap": 32}  # the network at 128 px keeps these tests fast on a CPU


@pytest.fixture(scope="module")
def crop(consep_npz) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 512 x 512 mosaic of four CoNSeP patches: image, globally unique instance ids, types."""
    with np.load(consep_npz) as data:
        images, inst, types = data["images"][:4], data["inst_map"][:4].astype(np.int64), data["type_map"][:4]
    inst = np.where(inst > 0, inst + (np.arange(4) * 100_000)[:, None, None], 0)

    def tile(a: np.ndarray) -> np.ndarray:
        return np.vstack([np.hstack(a[:2]), np.hstack(a[2:])])

    return tile(images), tile(inst), tile(types)


@pytest.fixture(scope="module")
def net() -> CellViT:
    torch.manual_seed(0)
    return CellViT("vit-t", num_nuclei_classes=len(CLASSES), num_tissue_classes=len(TISSUES),
                   vit_kwargs={"depth": 4}).eval()


class KnownNuclei:
    """The network's embeddings and tissue predictions of the ground truth's nuclei (instances and types from the
    oracle, so the nuclei are known; everything else from the network)."""

    def __init__(self, network: NetworkPredictor, inst: np.ndarray, types: np.ndarray) -> None:
        self.network = network
        self.oracle = GroundTruthPredictor(inst, types, len(CLASSES))
        self.num_classes = len(CLASSES)

    def __call__(self, tiles: np.ndarray, origins: np.ndarray) -> PredictedMaps:
        maps = self.network(tiles, origins)
        truth = self.oracle(tiles, origins)
        maps.type_map, maps.inst_map = truth.type_map, truth.inst_map
        return maps


def _slide(image: np.ndarray, path: Path) -> Path:
    write_pyramidal_tiff(path, image, mpp=0.25, compression=None, min_size=10_000)
    return path


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_pool_features_equals_the_cell_embedders_pooling():
    g = torch.Generator().manual_seed(1)
    inst = torch.zeros(64, 64, dtype=torch.long)
    inst[3:20, 5:30], inst[40:41, 60:62], inst[30:50, 10:12] = 4, 9, 2
    ids = torch.tensor([2, 4, 9])
    for scale in (16, 1):
        features = torch.randn(7, 64 // scale, 64 // scale, generator=g)
        np.testing.assert_allclose(pool_features(features.numpy(), inst.numpy(), ids.numpy()),
                                   pool_cells(features, inst, ids), rtol=1e-5, atol=1e-6)
    assert pool_features(np.zeros((7, 4, 4), np.float16), inst.numpy(), np.zeros(0, np.int64)).shape == (0, 7)


def test_whole_slide_embeddings_and_tissue_are_those_of_the_network_on_the_tile(crop, net, tmp_path):
    """One 128-px tile: each nucleus's whole-slide embedding is the cell embedder's on the same pixels (both
    sources), and the tissue map and fractions come from the tissue head's softmax on that tile."""
    image, inst, types = (a[:128, :128] for a in crop)
    slide = _slide(image, tmp_path / "one.tif")
    with CellEmbedder(net, "vit") as vit, CellEmbedder(net, "decoder") as decoder:
        features, out = vit.maps(image)  # one forward feeds both sources
        direct = {"vit": vit.pool(features, out, inst, "one", image.shape[:2]),
                  "decoder": decoder.pool(decoder.features(128, 128), out, inst, "one", image.shape[:2])}
    tissue = torch.softmax(out["tissue_types"].float(), 1)[0].numpy()
    for source, dim in (("vit", 192), ("decoder", 64)):
        predictor = KnownNuclei(NetworkPredictor(net, "cpu", len(CLASSES), embeddings=True, embedding_source=source,
                                                 dtype=torch.float32), inst, types)
        settings = WSISettings(**{**SETTINGS.__dict__, **SMALL_TILES, "embeddings": True, "embedding_source": source})
        summary = run_slide(slide, tmp_path / source, predictor, CLASSES, settings, tissue_names=TISSUES)
        predictor.network.features.close()
        vectors = np.load(tmp_path / source / "one.tif_embeddings.npy")
        rows = _rows(tmp_path / source / "one.tif.csv")
        assert summary["tiles"] == 1 and len(rows) == len(vectors) == summary["cells"] > 5
        assert summary["embedding_source"] == source and vectors.shape[1] == dim
        centroids = np.array([[float(r["x"]), float(r["y"])] for r in rows])
        nearest = np.linalg.norm(centroids[:, None] - direct[source].centroids[None], axis=2).argmin(axis=1)
        assert len(set(nearest.tolist())) == len(rows)
        tolerance = 1e-4 if source == "vit" else 2e-3  # the decoder map travels as float16
        np.testing.assert_allclose(vectors, direct[source].embeddings[nearest], rtol=tolerance, atol=tolerance)
    part = summary["tissue"]
    assert part["map"] == "one.tif_tissue.png" and part["tiles"] == 1 and part["classes"] == TISSUES
    np.testing.assert_allclose(list(part["mean_probabilities"].values()), tissue, atol=1e-5)
    assert part["fractions"] == {n: float(i == tissue.argmax()) for i, n in enumerate(TISSUES)}
    png = cv2.cvtColor(cv2.imread(str(tmp_path / "decoder" / "one.tif_tissue.png")), cv2.COLOR_BGR2RGB)
    assert png.shape == (1, 1, 3) and tuple(png[0, 0]) == TISSUE_PALETTE[tissue.argmax()]
    assert "one.tif_tissue.png" in summary["outputs"]


def test_a_classifier_types_every_nucleus_with_its_own_classes_and_probabilities(crop, net, tmp_path):
    image, inst, types = (a[:224, :224] for a in crop)
    with CellEmbedder(net, "vit") as embedder:
        cells = embedder(image, inst)
    area = np.bincount(inst.ravel())[cells.ids]
    table = ClassTable(["large", "small"], [(200, 30, 40), (20, 90, 220)])
    trained = train_classifier(cells.embeddings, (area < np.median(area)).astype(np.int64), table.names, epochs=20)
    path = save_classifier(tmp_path / "classifier.pt", trained.model, table, "vit", cells.fingerprint)

    predictor = NetworkPredictor(net, "cpu", len(CLASSES), classifier=path, dtype=torch.float32)
    assert predictor.embeddings and predictor.classifier.names == ["background", "large", "small"]
    settings = WSISettings(**{**SETTINGS.__dict__, **SMALL_TILES, "embeddings": True})
    slide = _slide(image, tmp_path / "mosaic.tif")
    out = tmp_path / "out"
    typed_background = np.where(inst % 3 == 0, 0, types)  # the type branch calls a third of the nuclei background
    summary = run_slide(slide, out, KnownNuclei(predictor, inst, typed_background), CLASSES, settings,
                        classifier=predictor.classifier, tissue_names=TISSUES)
    assert summary["classifier"] == str(path)
    # the classifier types every nucleus, those typed background too; each once, though many are wider than the
    # overlap (one is cut at tile (0, 1)'s lower side); a 5-pixel line on the image edge has no contour, no nucleus
    assert summary["cells"] == len(nuclei_from_instance_map(inst)) == len(cells.ids) - 1
    assert summary["tiles"] == 4 and summary["class_colours"] == {"large": [200, 30, 40], "small": [20, 90, 220]}
    assert set(summary["cells_per_class"]) == {"large", "small"}
    vectors = np.load(out / "mosaic.tif_embeddings.npy")
    probs = predict(trained.model, vectors)
    rows = _rows(out / "mosaic.tif.csv")
    assert len(rows) == len(vectors) == summary["cells"] == sum(summary["cells_per_class"].values()) > 30
    np.testing.assert_array_equal([int(r["type_id"]) for r in rows], probs.argmax(1) + 1)
    assert [r["type"] for r in rows] == [table.names[k] for k in probs.argmax(1)]
    np.testing.assert_allclose([float(r["probability"]) for r in rows], probs.max(1), atol=5e-5)
    features = json.loads((out / "mosaic.tif.geojson").read_text())["features"]
    assert [f["properties"]["classification"]["name"] for f in features] == [r["type"] for r in rows]
    assert [tuple(f["properties"]["classification"]["color"]) for f in features] == \
        [table.colours[k] for k in probs.argmax(1)]
    import pyarrow.parquet as pq

    cells_table = pq.read_table(out / "mosaic.tif.parquet").to_pydict()
    assert cells_table["type"] == [r["type"] for r in rows]
    np.testing.assert_allclose(cells_table["probability"], probs.max(1), rtol=1e-6)
    overlay = cv2.cvtColor(cv2.imread(str(out / "mosaic.tif_overlay.png")), cv2.COLOR_BGR2RGB)
    dots = {tuple(c) for c in overlay.reshape(-1, 3).tolist()}
    assert {table.colours[k] for k in probs.argmax(1)} <= dots
    assert not {(255, 0, 0), (34, 221, 77), (35, 92, 236)} & dots  # not the network's classes' colours


def test_a_classifier_for_other_embeddings_is_refused_naming_the_file(net, tmp_path):
    table = ClassTable(["a", "b"], [(1, 2, 3), (4, 5, 6)])
    x = np.random.default_rng(0).normal(size=(40, 192)).astype(np.float32)
    model = train_classifier(x, np.arange(40) % 2, table.names, epochs=2).model
    other = save_classifier(tmp_path / "other.pt", model, table, "vit", "0123456789abcdef")
    with pytest.raises(ValueError, match=r"other\.pt: trained on the embeddings of another model"):
        NetworkPredictor(net, "cpu", len(CLASSES), classifier=other)
    with CellEmbedder(net, "vit") as embedder:
        fingerprint = embedder.fingerprint
    decoder = save_classifier(tmp_path / "decoder.pt", model, table, "decoder", fingerprint)
    with pytest.raises(ValueError, match=r"decoder\.pt: trained on 'decoder' embeddings, these are 'vit'"):
        NetworkPredictor(net, "cpu", len(CLASSES), classifier=decoder)


class TissueByPlace:
    """Ground-truth nuclei and a tissue softmax that depends on the tile's place; counts the tiles it sees and
    fails on its ``fail_at``-th call (a crash in the middle of a run)."""

    def __init__(self, inst: np.ndarray, types: np.ndarray, fail_at: int = 0) -> None:
        self.oracle = GroundTruthPredictor(inst, types, len(CLASSES))
        self.num_classes = len(CLASSES)
        self.calls, self.tiles, self.fail_at = 0, 0, fail_at

    @staticmethod
    def softmax(origins: np.ndarray) -> np.ndarray:
        x, y = np.asarray(origins, np.float64).T / 192
        logits = np.stack([x, y, 1.5 - x * y], axis=1)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def __call__(self, tiles: np.ndarray, origins: np.ndarray) -> PredictedMaps:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("crash")
        self.tiles += len(tiles)
        maps = self.oracle(tiles, origins)
        maps.tissue = self.softmax(origins)
        return maps


def test_tissue_map_and_fractions_survive_an_interrupted_run(crop, tmp_path):
    crop_image, inst, types = crop
    image = np.full((512, 768, 3), 255, np.uint8)  # glass right of x = 512: the last column of tiles is not analysed
    image[:, :512] = crop_image
    slide = _slide(image, tmp_path / "tissue.tif")
    settings = WSISettings(**{**SETTINGS.__dict__, "min_tissue_fraction": 0.05, "batch_size": 1})
    whole = run_slide(slide, tmp_path / "whole", TissueByPlace(inst, types), CLASSES, settings, tissue_names=TISSUES)
    with pytest.raises(RuntimeError, match="crash"):
        run_slide(slide, tmp_path / "resumed", TissueByPlace(inst, types, fail_at=8), CLASSES, settings,
                  tissue_names=TISSUES)
    kept = len(list((tmp_path / "resumed" / ".tissue.tif.parts").glob("part_*.npz")))
    again = TissueByPlace(inst, types)
    resumed = run_slide(slide, tmp_path / "resumed", again, CLASSES, settings, tissue_names=TISSUES)
    assert kept >= 1 and again.tiles == whole["tiles"] - 2 * kept  # the crashed run's parts were used
    for suffix in ("_tissue.png", ".csv", ".geojson"):
        assert (tmp_path / "whole" / f"tissue.tif{suffix}").read_bytes() == \
               (tmp_path / "resumed" / f"tissue.tif{suffix}").read_bytes()
    assert whole["tissue"] == resumed["tissue"]

    grid = TileGrid(768, 512, 256, 64)
    expected = np.full((*grid.shape, 3), UNANALYSED, np.uint8)
    analysed = [(r, c) for r in range(grid.shape[0]) for c in range(grid.shape[1]) if c * grid.stride < 512]
    probs = TissueByPlace.softmax([grid.origin(r, c) for r, c in analysed])
    for (r, c), p in zip(analysed, probs):
        expected[r, c] = TISSUE_PALETTE[p.argmax()]
    png = cv2.cvtColor(cv2.imread(str(tmp_path / "whole" / "tissue.tif_tissue.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(png, expected)
    tissue = whole["tissue"]
    assert whole["tiles"] == tissue["tiles"] == len(analysed) and tissue["tile_stride"] == 192
    counts = np.bincount(probs.argmax(1), minlength=3)
    assert tissue["fractions"] == pytest.approx(dict(zip(TISSUES, counts / len(analysed))))
    assert tissue["mean_probabilities"] == pytest.approx(dict(zip(TISSUES, probs.mean(0))), abs=1e-6)
    assert tissue["colours"] == {n: list(TISSUE_PALETTE[i]) for i, n in enumerate(TISSUES)}


def test_without_a_tissue_head_there_is_no_tissue_map(crop, tmp_path):
    image, inst, types = (a[:256, :256] for a in crop)
    summary = run_slide(_slide(image, tmp_path / "plain.tif"), tmp_path, GroundTruthPredictor(inst, types, 5),
                        CLASSES, SETTINGS, tissue_names=TISSUES)
    assert summary["tissue"] is None and summary["classifier"] is None and summary["embedding_source"] is None
    assert not (tmp_path / "plain.tif_tissue.png").exists()
    assert "plain.tif_tissue.png" not in summary["outputs"]
