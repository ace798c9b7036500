"""The MONAI Label app's cell classifier and stain normalisation, against the real server on 127.0.0.1.

Label files as points (project environment): point CSVs, GeoJSON points and ASAP polygons as their centroids,
checked against their image. Then one server (``python apps/monailabel``, ``.venv-label``) serves a small CellVTA
whose nucleus and type heads are linear probes fitted on two real CoNSeP tiles (``tests.test_deploy_app``), with
Macenko stain normalisation switched on by ``--conf``: its nuclei must be those of the bundle's own inference
workflow on the tile normalised by hand; point and polygon labels with new class names saved in the datastore
train the cell classifier through ``POST /train/cellvta_classifier``, and the next inference returns the new
classes, equal to the bundle's inference workflow with that classifier. A classifier of another network stops the
start, naming its file.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.test_deploy_app import (
    CLASSES,
    NETWORK,
    TILE_A,
    TILE_B,
    _crop,
    _fit_heads,
    _save_model,
    median_area,
    size_types,
)
from tests.test_monailabel_app import (  # noqa: F401 (label_python is a fixture)
    BUNDLE,
    OP_ENV,
    Server,
    gt_polygons,
    label_python,
    write_png,
)

# the annotators' own classes (tiles A and B hold epithelial nuclei only): the nuclei by area
SIZE_CLASSES = ["background", "small", "large"]


def test_point_and_polygon_labels_are_read_as_points_and_checked_against_the_image(tmp_path):
    from cellvta_label.labels import has_outlines, label_points, validate_label

    (tmp_path / "points.csv").write_text("x,y,label\n10,12,immune\n30.5,4,tumour\n")
    points = label_points(tmp_path / "points.csv")
    assert points.xy.tolist() == [[10, 12], [30.5, 4]] and points.labels == ["immune", "tumour"]
    validate_label(tmp_path / "points.csv", (40, 20), 5)
    with pytest.raises(ValueError, match=r"points.csv: point 1 \(tumour\) at x 30.5, y 4 lies outside the image of "
                                         r"30 x 20 pixels"):
        validate_label(tmp_path / "points.csv", (30, 20), 5)
    (tmp_path / "empty.csv").write_text("x,y,label\n")
    with pytest.raises(ValueError, match=r"empty.csv: no labelled nuclei .*: no points after the header"):
        validate_label(tmp_path / "empty.csv", (30, 20), 5)
    point = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 6]},
             "properties": {"classification": {"name": "immune"}}}
    (tmp_path / "points.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [point]}))
    assert label_points(tmp_path / "points.geojson").labels == ["immune"]
    validate_label(tmp_path / "points.geojson", (30, 20), 5)
    assert not has_outlines(tmp_path / "points.geojson") and not has_outlines(tmp_path / "points.csv")
    (tmp_path / "cells.xml").write_text(
        '<ASAP_Annotations><Annotations><Annotation Name="a" PartOfGroup="tumour"><Coordinates>'
        '<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="6" Y="0"/><Coordinate Order="2" X="6" Y="3"/>'
        '<Coordinate Order="3" X="0" Y="3"/></Coordinates></Annotation></Annotations></ASAP_Annotations>')
    centroid = label_points(tmp_path / "cells.xml")
    assert centroid.xy.tolist() == [[3.0, 1.5]] and centroid.labels == ["tumour"] and has_outlines(
        tmp_path / "cells.xml")
    np.savez(tmp_path / "maps.npz", inst_map=np.zeros((4, 4), np.int32), type_map=np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="maps.npz: label maps give no class names to points"):
        label_points(tmp_path / "maps.npz")


# --- the real server (.venv-label) --------------------------------------------------------------------------


def run_inferring(python: Path, model_dir: Path, image: Path, out: Path, **overrides) -> dict:
    """The bundle's inference workflow on one image, run by ``python`` (the app's environment: its OpenCV and
    numpy builds place the post-processing's pixels as the server does); the GeoJSON features and maps."""
    from scripts.workflows.configs import config_files

    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(python), "-m", "monai.bundle", "run", "inferring", "--config_file", repr(config_files("inferring")),
           "--args_file", str(model_dir / "overrides.json"), "--bundle_root", str(out), "--model_dir", str(model_dir),
           "--input_images", repr([str(image)]), "--output_dir", str(out), "--num_workers", "0"]
    for key, value in overrides.items():
        cmd += [f"--{key}", repr(value)]
    result = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, **OP_ENV})
    assert result.returncode == 0, result.stderr[-4000:]
    return {"features": json.loads((out / f"{image.stem}.geojson").read_text())["features"],
            "type_map": np.load(out / f"{image.stem}.npz")["type_map"]}


@pytest.fixture(scope="module")
def probe_model(consep, tmp_path_factory) -> Path:
    """A small CellVTA (ViT-T, 4 blocks) with linear-probe nucleus and type heads fitted on tiles A and B."""
    torch.manual_seed(0)
    from scripts.model.network import CellVTA

    network = CellVTA(num_nuclei_classes=len(CLASSES), num_tissue_classes=1, freeze="full", **{
        k: v for k, v in NETWORK.items() if k != "patch_size"}).eval()
    _fit_heads(network, [_crop(consep, s) for s in (TILE_A, TILE_B)],
               [consep["inst_map"][i, :h, :w] for i, h, w in (TILE_A, TILE_B)],
               [consep["type_map"][i, :h, :w] for i, h, w in (TILE_A, TILE_B)])
    return _save_model(tmp_path_factory.mktemp("cells_model") / "cellvta", network, NETWORK)


@pytest.fixture(scope="module")
def stains(consep) -> tuple[list, list]:
    """The target stains: tile A's own, with 10% less of each (the probe heads see nuclei only in stains close to
    those they were fitted on)."""
    from scripts.data.stain import MacenkoNormalizer

    vectors, concentrations = MacenkoNormalizer().estimate(_crop(consep, TILE_A))
    return vectors.tolist(), (0.9 * concentrations).tolist()


@pytest.fixture(scope="module")
def cells_server(label_python, consep, probe_model, stains, tmp_path_factory):
    root = tmp_path_factory.mktemp("cells")
    studies = root / "studies"
    studies.mkdir()
    write_png(studies / "cells_a.png", _crop(consep, TILE_A))
    write_png(studies / "cells_b.png", _crop(consep, TILE_B))
    server = Server(label_python, studies, probe_model, root / "work", root / "server.log",
                    args=["--conf", "stain_normalization", "true", "--conf", "stain_vectors", json.dumps(stains[0]),
                          "--conf", "stain_max_concentrations", json.dumps(stains[1])])
    try:
        server.wait_ready()
        server.root = root
        yield server
    finally:
        server.stop()


def call(server, method: str, path: str, **kwargs):
    import requests

    return requests.request(method, f"{server.url}{path}", timeout=900, **kwargs)


def wait_for_training(server) -> dict:
    """The training status once the running task ended (or after 20 minutes)."""
    deadline = time.monotonic() + 1200
    while True:
        status = call(server, "GET", "/train/").json()
        if status["status"] not in ("SUBMITTED", "RUNNING") or time.monotonic() > deadline:
            return status
        time.sleep(2)


def train(server, task: str, request: dict) -> None:
    """Start training ``task`` (``cellvta``, ``cellvta_classifier``) with ``request`` and wait until it is done."""
    started = call(server, "POST", f"/train/{task}", json=request)
    assert started.status_code == 200, started.text
    status = wait_for_training(server)
    assert status["status"] == "DONE", "\n".join(status.get("details", []))


def normalised_tile(server, consep, stains, name: str) -> Path:
    """Tile A normalised by hand to the server's target stains, as a PNG."""
    from scripts.data.stain import MacenkoNormalizer

    image = MacenkoNormalizer(*stains)(_crop(consep, TILE_A))
    assert np.abs(image.astype(int) - _crop(consep, TILE_A)).mean() > 5
    return write_png(server.root / f"{name}.png", image)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # pays for the server's start and the reference inference
def test_stain_normalised_inference_gives_the_nuclei_of_the_tile_normalised_first(cells_server, consep, stains,
                                                                                   label_python, probe_model):
    answer = call(cells_server, "POST", "/infer/cellvta", params={"image": "cells_a", "output": "json"})
    assert answer.status_code == 200, answer.text
    reference = run_inferring(label_python, probe_model, normalised_tile(cells_server, consep, stains, "cells_a"),
                              cells_server.root / "reference")
    assert answer.json()["nuclei"]["features"] == reference["features"] and len(reference["features"]) >= 3
    plain = call(cells_server, "POST", "/infer/cellvta", params={"image": "cells_a", "output": "image"})
    type_map = cv2.imdecode(np.frombuffer(plain.content, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(type_map, reference["type_map"])


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_labelled_cells_train_the_classifier_and_inference_returns_its_classes(cells_server, consep, stains,
                                                                               label_python, probe_model):
    from scripts.inference.writers import class_color

    # tile A: points at the ground-truth nuclei's centres (CSV); tile B: their outlines (GeoJSON); new class names
    polygons = {}
    for name, (i, h, w) in (("a", TILE_A), ("b", TILE_B)):
        inst = consep["inst_map"][i, :h, :w]
        polygons[name] = gt_polygons(inst, size_types(inst, median_area(consep)), SIZE_CLASSES)
    polygons_a, polygons_b = polygons["a"], polygons["b"]
    rows = [f"{p.mean(0)[0]:.2f},{p.mean(0)[1]:.2f},{n}" for n, p in polygons_a]
    features_b = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[*p.tolist(), p[0].tolist()]]},
                   "properties": {"classification": {"name": n}}} for n, p in polygons_b]
    for image, name, content in (("cells_a", "cells_a.csv", "x,y,label\n" + "\n".join(rows) + "\n"),
                                 ("cells_b", "cells_b.geojson", json.dumps({"type": "FeatureCollection",
                                                                             "features": features_b}))):
        saved = call(cells_server, "PUT", "/datastore/label", params={"image": image},
                     files={"label": (name, content.encode())})
        assert saved.status_code == 200, saved.text

    info = call(cells_server, "GET", "/info/").json()
    assert set(info["trainers"]) == {"cellvta", "cellvta_classifier"}
    assert info["trainers"]["cellvta_classifier"]["config"]["epochs"] == 200  # configs/classifier.yaml
    train(cells_server, "cellvta_classifier", {"epochs": 50, "hidden": 0, "match_radius_um": 6})

    names = ["large", "small"]
    stats = call(cells_server, "GET", "/info/").json()["train_stats"]["cellvta_classifier"]
    assert [c["name"] for c in stats["classes"]] == names and stats["epochs"] <= 50
    assert stats["images"] == ["cells_a", "cells_b"] and stats["labels"]["cells_a"]["labelled"] >= 2
    # every label point is matched to a detected nucleus or reported
    for image, count in (("cells_a", len(polygons_a)), ("cells_b", len(polygons_b))):
        report = stats["labels"][image]
        assert report["points"] == count and report["labelled"] + report["unmatched"] == count
    classifier = probe_model / "classifier.pt"
    assert classifier.is_file()

    labels = call(cells_server, "GET", "/info/").json()["models"]["cellvta"]["labels"]
    assert labels == {n: k for k, n in enumerate(names, start=1)}
    answer = call(cells_server, "POST", "/infer/cellvta", params={"image": "cells_a", "output": "json"})
    assert answer.status_code == 200, answer.text
    features = answer.json()["nuclei"]["features"]
    assert {f["properties"]["classification"]["name"] for f in features} <= set(names) and len(features) >= 3
    for f in features:
        cls = names.index(f["properties"]["classification"]["name"]) + 1
        assert f["properties"]["classification"]["color"] == list(class_color(cls))
        assert 1 / len(names) <= f["properties"]["measurements"]["type_probability"] <= 1
    # the bundle's inference workflow with the published classifier, on the tile normalised by hand
    reference = run_inferring(label_python, probe_model, normalised_tile(cells_server, consep, stains, "classified"),
                              cells_server.root / "classified", classifier=str(classifier))
    assert features == reference["features"]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_new_weights_train_the_served_classifier_again_with_its_last_request(cells_server, probe_model):
    """After the test above: fine-tuning the network on the polygon labels publishes new weights, on which the
    classifier of the old weights would be refused; the app trains it again with its last request."""
    from scripts.cells.classifier import load_classifier

    before = call(cells_server, "GET", "/info/").json()["train_stats"]["cellvta_classifier"]
    old_fingerprint = load_classifier(probe_model / "classifier.pt")[2]["fingerprint"]
    train(cells_server, "cellvta", {"epochs": 1, "batch_size": 2})

    info = call(cells_server, "GET", "/info/").json()
    retrained = info["train_stats"]["cellvta"]["classifier"]
    assert retrained == info["train_stats"]["cellvta_classifier"] and retrained["run"] != before["run"]
    assert retrained["request"] == before["request"] and before["request"]["epochs"] == 50
    assert [c["name"] for c in retrained["classes"]] == ["large", "small"]
    assert load_classifier(probe_model / "classifier.pt")[2]["fingerprint"] != old_fingerprint
    answer = call(cells_server, "POST", "/infer/cellvta", params={"image": "cells_a", "output": "json"})
    assert answer.status_code == 200, answer.text
    assert {f["properties"]["classification"]["name"] for f in answer.json()["nuclei"]["features"]} <= {"large",
                                                                                                       "small"}


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_classifier_that_cannot_be_trained_again_is_reported_and_the_new_weights_still_published(cells_server,
                                                                                                     probe_model):
    """After the tests above: the classifier's recorded request no longer trains (it names classes the datastore's
    labels no longer hold, as after the labels were renamed). Fine-tuning still publishes its weights and its
    record says why the classifier was not trained again; inference then refuses the classifier of the previous
    weights, naming it."""
    record_file = probe_model / "classifier_stats.json"
    record = json.loads(record_file.read_text())
    record["request"]["classes"] = ["tumour", "immune"]
    record_file.write_text(json.dumps(record))
    weights = (probe_model / "model.pt").read_bytes()
    train(cells_server, "cellvta", {"epochs": 1, "batch_size": 2})

    info = call(cells_server, "GET", "/info/").json()
    error = info["train_stats"]["cellvta"]["classifier"]
    assert list(error) == ["error"] and "unknown class(es)" in error["error"], error
    assert info["train_stats"]["cellvta_classifier"]["run"] == record["run"]
    assert (probe_model / "model.pt").read_bytes() != weights
    answer = call(cells_server, "POST", "/infer/cellvta", params={"image": "cells_a", "output": "json"})
    assert answer.status_code in (400, 422, 500) and "classifier.pt" in answer.text, answer.text


@pytest.mark.slow
def test_a_classifier_of_another_network_stops_the_start(label_python, consep, probe_model, tmp_path):
    from scripts.cells.classifier import CellClassifier, save_classifier
    from scripts.cells.labels import ClassTable

    other = save_classifier(tmp_path / "other.pt", CellClassifier(64, 2), ClassTable(["a", "b"], [(1, 2, 3)] * 2),
                            "decoder", "0123456789abcdef")
    studies = tmp_path / "studies"
    studies.mkdir()
    write_png(studies / "tile.png", _crop(consep, TILE_A))
    server = Server(label_python, studies, probe_model, tmp_path / "work", tmp_path / "server.log",
                    args=["--conf", "classifier", str(other)])
    try:
        with pytest.raises(AssertionError, match="server exited"):
            server.wait_ready(timeout=600)
    finally:
        server.stop()
    assert f"{other}: trained on the embeddings of another model" in (tmp_path / "server.log").read_text()
