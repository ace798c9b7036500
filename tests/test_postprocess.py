"""HoVer-Net post-processing: exactness against CellViT's reference output, a literal per-nucleus oracle,
robustness, and the MONAI transform pair (ours and MONAI's own, corrected)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage
from skimage.draw import ellipse
from skimage.segmentation import watershed

from scripts.nuclei.postprocess import (
    Nuclei,
    _argmax_channels,
    _contours,
    _fill_holes,
    _framed,
    _frontier,
    _large_components,
    _ties_within_regions,
    hovernet_postprocess,
    instance_centroids,
    marker_watershed,
    nuclei_from_instance_map,
)
from scripts.nuclei.postprocess_transforms import (
    HoVerNetPostProcessing,
    HoVerNetPostProcessingd,
    MonaiHoVerNetPostProcessing,
)

# ---------------------------------------------------------------------------------------------------------------
# Oracles written straight from the specification (reference §7.1), one nucleus at a time, with scipy's own
# labelling and hole filling: slow, obvious, independent of the vectorised module under test.


def literal_instance_map(nuclei_prob: np.ndarray, hv_map: np.ndarray, magnification: int = 40) -> np.ndarray:
    ksize, marker_min = {40: (21, 10), 20: (11, 3)}[magnification]
    blb = (nuclei_prob.astype(np.float32) >= 0.5).astype(np.int32)
    lab = ndimage.label(blb)[0]
    sizes = np.bincount(lab.ravel())
    blb[(sizes < 10)[lab]] = 0
    norm = dict(alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    h = cv2.normalize(hv_map[0].astype(np.float32), None, **norm)
    v = cv2.normalize(hv_map[1].astype(np.float32), None, **norm)
    sobel_h = 1 - cv2.normalize(cv2.Sobel(h, cv2.CV_64F, 1, 0, ksize=ksize), None, **norm)
    sobel_v = 1 - cv2.normalize(cv2.Sobel(v, cv2.CV_64F, 0, 1, ksize=ksize), None, **norm)
    overall = np.maximum(sobel_h, sobel_v) - (1 - blb)
    overall[overall < 0] = 0
    dist = -cv2.GaussianBlur((1.0 - overall) * blb, (3, 3), 0)
    marker = blb - (overall >= 0.4).astype(np.int32)
    marker[marker < 0] = 0
    marker = ndimage.binary_fill_holes(marker).astype(np.uint8)
    marker = cv2.morphologyEx(marker, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    marker = ndimage.label(marker)[0]
    sizes = np.bincount(marker.ravel())
    marker[(sizes < marker_min)[marker]] = 0
    return watershed(dist, markers=marker, mask=blb)


def literal_nuclei(inst_map: np.ndarray, type_prob: np.ndarray | None) -> dict[int, dict]:
    pixel_types = None if type_prob is None else np.argmax(type_prob, axis=0)
    info = {}
    for inst_id in np.unique(inst_map[inst_map > 0]):
        whole = inst_map == inst_id
        rows, cols = np.where(whole.any(axis=1))[0], np.where(whole.any(axis=0))[0]
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        crop = whole[r0:r1, c0:c1].astype(np.uint8)
        contour = cv2.findContours(crop, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0][0].reshape(-1, 2)
        if contour.shape[0] < 3:
            continue
        m = cv2.moments(crop)
        entry = {
            "bbox": [[r0, c0], [r1, c1]],
            "centroid": [m["m10"] / m["m00"] + c0, m["m01"] / m["m00"] + r0],
            "contour": contour + [c0, r0],
            "type": 0,
            "type_prob": 0.0,
        }
        if pixel_types is not None:
            values, counts = np.unique(pixel_types[r0:r1, c0:c1][crop > 0], return_counts=True)
            ranked = sorted(zip(values.tolist(), counts.tolist()), key=lambda vc: vc[1], reverse=True)
            winner = ranked[1][0] if ranked[0][0] == 0 and len(ranked) > 1 else ranked[0][0]
            entry["type"] = winner
            entry["type_prob"] = dict(ranked)[winner] / (crop.sum() + 1.0e-6)
        info[int(inst_id)] = entry
    return info


def relabelling(a: np.ndarray, b: np.ndarray) -> dict[int, int] | None:
    """The id map a -> b if the two instance maps are equal up to relabelling (background fixed), else None."""
    a, b = a.astype(np.int64).ravel(), b.astype(np.int64).ravel()
    keys = np.unique(a * (b.max() + 1) + b)
    pairs = np.stack(np.divmod(keys, b.max() + 1))
    if len(np.unique(pairs[0])) != pairs.shape[1] or len(np.unique(pairs[1])) != pairs.shape[1]:
        return None
    mapping = dict(zip(pairs[0].tolist(), pairs[1].tolist()))
    return mapping if mapping.get(0, 0) == 0 else None


def assert_matches_literal(inst_map: np.ndarray, nuclei: Nuclei, literal_map: np.ndarray, literal: dict) -> None:
    mapping = relabelling(literal_map, inst_map)
    assert mapping is not None, "instance maps differ beyond relabelling"
    assert sorted(mapping[k] for k in literal) == nuclei.ids.tolist()
    for k, ref in literal.items():
        j = int(np.searchsorted(nuclei.ids, mapping[k]))
        assert nuclei.bboxes[j].tolist() == ref["bbox"]
        assert nuclei.centroids[j].tolist() == ref["centroid"]
        assert np.array_equal(nuclei.contours[j], ref["contour"])
        assert nuclei.types[j] == ref["type"]
        assert nuclei.type_probs[j] == np.float32(ref["type_prob"])


def binary_pq(a: np.ndarray, b: np.ndarray) -> float:
    """Binary panoptic quality of two instance maps (matches at IoU > 0.5), from one joint histogram."""
    a, b = a.astype(np.int64).ravel(), b.astype(np.int64).ravel()
    na, nb = a.max() + 1, b.max() + 1
    inter = np.bincount(a * nb + b, minlength=na * nb).reshape(na, nb)[1:, 1:]
    area_a, area_b = np.bincount(a, minlength=na)[1:], np.bincount(b, minlength=nb)[1:]
    iou = inter / (area_a[:, None] + area_b[None, :] - inter)
    tp = iou > 0.5
    n_tp = tp.sum()
    fp, fn = (area_b > 0).sum() - n_tp, (area_a > 0).sum() - n_tp
    return 1.0 if n_tp + fp + fn == 0 else float(iou[tp].sum() / (n_tp + 0.5 * fp + 0.5 * fn))


# ---------------------------------------------------------------------------------------------------------------
# Data


@pytest.fixture(scope="module")
def fixture_maps(fixtures_dir: Path) -> dict[str, np.ndarray]:
    with np.load(fixtures_dir / "postprocess_consep.npz") as d:
        maps = {k: d[k] for k in d.files}
    maps["nuclei_prob"] = maps["np_prob"] / 255.0
    maps["hv32"] = maps["hv"].astype(np.float32)
    return maps


@pytest.fixture(scope="module")
def reference_cells(fixtures_dir: Path) -> dict[int, list[dict]]:
    cells: dict[int, list[dict]] = {}
    for cell in json.loads((fixtures_dir / "reference_results.json").read_text())["cells"]:
        cells.setdefault(cell["patch"], []).append(cell)
    return cells


def logits(nuclei_prob: np.ndarray) -> np.ndarray:
    """(2, H, W) NP logits whose softmax foreground probability is ``nuclei_prob``."""
    p = np.clip(nuclei_prob, 1e-6, 1 - 1e-6)
    return np.stack([np.zeros_like(p), np.log(p) - np.log1p(-p)]).astype(np.float32)


def grid_maps(n_rows: int, n_cols: int, size: int, gap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Square nuclei on a grid: nuclei probability (H, W), ideal HV maps (2, H, W), instance map (H, W)."""
    pitch = size + gap
    r, c = np.arange(n_rows * pitch), np.arange(n_cols * pitch)
    fg = ((r % pitch) < size)[:, None] & ((c % pitch) < size)[None, :]
    half = (size - 1) / 2
    hv = np.zeros((2, r.size, c.size), np.float32)
    hv[0] = np.where(fg, (((c % pitch) - half) / half)[None, :], 0)
    hv[1] = np.where(fg, (((r % pitch) - half) / half)[:, None], 0)
    inst = np.where(fg, (r // pitch)[:, None] * n_cols + (c // pitch)[None, :] + 1, 0)
    return fg.astype(np.float32), hv, inst


def ellipse_maps(shape: tuple[int, int], centre_xy: tuple[float, float], radii_xy: tuple[float, float]):
    """One elliptical nucleus: probability (H, W), HV maps (2, H, W) with zero at its centre of mass."""
    prob = np.zeros(shape, np.float32)
    rr, cc = ellipse(centre_xy[1], centre_xy[0], radii_xy[1], radii_xy[0], shape=shape)
    prob[rr, cc] = 1.0
    hv = np.zeros((2, *shape), np.float32)
    hv[0, rr, cc] = (cc - cc.mean()) / np.abs(cc - cc.mean()).max()
    hv[1, rr, cc] = (rr - rr.mean()) / np.abs(rr - rr.mean()).max()
    return prob, hv, (cc.mean(), rr.mean())


# ---------------------------------------------------------------------------------------------------------------
# Exactness against CellViT's DetectionCellPostProcessor on the 40 real CoNSeP patches


def test_reproduces_cellvit_reference_fixture(fixture_maps, reference_cells):
    n_cells = 0
    for i in range(fixture_maps["np_prob"].shape[0]):
        inst_map, nuclei = hovernet_postprocess(
            fixture_maps["nuclei_prob"][i], fixture_maps["hv32"][i], fixture_maps["tp_prob"][i], magnification=40
        )
        assert inst_map.dtype == np.int32 and inst_map.shape == (256, 256)
        mapping = relabelling(fixture_maps["ref_inst"][i], inst_map)
        assert mapping is not None, f"patch {i}: instance map differs from ref_inst beyond relabelling"
        assert np.array_equal(nuclei.type_map(inst_map), fixture_maps["ref_type"][i]), f"patch {i}: type map"
        cells = sorted(reference_cells.get(i, []), key=lambda c: mapping[c["id"]])
        assert nuclei.ids.tolist() == [mapping[c["id"]] for c in cells], f"patch {i}: nuclei"
        assert nuclei.centroids.tolist() == [c["centroid_xy"] for c in cells], f"patch {i}: centroids"
        assert nuclei.bboxes.tolist() == [c["bbox"] for c in cells], f"patch {i}: boxes"
        assert nuclei.types.tolist() == [c["type"] for c in cells], f"patch {i}: types"
        ref_probs = np.array([c["type_prob"] for c in cells])
        assert np.array_equal(nuclei.type_probs, ref_probs.astype(np.float32)), f"patch {i}: type probabilities"
        assert [len(c) for c in nuclei.contours] == [c["contour_len"] for c in cells], f"patch {i}: contours"
        n_cells += len(nuclei)
    assert n_cells == 1729


def test_type_probabilities_are_exact_in_float64(fixture_maps, reference_cells):
    """type_probs are stored as float32; the float64 vote behind them equals the reference to the last bit."""
    from scripts.nuclei.postprocess import _argmax_channels as argmax, _foreground, _vote_types

    i = 7
    inst_map, nuclei = hovernet_postprocess(fixture_maps["nuclei_prob"][i], fixture_maps["hv32"][i], None)
    flat, labels = _foreground(inst_map)
    tp = fixture_maps["tp_prob"][i]
    _, probs = _vote_types(labels, argmax(tp.reshape(5, -1)[:, flat]), 5, nuclei.ids.astype(np.int64))
    mapping = relabelling(fixture_maps["ref_inst"][i], inst_map)
    cells = sorted(reference_cells[i], key=lambda c: mapping[c["id"]])
    assert probs.tolist() == [c["type_prob"] for c in cells]


# ---------------------------------------------------------------------------------------------------------------
# Against the literal oracle: other magnification, non-square tiles, border nuclei, no type map


@pytest.mark.parametrize(
    ("patch", "rows", "cols", "magnification"),
    [
        (36, slice(0, 256), slice(0, 256), 20),
        (11, slice(0, 256), slice(0, 256), 20),
        (26, slice(17, 217), slice(0, 256), 40),
        (19, slice(0, 256), slice(40, 171), 40),
        (27, slice(60, 197), slice(9, 250), 20),
        (33, slice(1, 255), slice(3, 254), 40),
    ],
)
def test_matches_literal_oracle(fixture_maps, patch, rows, cols, magnification):
    prob = fixture_maps["nuclei_prob"][patch][rows, cols]
    hv = fixture_maps["hv32"][patch][:, rows, cols]
    tp = fixture_maps["tp_prob"][patch][:, rows, cols]
    inst_map, nuclei = hovernet_postprocess(prob, hv, tp, magnification=magnification)
    literal_map = literal_instance_map(prob, hv, magnification)
    assert inst_map.shape == prob.shape and len(nuclei) > 5
    assert_matches_literal(inst_map, nuclei, literal_map, literal_nuclei(literal_map, tp))


def test_border_nuclei_keep_their_edge_pixels(fixture_maps):
    prob, hv, tp = fixture_maps["nuclei_prob"][0], fixture_maps["hv32"][0], fixture_maps["tp_prob"][0]
    inst_map, nuclei = hovernet_postprocess(prob, hv, tp)
    h, w = inst_map.shape
    on_edge = set(np.unique(np.concatenate([inst_map[0], inst_map[-1], inst_map[:, 0], inst_map[:, -1]]))) - {0}
    assert len(on_edge) >= 4
    for j, inst_id in enumerate(nuclei.ids):
        if inst_id in on_edge:
            (r0, c0), (r1, c1) = nuclei.bboxes[j]
            assert r0 == 0 or c0 == 0 or r1 == h or c1 == w
            xs, ys = nuclei.contours[j][:, 0], nuclei.contours[j][:, 1]
            assert xs.min() == 0 or ys.min() == 0 or xs.max() == w - 1 or ys.max() == h - 1


def test_without_type_prediction(fixture_maps):
    prob, hv = fixture_maps["nuclei_prob"][4], fixture_maps["hv32"][4]
    inst_map, nuclei = hovernet_postprocess(prob, hv, None)
    literal_map = literal_instance_map(prob, hv)
    assert_matches_literal(inst_map, nuclei, literal_map, literal_nuclei(literal_map, None))
    assert not nuclei.types.any() and not nuclei.type_map(inst_map).any()


# ---------------------------------------------------------------------------------------------------------------
# Robustness


def test_empty_prediction():
    hv = np.random.default_rng(0).uniform(-1, 1, (2, 64, 80)).astype(np.float32)
    inst_map, nuclei = hovernet_postprocess(np.zeros((64, 80)), hv, np.zeros((3, 64, 80)))
    assert inst_map.shape == (64, 80) and inst_map.dtype == np.int32 and not inst_map.any()
    assert len(nuclei) == 0 and nuclei.centroids.shape == (0, 2) and nuclei.bboxes.shape == (0, 2, 2)
    assert not nuclei.type_map(inst_map).any()


def test_specks_below_the_minimum_size_are_background():
    prob = np.zeros((40, 40))
    prob[5:8, 5:8] = 1.0  # 9 px < 10
    inst_map, nuclei = hovernet_postprocess(prob, np.zeros((2, 40, 40)))
    assert not inst_map.any() and len(nuclei) == 0


def test_constant_hv_gives_no_nuclei_like_the_reference():
    prob, _, _ = ellipse_maps((64, 64), (32, 30), (9, 7))
    hv = np.zeros((2, 64, 64), np.float32)
    inst_map, nuclei = hovernet_postprocess(prob, hv)
    assert not literal_instance_map(prob, hv).any()
    assert not inst_map.any() and len(nuclei) == 0


def test_one_elongated_nucleus():
    prob, hv, (cx, cy) = ellipse_maps((48, 96), (40.0, 14.0), (18.0, 6.0))
    types = np.zeros((4, 48, 96), np.float32)
    types[0] = 0.5
    types[3][prob > 0] = 1.0
    inst_map, nuclei = hovernet_postprocess(prob, hv, types)
    assert inst_map.max() == 1 and np.array_equal(inst_map > 0, prob > 0)
    assert nuclei.ids.tolist() == [1] and nuclei.types.tolist() == [3]
    assert nuclei.centroids[0] == pytest.approx([cx, cy], abs=1e-12)
    rows, cols = np.nonzero(prob)
    assert nuclei.bboxes[0].tolist() == [[rows.min(), cols.min()], [rows.max() + 1, cols.max() + 1]]
    assert nuclei.type_probs[0] == pytest.approx(1.0, abs=1e-6)


def test_more_than_65535_nuclei_in_a_large_non_square_tile():
    prob, hv, truth = grid_maps(257, 256, size=7, gap=2)
    inst_map, nuclei = hovernet_postprocess(prob, hv, None, magnification=20)
    assert inst_map.shape == (2313, 2304) and inst_map.dtype == np.int32
    assert inst_map.max() == 257 * 256 == len(nuclei) > 65535
    assert relabelling(truth, inst_map) is not None
    expected = np.stack(np.meshgrid(np.arange(256) * 9 + 3.0, np.arange(257) * 9 + 3.0), axis=-1).reshape(-1, 2)
    assert np.array_equal(nuclei.centroids, expected)
    assert all(c.shape == (4, 2) for c in nuclei.contours[:100])


@pytest.mark.parametrize("name", ["nuclei_prob", "hv_map", "type_prob"])
def test_nan_is_an_error_naming_the_map(name):
    maps = {"nuclei_prob": np.zeros((8, 8)), "hv_map": np.zeros((2, 8, 8)), "type_prob": np.zeros((3, 8, 8))}
    maps[name][..., 2, 3] = np.nan
    with pytest.raises(ValueError, match=f"{name} contains NaN"):
        hovernet_postprocess(**maps)


def test_finite_values_whose_sum_overflows_are_accepted():
    prob, hv, _ = ellipse_maps((48, 64), (30.0, 20.0), (12.0, 8.0))
    types = np.full((3, 48, 64), 3.0e38, np.float32)
    types[2][prob > 0] = 3.4e38
    inst_map, nuclei = hovernet_postprocess(prob, hv, types)
    assert nuclei.types.tolist() == [2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(nuclei_prob=np.zeros((1, 8, 8)), hv_map=np.zeros((2, 8, 8))), "nuclei_prob must have shape"),
        (dict(nuclei_prob=np.zeros((8, 8)), hv_map=np.zeros((2, 8, 9))), "hv_map must have shape"),
        (dict(nuclei_prob=np.zeros((8, 8)), hv_map=np.zeros((2, 8, 8)), type_prob=np.zeros((8, 8))), "type_prob"),
        (dict(nuclei_prob=np.zeros((8, 8)), hv_map=np.zeros((2, 8, 8)), magnification=30), "magnification"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hovernet_postprocess(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Per-nucleus extraction and its vectorised pieces


def test_nuclei_with_fewer_than_three_contour_points_stay_in_the_map_only():
    inst_map = np.zeros((30, 40), np.int32)
    inst_map[5, 3:20] = 4  # a straight line: 2 contour points
    inst_map[12:20, 10:22] = 9
    inst_map[25:28, 30:33] = 2
    types = np.zeros((3, 30, 40))
    types[2] = 1.0
    nuclei = nuclei_from_instance_map(inst_map, types)
    assert nuclei.ids.tolist() == [2, 9]
    type_map = nuclei.type_map(inst_map)
    assert (type_map[inst_map == 4] == 0).all() and (type_map[inst_map == 9] == 2).all()
    literal = literal_nuclei(inst_map, types)
    assert_matches_literal(inst_map, nuclei, inst_map, literal)


def test_type_vote_rules():
    inst_map = np.repeat(np.arange(1, 5, dtype=np.int32), 2)[:, None].repeat(10, axis=1)
    # 1: background majority, class 2 runner-up; 2: classes 3 and 1 tie, the smaller id wins;
    # 3: background only; 4: background and class 2 tie, class 2 wins
    rows = [[0, 0, 0, 0, 0, 0, 2, 2, 1, 0], [3, 3, 1, 1, 0, 0, 0, 0, 0, 0], [0] * 10, [0] * 5 + [2] * 5]
    pixel_types = np.repeat(np.array(rows), 2, axis=0)
    one_hot = np.eye(4)[pixel_types].transpose(2, 0, 1)
    nuclei = nuclei_from_instance_map(inst_map, one_hot)
    assert nuclei.types.tolist() == [2, 1, 0, 2]
    assert nuclei.type_probs.tolist() == pytest.approx([0.2, 0.2, 1.0, 0.5], abs=1e-6)
    assert_matches_literal(inst_map, nuclei, inst_map, literal_nuclei(inst_map, one_hot))


def test_non_contiguous_ids_and_wide_dtypes(consep):
    gt = consep["inst_map"][10]
    ids = np.unique(gt)[1:]
    sparse = np.zeros_like(gt, dtype=np.uint64)
    for k, i in enumerate(ids):
        sparse[gt == i] = 1000 + 7 * k
    nuclei = nuclei_from_instance_map(sparse)
    assert_matches_literal(sparse.astype(np.int64), nuclei, sparse.astype(np.int64), literal_nuclei(sparse, None))
    boxes = nuclei.bboxes[:, 0]
    assert np.array_equal(instance_centroids(sparse.astype(np.int64), nuclei.ids, boxes), nuclei.centroids)


@settings(max_examples=100, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 20), st.integers(1, 20)), elements=st.integers(0, 3)))
def test_contours_are_the_first_of_the_contour_tree(inst_map):
    """Nuclei in several pieces, with holes and inside other nuclei: the reference's first RETR_TREE contour."""
    slices = ndimage.find_objects(inst_map)
    ids = np.array([i for i, s in enumerate(slices, 1) if s is not None], np.int64)
    boxes = np.array([[[s[0].start, s[1].start], [s[0].stop, s[1].stop]] for s in slices if s is not None], np.int32)
    for i, box, contour in zip(ids, boxes.reshape(-1, 2, 2), _contours(inst_map, ids, boxes.reshape(-1, 2, 2))):
        crop = (inst_map[box[0, 0] : box[1, 0], box[0, 1] : box[1, 1]] == i).astype(np.uint8)
        expected = cv2.findContours(crop, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0][0].reshape(-1, 2) + box[0, ::-1]
        assert np.array_equal(contour, expected) and contour.dtype == np.int32


def test_instance_map_errors():
    with pytest.raises(ValueError, match="integer"):
        nuclei_from_instance_map(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="negative"):
        nuclei_from_instance_map(-np.ones((4, 4), np.int32))


@settings(max_examples=60, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 24), st.integers(1, 24))))
def test_fill_holes_equals_scipy(binary):
    assert np.array_equal(_fill_holes(binary), ndimage.binary_fill_holes(binary))


def watershed_inputs(seed: int, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Random blobs as mask regions, blobs of several labels as markers (some outside the mask), and a relief
    with ``levels`` distinct heights (0: continuous): height (H, W), markers (H, W), regions (H, W), count."""
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(6, 48, 2))
    mask = ndimage.gaussian_filter(rng.random(shape), 1.5) > rng.uniform(0.45, 0.55)
    regions, n_regions = ndimage.label(mask)
    coarse = (rng.integers(1, 9, (shape[0] // 3 + 1, shape[1] // 3 + 1))
              .repeat(3, 0).repeat(3, 1)[: shape[0], : shape[1]])
    markers = np.where(ndimage.gaussian_filter(rng.random(shape), 1.0) > rng.uniform(0.5, 0.56), coarse, 0)
    height = rng.random(shape)
    if levels:
        height = np.floor(height * levels) / levels
    return -height, markers.astype(np.int32), regions.astype(np.int32), n_regions


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0, 2, 40]))
def test_marker_watershed_equals_skimage(seed, levels):
    height, markers, regions, n_regions = watershed_inputs(seed, levels)
    expected = watershed(height, markers=markers, mask=regions > 0)
    assert np.array_equal(marker_watershed(height, markers, regions, n_regions), expected)


def contested_case(levels: int, tie: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]:
    """The first :func:`watershed_inputs` with a region where markers of several labels meet and, among their
    frontier pixels, a tie in height within a region or none: inputs, frontier indices and framed labels."""
    for seed in range(500):
        height, markers, regions, n_regions = watershed_inputs(seed, levels)
        contested = [r for r in range(1, n_regions + 1) if np.unique(markers[(regions == r) & (markers > 0)]).size > 1]
        if not contested:
            continue
        image, flood, labels = _framed(height, markers, np.isin(regions, contested))
        starts = _frontier(flood, labels)
        if _ties_within_regions(image.ravel()[starts], starts, regions) == tie:
            return height, markers, regions, n_regions, starts, labels
    raise AssertionError(f"no contested case with tie={tie} among 500 seeds")


@pytest.mark.parametrize(("levels", "tie"), [(0, False), (2, True)])
def test_marker_watershed_floods_contested_regions_from_their_frontier_or_the_whole_mask_on_a_tie(levels, tie):
    height, markers, regions, n_regions, starts, labels = contested_case(levels, tie)
    assert 0 < starts.size < np.count_nonzero(labels)  # interior marker pixels are left out
    expected = watershed(height, markers=markers, mask=regions > 0)
    assert np.array_equal(marker_watershed(height, markers, regions, n_regions), expected)


def test_skimage_queues_markers_at_their_own_height():
    """marker_watershed relies on it: markers enter skimage's queue with key (height, age 0), so the lowest marker
    floods first (skimage 0.25.0-0.25.1 queued every marker at -inf, and their order followed the heap layout)."""
    assert watershed(np.array([[5.0, 0, 0, 0, 0]]), np.array([[1, 0, 0, 0, 2]])).tolist() == [[1, 2, 2, 2, 2]]


@settings(max_examples=60, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 24), st.integers(1, 24))), st.integers(1, 6))
def test_large_components_equal_ndimage_label_and_removal(binary, min_size):
    labels, n = _large_components(binary, min_size)
    ref = ndimage.label(binary)[0]
    sizes = np.bincount(ref.ravel())
    ref[(sizes < min_size)[ref]] = 0
    kept = np.unique(ref[ref > 0])
    assert n == kept.size and np.array_equal(labels, np.where(ref > 0, np.searchsorted(kept, ref) + 1, 0))


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 6), st.integers(1, 9), st.integers(1, 9)), elements=st.integers(0, 3)))
def test_argmax_channels_equals_numpy_with_ties(prob):
    assert np.array_equal(_argmax_channels(prob), prob.argmax(axis=0))


# ---------------------------------------------------------------------------------------------------------------
# MONAI transforms: our pair, and MONAI's own HoVerNet post-processing with its problems corrected


def test_array_and_dict_transforms_match_the_function(fixture_maps):
    i = 2
    prob, hv, tp = fixture_maps["nuclei_prob"][i], fixture_maps["hv32"][i], fixture_maps["tp_prob"][i]
    expected_map, expected = hovernet_postprocess(prob, hv, tp)
    np_logits = logits(prob)
    inst_map, type_map, nuclei = HoVerNetPostProcessing()(torch.from_numpy(np_logits), torch.from_numpy(hv), tp)
    assert inst_map.shape == type_map.shape == (1, 256, 256) and inst_map.dtype == type_map.dtype == np.int32
    assert np.array_equal(inst_map[0], expected_map) and np.array_equal(type_map[0], fixture_maps["ref_type"][i])
    assert np.array_equal(nuclei.centroids, expected.centroids)

    sigmoid_map, _, _ = HoVerNetPostProcessing(activation="sigmoid")(np_logits[1:], hv, tp)
    assert np.array_equal(sigmoid_map[0], expected_map)

    out = HoVerNetPostProcessingd()({"nuclei_binary_map": np_logits, "hv_map": hv, "nuclei_type_map": tp, "x": 1})
    assert out["x"] == 1 and np.array_equal(out["inst_map"][0], expected_map)
    assert np.array_equal(out["type_map"][0], fixture_maps["ref_type"][i]) and len(out["nuclei"]) == len(expected)

    untyped = HoVerNetPostProcessingd(keys=("nuclei_binary_map", "hv_map"))({"nuclei_binary_map": np_logits,
                                                                              "hv_map": hv})
    assert np.array_equal(untyped["inst_map"][0], expected_map) and not untyped["type_map"].any()


def test_transform_errors():
    with pytest.raises(ValueError, match="implementation"):
        HoVerNetPostProcessingd(implementation="tiatoolbox")
    with pytest.raises(ValueError, match="magnification"):
        HoVerNetPostProcessing(magnification=10)
    with pytest.raises(KeyError, match="hv_map"):
        HoVerNetPostProcessingd()({"nuclei_binary_map": np.zeros((2, 8, 8))})
    with pytest.raises(ValueError, match="hv_map contains NaN"):
        MonaiHoVerNetPostProcessing()(np.zeros((2, 8, 8)), np.full((2, 8, 8), np.nan))
    with pytest.raises(ValueError, match="2-channel"):
        HoVerNetPostProcessing()(np.zeros((1, 8, 8)), np.zeros((2, 8, 8)))


def test_stock_monai_centroid_is_wrong_for_elongated_nuclei_and_ours_is_right():
    from monai.apps.pathology.transforms.post.array import HoVerNetInstanceMapPostProcessing

    prob, hv, (cx, cy) = ellipse_maps((48, 96), (40.0, 14.0), (18.0, 6.0))
    info, _ = HoVerNetInstanceMapPostProcessing(sobel_kernel_size=21)(logits(prob), hv)
    (stock,) = [entry["centroid"] for entry in info.values()]
    assert np.abs(np.asarray(stock, float) - [cx, cy]).max() > 5  # offsets added in swapped order

    inst_map, type_map, nuclei = MonaiHoVerNetPostProcessing()(logits(prob), hv)
    assert inst_map.max() == 1 and nuclei.ids.tolist() == [1]
    assert nuclei.centroids[0] == pytest.approx([cx, cy], abs=1e-9)


def test_stock_monai_fails_on_constant_hv_and_ours_returns_no_nuclei():
    from monai.apps.pathology.transforms.post.array import HoVerNetInstanceMapPostProcessing

    prob, _, _ = ellipse_maps((64, 64), (30.0, 30.0), (10.0, 7.0))
    hv = np.zeros((2, 64, 64), np.float32)
    with pytest.raises(ValueError, match="hover map"):
        HoVerNetInstanceMapPostProcessing(sobel_kernel_size=21)(logits(prob), hv)
    for transform in (MonaiHoVerNetPostProcessing(), HoVerNetPostProcessing()):
        inst_map, type_map, nuclei = transform(logits(prob), hv, np.ones((3, 64, 64)))
        assert inst_map.shape == (1, 64, 64) and not inst_map.any() and not type_map.any() and len(nuclei) == 0


def test_corrected_monai_agrees_with_stock_monai_and_with_cellvit(fixture_maps):
    from monai.apps.pathology.transforms.post.array import (
        HoVerNetInstanceMapPostProcessing,
        HoVerNetNuclearTypePostProcessing,
    )
    from scripts.nuclei.postprocess_transforms import GaussianBlur3x3

    stock_instances = HoVerNetInstanceMapPostProcessing(sobel_kernel_size=21, distance_smooth_fn=GaussianBlur3x3())
    stock_types = HoVerNetNuclearTypePostProcessing()
    corrected = HoVerNetPostProcessingd(implementation="monai")
    pqs = []
    for i in (0, 9, 13, 20):
        prob, hv, tp = (fixture_maps["nuclei_prob"][i], fixture_maps["hv32"][i],
                        fixture_maps["tp_prob"][i].astype(np.float32))
        out = corrected({"nuclei_binary_map": logits(prob), "hv_map": hv, "nuclei_type_map": tp})
        info, stock_map = stock_instances(logits(prob), hv)
        info, stock_type_map = stock_types(tp, info, stock_map)
        stock_map = stock_map.numpy()[0]
        mapping = relabelling(stock_map, out["inst_map"][0])
        assert mapping is not None
        assert np.array_equal(out["type_map"][0], np.asarray(stock_type_map)[0])
        nuclei = out["nuclei"]
        assert nuclei.ids.tolist() == sorted(mapping[k] for k in info)
        for k, entry in info.items():
            j = int(np.searchsorted(nuclei.ids, mapping[k]))
            assert nuclei.types[j] == entry["type"] and nuclei.type_probs[j] == np.float32(entry["type_prob"])
            (r0, r1, c0, c1) = np.asarray(entry["bounding_box"]).ravel()
            assert nuclei.bboxes[j].tolist() == [[r0, c0], [r1, c1]]
        literal = literal_nuclei(out["inst_map"][0], None)
        assert nuclei.centroids.tolist() == [literal[k]["centroid"] for k in nuclei.ids.tolist()]
        pqs.append(binary_pq(fixture_maps["ref_inst"][i], out["inst_map"][0]))
    assert np.mean(pqs) > 0.9


def test_presets_from_a_config_reproduce_the_defaults_and_change_the_result(fixture_maps):
    from scripts.nuclei.postprocess import MAGNIFICATION_PRESETS, PostProcessSettings, postprocess_settings

    prob, hv, types = fixture_maps["nuclei_prob"][0], fixture_maps["hv32"][0], fixture_maps["tp_prob"][0]
    expected, _ = hovernet_postprocess(prob, hv, types)
    as_yaml = {"40": {"mask_threshold": 0.5, "mask_min_size": 10, "sobel_kernel_size": 21, "marker_threshold": 0.4,
                      "marker_opening_size": 5, "marker_min_size": 10}}
    assert postprocess_settings(40, as_yaml) == MAGNIFICATION_PRESETS[40] == PostProcessSettings()
    assert postprocess_settings(20) == PostProcessSettings(sobel_kernel_size=11, marker_min_size=3)
    np.testing.assert_array_equal(hovernet_postprocess(prob, hv, types, 40, as_yaml)[0], expected)
    strict = {"40": {**as_yaml["40"], "mask_threshold": 0.9}}
    stricter, _ = hovernet_postprocess(prob, hv, types, 40, strict)
    assert 0 < (stricter > 0).sum() < (expected > 0).sum()
    np.testing.assert_array_equal(stricter, literal_instance_map(np.where(prob >= 0.9, prob, 0.0), hv))
    with pytest.raises(ValueError, match=r"preset 40: unknown settings \['blur'\]"):
        postprocess_settings(40, {40: {"blur": 3}})
    with pytest.raises(ValueError, match=r"magnification must be one of \[40\], got 20"):
        HoVerNetPostProcessingd(magnification=20, presets=as_yaml)
