"""The MONAI Label app (apps/monailabel).

The app's pure parts (label files, regions, fine-tuning weights, uncertainty) are tested here in the project's
environment. The app itself runs as a real MONAI Label server in its own environment, ``.venv-label``
(``make setup-label``; MONAI Label needs numpy<2): a small CellVTA trained by the bundle's own training
workflow (project environment) is served on 127.0.0.1 with real CoNSeP images as studies, and its answers are
compared with the bundle's own inference workflow on the same pixels.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "monailabel"
BUNDLE = REPO / "bundles" / "cellvta"
LABEL_PYTHON = REPO / ".venv-label" / "bin" / "python"
sys.path.insert(0, str(APP))

from cellvta_label.checkpoints import carry_over  # noqa: E402
from cellvta_label.config import AppConfig  # noqa: E402
from cellvta_label.dataset import patches, split  # noqa: E402
from cellvta_label.labels import class_table, rasterize, read_maps, read_polygons, validate_label  # noqa: E402
from cellvta_label.regions import check_slide_request, read_region  # noqa: E402
from cellvta_label.uncertainty import (  # noqa: E402
    dihedral,
    enable_mc_dropout,
    mc_dropout_network,
    mutual_information,
    type_probabilities,
    undo_dihedral,
)
from scripts.data.prepare import CONSEP_CLASSES  # noqa: E402

# a CellVTA small enough to train and serve in seconds on 2 cores; the server and the reference inference
# run the same (pure PyTorch) attention op, so both compute the same maps
NETWORK = {"backbone": "vit-t", "vit_kwargs": {"depth": 4}, "patch_size": 64}
OP_ENV = {"CELLVTA_MSDA_IMPL": "reference"}
TILE = 128
STUDY_TILES = {"consep_a": 120, "consep_b": 40, "consep_c": 300}  # CoNSeP patches with many nuclei


# --- label files, regions, weights, uncertainty (project environment) ------------------------------------


def gt_polygons(inst: np.ndarray, types: np.ndarray, names: list[str]) -> list[tuple[str, np.ndarray]]:
    """Outer contour of every ground-truth nucleus with its class name (what an annotator draws)."""
    out = []
    for k in np.unique(inst)[1:]:
        mask = (inst == k).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        contour = max(contours, key=len).reshape(-1, 2)
        if len(contour) >= 3:
            out.append((names[int(np.bincount(types[inst == k]).argmax())], contour))
    return out


def asap_xml(polygons: list[tuple[str, np.ndarray]], bbox=(0, 0, 0, 0)) -> bytes:
    """ASAP annotations as QuPath's MONAI Label extension submits them (its SubmitLabel command)."""
    root = ET.Element("ASAP_Annotations")
    group = ET.SubElement(root, "Annotations", Name="", Description="", X=str(bbox[0]), Y=str(bbox[1]),
                          W=str(bbox[2]), H=str(bbox[3]))
    for name, points in polygons:
        annotation = ET.SubElement(group, "Annotation", Name=name, Type="Polygon", PartOfGroup=name, Color="#ff0000")
        coordinates = ET.SubElement(annotation, "Coordinates")
        for i, (x, y) in enumerate(points.tolist()):
            ET.SubElement(coordinates, "Coordinate", Order=str(i), X=str(x), Y=str(y))
    groups = ET.SubElement(root, "AnnotationGroups")
    for name in sorted({n for n, _ in polygons}):
        ET.SubElement(groups, "Group", Name=name, PartOfGroup="None", Color="#ff0000")
    return ET.tostring(root)


def test_asap_labels_of_real_nuclei_rasterise_back_to_the_annotation(consep, tmp_path):
    inst, types = consep["inst_map"][7], consep["type_map"][7]
    polygons = gt_polygons(inst, types, CONSEP_CLASSES)
    path = tmp_path / "label.xml"
    path.write_bytes(asap_xml(polygons))
    read = read_polygons(path)
    assert [p.name for p in read] == [n for n, _ in polygons]
    new_inst, new_types = rasterize(read, inst.shape, CONSEP_CLASSES)
    assert new_inst.max() == len(polygons) == len(np.unique(inst)) - 1
    # an outline filled back covers the nucleus (holes and detached fragments of an id excepted)
    agreement = np.mean((new_inst > 0) == (inst > 0))
    assert agreement > 0.99
    assert np.mean(new_types[inst > 0] == types[inst > 0]) > 0.98


def test_geojson_labels_are_read_with_their_classes(tmp_path):
    square = [[10, 10], [20, 10], [20, 20], [10, 20], [10, 10]]
    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
         "properties": {"objectType": "detection", "classification": {"name": "Tumour"}}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon",
                                         "coordinates": [[[[30, 30], [34, 30], [34, 34]]], [[[0, 0], [3, 0], [0, 3]]]]},
         "properties": {"classification": {"name": "lymphocyte"}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}},
    ]
    path = tmp_path / "label.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    polygons = read_polygons(path)
    assert [p.name for p in polygons] == ["Tumour", "lymphocyte", "lymphocyte"]
    classes = class_table(["background", "tumour"], [p.name for p in polygons])
    assert classes == ["background", "tumour", "lymphocyte"]
    inst, types = rasterize(polygons, (40, 40), classes)
    assert inst.max() == 3
    assert (types[inst == 1] == 1).all() and (inst == 1).sum() == 11 * 11  # the boundary is inside
    assert (types[inst == 2] == 2).all() and (types[inst == 3] == 2).all()


def test_label_files_with_problems_are_rejected_naming_the_file(tmp_path):
    unnamed = tmp_path / "unnamed.geojson"
    unnamed.write_text(json.dumps({"features": [
        {"geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4]]]}, "properties": {}}]}))
    with pytest.raises(ValueError, match=r"unnamed.geojson: feature 0 has no class"):
        read_polygons(unnamed)
    broken = tmp_path / "broken.xml"
    broken.write_text("<ASAP_Annotations><Annotations>")
    with pytest.raises(ValueError, match=r"broken.xml: not valid XML"):
        read_polygons(broken)
    with pytest.raises(ValueError, match=r"label.png: unsupported label format"):
        read_polygons(tmp_path / "label.png")
    maps = tmp_path / "maps.npz"
    np.savez(maps, inst_map=np.zeros((8, 8), np.int32), type_map=np.full((8, 8), 7, np.uint8))
    with pytest.raises(ValueError, match=r"maps.npz: class id 7 outside the class table of 5 classes"):
        read_maps(maps, (8, 8), 5)
    with pytest.raises(ValueError, match=r"class names \['mitosis'\] are not in the requested classes"):
        class_table(CONSEP_CLASSES, ["other", "mitosis"], requested=["other", "spindle-shaped"])


def test_labels_are_validated_against_their_image(tmp_path):
    ring = [[5, 5], [30, 5], [30, 30], [5, 5]]

    def geojson(name, features):
        path = tmp_path / name
        path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
        return path

    good = geojson("good.geojson", [{"geometry": {"type": "Polygon", "coordinates": [ring]},
                                     "properties": {"classification": {"name": "new class"}}}])
    validate_label(good, (64, 48), 5)  # a class the served table lacks is allowed (appended when training)
    with pytest.raises(ValueError, match=r"nucleus 0 \(new class\) at x 5..30, y 5..30 lies outside the image of "
                                         r"4 x 4 pixels"):
        validate_label(good, (4, 4), 5)
    for features, message in (("oops", "expected a GeoJSON FeatureCollection"),
                              (["oops"], "no labelled nuclei"),
                              ([{"geometry": {"type": "Polygon", "coordinates": "xy"},
                                 "properties": {"name": "a"}}], "feature 0 has malformed Polygon coordinates")):
        with pytest.raises(ValueError, match=message):
            validate_label(geojson("bad.geojson", features), (64, 48), 5)
    (tmp_path / "maps.npz").write_bytes(b"PK not a zip")
    with pytest.raises(ValueError, match="maps.npz: not a label npz"):
        validate_label(tmp_path / "maps.npz", (8, 8), 5)
    np.savez(tmp_path / "maps.npz", inst_map=np.zeros((8, 6), np.int32), type_map=np.zeros((8, 6), np.uint8))
    validate_label(tmp_path / "maps.npz", (6, 8), 5)  # extent is (width, height)
    with pytest.raises(ValueError, match=r"differ from the image size \(6, 8\)"):
        validate_label(tmp_path / "maps.npz", (8, 6), 5)


def test_slide_requests_are_checked_against_the_pyramid_and_its_resolution(tmp_path):
    rgb = np.full((256, 384, 3), 200, np.uint8)
    slide = pyramid(tmp_path / "s.tif", rgb, mpp=0.25)
    assert check_slide_request(slide, 0, [0, 0], [384, 256], 0.25, 0.15) is None
    assert check_slide_request(slide, 1, [0, 0], [192, 128], 0.5, 0.15) is None  # a 20x network reads level 1
    for args, message in (((1, [0, 0], [64, 64], 0.25), r"level 1 is 0.5 um/px .* 0.25 um/px .*; level 0 has it"),
                          ((0, [0, 0], [64, 64], 1.0), "no level has it"),
                          ((2, [0, 0], [64, 64], 0.25), r"level 2 requested, the slide has levels 0..1"),
                          ((0, [0, -1], [64, 64], 0.25), "negative"),
                          ((1, [320, 0], [64, 64], 0.5), r"reaches beyond the slide \(384 x 256")):
        with pytest.raises(ValueError, match=message):
            check_slide_request(slide, *args, 0.15)
    # a slide without a resolution is read as asked, with a warning
    import tifffile

    tifffile.imwrite(tmp_path / "plain.tif", rgb, tile=(128, 128), photometric="rgb")
    assert "does not record its resolution" in check_slide_request(tmp_path / "plain.tif", 0, [0, 0], [64, 64],
                                                                    0.25, 0.15)


def test_regions_read_the_requested_area_with_clipped_context(consep):
    image = consep["images"][3]
    pixels, region = read_region(image, (100, 40), (64, 32), margin=50)
    assert region.origin == (50.0, 0.0) and region.core == (50, 40, 64, 32)
    np.testing.assert_array_equal(pixels, image[0:122, 50:214])
    whole, region = read_region(image)
    assert whole.shape == image.shape and region.core == (0, 0, 256, 256)
    centroids = np.array([[49.9, 50.0], [50.0, 40.0], [113.99, 71.99], [114.0, 50.0]])
    assert region.contains(centroids).all()
    _, region = read_region(image, (100, 40), (64, 32), margin=50)
    assert region.contains(centroids).tolist() == [False, True, True, False]
    with pytest.raises(ValueError, match="outside the image"):
        read_region(image, (300, 0), (10, 10))


def test_datastore_samples_are_cut_into_training_patches_and_split_by_image():
    image = np.zeros((100, 150, 3), np.uint8)
    inst = np.zeros((100, 150), np.int32)
    inst[10:20, 10:20], inst[90:100, 140:150] = 5, 9
    cut = patches(image, inst, (inst > 0).astype(np.uint8), 64)
    assert len(cut) == 2 * 3 and all(p[0].shape == (64, 64, 3) for p in cut)
    assert cut[0][1].max() == 1 and cut[-1][1].max() == 1  # ids consecutive in every patch
    padded = patches(np.zeros((40, 70, 3), np.uint8), np.ones((40, 70), np.int32), np.ones((40, 70), np.uint8), 64)
    assert len(padded) == 2 and (padded[0][0][40:] == 255).all() and (padded[0][1][40:] == 0).all()
    assert split(["a"], 0.2, 0) == {"train": ["a"], "val": ["a"]}
    halves = split([f"s{i}" for i in range(10)], 0.2, 0)
    assert len(halves["val"]) == 2 and sorted(halves["train"] + halves["val"]) == sorted(f"s{i}" for i in range(10))


def test_new_class_tables_keep_the_learnt_rows_of_shared_classes():
    old = {"head.weight": torch.arange(12.0).reshape(3, 4), "head.bias": torch.tensor([0.0, 1.0, 2.0]),
           "body.weight": torch.ones(2, 2)}
    new = {"head.weight": torch.full((4, 4), -1.0), "head.bias": torch.full((4,), -1.0),
           "body.weight": torch.zeros(2, 2)}
    state, partial = carry_over(old, ["background", "a", "b"], new, ["background", "B", "c", "a"])
    assert state["head.bias"].tolist() == [0.0, 2.0, -1.0, 1.0]
    assert state["head.weight"][3].tolist() == [4.0, 5.0, 6.0, 7.0] and (state["head.weight"][2] == -1).all()
    assert torch.equal(state["body.weight"], torch.ones(2, 2))
    assert sorted(partial) == ["head.bias", "head.weight"]


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr("cellvta_label.config.time.strftime", lambda fmt: "20261207_101500")
    config = AppConfig(bundle=BUNDLE, model_dir=tmp_path / "model", work_dir=tmp_path / "runs")
    runs = [config.new_run_dir("classifier") for _ in range(3)] + [config.new_run_dir("run")]
    assert [r.name for r in runs] == ["classifier_20261207_101500", "classifier_20261207_101500_2",
                                      "classifier_20261207_101500_3", "run_20261207_101500"]
    assert all(r.is_dir() and r.parent == tmp_path / "runs" for r in runs)


def test_mutual_information_and_the_dihedral_views():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    views = {tuple(dihedral(x, i).flatten().tolist()) for i in range(8)}
    assert len(views) == 8
    for i in range(8):
        assert torch.equal(undo_dihedral(dihedral(x, i), i), x)
    same = torch.softmax(torch.randn(1, 3, 4, 4), 1).repeat(4, 1, 1, 1)
    assert float(mutual_information(same)) == pytest.approx(0.0, abs=1e-6)
    opposite = torch.zeros(2, 2, 3, 3)
    opposite[0, 0], opposite[1, 1] = 1.0, 1.0
    assert float(mutual_information(opposite)) == pytest.approx(np.log(2), rel=1e-6)


def test_tta_and_mc_dropout_sample_distinct_predictions():
    class PixelNet(torch.nn.Module):
        """Per-pixel class logits that depend on position (so flips change them) with one dropout layer."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x):
            ramp = torch.linspace(-2, 2, x.shape[-1]).expand_as(x[:, :1])
            return {"nuclei_type_map": self.drop(self.conv(x) + ramp)}

    torch.manual_seed(0)
    net = PixelNet().eval()
    image = torch.randn(1, 3, 16, 16)
    tta = type_probabilities(net, lambda x, n: n(x), image, "tta", 4)
    assert tta.shape == (4, 3, 16, 16)
    assert torch.allclose(tta[0], torch.softmax(net(image)["nuclei_type_map"], 1)[0])
    assert float(mutual_information(tta)) > 1e-3
    with pytest.raises(ValueError, match="mc_dropout needs a network"):
        type_probabilities(net, lambda x, n: n(x), image, "mc_dropout", 2)
    stochastic = mc_dropout_network(net)
    assert not net.drop.training and stochastic.drop.training and not stochastic.conv.training
    mc = type_probabilities(stochastic, lambda x, n: n(x), image, "mc_dropout", 3)
    assert float(mutual_information(mc)) > 1e-3
    with pytest.raises(ValueError, match="no dropout or drop-path layer"):
        enable_mc_dropout(torch.nn.Conv2d(1, 1, 1))


# --- the real server (.venv-label) --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def label_python() -> Path:
    """The interpreter of the app's environment; missing is a failure in CI and a skip elsewhere."""
    if not LABEL_PYTHON.is_file():
        reason = f"{LABEL_PYTHON} not found: create it with `make setup-label`"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return LABEL_PYTHON


def bundle_args(**overrides) -> list[str]:
    args = []
    for key, value in {**NETWORK, "num_workers": 0, **overrides}.items():
        args += [f"--{key}", repr(value)]
    return args


def run_bundle(python: str | Path, workflow: str, **overrides) -> None:
    """A workflow of the bundle (``training``, ``inferring``: its config files), run by ``python``."""
    from scripts.workflows.configs import config_files

    cmd = [str(python), "-m", "monai.bundle", "run", workflow, "--config_file", repr(config_files(workflow)),
           *bundle_args(**overrides)]
    result = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, **OP_ENV})
    assert result.returncode == 0, result.stderr[-4000:]


def write_png(path: Path, rgb: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def trained(consep, tmp_path_factory) -> Path:
    """Model folder of a small CellVTA trained on CoNSeP patches by the bundle's training workflow."""
    from scripts.data.datasets import DatasetWriter, relabel_sequential

    data = tmp_path_factory.mktemp("consep_patches")
    size = NETWORK["patch_size"]
    with DatasetWriter(data, "consep", CONSEP_CLASSES, ["colon"], 40) as writer:
        for i, split_name in ((0, "train"), (5, "train"), (10, "train"), (15, "train"), (30, "val")):
            for k, (y, x) in enumerate([(0, 0), (0, 64), (64, 0), (64, 64)][: 4 if split_name == "train" else 2]):
                window = (slice(y, y + size), slice(x, x + size))
                writer.add(f"p{i}_{k}", consep["images"][i][window], relabel_sequential(consep["inst_map"][i][window]),
                           consep["type_map"][i][window], split_name)
    root = tmp_path_factory.mktemp("bundle_run")
    # 24 steps of the decoder (the ViT stays at its initialisation): enough to find nuclei
    run_bundle(sys.executable, "training", dataset_dir=str(data), dataset_name="folder",
               bundle_root=str(root), epochs=6, batch_size=4, learning_rate=0.001, augment=False, freeze="decoder_only",
               progress_bar=False)
    return root / "models"


def pyramid(path: Path, rgb: np.ndarray, mpp: float) -> Path:
    """A tiled TIFF with level 0 and a half-resolution level 1, recording ``mpp`` microns per level-0 pixel."""
    import tifffile

    per_cm = 1e4 / mpp
    half = cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] // 2), interpolation=cv2.INTER_AREA)
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(128, 128), photometric="rgb", compression="zlib", subifds=1,
                  resolution=(per_cm, per_cm), resolutionunit=3)
        tif.write(half, tile=(128, 128), photometric="rgb", compression="zlib", subfiletype=1)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def studies(consep, tmp_path_factory) -> dict:
    """The datastore: three CoNSeP tiles (PNG) and a tiled TIFF slide of four others, and the pixels of each."""
    import tifffile

    folder = tmp_path_factory.mktemp("studies")
    tiles = {name: consep["images"][i][:TILE, :TILE] for name, i in STUDY_TILES.items()}
    for name, rgb in tiles.items():
        write_png(folder / f"{name}.png", rgb)
    quarters = [consep["images"][i][64:64 + TILE, 64:64 + TILE] for i in (272, 360, 204, 262)]
    slide = np.concatenate([np.concatenate(quarters[:2], 1), np.concatenate(quarters[2:], 1)], 0)
    tifffile.imwrite(folder / "slide.tif", slide, tile=(TILE, TILE), photometric="rgb", compression="zlib")
    return {"folder": folder, "tiles": tiles, "slide": slide}


class Server:
    """The app started as documented (``python apps/monailabel``), on 127.0.0.1 and a free port."""

    def __init__(self, python: Path, studies: Path, model_dir: Path, work_dir: Path, log: Path,
                 args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.studies, self.model_dir, self.work_dir = studies, model_dir, work_dir
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        if args is None:
            args = ["--conf", "overrides", json.dumps(NETWORK)]
        cmd = [str(python), str(APP), "--studies", str(studies), "--model_dir", str(model_dir),
               "--port", str(self.port), "--conf", "work_dir", str(work_dir), "--conf", "margin", "16",
               "--conf", "uncertainty_samples", "2", *args]
        env = {**os.environ, **OP_ENV, "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false", **(env or {})}
        self.process = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)

    def wait_ready(self, timeout: float = 600, headers: dict[str, str] | None = None) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if requests.get(f"{self.url}/info/", headers=headers, timeout=30).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(1)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(60)


@pytest.fixture(scope="module")
def server(label_python, trained, studies, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("served")
    for name in ("model.pt", "dataset.json"):
        shutil.copyfile(trained / name, model_dir / name)
    run = Server(label_python, studies["folder"], model_dir, tmp_path_factory.mktemp("work"),
                 tmp_path_factory.mktemp("logs") / "server.log")
    try:
        run.wait_ready()
        yield run
    finally:
        run.stop()


@pytest.fixture(scope="module")
def reference(label_python, trained, studies, tmp_path_factory) -> dict:
    """The bundle's own inference workflow on a study tile, a crop of the slide and the whole slide, run in the
    app's environment (OpenCV and numpy builds for numpy 1 can move a borderline pixel of the post-processing
    relative to the project's): GeoJSON features and type maps by image name."""
    images = tmp_path_factory.mktemp("reference_images")
    slide = studies["slide"]
    paths = [write_png(images / "consep_a.png", studies["tiles"]["consep_a"]),
             write_png(images / "slide_crop.png", slide[64:64 + TILE, 96:96 + TILE]),
             write_png(images / "slide.png", slide)]
    out = tmp_path_factory.mktemp("reference")
    run_bundle(label_python, "inferring", bundle_root=str(trained.parent),
               input_images=[str(p) for p in paths], output_dir=str(out))
    return {p.stem: {"features": json.loads((out / f"{p.stem}.geojson").read_text())["features"],
                     "type_map": np.load(out / f"{p.stem}.npz")["type_map"]} for p in paths}


def polygon_set(features: list[dict], offset=(0, 0)) -> set[tuple]:
    """Class name and vertices (without the closing one) of each GeoJSON feature, shifted by ``offset``."""
    out = set()
    for f in features:
        ring = np.asarray(f["geometry"]["coordinates"][0][:-1]) + np.asarray(offset)
        out.add((f["properties"]["classification"]["name"], tuple(map(tuple, ring.round(2).tolist()))))
    return out


def asap_set(xml: bytes) -> set[tuple]:
    root = ET.fromstring(xml)
    out = set()
    for a in root.iter("Annotation"):
        points = tuple((float(c.get("X")), float(c.get("Y"))) for c in a.iter("Coordinate"))
        out.add((a.get("PartOfGroup"), points))
    return out


@pytest.mark.slow
@pytest.mark.timeout(2400)  # pays for training the served model, the reference inference and the server's start
def test_info_describes_the_served_model_and_the_strategies(server):
    import requests

    info = requests.get(f"{server.url}/info/", timeout=60).json()
    model = info["models"]["cellvta"]
    assert model["labels"] == {name: i for i, name in enumerate(CONSEP_CLASSES) if i}
    assert model["pathology"] is True and model["config"]["margin"] == 16
    assert set(info["strategies"]) == {"random", "epistemic_tta", "epistemic_mc_dropout"}
    assert set(info["trainers"]) == {"cellvta", "cellvta_classifier"}
    assert info["trainers"]["cellvta"]["config"]["epochs"] == 10
    assert info["datastore"]["total"] == 4


@pytest.mark.slow
def test_tile_inference_returns_the_nuclei_of_the_bundles_own_inference(server, reference):
    import requests

    answer = requests.post(f"{server.url}/infer/cellvta", params={"image": "consep_a", "output": "json"},
                           timeout=600)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    expected = reference["consep_a"]["features"]
    assert result["count"] == len(expected) >= 3
    assert result["nuclei"]["features"] == expected
    label = requests.post(f"{server.url}/infer/cellvta", params={"image": "consep_a", "output": "image"},
                          timeout=600)
    type_map = cv2.imdecode(np.frombuffer(label.content, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(type_map, reference["consep_a"]["type_map"])


@pytest.mark.slow
def test_slide_regions_return_asap_polygons_of_the_bundles_nuclei(server, reference):
    import requests

    def wsi(location, size, tile_size, margin):
        body = {"location": location, "size": size, "tile_size": tile_size, "level": 0, "params": {"margin": margin}}
        answer = requests.post(f"{server.url}/infer/wsi_v2/cellvta", params={"image": "slide", "output": "asap"},
                               data={"wsi": json.dumps(body)}, timeout=900)
        assert answer.status_code == 200, answer.text
        return asap_set(answer.content)

    # one tile without context: the bundle's nuclei of the same crop, in slide coordinates; also through the
    # older endpoint QuPath calls for images of the datastore
    crop = polygon_set(reference["slide_crop"]["features"], offset=(96, 64))
    assert len(crop) >= 3
    assert wsi([96, 64], [TILE, TILE], [TILE, TILE], 0) == crop
    body = {"location": [96, 64], "size": [TILE, TILE], "tile_size": [TILE, TILE], "min_poly_area": 30,
            "params": {"margin": 0}}
    qupath = requests.post(f"{server.url}/infer/wsi/cellvta", params={"image": "slide", "output": "asap"},
                           json=body, timeout=900)
    assert qupath.status_code == 200 and asap_set(qupath.content) == crop
    # two tiles whose context is the whole slide: every nucleus of the bundle's whole-slide inference centred
    # in the region, each once
    region = (32, 64, 192, 128)
    inside = [f for f in reference["slide"]["features"]
              if region[0] <= f["properties"]["measurements"]["centroid_x"] < region[0] + region[2]
              and region[1] <= f["properties"]["measurements"]["centroid_y"] < region[1] + region[3]]
    assert len(inside) >= 3
    stitched, expected = wsi(list(region[:2]), list(region[2:]), [96, 128], 2 * TILE), polygon_set(inside)
    # every nucleus once, with the outline of the bundle's GeoJSON (a contour touching itself becomes the largest
    # valid part of its polygon in both)
    assert stitched == expected


@pytest.mark.slow
def test_saved_labels_steer_active_learning(server, consep):
    import requests

    index = STUDY_TILES["consep_a"]
    tile = consep["images"][index][:TILE, :TILE]
    inst, types = consep["inst_map"][index][:TILE, :TILE], consep["type_map"][index][:TILE, :TILE]
    # the annotator calls the inflammatory nuclei "lymphocyte": a class the served model does not have
    names = [*CONSEP_CLASSES[:2], "lymphocyte", *CONSEP_CLASSES[3:]]
    polygons = gt_polygons(inst, types, names)
    assert np.array_equal(tile, cv2.cvtColor(cv2.imread(str(server.studies / "consep_a.png")), cv2.COLOR_BGR2RGB))
    saved = requests.put(f"{server.url}/datastore/label", params={"image": "consep_a"},
                         files={"label": ("consep_a.xml", asap_xml(polygons))}, data={"params": "{}"}, timeout=60)
    assert saved.status_code == 200, saved.text
    assert saved.json()["label"] == "consep_a"
    unlabelled = {"consep_b", "consep_c", "slide"}

    picked = requests.post(f"{server.url}/activelearning/random", json={}, timeout=60).json()
    assert picked["id"] in unlabelled
    patch = requests.post(f"{server.url}/activelearning/random",
                          json={"image": "slide", "patch_size": [96, 96], "image_size": [256, 256]}, timeout=60).json()
    x, y, w, h = patch["bbox"]
    assert patch["id"] == "slide" and (w, h) == (96, 96) and 0 <= x <= 160 and 0 <= y <= 160
    for strategy in ("epistemic_tta", "epistemic_mc_dropout"):
        picked = requests.post(f"{server.url}/activelearning/{strategy}", json={}, timeout=900).json()
        scores = picked["scores"]
        assert set(scores) == unlabelled and all(s > 0 for s in scores.values())
        assert picked["id"] == max(scores, key=scores.get) and picked["score"] == scores[picked["id"]]
        info = requests.get(f"{server.url}/datastore/image/info", params={"image": picked["id"]}, timeout=60).json()
        assert info[f"cellvta_{strategy.split('_', 1)[1]}"]["score"] == picked["score"]


@pytest.mark.slow
def test_training_fine_tunes_on_the_saved_label_and_publishes(server):
    import requests

    before = (server.model_dir / "model.pt").read_bytes()
    started = requests.post(f"{server.url}/train/cellvta",
                            json={"epochs": 1, "batch_size": 4, "learning_rate": 0.001}, timeout=60)
    assert started.status_code == 200, started.text
    deadline = time.monotonic() + 1200
    while True:
        status = requests.get(f"{server.url}/train/", timeout=60).json()
        if status["status"] not in ("SUBMITTED", "RUNNING") or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert status["status"] == "DONE", "\n".join(status.get("details", []))
    stats = json.loads((server.model_dir / "train_stats.json").read_text())
    classes = [*CONSEP_CLASSES, "lymphocyte"]
    assert stats["classes"] == classes and stats["train"] == stats["val"] == ["consep_a"]
    # the best metric comes from the file the run's BestMetricWriter wrote
    best = stats["best_metric"]
    assert json.loads((server.work_dir / stats["run"] / "models" / "best_metric.json").read_text()) == best
    assert stats["epochs"] == 1 and best["metric"] == "val_bpq" and best["epoch"] == 1 and 0.0 <= best["value"] <= 1.0
    assert json.loads((server.model_dir / "dataset.json").read_text())["classes"] == classes
    # the published model folder describes its network, so the next start needs no overrides
    assert json.loads((server.model_dir / "overrides.json").read_text()).items() >= NETWORK.items()
    assert (server.model_dir / "model.pt").read_bytes() != before
    info = requests.get(f"{server.url}/info/", timeout=60).json()
    assert info["models"]["cellvta"]["labels"] == {name: i for i, name in enumerate(classes) if i}
    again = requests.post(f"{server.url}/infer/cellvta", params={"image": "consep_b", "output": "json"}, timeout=600)
    assert again.status_code == 200 and again.json()["label_names"] == info["models"]["cellvta"]["labels"]


@pytest.mark.slow
def test_the_server_stops_and_leaves_no_process(server):
    pid = server.process.pid
    server.stop()
    assert server.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
