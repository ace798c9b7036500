"""The MONAI Deploy application (apps/deploy): inputs, outputs, model folders, and the app itself against the
bundle's inference workflow on real CoNSeP images.

The tests that run the application need the MONAI Deploy App SDK, which lives in its own environment
(``.venv-deploy``, ``requirements-deploy.txt``). Under the project's main environment
``test_deploy_tests_pass_in_the_deploy_environment`` runs this file with ``.venv-deploy``'s interpreter; a missing
``.venv-deploy`` is a failure in CI (``CI=true``) and a skip elsewhere. The other tests need no SDK and run in both.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "deploy"
BUNDLE = REPO / "bundles" / "cellvta"
DEPLOY_VENV = REPO / ".venv-deploy"
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

from cellvta_deploy.bundle import find_model_dir, load_pipeline  # noqa: E402
from cellvta_deploy.inputs import LoadedImage, load_item, read_region_request, scan_inputs  # noqa: E402
from cellvta_deploy.outputs import write_maps_tiff  # noqa: E402
from cellvta_deploy.settings import AppSettings  # noqa: E402
from scripts.model.network import CellVTA  # noqa: E402


def _sdk_installed() -> bool:
    try:
        importlib.metadata.version("monai-deploy-app-sdk")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


IN_DEPLOY_ENV = _sdk_installed()
needs_sdk = pytest.mark.skipif(
    not IN_DEPLOY_ENV, reason="needs the MONAI Deploy App SDK: run in .venv-deploy by "
                              "test_deploy_tests_pass_in_the_deploy_environment")

CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle"]
NETWORK = {"backbone": "vit-t", "vit_kwargs": {"depth": 4}, "patch_size": 128}
# real CoNSeP crops: (patch index, height, width); B is wider than the 128 px window, so the sliding window blends
TILE_A, TILE_B = (0, 128, 128), (100, 128, 176)
SLIDE_MPP = 0.25


def _write_png(path: Path, rgb: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def _write_slide(path: Path, image: np.ndarray, mpp: float | None) -> Path:
    """A tiled two-level pyramidal RGB TIFF (level 1 at half size), lossless, with its resolution when given."""
    half = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA)
    with tifffile.TiffWriter(path) as tif:
        for downsample, level in ((1, image), (2, half)):
            resolution = {} if mpp is None else {"resolution": (1e4 / (mpp * downsample),) * 2,
                                                 "resolutionunit": "CENTIMETER"}
            tif.write(level, tile=(64, 64), photometric="rgb", compression="zlib",
                      subfiletype=0 if downsample == 1 else 1, **resolution)
    return path


def _crop(consep: dict, spec: tuple[int, int, int]) -> np.ndarray:
    index, height, width = spec
    return np.ascontiguousarray(consep["images"][index, :height, :width])


def _mosaic(consep: dict) -> np.ndarray:
    """256 x 256 mosaic of four 128 px CoNSeP crops; tile A is its top-right quarter (level-0 x 128, y 0)."""
    a = _crop(consep, TILE_A)
    others = [np.ascontiguousarray(consep["images"][i, 128:, 128:]) for i in (7, 20, 33)]
    return np.vstack([np.hstack([others[0], a]), np.hstack(others[1:])])


def _features(path: Path) -> list[dict]:
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    return collection["features"]


def _assert_shifted(moved: list[dict], features: list[dict], dx: float, dy: float) -> None:
    """``moved`` are ``features`` translated by ``(dx, dy)`` (centroids rounded to 0.01 on both sides)."""
    assert len(moved) == len(features)
    for m, f in zip(moved, features, strict=True):
        (ring,), (moved_ring,) = f["geometry"]["coordinates"], m["geometry"]["coordinates"]
        assert moved_ring == [[x + dx, y + dy] for x, y in ring]
        assert m["properties"]["classification"] == f["properties"]["classification"]
        a, b = m["properties"]["measurements"], f["properties"]["measurements"]
        assert a["type_probability"] == b["type_probability"]
        assert abs(a["centroid_x"] - b["centroid_x"] - dx) <= 0.0101
        assert abs(a["centroid_y"] - b["centroid_y"] - dy) <= 0.0101


# --- inputs ---------------------------------------------------------------------------------------------------

def test_inputs_are_tiles_and_region_requests_and_the_slides_they_name_are_not_tiles(consep, tmp_path):
    _write_png(tmp_path / "a.png", _crop(consep, TILE_A))
    tifffile.imwrite(tmp_path / "b.tif", _crop(consep, TILE_B), photometric="rgb")
    _write_slide(tmp_path / "slide.tif", _mosaic(consep), SLIDE_MPP)
    (tmp_path / "r.json").write_text(json.dumps({"slide": "slide.tif", "location": [128, 0], "size": [128, 128]}))
    (tmp_path / "notes.txt").write_text("not an image")

    items = scan_inputs(tmp_path)
    assert [(i.name, i.path.name) for i in items] == [("a", "a.png"), ("b", "b.tif"), ("r", "r.json")]
    region = items[2].region
    assert region.slide == (tmp_path / "slide.tif").resolve()
    assert (region.location, region.size, region.level, region.mpp, region.backend) == ((128, 0), (128, 128), 0,
                                                                                       None, "auto")
    loaded = [load_item(i, magnification=40) for i in items]
    assert np.array_equal(loaded[0].image, _crop(consep, TILE_A))
    assert np.array_equal(loaded[1].image, _crop(consep, TILE_B))
    assert np.array_equal(loaded[2].image, _crop(consep, TILE_A))  # the region is tile A, cut from the slide
    assert (loaded[0].origin, loaded[0].downsample) == ((0.0, 0.0), 1.0)
    assert (loaded[2].origin, loaded[2].downsample) == ((128.0, 0.0), 1.0)
    assert [i.name for i in scan_inputs(tmp_path / "r.json")] == ["r"]


def test_input_folders_without_images_or_with_clashing_names_are_refused(consep, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing: input not found"):
        scan_inputs(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=f"{tmp_path}: no tiles"):
        scan_inputs(tmp_path)
    with pytest.raises(ValueError, match="notes.txt: not a tile"):
        scan_inputs(tmp_path / "notes.txt")
    _write_png(tmp_path / "a.png", _crop(consep, TILE_A))
    tifffile.imwrite(tmp_path / "a.tif", _crop(consep, TILE_A), photometric="rgb")
    with pytest.raises(ValueError, match=r"a\.(png|tif) and .*a\.(png|tif) would write the same outputs 'a\.\*'"):
        scan_inputs(tmp_path)


@pytest.mark.parametrize(("request_text", "message"), [
    ("{not json", "not a valid JSON region request"),
    ('[1, 2]', "a region request is a JSON object, got list"),
    ('{"slide": "s.tif", "locaton": [0, 0], "size": [8, 8]}', r"unknown keys \['locaton'\]"),
    ('{"slide": "s.tif", "location": [0, 0]}', r"missing keys \['size'\]"),
    ('{"slide": "s.tif", "location": [0, 0], "size": [0, 8]}', "'size' must be two positive integers"),
    ('{"slide": "s.tif", "location": [-1, 0], "size": [8, 8]}', "'location' must be two non-negative integers"),
    ('{"slide": "s.tif", "location": [0, 0], "size": [8.5, 8]}', "'size' must be two positive integers"),
    ('{"slide": "s.tif", "location": [0, 0], "size": [8, 8], "level": -1}', "'level' must be a non-negative"),
    ('{"slide": "s.tif", "location": [0, 0], "size": [8, 8], "mpp": 0}', "'mpp' must be a positive number"),
    ('{"slide": "s.tif", "location": [0, 0], "size": [8, 8], "backend": "pil"}', "'backend' must be one of"),
    ('{"slide": "other.tif", "location": [0, 0], "size": [8, 8]}', "slide .*other.tif not found"),
])
def test_bad_region_requests_are_refused_naming_the_file(tmp_path, request_text, message):
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((16, 16, 3), np.uint8), photometric="rgb")
    path = tmp_path / "req.json"
    path.write_text(request_text)
    with pytest.raises((ValueError, FileNotFoundError), match=f"{re.escape(str(path))}: .*{message}"):
        read_region_request(path)


def _region(tmp_path: Path, **request) -> LoadedImage:
    path = tmp_path / "req.json"
    path.write_text(json.dumps(request))
    (item,) = scan_inputs(path)
    return load_item(item, magnification=40)


def test_regions_are_read_at_the_network_resolution_or_refused_naming_the_level_that_fits(consep, tmp_path):
    mosaic = _mosaic(consep)
    _write_slide(tmp_path / "with_mpp.tif", mosaic, SLIDE_MPP)
    _write_slide(tmp_path / "no_mpp.tif", mosaic, None)

    for backend in ("tifffile", "openslide"):
        loaded = _region(tmp_path, slide="with_mpp.tif", location=[64, 32], size=[96, 80], backend=backend)
        assert np.array_equal(loaded.image, mosaic[32:112, 64:160])
        assert (loaded.origin, loaded.downsample) == ((64.0, 32.0), 1.0)
    with pytest.raises(ValueError, match=r"req.json: level 1 has 0.5 µm/px but the network expects 0.25 µm/px "
                                         r"\(40x\); level 0 fits"):
        _region(tmp_path, slide="with_mpp.tif", location=[0, 0], size=[64, 64], level=1)
    with pytest.raises(ValueError, match="req.json: .*no_mpp.tif does not record its microns per pixel"):
        _region(tmp_path, slide="no_mpp.tif", location=[0, 0], size=[64, 64])
    with pytest.raises(ValueError, match=r"req.json: level 2 does not exist \(.*with_mpp.tif has 2\)"):
        _region(tmp_path, slide="with_mpp.tif", location=[0, 0], size=[64, 64], level=2)
    with pytest.raises(ValueError, match=r"req.json: the region at \[256, 0\] of 64 x 64 pixels at level 0 reaches "
                                         r"beyond the slide \(256 x 256 pixels"):
        _region(tmp_path, slide="with_mpp.tif", location=[256, 0], size=[64, 64])
    with pytest.raises(ValueError, match=r"req.json: the region at \[224, 0\] .* reaches beyond the slide"):
        _region(tmp_path, slide="with_mpp.tif", location=[224, 0], size=[64, 64])  # partly outside

    # the request states the resolution the file lacks; level 1 (downsample 2) then has the network's resolution
    loaded = _region(tmp_path, slide="no_mpp.tif", location=[128, 64], size=[64, 32], level=1, mpp=0.125)
    half = tifffile.imread(tmp_path / "no_mpp.tif", key=1)
    assert np.array_equal(loaded.image, half[32:64, 64:128])
    assert (loaded.origin, loaded.downsample) == ((128.0, 64.0), 2.0)
    # a stated resolution overrides the one the file records (level 1 of with_mpp.tif records 0.5 µm/px)
    loaded = _region(tmp_path, slide="with_mpp.tif", location=[128, 64], size=[64, 32], level=1, mpp=0.125)
    assert np.array_equal(loaded.image, tifffile.imread(tmp_path / "with_mpp.tif", key=1)[32:64, 64:128])


# --- model folders, settings, outputs ---------------------------------------------------------------------------

def test_model_folders_are_found_in_every_layout_the_app_is_given(tmp_path):
    model = tmp_path / "models" / "cellvta"
    model.mkdir(parents=True)
    (model / "model.pt").write_bytes(b"")
    assert find_model_dir(model / "model.pt") == model
    assert find_model_dir(model) == model
    assert find_model_dir(tmp_path / "models") == model  # the MAP layout: /opt/holoscan/models/<name>/
    with pytest.raises(FileNotFoundError, match="weights.pt: the model file must be named model.pt"):
        (model / "weights.pt").write_bytes(b"")
        find_model_dir(model / "weights.pt")
    (tmp_path / "models" / "other").mkdir()
    (tmp_path / "models" / "other" / "model.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"models: several model folders \(cellvta, other\)"):
        find_model_dir(tmp_path / "models")
    with pytest.raises(FileNotFoundError, match="empty: no model.pt"):
        (tmp_path / "empty").mkdir()
        find_model_dir(tmp_path / "empty")


def test_app_settings_are_checked_naming_the_config_file():
    assert AppSettings.from_mapping({}, "app.yaml") == AppSettings(maps="npz", overlays=True)
    assert AppSettings.from_mapping({"maps": "tiff", "overlays": False}, "app.yaml") == AppSettings("tiff", False)
    with pytest.raises(ValueError, match=r"app.yaml: unknown keys \['overlay'\] in section 'cellvta'"):
        AppSettings.from_mapping({"overlay": True}, "app.yaml")
    with pytest.raises(ValueError, match="app.yaml: 'cellvta.maps' must be one of \\['npz', 'tiff'\\], got 'png'"):
        AppSettings.from_mapping({"maps": "png"}, "app.yaml")
    with pytest.raises(ValueError, match="app.yaml: 'cellvta.overlays' must be true or false, got 'yes'"):
        AppSettings.from_mapping({"overlays": "yes"}, "app.yaml")
    with pytest.raises(ValueError, match="app.yaml: 'cellvta.stain_normalization' must be true or false, got 'on'"):
        AppSettings.from_mapping({"stain_normalization": "on"}, "app.yaml")
    with pytest.raises(ValueError, match=r"app.yaml: 'cellvta.stain_vectors' must be 3 x 2 numbers or null"):
        AppSettings.from_mapping({"stain_vectors": [0.5, 0.7, 0.4]}, "app.yaml")
    with pytest.raises(ValueError, match=r"app.yaml: 'cellvta.stain_max_concentrations' must be 2 numbers or null"):
        AppSettings.from_mapping({"stain_max_concentrations": [1.0, "x"]}, "app.yaml")
    with pytest.raises(ValueError, match="app.yaml: 'cellvta.classifier' must be a file path or null, got 3"):
        AppSettings.from_mapping({"classifier": 3}, "app.yaml")


def test_app_settings_set_the_inference_configs_keys_with_paths_in_the_model_folder(tmp_path):
    settings = AppSettings.from_mapping({"stain_normalization": True, "stain_reference": "reference.png",
                                         "stain_max_concentrations": [1.5, 1]}, "app.yaml")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'reference.png'}: stain reference image not found "
                                                r"\('cellvta.stain_reference', relative to the model folder\)"):
        settings.config_overrides(tmp_path)
    (tmp_path / "reference.png").write_bytes(b"")
    assert settings.config_overrides(tmp_path) == {
        "stain_normalization": True, "stain_reference": str(tmp_path / "reference.png"), "stain_vectors": None,
        "stain_max_concentrations": [1.5, 1.0]}
    assert AppSettings().config_overrides(tmp_path) == {"stain_normalization": False, "stain_vectors": None,
                                                        "stain_max_concentrations": None}


def test_tiff_maps_hold_the_instance_and_type_maps(consep, tmp_path):
    inst, types = consep["inst_map"][3], consep["type_map"][3]
    write_maps_tiff(tmp_path / "m_maps.tif", inst, types)
    with tifffile.TiffFile(tmp_path / "m_maps.tif") as tif:
        data = tif.asarray()
        assert tif.is_ome and 'Name="instance"' in tif.ome_metadata and 'Name="type"' in tif.ome_metadata
    assert data.dtype == np.int32 and np.array_equal(data[0], inst) and np.array_equal(data[1], types)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_maps.tif"]  # no temporary file left


def _save_model(model_dir: Path, network: torch.nn.Module, overrides: dict) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), model_dir / "model.pt")
    (model_dir / "dataset.json").write_text(json.dumps(
        {"name": "consep", "classes": CLASSES, "tissues": ["colon"], "magnification": 40, "samples": []}))
    (model_dir / "overrides.json").write_text(json.dumps(overrides))
    return model_dir


def test_a_checkpoint_of_another_network_is_refused_naming_the_keys(tmp_path):
    torch.manual_seed(0)
    network = CellVTA(num_nuclei_classes=len(CLASSES), num_tissue_classes=1, freeze="full", **{
        k: v for k, v in NETWORK.items() if k != "patch_size"})
    model = _save_model(tmp_path / "model", network, {**NETWORK, "vit_kwargs": {"depth": 8}})
    with pytest.raises(ValueError, match=r"model.pt does not fit the network of configs/inference.yaml with overrides "
                                         r"\{.*'depth': 8.*\}: .*model.pt: network weights do not match; "
                                         r"missing \[.*'encoder.vit.blocks.[4-7]\."):
        load_pipeline(BUNDLE, model)
    (model / "dataset.json").unlink()
    with pytest.raises(FileNotFoundError, match="dataset.json: not found"):
        load_pipeline(BUNDLE, model)


# --- the application ----------------------------------------------------------------------------------------------

def _fit_heads(network: CellVTA, images: list[np.ndarray], inst_maps: list[np.ndarray],
               type_maps: list[np.ndarray]) -> None:
    """Give a randomly initialised network nucleus and type heads that see nuclei: the final 1x1 convolutions of
    the NP and NC branches become least-squares fits of the ground truth on their input features (a linear probe),
    so the nuclei found are real ones; the HV head keeps its random weights, which split them."""
    mean, std = torch.tensor(network.mean)[:, None, None], torch.tensor(network.std)[:, None, None]
    features: dict[str, list[torch.Tensor]] = {}
    hooks = [branch.decoder0_header[1].register_forward_hook(
        lambda _m, _i, out, name=name: features.setdefault(name, []).append(out[0].flatten(1).T))
        for name, branch in network.decoder.branches.items()]
    with torch.no_grad():
        for image in images:
            network((torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 - mean) / std)
    for hook in hooks:
        hook.remove()
    inst, types = np.concatenate([m.ravel() for m in inst_maps]), np.concatenate([m.ravel() for m in type_maps])

    def fit(name: str, target: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat(features[name]).double()
        design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.double)], 1)
        solution = torch.linalg.lstsq(design, torch.from_numpy(target).double()).solution.float()
        return solution[:-1].T, solution[-1]

    branches = network.decoder.branches
    with torch.no_grad():
        w, b = fit("nuclei_binary_map", (inst > 0).astype(np.float64)[:, None])
        np_head = branches["nuclei_binary_map"].decoder0_header[2]
        # logit(nucleus) - logit(background) = 20 (score - 0.5): a nucleus where the fitted score passes 0.5
        np_head.weight.copy_(torch.cat([torch.zeros_like(w), 20 * w])[:, :, None, None])
        np_head.bias.copy_(torch.stack([torch.zeros(()), 20 * (b[0] - 0.5)]))
        w, b = fit("nuclei_type_map", np.eye(len(CLASSES))[types])
        branches["nuclei_type_map"].decoder0_header[2].weight.copy_(w[:, :, None, None])
        branches["nuclei_type_map"].decoder0_header[2].bias.copy_(b)


@pytest.fixture(scope="module")
def probe_model(consep, tmp_path_factory) -> Path:
    """A small CellVTA (ViT-T, 4 blocks) with linear-probe nucleus and type heads fitted on tiles A and B."""
    torch.manual_seed(0)
    network = CellVTA(num_nuclei_classes=len(CLASSES), num_tissue_classes=1, freeze="full", **{
        k: v for k, v in NETWORK.items() if k != "patch_size"}).eval()
    specs = (TILE_A, TILE_B)
    _fit_heads(network, [_crop(consep, s) for s in specs], [consep["inst_map"][i, :h, :w] for i, h, w in specs],
               [consep["type_map"][i, :h, :w] for i, h, w in specs])
    return _save_model(tmp_path_factory.mktemp("models") / "cellvta", network, NETWORK)


def test_stain_normalisation_gives_the_nuclei_of_the_image_normalised_first(consep, probe_model):
    from scripts.data.stain import MacenkoNormalizer

    image = _crop(consep, TILE_B)
    # the target: the tile's own stains with 10% less of each (the linear-probe heads only see nuclei in stains
    # close to those they were fitted on)
    stains, concentrations = MacenkoNormalizer().estimate(image)
    settings = AppSettings.from_mapping({"stain_normalization": True, "stain_vectors": stains.tolist(),
                                         "stain_max_concentrations": (0.9 * concentrations).tolist()}, "app.yaml")
    normalised = load_pipeline(BUNDLE, probe_model, settings.config_overrides(probe_model))
    plain = load_pipeline(BUNDLE, probe_model)
    by_hand = MacenkoNormalizer(stains, 0.9 * concentrations)(image)
    assert np.abs(by_hand.astype(int) - image).mean() > 5
    ours, theirs, original = normalised(image), plain(by_hand), plain(image)
    assert np.array_equal(ours.inst_map, theirs.inst_map) and np.array_equal(ours.type_map, theirs.type_map)
    assert np.array_equal(ours.nuclei.type_probs, theirs.nuclei.type_probs)
    assert ours.inst_map.max() >= 5 and not np.array_equal(ours.inst_map, original.inst_map)


# the cell classifier's own classes (not the network's), with their colours: tiles A and B hold epithelial nuclei
# only, so the new classes split them by area (below or above the median of the ground-truth nuclei of both)
CELL_CLASSES = {"small": [200, 30, 30], "large": [30, 30, 200]}


def size_types(inst_map: np.ndarray, median_area: float) -> np.ndarray:
    """A type map of the nuclei of ``inst_map``: 1 (small) below ``median_area`` pixels, else 2 (large)."""
    areas = np.bincount(inst_map.ravel())
    return np.where(inst_map > 0, np.where(areas[inst_map] < median_area, 1, 2), 0).astype(np.uint8)


def median_area(consep) -> float:
    """The median area in pixels of the ground-truth nuclei of tiles A and B."""
    areas = [np.bincount(consep["inst_map"][i, :h, :w].ravel())[1:] for i, h, w in (TILE_A, TILE_B)]
    areas = np.concatenate(areas)
    return float(np.median(areas[areas > 0]))


def _train_classifier(consep, network_dir: Path, path: Path, fingerprint: str | None = None) -> Path:
    """A logistic-regression classifier on the ``decoder`` embeddings of the ground-truth nuclei of tiles A and B
    (:data:`CELL_CLASSES` by area), for the network of ``network_dir`` (``fingerprint`` another network's, to test
    the refusal)."""
    from scripts.cells.classifier import save_classifier, train_classifier
    from scripts.cells.embeddings import CellEmbedder
    from scripts.cells.labels import ClassTable
    from scripts.data.datasets import instance_types, relabel_sequential

    network = CellVTA(num_nuclei_classes=len(CLASSES), num_tissue_classes=1, freeze="full", **{
        k: v for k, v in NETWORK.items() if k != "patch_size"})
    network.load_state_dict(torch.load(network_dir / "model.pt", weights_only=True))
    x, y = [], []
    with CellEmbedder(network.eval(), "decoder") as embedder:
        for i, h, w in (TILE_A, TILE_B):
            inst = relabel_sequential(consep["inst_map"][i, :h, :w])
            cells = embedder(_crop(consep, (i, h, w)), inst)
            ids, types = instance_types(inst, size_types(inst, median_area(consep)), 3)
            by_id = dict(zip(ids.tolist(), types.tolist()))
            x.append(cells.embeddings)
            y += [by_id[int(k)] - 1 for k in cells.ids]
            fingerprint = fingerprint or embedder.fingerprint
    trained = train_classifier(np.concatenate(x), np.array(y), list(CELL_CLASSES), epochs=100, seed=0)
    table = ClassTable(list(CELL_CLASSES), [tuple(c) for c in CELL_CLASSES.values()])
    return save_classifier(path, trained.model, table, "decoder", fingerprint)


def test_a_cell_classifier_types_every_nucleus_with_its_softmax(consep, probe_model, tmp_path):
    from scripts.cells.classifier import load_classifier, predict
    from scripts.cells.embeddings import CellEmbedder

    _train_classifier(consep, probe_model, tmp_path / "classifier.pt")
    settings = AppSettings.from_mapping({"classifier": str(tmp_path / "classifier.pt")}, "app.yaml")
    classified = load_pipeline(BUNDLE, probe_model, settings.config_overrides(probe_model))
    assert classified.class_names == ["background", *CELL_CLASSES]
    assert [list(c) for c in classified.colours[1:]] == list(CELL_CLASSES.values())
    image = _crop(consep, TILE_A)  # one window: the stitched map is the network's map of the whole tile
    ours, plain = classified(image), load_pipeline(BUNDLE, probe_model)(image)
    assert np.array_equal(ours.inst_map, plain.inst_map) and len(ours.nuclei) >= 3  # the same nuclei
    # by hand: the decoder embedding of each nucleus, the classifier's softmax
    model, _, _ = load_classifier(tmp_path / "classifier.pt")
    with CellEmbedder(classified.network.network, "decoder") as embedder:
        cells = embedder(image, ours.inst_map)
    probs = predict(model, cells.embeddings)
    assert cells.ids.tolist() == ours.nuclei.ids.tolist()
    assert ours.nuclei.types.tolist() == (probs.argmax(1) + 1).tolist()
    np.testing.assert_allclose(ours.nuclei.type_probs, probs.max(1), atol=1e-4)
    assert len(set(ours.nuclei.types.tolist())) >= 2
    assert np.array_equal(ours.type_map, ours.nuclei.type_map(ours.inst_map))


def test_a_classifier_of_another_network_is_refused_naming_the_file(consep, probe_model, tmp_path):
    path = _train_classifier(consep, probe_model, tmp_path / "other.pt", fingerprint="0123456789abcdef")
    overrides = AppSettings.from_mapping({"classifier": str(path)}, "app.yaml").config_overrides(probe_model)
    with pytest.raises(ValueError, match=f"^{path}: trained on the embeddings of another model"):
        load_pipeline(BUNDLE, probe_model, overrides)


def _app_command(app: Path, *args: str) -> list[str]:
    return [sys.executable, str(app), *args]


def _popen(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _map_environment(root: Path, probe_model: Path) -> tuple[Path, dict[str, str]]:
    """A staged MAP folder and the environment a MAP runs it in: ``HOLOSCAN_*`` paths, models in
    ``<models>/<name>/`` and a config of its own (TIFF maps, no overlays); no PYTHONPATH."""
    from stage import stage

    staged = stage(root / "map")
    models = root / "map_models" / "cellvta"
    models.mkdir(parents=True)
    for f in probe_model.iterdir():
        (models / f.name).write_bytes(f.read_bytes())
    config = root / "map_config.yaml"
    config.write_text((staged / "app.yaml").read_text().replace("maps: npz", "maps: tiff")
                      .replace("overlays: true", "overlays: false"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HOLOSCAN_INPUT_PATH=str(root / "map_input"), HOLOSCAN_OUTPUT_PATH=str(root / "map_output"),
               HOLOSCAN_MODEL_PATH=str(models.parent), HOLOSCAN_CONFIG_PATH=str(config))
    return staged, env


@pytest.fixture(scope="module")
def runs(consep, probe_model, tmp_path_factory) -> dict[str, Path | subprocess.CompletedProcess]:
    """Four runs at the same time: the bundle's inference workflow on tiles A (PNG) and B (TIFF); the app on the
    same tiles and on region requests for A's place in a slide; the staged MAP folder on tile A in a MAP's
    environment; the app on a corrupt PNG."""
    root = tmp_path_factory.mktemp("runs")
    tiles, app_in, map_in, broken_in = (root / n for n in ("tiles", "app_in", "map_input", "broken_in"))
    for folder in (tiles, app_in, map_in, broken_in):
        folder.mkdir()
    for folder in (tiles, app_in):
        _write_png(folder / "a.png", _crop(consep, TILE_A))
        tifffile.imwrite(folder / "b.tif", _crop(consep, TILE_B), photometric="rgb")
    _write_png(map_in / "a.png", _crop(consep, TILE_A))
    _write_slide(app_in / "slide.tif", _mosaic(consep), SLIDE_MPP)
    for name, backend in (("region", "auto"), ("region_openslide", "openslide")):
        (app_in / f"{name}.json").write_text(json.dumps(
            {"slide": "slide.tif", "location": [128, 0], "size": [128, 128], "backend": backend}))
    (broken_in / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _write_png(broken_in / "good.png", _crop(consep, TILE_A))
    _write_slide(broken_in / "slide.tif", _mosaic(consep), SLIDE_MPP)
    (broken_in / "edge.json").write_text(json.dumps({"slide": "slide.tif", "location": [200, 0], "size": [128, 128]}))
    (broken_in / "typo.json").write_text(json.dumps({"slide": "slide.tif", "locaton": [0, 0], "size": [64, 64]}))
    staged, map_env = _map_environment(root, probe_model)
    # a model folder with a cell classifier, and a config that uses it and normalises stains
    cells_in, cells_model = root / "cells_in", root / "cells_model"
    cells_in.mkdir()
    _write_png(cells_in / "a.png", _crop(consep, TILE_A))
    cells_model.mkdir()
    for f in probe_model.iterdir():
        (cells_model / f.name).write_bytes(f.read_bytes())
    _train_classifier(consep, cells_model, cells_model / "classifier.pt")
    cells_config = root / "cells_config.yaml"
    # the target stains: tile A's own with 10% less of each (the probe heads see nuclei only in stains close to
    # those they were fitted on)
    from scripts.data.stain import MacenkoNormalizer

    vectors, concentrations = MacenkoNormalizer().estimate(_crop(consep, TILE_A))
    cells_config.write_text((APP_DIR / "app.yaml").read_text().replace(
        "classifier: null", "classifier: classifier.pt").replace(
        "stain_normalization: false", "stain_normalization: true").replace(
        "stain_vectors: null", f"stain_vectors: {vectors.tolist()}").replace(
        "stain_max_concentrations: null", f"stain_max_concentrations: {(0.9 * concentrations).tolist()}"))
    cells_env = {**os.environ, "HOLOSCAN_CONFIG_PATH": str(cells_config)}

    processes = {
        "workflow": _popen([sys.executable, "-m", "monai.bundle", "run", "inferring", "--config_file",
                            "['configs/common.yaml','configs/inference.yaml']",
                            "--args_file", str(probe_model / "overrides.json"),
                            "--bundle_root", str(root), "--model_dir", str(probe_model), "--input_dir", str(tiles),
                            "--output_dir", str(root / "workflow_out"), "--num_workers", "0"], cwd=BUNDLE),
        "app": _popen(_app_command(APP_DIR, "-i", str(app_in), "-o", str(root / "app_out"), "-m", str(probe_model)),
                      cwd=root),
        "map": _popen(_app_command(staged), cwd=root, env=map_env),
        "broken": _popen(_app_command(APP_DIR, "-i", str(broken_in), "-o", str(root / "broken_out"),
                                      "-m", str(probe_model)), cwd=root),
        "cells": _popen(_app_command(APP_DIR, "-i", str(cells_in), "-o", str(root / "cells_out"),
                                     "-m", str(cells_model)), cwd=root, env=cells_env),
    }
    logs = {name: process.communicate(timeout=1800)[0] for name, process in processes.items()}
    for name in ("workflow", "app", "map", "cells"):
        assert processes[name].returncode == 0, f"{name} run failed:\n{logs[name][-6000:]}"
    return {"app": root / "app_out", "workflow": root / "workflow_out", "map": root / "map_output", "staged": staged,
            "broken_in": broken_in, "broken_out": root / "broken_out", "cells": root / "cells_out",
            "cells_model": cells_model, "cells_config": cells_config,
            "broken": subprocess.CompletedProcess(processes["broken"].args, processes["broken"].returncode,
                                                  logs["broken"])}


@pytest.mark.slow
@needs_sdk
def test_the_app_finds_the_nuclei_of_the_bundle_inference_workflow(runs):
    app, workflow = runs["app"], runs["workflow"]
    found = 0
    for name in ("a", "b"):
        ours, theirs = np.load(app / f"{name}.npz"), np.load(workflow / f"{name}.npz")
        assert np.array_equal(ours["inst_map"], theirs["inst_map"]) and np.array_equal(ours["type_map"],
                                                                                        theirs["type_map"])
        features = _features(app / f"{name}.geojson")
        assert features == _features(workflow / f"{name}.geojson")  # polygons, classes, probabilities, centroids
        assert len(features) == len(np.unique(ours["inst_map"])) - 1 >= 3
        assert {f["properties"]["classification"]["name"] for f in features} <= set(CLASSES[1:])
        assert (app / f"{name}_overlay.png").stat().st_size > 0
        found += len(features)
    assert found >= 8
    assert sorted(p.name for p in app.iterdir()) == sorted(
        f"{n}{s}" for n in ("a", "b", "region", "region_openslide") for s in (".geojson", ".npz", "_overlay.png"))


@pytest.mark.slow
@needs_sdk
def test_the_app_config_adds_the_cell_classifier_and_stain_normalisation(consep, runs):
    import yaml

    section = yaml.safe_load(runs["cells_config"].read_text())["cellvta"]
    settings = AppSettings.from_mapping(section, str(runs["cells_config"]))
    assert settings.classifier == "classifier.pt" and settings.stain_normalization
    expected = load_pipeline(BUNDLE, runs["cells_model"], settings.config_overrides(runs["cells_model"]))(
        _crop(consep, TILE_A))
    maps = np.load(runs["cells"] / "a.npz")
    assert np.array_equal(maps["inst_map"], expected.inst_map) and np.array_equal(maps["type_map"], expected.type_map)
    features = _features(runs["cells"] / "a.geojson")
    assert len(features) == len(expected.nuclei) >= 3
    for feature, cls, prob in zip(features, expected.nuclei.types, expected.nuclei.type_probs, strict=True):
        name = list(CELL_CLASSES)[cls - 1]
        assert feature["properties"]["classification"] == {"name": name, "color": CELL_CLASSES[name]}
        assert feature["properties"]["measurements"]["type_probability"] == round(float(prob), 4)


@pytest.mark.slow
@needs_sdk
def test_a_slide_region_gives_the_nuclei_of_the_same_pixels_as_a_tile_in_slide_coordinates(runs):
    app = runs["app"]
    tile = np.load(app / "a.npz")
    for region in ("region", "region_openslide"):
        maps = np.load(app / f"{region}.npz")
        assert np.array_equal(maps["inst_map"], tile["inst_map"]) and np.array_equal(maps["type_map"],
                                                                                      tile["type_map"])
        _assert_shifted(_features(app / f"{region}.geojson"), _features(app / "a.geojson"), 128, 0)


@pytest.mark.slow
@needs_sdk
def test_the_staged_map_folder_runs_alone_in_the_map_environment(runs, tmp_path):
    from stage import MARKER, stage

    staged = runs["staged"]
    assert (staged / MARKER).is_file()
    assert {p.name for p in (staged / "bundle").iterdir()} == {"configs", "scripts"}
    requirements = (staged / "requirements.txt").read_text()
    assert "torch==2.14.1" in requirements and "monai-deploy-app-sdk==4.0.0" in requirements
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(FileExistsError, match="elsewhere: exists and is not a staged CellVTA MAP folder"):
        stage(tmp_path / "elsewhere")

    output, expected = runs["map"], np.load(runs["workflow"] / "a.npz")
    assert sorted(p.name for p in output.iterdir()) == ["a.geojson", "a_maps.tif"]  # the run's config: TIFF, no overlay
    assert _features(output / "a.geojson") == _features(runs["workflow"] / "a.geojson")
    maps = tifffile.imread(output / "a_maps.tif")
    assert np.array_equal(maps[0], expected["inst_map"]) and np.array_equal(maps[1], expected["type_map"])
    assert stage(staged) == staged and (staged / MARKER).is_file()  # a staging folder is replaced


@pytest.mark.slow
@needs_sdk
def test_inputs_that_cannot_be_read_are_reported_and_the_others_analysed(runs):
    result, out, folder = runs["broken"], runs["broken_out"], runs["broken_in"]
    assert result.returncode == 1
    # the good tile beside the bad inputs gets its outputs, equal to those of the same tile in the other run
    assert sorted(p.name for p in out.iterdir()) == ["failures.json", "good.geojson", "good.npz", "good_overlay.png"]
    good, same = np.load(out / "good.npz"), np.load(runs["app"] / "a.npz")
    assert np.array_equal(good["inst_map"], same["inst_map"])
    failures = {Path(f["input"]).name: f["error"] for f in json.loads((out / "failures.json").read_text())["failures"]}
    assert sorted(failures) == ["broken.png", "edge.json", "typo.json"]
    assert failures["broken.png"].startswith(f"{folder / 'broken.png'}: not a readable image")
    assert "edge.json: the region at [200, 0] of 128 x 128 pixels at level 0 reaches beyond the slide" in \
        failures["edge.json"]
    assert "typo.json: unknown keys ['locaton']" in failures["typo.json"]
    assert "1 input(s) analysed; 3 could not be read" in result.stdout
    assert "Traceback" not in result.stdout
    # Holoscan's CUDA-driver warning and its scheduler's "deadlock" at a normal end are not shown
    assert "deadlock" not in result.stdout and "CUDA driver" not in result.stdout


@needs_sdk
def test_help_lists_the_apps_own_options():
    result = subprocess.run([sys.executable, str(APP_DIR), "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    for option in ("-i INPUT, --input INPUT", "-o OUTPUT, --output OUTPUT", "-m MODEL, --model MODEL", "failures.json"):
        assert option in result.stdout


# --- the deploy environment -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(IN_DEPLOY_ENV, reason="already running in the deploy environment")
def test_deploy_tests_pass_in_the_deploy_environment(consep_npz):
    if not (DEPLOY_VENV / ".installed").is_file():
        message = f"{DEPLOY_VENV} is not set up (make setup-deploy)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    this = Path(__file__).relative_to(REPO)
    result = subprocess.run(
        [str(DEPLOY_VENV / "bin" / "python"), "-m", "pytest", str(this), "-q", "-p", "no:cacheprovider",
         "--deselect", f"{this}::test_deploy_tests_pass_in_the_deploy_environment"],
        cwd=REPO, capture_output=True, text=True, timeout=2400)
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, summary
