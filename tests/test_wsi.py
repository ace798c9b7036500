"""Whole-slide inference on a pyramidal TIFF built from real CoNSeP patches: tiling, merging, readers,
resumption, outputs and errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely.geometry
from scipy import ndimage

from scripts.nuclei.metrics import instance_overlap, panoptic_quality, pq_counts
from scripts.nuclei.postprocess import nuclei_from_instance_map
from scripts.slides.predictors import PredictedMaps
from scripts.slides.pyramid import PeriodicImage, write_pyramidal_tiff
from scripts.slides.readers import SlideError, open_slide
from scripts.slides.tiling import TileGrid
from scripts.data.transforms import hv_maps
from scripts.slides.wsi import WSISettings, run_cohort, run_slide
from tests.oracle import GroundTruthPredictor

CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle-shaped"]
SETTINGS = WSISettings(postprocess_workers=0, chunk_tiles=4, min_tissue_fraction=0.0)
ROOT = Path(__file__).resolve().parents[1]


def _mosaic(data: dict, first: int, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A side x side mosaic of consecutive CoNSeP patches: image, globally unique instance ids, types."""
    n = side * side
    idx = np.arange(first, first + n)
    inst = data["inst_map"][idx].astype(np.int64)
    inst = np.where(inst > 0, inst + (np.arange(n) * 100_000)[:, None, None], 0)

    def tile(a: np.ndarray) -> np.ndarray:
        a = a.reshape(side, side, 256, 256, *a.shape[3:])
        return np.ascontiguousarray(a.swapaxes(1, 2).reshape(side * 256, side * 256, *a.shape[4:]))

    return tile(data["images"][idx]), tile(inst), tile(data["type_map"][idx])


@pytest.fixture(scope="module")
def mosaic(consep_npz):
    """A non-square 1000 x 900 crop of a 4 x 4 mosaic: image, instance map, type map."""
    with np.load(consep_npz) as data:
        image, inst, types = _mosaic({k: data[k] for k in ("images", "inst_map", "type_map")}, 0, 4)
    return image[:1000, :900], inst[:1000, :900], types[:1000, :900]


@pytest.fixture(scope="module")
def slide(mosaic, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "mosaic.tif"
    write_pyramidal_tiff(path, mosaic[0], mpp=0.25, factor=2, min_size=200)
    return path


def rasterize(geojson: Path, shape: tuple[int, int], scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Instance and type maps painted from the polygons of a GeoJSON (coordinates divided by ``scale``)."""
    features = json.loads(geojson.read_text())["features"]
    inst, types = np.zeros(shape, np.int32), np.zeros(shape, np.uint8)
    for i, feature in enumerate(features, start=1):
        ring = np.round(np.array(feature["geometry"]["coordinates"][0][:-1]) / scale).astype(np.int32)
        cv2.fillPoly(inst, [ring.reshape(-1, 1, 2)], i)
        cv2.fillPoly(types, [ring.reshape(-1, 1, 2)], CLASSES.index(feature["properties"]["classification"]["name"]))
    return inst, types


def outputs(folder: Path, stem: str) -> dict[str, bytes]:
    """The outputs that do not hold the run time (the summary and the report do)."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob(f"{stem}*")) if p.suffix not in {".json", ".html"}}


def test_every_nucleus_is_kept_by_exactly_one_tile_whatever_the_tiles_processed():
    rng = np.random.default_rng(0)
    for size, overlap in [(256, 64), (128, 48), (100, 30)]:
        grid = TileGrid(900, 700, size, overlap)
        grid = grid.with_processed(rng.random(grid.shape) < 0.8)
        rows, cols = grid.shape
        for _ in range(400):
            h, w = rng.integers(1, overlap, size=2)
            y, x = rng.integers(0, 700 - h), rng.integers(0, 900 - w)
            keepers, seen_whole = 0, False
            for r in range(rows):
                for c in range(cols):
                    if not grid.processed[r, c]:
                        continue
                    x0, y0 = grid.origin(r, c)
                    view = [max(y, y0), max(x, x0), min(y + h, y0 + size), min(x + w, x0 + size)]
                    if view[0] >= view[2] or view[1] >= view[3]:
                        continue
                    seen_whole |= view == [y, x, y + h, x + w]
                    keepers += int(grid.owned(np.array([view]), r, c)[0])
            if seen_whole:
                assert keepers == 1, (size, overlap, (y, x, h, w))


def test_nuclei_wider_than_the_overlap_are_kept_once_and_touching_neighbours_stay_apart(consep, tmp_path):
    """No tile sees these nuclei whole; each tile cutting one finds a fragment and only the largest is kept. Two wide
    nuclei that touch stay two."""
    image = np.full((600, 600, 3), 200, np.uint8)
    image[:256, :256] = consep["images"][0]
    inst = np.zeros((600, 600), np.int32)
    cv2.ellipse(inst, (225, 100), (45, 15), 0, 0, 360, 1, -1)  # 91 px wide across the strip x 192..255
    cv2.rectangle(inst, (180, 180), (260, 260), 2, -1)  # across four tiles
    cv2.rectangle(inst, (300, 150), (370, 160), 3, -1)  # two neighbours touching along y = 160 / 161
    cv2.rectangle(inst, (300, 161), (370, 170), 4, -1)
    cv2.circle(inst, (400, 400), 10, 5, -1)  # inside one tile
    types = (inst > 0).astype(np.uint8) * 3
    write_pyramidal_tiff(tmp_path / "wide.tif", image, mpp=0.25, min_size=10_000)
    summary = run_slide(tmp_path / "wide.tif", tmp_path / "out", GroundTruthPredictor(inst, types, len(CLASSES)),
                        CLASSES, SETTINGS)
    with open(tmp_path / "out" / "wide.tif.csv") as f:
        rows = list(csv.DictReader(f))
    assert summary["cells"] == len(rows) == 5
    found = {int(inst[round(float(r["y"])), round(float(r["x"]))]): float(r["area_um2"]) * 16 for r in rows}
    assert sorted(found) == [1, 2, 3, 4, 5]
    true_area = np.bincount(inst.ravel())
    for k, area in found.items():  # the largest fragment: at least the share of the tile that sees most of it
        assert true_area[k] / 4 <= area <= true_area[k] + 1, (k, area, true_area[k])  # areas rounded to 0.01 um2


def test_tiles_with_tissue_and_their_neighbours_holding_any_are_processed():
    grid = TileGrid(1000, 1000, 256, 64)  # 5 x 5 tiles, stride 192
    mask = np.zeros((100, 100), bool)  # 10 image pixels per mask pixel
    mask[0:20, 0:20] = True  # fills tile (0, 0)
    mask[60, 80] = True  # one pixel of tissue: less than 5% of any tile
    processed = grid.tissue_tiles(mask, 10.0, min_fraction=0.05)
    expected = np.zeros((5, 5), bool)
    expected[0, 0] = expected[0, 1] = expected[1, 0] = expected[1, 1] = True  # tile (0, 0) and neighbours with tissue
    np.testing.assert_array_equal(processed, expected)
    assert grid.tissue_tiles(mask, 10.0, min_fraction=0.0).sum() == 4 + 4  # the lone pixel lies in 4 tiles


def test_ground_truth_oracle_gives_back_the_ground_truth_without_duplicates(slide, mosaic, tmp_path):
    image, inst, types = mosaic
    settings = WSISettings(postprocess_workers=2, chunk_tiles=4, min_tissue_fraction=0.0)
    summary = run_cohort(slide, tmp_path, GroundTruthPredictor(inst, types, len(CLASSES)), CLASSES, settings)[0]
    pred_inst, pred_type = rasterize(tmp_path / "mosaic.tif.geojson", inst.shape)
    # nuclei that are polygons: fragments of 1-2 pixels at the CoNSeP patches' cut edges have no outline
    _, compact = np.unique(inst, return_inverse=True)
    compact = compact.reshape(inst.shape)
    outlined = np.isin(compact, nuclei_from_instance_map(compact).ids)
    dq, sq, pq = panoptic_quality(np.where(outlined, inst, 0), pred_inst)
    tp, fp, fn, _ = pq_counts(instance_overlap(np.where(outlined, inst, 0), pred_inst))[:4]
    assert pq >= 0.99 and fp == 0 and fn == 0, (dq, sq, pq, tp, fp, fn)
    assert panoptic_quality(inst, pred_inst)[2] > 0.98
    assert summary["cells"] == int(pred_inst.max()) == tp
    agree = (pred_type == types)[(pred_inst > 0) & (inst > 0)].mean()
    assert agree > 0.99
    features = json.loads((tmp_path / "mosaic.tif.geojson").read_text())["features"]
    assert all(shapely.geometry.shape(f["geometry"]).is_valid for f in features)
    assert {f["properties"]["classification"]["name"] for f in features} <= set(CLASSES[1:])
    with open(tmp_path / "mosaic.tif.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["id"]) for r in rows] == list(range(1, len(features) + 1))
    x, y = (np.array([float(r[k]) for r in rows]) for k in ("x", "y"))
    assert np.allclose(np.array([float(r["x_um"]) for r in rows]), x * 0.25, atol=2e-3)
    hit = inst[np.floor(y).astype(int), np.floor(x).astype(int)]
    assert (hit > 0).mean() > 0.99
    counts = {name: sum(r["type"] == name for r in rows) for name in CLASSES[1:]}
    assert {k: v for k, v in counts.items() if v} == summary["cells_per_class"]
    assert not list(tmp_path.glob(".*")), "temporary files or parts left behind"


def test_hovernet_postprocessing_on_ideal_maps_finds_most_nuclei(slide, mosaic, tmp_path):
    _, inst, types = mosaic
    predictor = GroundTruthPredictor(inst, types, len(CLASSES), instances=False)
    run_slide(slide, tmp_path, predictor, CLASSES, SETTINGS)
    pred_inst, _ = rasterize(tmp_path / "mosaic.tif.geojson", inst.shape)
    tp, fp, fn, _ = pq_counts(instance_overlap(inst, pred_inst))[:4]
    assert tp / (tp + fn) > 0.8 and fp / (tp + fp) < 0.05, (tp, fp, fn)


class HematoxylinPredictor:
    """Maps computed from the pixels (dark, purple pixels are nuclei): the nuclei depend on what is read."""

    num_classes = len(CLASSES)

    def __call__(self, tiles: np.ndarray, origins: np.ndarray) -> PredictedMaps:
        grey = tiles.astype(np.float32).mean(axis=3) / 255
        prob = np.clip((0.55 - grey) * 8, 0, 1).astype(np.float32)
        types = np.where(prob >= 0.5, 1 + (tiles[..., 0] > tiles[..., 2]).astype(np.uint8), 0).astype(np.uint8)
        hv = np.stack([hv_maps(ndimage.label(p >= 0.5)[0]) for p in prob])
        return PredictedMaps(prob, hv, types)


def test_openslide_and_tifffile_read_the_same_pixels_and_find_the_same_nuclei(slide, tmp_path):
    with open_slide(slide, "openslide") as a, open_slide(slide, "tifffile") as b:
        assert a.level_dimensions == b.level_dimensions == [(900, 1000), (450, 500), (225, 250)]
        assert a.mpp == pytest.approx(0.25) and b.mpp == pytest.approx(0.25)
        for level, (x, y, w, h) in [(0, (0, 0, 900, 1000)), (0, (250, 300, 333, 77)), (1, (100, 50, 400, 460)),
                                    (0, (850, 950, 256, 256))]:
            np.testing.assert_array_equal(a.read_region(x, y, w, h, level), b.read_region(x, y, w, h, level))
    found = {}
    for backend in ("openslide", "tifffile"):
        out = tmp_path / backend
        summary = run_slide(slide, out, HematoxylinPredictor(), CLASSES,
                            WSISettings(**{**SETTINGS.__dict__, "backend": backend}))
        found[backend] = (out / "mosaic.tif.csv").read_text()
        assert summary["cells"] > 50
    assert found["openslide"] == found["tifffile"]


def test_twenty_x_slide_is_upsampled_and_coordinates_are_level_zero_pixels(mosaic, tmp_path):
    image, inst, types = mosaic
    path = tmp_path / "half.tif"
    write_pyramidal_tiff(path, cv2.resize(image, (450, 500), interpolation=cv2.INTER_AREA), mpp=0.5, min_size=10_000)
    summary = run_slide(path, tmp_path / "out", GroundTruthPredictor(inst, types, len(CLASSES)), CLASSES, SETTINGS)
    assert summary["scale"] == 0.5 and summary["analysed_mpp"] == 0.25 and summary["mpp"] == 0.5
    pred_inst, _ = rasterize(tmp_path / "out" / "half.tif.geojson", inst.shape, scale=0.5)
    assert panoptic_quality(inst, pred_inst)[2] > 0.9
    with open(tmp_path / "out" / "half.tif.csv") as f:
        rows = list(csv.DictReader(f))
    x = np.array([float(r["x"]) for r in rows])
    assert 0 <= x.min() and x.max() < 450
    assert np.allclose([float(r["x_um"]) for r in rows], x * 0.5, atol=3e-3)


RUN_SLIDE = """
import sys
sys.path[:0] = {paths!r}
import numpy as np
from scripts.nuclei.postprocess import nuclei_from_instance_map
from scripts.slides.wsi import WSISettings, run_slide
from tests.oracle import GroundTruthPredictor
gt = np.load({gt!r})
run_slide({slide!r}, {out!r}, GroundTruthPredictor(gt["inst"], gt["types"], 5, periodic=True), {classes!r},
          WSISettings(postprocess_workers=0, chunk_tiles=8, min_tissue_fraction=0.0, batch_size=4))
"""


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_with_the_outputs_of_an_uninterrupted_run(mosaic, tmp_path):
    image, inst, types = mosaic
    big = PeriodicImage(np.ascontiguousarray(image[:768, :768]), 3000, 3000)
    slide = tmp_path / "big.tif"
    write_pyramidal_tiff(slide, big, mpp=0.25)
    np.savez(tmp_path / "gt.npz", inst=inst[:768, :768], types=types[:768, :768])
    paths = [str(ROOT), str(ROOT / "bundles" / "cellvta")]

    def script(out: Path) -> list[str]:
        code = RUN_SLIDE.format(paths=paths, gt=str(tmp_path / "gt.npz"), slide=str(slide), out=str(out),
                                classes=CLASSES)
        return [sys.executable, "-c", code]

    subprocess.run(script(tmp_path / "whole"), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(script(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "killed" / ".big.tif.parts"
    deadline = time.monotonic() + 300
    while len(list(parts.glob("part_*.npz"))) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "big.tif.json").exists(), "the run ended before it could be killed"
    done_before = len(list(parts.glob("part_*.npz")))
    subprocess.run(script(tmp_path / "killed"), check=True, capture_output=True, timeout=600)
    assert done_before >= 5
    whole, resumed = outputs(tmp_path / "whole", "big"), outputs(tmp_path / "killed", "big")
    assert whole.keys() == resumed.keys() == {"big.tif.csv", "big.tif.geojson", "big.tif.parquet",
                                              "big.tif_overlay.png", "big.tif_mask.png"}
    assert whole == resumed
    summary = json.loads((tmp_path / "killed" / "big.tif.json").read_text())
    assert summary["cells"] == json.loads((tmp_path / "whole" / "big.tif.json").read_text())["cells"] > 5000


def test_slides_without_resolution_or_tissue_and_corrupt_files(mosaic, tmp_path):
    image, inst, types = mosaic
    predictor = GroundTruthPredictor(inst, types, len(CLASSES))
    no_mpp = tmp_path / "no_mpp.tif"
    write_pyramidal_tiff(no_mpp, image[:300, :300], mpp=None)
    with pytest.raises(SlideError, match=r"no_mpp\.tif.*--mpp"):
        run_slide(no_mpp, tmp_path / "out", predictor, CLASSES, SETTINGS)
    summary = run_slide(no_mpp, tmp_path / "out", predictor, CLASSES, WSISettings(**{**SETTINGS.__dict__, "mpp": 0.25}))
    assert summary["mpp"] == 0.25 and summary["cells"] > 0

    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + os.urandom(5000))
    with pytest.raises(SlideError, match=r"corrupt\.tif"):
        open_slide(corrupt)
    with pytest.raises(SlideError, match=r"missing\.svs: no such slide"):
        open_slide(tmp_path / "missing.svs")

    glass = tmp_path / "glass.tif"
    write_pyramidal_tiff(glass, np.full((600, 700, 3), 240, np.uint8), mpp=0.25)
    summary = run_slide(glass, tmp_path / "out", predictor, CLASSES, WSISettings(postprocess_workers=0))
    assert summary["tiles"] == 0 and summary["cells"] == 0
    assert json.loads((tmp_path / "out" / "glass.tif.geojson").read_text()) == {"type": "FeatureCollection",
                                                                                 "features": []}
    assert (tmp_path / "out" / "glass.tif.csv").read_text().splitlines() == [
        "id,x,y,x_um,y_um,type_id,type,probability,area_um2"]


def test_a_cohort_is_sharded_by_rank_and_a_bad_slide_does_not_stop_the_others(slide, mosaic, tmp_path):
    _, inst, types = mosaic
    (tmp_path / "bad.svs").write_bytes(b"not a slide")
    cohort = tmp_path / "cohort.txt"
    cohort.write_text(f"{tmp_path / 'bad.svs'}\n{slide}\n")
    predictor = GroundTruthPredictor(inst, types, len(CLASSES))
    with pytest.raises(SlideError, match=r"1 of 2 slides failed:\n.*bad\.svs"):
        run_cohort(cohort, tmp_path / "all", predictor, CLASSES, SETTINGS)
    assert (tmp_path / "all" / "mosaic.tif.json").is_file()
    second = run_cohort(cohort, tmp_path / "rank1", predictor, CLASSES, SETTINGS, rank=1, world_size=2)
    assert [s["slide"] for s in second] == [str(slide)]
    again = run_cohort(cohort, tmp_path / "rank1", predictor, CLASSES, SETTINGS, rank=1, world_size=2)
    assert again == second, "a finished slide is not analysed again"


def _small_slides(image: np.ndarray, folder: Path, names: list[str]) -> list[Path]:
    """One single-level slide per name, each a different 320 x 320 crop of ``image``."""
    folder.mkdir(parents=True, exist_ok=True)
    crops = [(0, 0), (0, 320), (320, 0), (320, 320), (600, 500)]
    paths = []
    for name, (y, x) in zip(names, crops):
        write_pyramidal_tiff(folder / name, image[y : y + 320, x : x + 320], mpp=0.25, min_size=10_000)
        paths.append(folder / name)
    return paths


def test_slides_sharing_a_stem_or_a_name_keep_their_own_outputs_or_are_refused(mosaic, tmp_path):
    image = mosaic[0]
    slides = _small_slides(image, tmp_path / "in", ["case.1.tif", "case.2.tif", "a.tif", "a.tiff"])
    summaries = run_cohort(tmp_path / "in", tmp_path / "out", HematoxylinPredictor(), CLASSES, SETTINGS)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.json")) == sorted(f"{p.name}.json" for p in slides)
    for slide, summary in zip(sorted(slides), summaries):
        assert summary["slide"] == str(slide)
        alone = run_slide(slide, tmp_path / "alone" / slide.name, HematoxylinPredictor(), CLASSES, SETTINGS)
        assert alone["cells"] == summary["cells"] > 3
        assert ((tmp_path / "out" / f"{slide.name}.csv").read_bytes()
                == (tmp_path / "alone" / slide.name / f"{slide.name}.csv").read_bytes())
    assert len({(tmp_path / "out" / f"{p.name}.csv").read_bytes() for p in slides}) == 4  # four different results
    # the same file name in two folders (or differing only by case) is refused before anything is written
    other = _small_slides(image, tmp_path / "elsewhere", ["A.TIF"])[0]
    cohort = tmp_path / "cohort.txt"
    cohort.write_text(f"{slides[2]}\n{slides[0]}\n{other}\n")
    with pytest.raises(ValueError, match=rf"{slides[2]} and {other} would write the same outputs"):
        run_cohort(cohort, tmp_path / "refused", HematoxylinPredictor(), CLASSES, SETTINGS)
    assert not (tmp_path / "refused").exists()


def test_a_slide_named_like_a_hidden_file_writes_inside_the_output_folder(mosaic, tmp_path):
    slide = _small_slides(mosaic[0], tmp_path / "in", [".dot.tif"])[0]
    summary = run_slide(slide, tmp_path / "box" / "out", HematoxylinPredictor(), CLASSES, SETTINGS)
    assert sorted(p.name for p in (tmp_path / "box").iterdir()) == ["out"]
    assert {p.name for p in (tmp_path / "box" / "out").iterdir()} == {
        ".dot.tif.geojson", ".dot.tif.csv", ".dot.tif.parquet", ".dot.tif_overlay.png", ".dot.tif_mask.png",
        ".dot.tif_report.html", ".dot.tif.json"}
    assert summary["cells"] > 3


def test_a_summary_of_other_settings_is_invalidated_before_new_outputs_are_published(slide, monkeypatch, tmp_path):
    import scripts.files

    first = run_slide(slide, tmp_path, HematoxylinPredictor(), CLASSES, SETTINGS)
    published = outputs(tmp_path, "mosaic.tif")
    other = WSISettings(**{**SETTINGS.__dict__, "tile_size": 200, "overlap": 40})
    real_publish, calls = scripts.files.publish, []

    def killed_before_the_geojson(tmp: Path, path: Path) -> None:
        calls.extend([Path(path).name] if Path(path).name.startswith("mosaic.tif") else [])
        if Path(path).name == "mosaic.tif.geojson":
            raise KeyboardInterrupt("killed between two publications")
        real_publish(tmp, path)

    monkeypatch.setattr(scripts.files, "publish", killed_before_the_geojson)
    with pytest.raises(KeyboardInterrupt):
        run_slide(slide, tmp_path, HematoxylinPredictor(), CLASSES, other)
    monkeypatch.undo()
    assert "mosaic.tif.csv" in calls and outputs(tmp_path, "mosaic.tif") != published  # the new CSV is out
    assert not (tmp_path / "mosaic.tif.json").exists(), "the old summary would vouch for mixed outputs"
    again = run_slide(slide, tmp_path, HematoxylinPredictor(), CLASSES, SETTINGS)
    assert outputs(tmp_path, "mosaic.tif") == published and again["cells"] == first["cells"]
    # outputs deleted by hand: the summary no longer vouches for them and the slide is analysed again
    (tmp_path / "mosaic.tif.csv").unlink()
    run_slide(slide, tmp_path, HematoxylinPredictor(), CLASSES, SETTINGS)
    assert outputs(tmp_path, "mosaic.tif") == published


def test_parts_left_by_a_kill_after_the_summary_are_removed_by_the_next_run(slide, tmp_path):
    first = run_slide(slide, tmp_path, HematoxylinPredictor(), CLASSES, SETTINGS)
    leftover = tmp_path / ".mosaic.tif.parts"
    leftover.mkdir()
    (leftover / "part_000000.npz").write_bytes(b"x" * 1000)
    assert run_slide(slide, tmp_path, HematoxylinPredictor(), CLASSES, SETTINGS) == first
    assert not leftover.exists()


def test_a_full_disk_during_the_outputs_leaves_no_temporary_and_no_output(slide, tmp_path):
    import resource

    reference = run_slide(slide, tmp_path / "reference", HematoxylinPredictor(), CLASSES, SETTINGS)
    expected = outputs(tmp_path / "reference", "mosaic.tif")
    limit = len(expected["mosaic.tif.geojson"]) // 2  # larger than any part file, smaller than the GeoJSON
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(OSError, match="File too large"):
            run_slide(slide, tmp_path / "full", HematoxylinPredictor(), CLASSES, SETTINGS)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    left = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert left == [".mosaic.tif.parts"], left  # the resumable parts, nothing else
    assert run_slide(slide, tmp_path / "full", HematoxylinPredictor(), CLASSES, SETTINGS)["cells"] == reference["cells"]
    assert outputs(tmp_path / "full", "mosaic.tif") == expected
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == sorted([*expected, "mosaic.tif.json",
                                                                            "mosaic.tif_report.html"])


ORPHANS = """
import sys, time
sys.path[:0] = {paths!r}
from scripts.slides.workers import postprocess_pool
pool = postprocess_pool(2, poll=0.1)
jobs = [pool.submit(time.sleep, 120) for _ in range(2)]
print("started", flush=True)
time.sleep(120)
"""


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat[0] != "Z":
            children.setdefault(int(stat[1]), []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        below = children.get(stack.pop(), [])
        found += below
        stack += below
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the worker processes")
def test_postprocessing_workers_end_when_the_main_process_is_killed():
    code = ORPHANS.format(paths=[str(ROOT), str(ROOT / "bundles" / "cellvta")])
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        deadline = time.monotonic() + 60
        workers = []
        while len(workers) < 2 and time.monotonic() < deadline:  # both workers busy in their 120 s job
            workers = [p for p in _descendants(proc.pid) if "spawn_main" in _cmdline(p)]
            time.sleep(0.1)
        assert len(workers) == 2, workers
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 20
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, workers)), "post-processing workers outlived the killed main process"


def test_empty_maps_and_thumbnails_are_refused_with_a_value_error():
    from scripts.slides.tile_cells import TileMaps, tile_cells
    from scripts.slides.tissue import tissue_mask

    with pytest.raises(ValueError, match="empty thumbnail: 0 x 0"):
        tissue_mask(np.zeros((0, 0, 3), np.uint8))
    empty = TileMaps(0, 0, np.zeros((0, 0), np.float32), np.zeros((2, 0, 0), np.float32), None, len(CLASSES))
    with pytest.raises(ValueError, match=r"tile \(0, 0\): nuclei map must be a non-empty"):
        tile_cells(empty, TileGrid(256, 256))


def test_the_parquet_cell_table_holds_the_csv_columns_and_shape_measurements(slide, mosaic, tmp_path):
    import pyarrow.parquet as pq
    from skimage.measure import regionprops

    _, inst, types = mosaic
    summary = run_slide(slide, tmp_path, GroundTruthPredictor(inst, types, len(CLASSES)), CLASSES, SETTINGS)
    table = pq.read_table(tmp_path / "mosaic.tif.parquet").to_pydict()
    with open(tmp_path / "mosaic.tif.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(table["id"]) == len(rows) == summary["cells"] > 100
    assert table["id"] == [int(r["id"]) for r in rows] and table["type"] == [r["type"] for r in rows]
    for column in ("x", "y", "x_um", "y_um", "probability", "area_um2"):
        np.testing.assert_allclose(table[column], [float(r[column]) for r in rows], atol=0.006, rtol=1e-6)
    compact = np.unique(inst, return_inverse=True)[1].reshape(inst.shape)
    props = {p.label: p for p in regionprops(compact)}
    labels = compact[np.floor(table["y"]).astype(int), np.floor(table["x"]).astype(int)]
    whole = [i for i, label in enumerate(labels) if label > 0 and props[label].area >= 30]
    eccentricity = np.array([props[labels[i]].eccentricity for i in whole])
    solidity = np.array([props[labels[i]].solidity for i in whole])
    perimeter = np.array([props[labels[i]].perimeter for i in whole]) * 0.25
    assert np.median(np.abs(np.array(table["eccentricity"])[whole] - eccentricity)) < 0.05
    assert np.median(np.abs(np.array(table["solidity"])[whole] - solidity)) < 0.05
    assert np.median(np.abs(np.array(table["perimeter_um"])[whole] / perimeter - 1)) < 0.15


def test_whole_slide_code_and_its_workers_import_without_torch():
    code = ("import sys; import scripts.slides.wsi, scripts.slides.tile_cells, scripts.slides.workers; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'monai', 'torchvision')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "bundles" / "cellvta", capture_output=True,
                          text=True, timeout=300, check=True)
    assert done.stdout.strip() == "[]"


def test_whole_slide_defaults_are_written_once_in_the_config():
    import dataclasses

    import yaml

    config = yaml.safe_load((ROOT / "bundles" / "cellvta" / "configs" / "wsi_inference.yaml").read_text())
    fields = [f.name for f in dataclasses.fields(WSISettings)]
    assert config["settings"] == {"_target_": "scripts.slides.wsi.WSISettings", **{k: f"@{k}" for k in fields}}
    assert dataclasses.asdict(WSISettings()) == {k: config[k] for k in fields}
