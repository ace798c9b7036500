"""Whole-slide outputs people and tools open: the bulk GeoJSON text, its gzip twin and the slide report page."""

from __future__ import annotations

import gzip
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from scripts.inference.writers import PALETTE, closed_rings, detection_feature
from scripts.nuclei.postprocess import nuclei_from_instance_map
from scripts.slides.outputs import GeoJSONStream, geojson_features
from scripts.slides.pyramid import write_pyramidal_tiff
from scripts.slides.report import class_density
from scripts.slides.wsi import WSISettings, run_slide
from tests.oracle import GroundTruthPredictor

CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle-shaped"]


def per_feature(rings, ids, types, probability, area, names) -> bytes:
    """The per-feature writer the bulk formatter replaces: ``json.dumps`` of each feature dict."""
    return ",\n".join(json.dumps(detection_feature(r, int(t), names, {
        "cell_id": int(i), "type_probability": round(float(p), 4), "area_um2": round(float(a), 2)}),
        separators=(",", ":")) for r, i, t, p, a in zip(rings, ids, types, probability, area)).encode()


def test_bulk_geojson_text_is_byte_identical_to_json_dumps_on_awkward_numbers():
    rng = np.random.default_rng(0)
    n = 2000
    corners = rng.uniform(-50, 2e5, (n, 5, 2)) * rng.choice([1, 1e-3, 1e2], (n, 1, 1))
    rings = [np.vstack([r, r[:1]]) for r in corners]
    # -0.0 after rounding, decimal halves that binary rounds either way, whole numbers, five-digit integers
    for k, value in enumerate([-0.001, 0.005, 2.675, 1.125, 0.125, 45056.0, 99999.995, 1e-9]):
        rings[k][:] = value
    ids = rng.integers(1, 10**12, n)
    types = rng.integers(0, 14, n)  # ids beyond the names and the palette
    probability = rng.uniform(0, 1, n)
    probability[:8] = [0.00005, 0.12345, 0.5, 1.0, 0.0, 0.99995, 0.33335, 1e-7]
    area = rng.uniform(0, 1e6, n) * rng.choice([1, 1e-3], n)
    area[:5] = [2.675, 1.005, 0.125, 0.0, 100.0]
    names = [*CLASSES, 'nicht "üblich"']
    args = rings, ids, types, probability, area, names
    assert geojson_features(*args, np.array(PALETTE)) == per_feature(*args)
    assert geojson_features([], ids[:0], types[:0], probability[:0], area[:0], names, np.array(PALETTE)) == b""
    with pytest.raises(ValueError, match="finite"):
        geojson_features([np.full((4, 2), np.nan)], ids[:1], types[:1], probability[:1], area[:1], names,
                         np.array(PALETTE))


def test_bulk_geojson_text_is_byte_identical_on_real_consep_nuclei(consep):
    inst = consep["inst_map"][0].astype(np.int32)
    nuclei = nuclei_from_instance_map(np.unique(inst, return_inverse=True)[1].reshape(inst.shape).astype(np.int32))
    lengths = [len(c) for c in nuclei.contours]
    rings = closed_rings(np.concatenate(nuclei.contours), np.concatenate([[0], np.cumsum(lengths)]), 0.5,
                         (40960.25, 7.5))
    n = len(rings)
    types = consep["type_map"][0][tuple(np.floor(nuclei.centroids[:, ::-1]).astype(int).T)]
    args = rings, np.arange(1, n + 1), types, nuclei.type_probs, np.array(lengths) * 0.0625, CLASSES
    text = geojson_features(*args, np.array(PALETTE))
    assert n > 20 and text == per_feature(*args)
    assert [f["properties"]["measurements"]["cell_id"] for f in json.loads(b"[" + text + b"]")] == list(range(1, n + 1))


def test_gzip_stream_holds_the_plain_text_and_is_reproducible(tmp_path):
    blocks = [b'{"a":1}', b"", b'{"b":[2.5,3.0]}']
    for name, level in (("plain.geojson", None), ("one.geojson.gz", 1), ("two.geojson.gz", 1)):
        stream = GeoJSONStream(tmp_path / name, level)
        for block in blocks:
            stream.write(block)
        stream.close()
    plain = (tmp_path / "plain.geojson").read_bytes()
    assert json.loads(plain) == {"type": "FeatureCollection", "features": [{"a": 1}, {"b": [2.5, 3.0]}]}
    assert gzip.decompress((tmp_path / "one.geojson.gz").read_bytes()) == plain
    assert (tmp_path / "one.geojson.gz").read_bytes() == (tmp_path / "two.geojson.gz").read_bytes()


def test_class_density_counts_nuclei_per_square_millimetre_of_slide():
    # 1000 x 500 px at 0.5 um/px in 100 um squares (200 px): the last row of squares is cut to 0.1 x 0.05 mm
    x = np.array([10.0, 20.0, 210.0, 999.0, 999.0, 5.0])
    y = np.array([10.0, 30.0, 10.0, 499.0, 499.0, 5.0])
    types = np.array([1, 1, 2, 2, 2, 0])  # background counted nowhere
    density = class_density(x, y, types, 3, 1000, 500, 0.5, 100.0)
    assert density.shape == (2, 3, 5)
    assert density[0, 0, 0] == pytest.approx(2 / 0.01)
    assert density[1, 0, 1] == pytest.approx(1 / 0.01)
    assert density[1, 2, 4] == pytest.approx(2 / 0.005)
    area = np.array([0.01, 0.01, 0.005])[:, None]
    assert (density * area).sum() == pytest.approx(5) and np.count_nonzero(density) == 3


class _Page(HTMLParser):
    """What a report page holds: every URL-bearing attribute, the class counts, tags and text."""

    def __init__(self) -> None:
        super().__init__()
        self.urls, self.tags, self.counts, self.text = [], [], {}, []
        self._count: str | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        self.urls += [v for k, v in attrs.items() if k in {"src", "href", "srcset", "action", "poster", "data"}]
        self._count = attrs.get("data-class") if "count" in (attrs.get("class") or "").split() else None

    def handle_data(self, data):
        self.text.append(data)
        if self._count is not None:
            self.counts[self._count] = int(data)
            self._count = None


def mosaic_predictor(consep) -> tuple[np.ndarray, GroundTruthPredictor]:
    """A 2 x 2 mosaic of CoNSeP patches (512 x 512 RGB) and the ground-truth oracle of its nuclei."""
    idx = [0, 1, 2, 3]
    inst = np.where(consep["inst_map"][idx] > 0, consep["inst_map"][idx] + np.arange(4)[:, None, None] * 1000, 0)

    def tile(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.reshape(2, 2, 256, 256, *a.shape[3:]).swapaxes(1, 2)
                                    .reshape(512, 512, *a.shape[3:]))

    return tile(consep["images"][idx]), GroundTruthPredictor(tile(inst), tile(consep["type_map"][idx]), len(CLASSES))


@pytest.fixture(scope="module")
def slide_run(consep, tmp_path_factory):
    """The mosaic as a pyramidal TIFF, analysed with the ground-truth oracle and gzip."""
    image, predictor = mosaic_predictor(consep)
    folder = tmp_path_factory.mktemp("report")
    slide = folder / "case.1.tif"
    write_pyramidal_tiff(slide, image, mpp=0.25, factor=2, min_size=128)
    settings = WSISettings(postprocess_workers=0, min_tissue_fraction=0.0, geojson_gzip=1, report_grid_um=32)
    summary = run_slide(slide, folder / "out", predictor, CLASSES, settings, predictor_id="ground-truth oracle")
    return folder / "out", summary


def test_a_run_asking_for_fewer_outputs_leaves_none_of_the_earlier_ones(consep, tmp_path):
    """Outputs of an earlier run that the new one does not write are removed when it publishes: an old gzip twin or
    embedding ids would otherwise describe other nuclei than the tables beside them."""
    image, predictor = mosaic_predictor(consep)
    write_pyramidal_tiff(tmp_path / "s.tif", image, mpp=0.25, factor=2, min_size=128)
    full = WSISettings(postprocess_workers=0, min_tissue_fraction=0.0, geojson_gzip=1, embeddings=True)
    first = run_slide(tmp_path / "s.tif", tmp_path / "out", predictor, CLASSES, full)
    assert {"s.tif.geojson.gz", "s.tif_embeddings.npy", "s.tif_embedding_ids.npy"} <= set(first["outputs"])
    region = tmp_path / "half.geojson"
    ring = [[0, 0], [256, 0], [256, 512], [0, 512], [0, 0]]
    region.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    fewer = WSISettings(postprocess_workers=0, min_tissue_fraction=0.0)
    second = run_slide(tmp_path / "s.tif", tmp_path / "out", predictor, CLASSES, fewer, roi=region)
    assert 0 < second["cells"] < first["cells"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(second["outputs"] + ["s.tif.json"])


def test_a_slide_writes_its_geojson_gzip_compressed_too(slide_run):
    out, summary = slide_run
    plain = (out / "case.1.tif.geojson").read_bytes()
    assert gzip.decompress((out / "case.1.tif.geojson.gz").read_bytes()) == plain
    assert len(json.loads(plain)["features"]) == summary["cells"] > 50
    assert "case.1.tif.geojson.gz" in summary["outputs"] and summary["write_seconds"]["geojson.gz"] >= 0


def test_the_slide_report_is_one_self_contained_page_with_the_summary_counts(slide_run):
    out, summary = slide_run
    assert json.loads((out / "case.1.tif.json").read_text()) == summary
    page = (out / "case.1.tif_report.html").read_text(encoding="utf-8")
    parser = _Page()
    parser.feed(page)
    parser.close()
    assert parser.tags[:2] == ["html", "head"] and "body" in parser.tags
    assert parser.counts == summary["cells_per_class"] and sum(parser.counts.values()) == summary["cells"]
    # every image embedded, nothing fetched: no URL but data: PNGs, no script, no stylesheet link, no CSS import
    assert len(parser.urls) >= 2 and all(u.startswith("data:image/png;base64,") for u in parser.urls)
    assert not {"script", "link", "iframe", "object", "embed"} & set(parser.tags)
    assert not re.search(r"url\(|@import|https?://|//[a-z]", page.split("<body>")[0] + "".join(parser.text), re.I)
    text = " ".join(parser.text)
    assert "ground-truth oracle" in text and f"{summary['seconds']:.1f} s" in text
    assert all(k in text for k in summary["settings"])
    assert "Tissue" not in parser.text  # the oracle has no tissue head: no tissue section
    assert "case.1.tif_report.html" in summary["outputs"]


def test_the_report_shows_the_tissue_map_and_fractions_when_the_network_has_a_tissue_head(slide_run, tmp_path):
    import shutil

    import cv2

    from scripts.slides.report import write_report

    out, summary = slide_run
    for suffix in (".parquet", "_overlay.png", "_mask.png"):
        shutil.copy(out / f"case.1.tif{suffix}", tmp_path)
    tissue_map = np.full((3, 4, 3), 255, np.uint8)
    tissue_map[:2, :3] = (200, 30, 30)
    cv2.imwrite(str(tmp_path / "case.1.tif_tissue.png"), tissue_map)
    tissue = {"map": "case.1.tif_tissue.png", "tile_stride": 192.0, "tiles": 6, "classes": ["tumour", "stroma"],
              "colours": {"tumour": [200, 30, 30], "stroma": [30, 200, 30]},
              "fractions": {"tumour": 0.8333, "stroma": 0.1667},
              "mean_probabilities": {"tumour": 0.71, "stroma": 0.29}}
    write_report(tmp_path / "page.html", {**summary, "tissue": tissue}, tmp_path, 32)
    parser = _Page()
    parser.feed((tmp_path / "page.html").read_text(encoding="utf-8"))
    assert "Tissue" in parser.text and "tumour" in parser.text and "83.3 %" in parser.text
    assert len(parser.urls) == 3 and all(u.startswith("data:image/png;base64,") for u in parser.urls)
