"""Whole-slide cohorts given as a CSV (per-slide resolution and region), and regions of interest: QuPath GeoJSON,
ASAP XML and mask images restrict the tiles analysed and the nuclei kept."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely

from scripts.slides.cohort import list_slides
from scripts.slides.pyramid import write_pyramidal_tiff
from scripts.slides.readers import SlideError
from scripts.slides.regions import find_region, read_region
from scripts.slides.wsi import WSISettings, run_cohort, run_slide
from tests.oracle import GroundTruthPredictor

CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle-shaped"]
SETTINGS = WSISettings(postprocess_workers=0, chunk_tiles=4, min_tissue_fraction=0.0)
BOX = (100, 200, 500, 600)  # x0, y0, x1, y1 in level-0 pixels


@pytest.fixture(scope="module")
def mosaic(consep_npz):
    """A 1000 x 900 (rows x cols) mosaic of 4 x 4 CoNSeP patches: image, instance ids, types."""
    with np.load(consep_npz) as data:
        images, inst, types = data["images"][:16], data["inst_map"][:16].astype(np.int64), data["type_map"][:16]
    inst = np.where(inst > 0, inst + (np.arange(16) * 100_000)[:, None, None], 0)

    def tile(a: np.ndarray) -> np.ndarray:
        a = a.reshape(4, 4, 256, 256, *a.shape[3:])
        return np.ascontiguousarray(a.swapaxes(1, 2).reshape(1024, 1024, *a.shape[4:]))[:1000, :900]

    return tile(images), tile(inst), tile(types)


@pytest.fixture(scope="module")
def slide(mosaic, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "mosaic.tif"
    write_pyramidal_tiff(path, mosaic[0], mpp=0.25, factor=2, min_size=200)
    return path


def _geojson(path: Path, box: tuple[int, int, int, int]) -> Path:
    x0, y0, x1, y1 = box
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}}]}))
    return path


def _asap(path: Path, box: tuple[int, int, int, int]) -> Path:
    x0, y0, x1, y1 = box
    points = [(x1, y1), (x0, y0), (x0, y1), (x1, y0)]  # listed out of order: the Order attribute counts
    order = [2, 0, 3, 1]
    coordinates = "".join(f'<Coordinate Order="{o}" X="{x}" Y="{y}"/>' for o, (x, y) in zip(order, points))
    path.write_text(f'<?xml version="1.0"?><ASAP_Annotations><Annotations><Annotation Name="A" Type="Polygon">'
                    f"<Coordinates>{coordinates}</Coordinates></Annotation></Annotations></ASAP_Annotations>")
    return path


def _centroids(csv_path: Path) -> np.ndarray:
    with open(csv_path) as f:
        return np.array([[float(r["x"]), float(r["y"])] for r in csv.DictReader(f)]).reshape(-1, 2)


def test_a_region_restricts_the_tiles_and_the_nuclei_and_the_mask_shows_it(slide, mosaic, tmp_path):
    _, inst, types = mosaic
    predictor = GroundTruthPredictor(inst, types, len(CLASSES))
    whole = run_slide(slide, tmp_path / "whole", predictor, CLASSES, SETTINGS)
    roi = _geojson(tmp_path / "r.geojson", BOX)
    inside = run_slide(slide, tmp_path / "geojson", predictor, CLASSES, SETTINGS, roi=roi)
    x0, y0, x1, y1 = BOX
    all_xy = _centroids(tmp_path / "whole" / "mosaic.tif.csv")
    expected = all_xy[(all_xy[:, 0] > x0) & (all_xy[:, 0] < x1) & (all_xy[:, 1] > y0) & (all_xy[:, 1] < y1)]
    found = _centroids(tmp_path / "geojson" / "mosaic.tif.csv")
    assert len(found) == len(expected) == inside["cells"] > 50 and inside["cells"] < whole["cells"] / 3
    np.testing.assert_allclose(np.sort(found, axis=0), np.sort(expected, axis=0))
    assert inside["tiles"] < whole["tiles"] and inside["roi"].endswith("r.geojson")
    assert len(json.loads((tmp_path / "geojson" / "mosaic.tif.geojson").read_text())["features"]) == inside["cells"]
    mask = cv2.imread(str(tmp_path / "geojson" / "mosaic.tif_mask.png"), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (1000, 900) and set(np.unique(mask)) == {0, 255}  # the thumbnail is level 0 here
    ys, xs = np.nonzero(mask)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x0, y0, x1, y1)  # the polygon, closed boundary included
    whole_mask = cv2.imread(str(tmp_path / "whole" / "mosaic.tif_mask.png"), cv2.IMREAD_GRAYSCALE)
    assert (whole_mask == 255).mean() > 0.99

    # the same rectangle from ASAP XML gives the same result; as a quarter-resolution mask image, the same nuclei
    run_slide(slide, tmp_path / "asap", predictor, CLASSES, SETTINGS, roi=_asap(tmp_path / "r.xml", BOX))
    assert ((tmp_path / "asap" / "mosaic.tif.csv").read_bytes()
            == (tmp_path / "geojson" / "mosaic.tif.csv").read_bytes())
    quarter = np.zeros((250, 225), np.uint8)
    quarter[y0 // 4 : y1 // 4, x0 // 4 : x1 // 4] = 255
    cv2.imwrite(str(tmp_path / "r.png"), quarter)
    run_slide(slide, tmp_path / "png", predictor, CLASSES, SETTINGS, roi=tmp_path / "r.png")
    np.testing.assert_allclose(np.sort(_centroids(tmp_path / "png" / "mosaic.tif.csv"), axis=0),
                               np.sort(expected, axis=0))


def test_bad_regions_are_named_and_a_cohort_csv_gives_each_slide_its_own_resolution(slide, mosaic, tmp_path):
    _, inst, types = mosaic
    with pytest.raises(ValueError, match=r"far\.geojson: the region \(5000, 5000\)-\(6000, 6000\) lies outside"):
        read_region(_geojson(tmp_path / "far.geojson", (5000, 5000, 6000, 6000)), 900, 1000)
    cv2.imwrite(str(tmp_path / "wide.png"), np.full((100, 400), 255, np.uint8))
    with pytest.raises(ValueError, match=r"wide\.png: mask of 400 x 100 does not match the slide's 900 x 1000"):
        read_region(tmp_path / "wide.png", 900, 1000)
    (tmp_path / "points.geojson").write_text(json.dumps({"type": "Point", "coordinates": [1, 2]}))
    with pytest.raises(ValueError, match=r"points\.geojson: no polygon"):
        read_region(tmp_path / "points.geojson", 900, 1000)
    with pytest.raises(FileNotFoundError, match=r"mosaic\.tif: no region file named after the slide"):
        find_region(tmp_path, slide)  # holds no file named after the slide

    folder = tmp_path / "cohort"
    folder.mkdir()
    no_mpp = folder / "no_mpp.tif"
    write_pyramidal_tiff(no_mpp, mosaic[0][:400, :400], mpp=None, min_size=10_000)
    regions = folder / "regions"
    regions.mkdir()
    _geojson(regions / "no_mpp.geojson", (0, 0, 200, 200))
    (folder / "cohort.csv").write_text(
        "path,mpp,roi\n"
        f"no_mpp.tif,0.25,\n"  # no resolution recorded: given here
        f"{slide},0.5,{_geojson(tmp_path / 'far.geojson', (5000, 5000, 6000, 6000))}\n"  # region off the slide
        "missing_mpp.tif,abc,\n"
        ",0.25,\n")
    entries = list_slides(folder / "cohort.csv")
    assert [e.mpp for e in entries[:2]] == [0.25, 0.5] and entries[0].path == no_mpp
    predictor = GroundTruthPredictor(inst, types, len(CLASSES))
    with pytest.raises(SlideError) as failed:
        run_cohort(folder / "cohort.csv", tmp_path / "out", predictor, CLASSES, SETTINGS)
    message = str(failed.value)
    assert message.startswith("3 of 4 slides failed:")
    assert "cohort.csv, line 4: mpp 'abc' is not a positive number" in message
    assert "cohort.csv, line 5: no slide path" in message
    assert f"{slide}: " in message and "far.geojson: the region" in message
    summary = json.loads((tmp_path / "out" / "no_mpp.tif.json").read_text())
    assert summary["mpp"] == 0.25 and summary["cells"] > 20 and summary["roi"] is None

    # a cohort-wide region folder: each slide takes the file named after it
    (folder / "list.txt").write_text(f"{no_mpp}\n")
    partial = run_cohort(folder / "list.txt", tmp_path / "roi", predictor, CLASSES,
                         WSISettings(**{**SETTINGS.__dict__, "mpp": 0.25}), roi=regions)[0]
    xy = _centroids(tmp_path / "roi" / "no_mpp.tif.csv")
    assert 0 < partial["cells"] < summary["cells"] and (xy < 200).all()


def test_pen_marks_are_found_by_colour_and_left_out_of_the_analysis(slide, mosaic, tmp_path):
    from scripts.slides.tissue import pen_mask

    image, inst, types = mosaic
    assert pen_mask(image).mean() < 0.002  # real H&E: (almost) nothing is ink
    inked = image.copy()
    cv2.line(inked, (0, 150), (899, 150), (30, 60, 200), 40)  # blue marker across the slide
    cv2.line(inked, (450, 0), (450, 999), (20, 140, 60), 30)  # green marker down it
    stroke = np.zeros(image.shape[:2], np.uint8)
    cv2.line(stroke, (0, 150), (899, 150), 1, 40)
    cv2.line(stroke, (450, 0), (450, 999), 1, 30)
    found = pen_mask(inked)
    near = cv2.dilate(stroke, np.ones((13, 13), np.uint8)).astype(bool)
    assert found[stroke.astype(bool)].all() and found[~near].mean() < 0.002

    path = tmp_path / "inked.tif"
    write_pyramidal_tiff(path, inked, mpp=0.25, min_size=10_000)
    predictor = GroundTruthPredictor(inst, types, len(CLASSES))
    kept = run_slide(path, tmp_path / "pen", predictor, CLASSES, WSISettings(**{**SETTINGS.__dict__,
                                                                                  "exclude_pen_marks": True}))
    everything = run_slide(path, tmp_path / "all", predictor, CLASSES, SETTINGS)
    xy = _centroids(tmp_path / "pen" / "inked.tif.csv")
    on_ink = found[xy[:, 1].astype(int), xy[:, 0].astype(int)]
    assert not on_ink.any() and 0.7 * everything["cells"] < kept["cells"] < 0.95 * everything["cells"]
    mask = cv2.imread(str(tmp_path / "pen" / "inked.tif_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    assert not (mask & stroke.astype(bool)).any() and mask.mean() > 0.8


def test_an_island_in_a_hole_is_drawn_whatever_the_order_of_the_features(tmp_path):
    outer = [[0, 0], [400, 0], [400, 400], [0, 400], [0, 0]]
    hole = [[100, 100], [300, 100], [300, 300], [100, 300], [100, 100]]
    island = [[150, 150], [250, 150], [250, 250], [150, 250], [150, 150]]
    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings}, "properties": {}}
                for rings in ([outer, hole], [island])]
    rasters = []
    for order in (features, features[::-1]):
        path = tmp_path / f"r{len(rasters)}.geojson"
        path.write_text(json.dumps({"type": "FeatureCollection", "features": order}))
        region = read_region(path, 500, 500)
        raster = region.raster((125, 125), 4.0)
        # the raster agrees with the region's own point test at the centres of its pixels off the rings
        yy, xx = np.mgrid[:125, :125]
        centres = np.stack([(xx.ravel() + 0.5) * 4, (yy.ravel() + 0.5) * 4], axis=1)
        off_rings = shapely.distance(region.geometry.boundary, shapely.points(centres)) > 4
        np.testing.assert_array_equal(raster.ravel()[off_rings], region.contains(centres)[off_rings])
        assert raster[50, 50] and not raster[30, 30] and raster[10, 10] and not raster[110, 110]
        rasters.append(raster)
    np.testing.assert_array_equal(rasters[0], rasters[1])


def test_a_malformed_asap_coordinate_is_an_error_naming_the_file_and_the_annotation(tmp_path):
    path = tmp_path / "bad.xml"
    path.write_text('<ASAP_Annotations><Annotations><Annotation Name="tumour"><Coordinates>'
                    '<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" Y="5"/>'
                    '<Coordinate Order="2" X="5" Y="5"/>'
                    '</Coordinates></Annotation></Annotations></ASAP_Annotations>')
    with pytest.raises(ValueError, match=r"bad\.xml: annotation 'tumour' has a coordinate without a numeric X"):
        read_region(path, 100, 100)


def test_the_slide_records_its_resolution_unless_told_otherwise_for_that_slide(slide):
    from scripts.slides.readers import open_slide
    from scripts.slides.wsi import slide_geometry

    with open_slide(slide) as opened:
        assert slide_geometry(opened, SETTINGS).mpp == 0.25  # recorded
        assert slide_geometry(opened, WSISettings(mpp=0.5)).mpp == 0.25  # --mpp: only for slides recording none
        given = slide_geometry(opened, WSISettings(mpp=0.5), mpp=0.5)  # a cohort CSV's own column for this slide
        assert given.mpp == 0.5 and given.scale == 0.5


def test_whatever_stops_one_slide_the_cohort_goes_on(slide, mosaic, tmp_path, monkeypatch):
    import scripts.slides.wsi as wsi

    _, inst, types = mosaic
    other = tmp_path / "copy.tif"
    other.write_bytes(slide.read_bytes())
    real = wsi.run_slide

    def run_slide(path, *args, **kwargs):
        if Path(path).name == "mosaic.tif":
            raise MemoryError("the level does not fit in memory")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(wsi, "run_slide", run_slide)
    (tmp_path / "list.txt").write_text(f"{slide}\n{other}\n")
    with pytest.raises(SlideError, match=r"1 of 2 slides failed:\n.*mosaic\.tif: MemoryError: the level does not fit"):
        run_cohort(tmp_path / "list.txt", tmp_path / "out", GroundTruthPredictor(inst, types, len(CLASSES)), CLASSES,
                   WSISettings(**{**SETTINGS.__dict__, "thumbnail_size": 256}), roi=None)
    assert json.loads((tmp_path / "out" / "copy.tif.json").read_text())["cells"] > 100
