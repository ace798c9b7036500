"""The PQ metric family against the field's references on real CoNSeP patches, MONAI, and properties."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import permutations
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.metrics import PanopticQualityMetric, compute_panoptic_quality
from scipy.optimize import linear_sum_assignment

from scripts.nuclei import metrics as M

NUM_CLASSES = 5  # CoNSeP: background + other, inflammatory, epithelial, spindle
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fixture_maps(fixtures_dir: Path) -> dict[str, np.ndarray]:
    with np.load(fixtures_dir / "postprocess_consep.npz") as d:
        return {k: d[k] for k in ("gt_inst", "gt_type", "ref_inst", "ref_type")}


@pytest.fixture(scope="module")
def reference(fixtures_dir: Path) -> dict:
    return json.loads((fixtures_dir / "reference_results.json").read_text())


@pytest.fixture(scope="module")
def fixture_scores(fixture_maps: dict[str, np.ndarray]) -> list[M.ImageScores]:
    m = fixture_maps
    return [
        M.evaluate_image(m["gt_inst"][i], m["gt_type"][i], m["ref_inst"][i], m["ref_type"][i], NUM_CLASSES)
        for i in range(len(m["gt_inst"]))
    ]


# --- exactness against reference_results.json (hover_net / CoNIC code run on the fixture) -------------------------


def test_every_patch_equals_reference(fixture_scores: list[M.ImageScores], reference: dict) -> None:
    assert len(fixture_scores) == len(reference["per_image"]) == 40
    for score, ref in zip(fixture_scores, reference["per_image"]):
        np.testing.assert_allclose(score.binary_quality, ref["binary_dq_sq_pq"], rtol=0, atol=1e-9)
        assert score.aji == pytest.approx(ref["aji"], abs=1e-9)
        assert score.aji_plus == pytest.approx(ref["aji_plus"], abs=1e-9)
        for c in range(1, NUM_CLASSES):
            expected = ref["dq_sq_pq_per_class"][str(c)]
            if expected is None:
                assert np.isnan(score.class_quality[c - 1]).all()
            else:
                np.testing.assert_allclose(score.class_quality[c - 1], expected, rtol=0, atol=1e-9)


def test_summary_equals_reference(fixture_scores: list[M.ImageScores], reference: dict) -> None:
    ref = reference["summary"]
    summary = M.summarize(fixture_scores, NUM_CLASSES)
    assert summary["bpq"] == pytest.approx(ref["bpq_mean"], abs=1e-9)
    assert summary["aji"] == pytest.approx(ref["aji_mean"], abs=1e-9)
    assert summary["mpq"] == pytest.approx(ref["mpq_pannuke_style"], abs=1e-9)
    assert summary["mpq_plus"] == pytest.approx(ref["conic_mpq_plus"], abs=1e-9)
    assert [c["pq_plus"] for c in summary["per_class"]] == pytest.approx(ref["conic_pq_per_class"], abs=1e-9)
    counts = [[c["tp"], c["fp"], c["fn"], c["iou_sum"]] for c in summary["per_class"]]
    np.testing.assert_allclose(counts, ref["conic_counts_tp_fp_fn_iou_per_class"], rtol=0, atol=1e-9)
    assert (summary["bpq"], summary["aji"], summary["mpq"], summary["mpq_plus"]) == pytest.approx(
        (0.8279, 0.8303, 0.8002, 0.8019), abs=5e-5
    )


def test_centroids_and_types_equal_reference_cells(fixture_maps: dict[str, np.ndarray], reference: dict) -> None:
    cells = reference["cells"]
    for i in range(40):
        xy, types = M.instance_centroids_and_types(fixture_maps["ref_inst"][i], fixture_maps["ref_type"][i],
                                                   NUM_CLASSES)
        mine = sorted((c for c in cells if c["patch"] == i), key=lambda c: c["id"])
        assert [c["id"] for c in mine] == list(range(1, len(mine) + 1))
        np.testing.assert_allclose(xy, [c["centroid_xy"] for c in mine], rtol=0, atol=1e-9)
        np.testing.assert_array_equal(types, [c["type"] for c in mine])


# --- MONAI ---------------------------------------------------------------------------------------------------------


def _monai_counts(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    out = compute_panoptic_quality(torch.as_tensor(pred), torch.as_tensor(gt), output_confusion_matrix=True)
    return out.double().numpy()


def test_matches_monai_compute_panoptic_quality(fixture_maps: dict[str, np.ndarray]) -> None:
    m = fixture_maps
    for i in range(0, 40, 3):
        gi, gt, pi, pt = m["gt_inst"][i], m["gt_type"][i], m["ref_inst"][i], m["ref_type"][i]
        binary, per_class = M.class_overlaps(gi, gt, pi, pt, NUM_CLASSES)
        pairs = [(binary, pi, gi)] + [(o, pi * (pt == c), gi * (gt == c)) for c, o in enumerate(per_class, 1)]
        for overlap, pred_c, gt_c in pairs:
            ours = M.pq_counts(overlap)
            theirs = _monai_counts(pred_c, gt_c)
            np.testing.assert_array_equal(ours[:3], theirs[:3])
            assert ours[3] == pytest.approx(theirs[3], abs=1e-5 * max(1.0, ours[0]))
            if ours[0] + ours[2] > 0:
                monai_pq = compute_panoptic_quality(torch.as_tensor(pred_c), torch.as_tensor(gt_c)).item()
                assert M.quality_from_counts(ours)[2] == pytest.approx(monai_pq, abs=1e-5)


def test_mpq_plus_matches_monai_panoptic_quality_metric(fixture_scores, fixture_maps) -> None:
    m = fixture_maps
    metric = PanopticQualityMetric(num_classes=NUM_CLASSES - 1)
    for start in range(0, 40, 8):
        sl = slice(start, start + 8)
        y = torch.as_tensor(np.stack([m["gt_inst"][sl], m["gt_type"][sl]], axis=1))
        y_pred = torch.as_tensor(np.stack([m["ref_inst"][sl], m["ref_type"][sl]], axis=1))
        metric(y_pred=y_pred, y=y)
    monai_pq = metric.aggregate().double().numpy()
    summary = M.summarize(fixture_scores, NUM_CLASSES)
    np.testing.assert_allclose([c["pq_plus"] for c in summary["per_class"]], monai_pq, rtol=0, atol=1e-5)
    assert summary["mpq_plus"] == pytest.approx(monai_pq.mean(), abs=1e-5)


# --- scale, odd ids, the sparse path -------------------------------------------------------------------------------


def _mosaic(maps: np.ndarray, n: int) -> np.ndarray:
    """Tile n*n instance maps (n*n, H, W) into one (n*H, n*W) map with disjoint ids."""
    offsets = np.concatenate([[0], np.cumsum(maps.reshape(len(maps), -1).max(axis=1))[:-1]])
    shifted = np.where(maps > 0, maps + offsets[:, None, None], 0)
    rows = [np.concatenate(list(shifted[r * n : (r + 1) * n]), axis=1) for r in range(n)]
    return np.concatenate(rows, axis=0)


def test_large_tile_equals_sum_of_its_patches(fixture_maps, fixture_scores) -> None:
    m = fixture_maps
    idx = np.arange(16)
    gi, pi = _mosaic(m["gt_inst"][idx], 4), _mosaic(m["ref_inst"][idx], 4)
    gt = np.concatenate([np.concatenate(list(m["gt_type"][idx][r * 4 : (r + 1) * 4]), axis=1) for r in range(4)])
    pt = np.concatenate([np.concatenate(list(m["ref_type"][idx][r * 4 : (r + 1) * 4]), axis=1) for r in range(4)])
    big = M.evaluate_image(gi, gt, pi, pt, NUM_CLASSES)
    parts = [fixture_scores[i] for i in idx]
    np.testing.assert_allclose(big.binary_counts, sum(s.binary_counts for s in parts), rtol=1e-12)
    np.testing.assert_allclose(big.class_counts, sum(s.class_counts for s in parts), rtol=1e-12)
    overlaps = [M.instance_overlap(m["gt_inst"][i], m["ref_inst"][i]) for i in idx]
    expected_dice = (2 * sum(o.inter.sum() for o in overlaps)
                     / sum(o.gt_area.sum() + o.pred_area.sum() for o in overlaps))
    assert big.dice == pytest.approx(expected_dice, abs=1e-12)


def test_huge_and_sparse_ids_change_nothing(fixture_maps) -> None:
    m = fixture_maps
    rng = np.random.default_rng(0)
    gi, gt, pi, pt = m["gt_inst"][5], m["gt_type"][5], m["ref_inst"][5], m["ref_type"][5]
    lut_g = np.concatenate([[0], np.sort(rng.choice(2**31 - 1, gi.max(), replace=False) + 1)])
    lut_p = np.concatenate([[0], rng.permutation(np.arange(1, pi.max() + 1) * 7919)])
    a = M.evaluate_image(gi, gt, pi, pt, NUM_CLASSES)
    b = M.evaluate_image(lut_g[gi].astype(np.int64), gt, lut_p[pi], pt, NUM_CLASSES)
    _assert_same_scores(a, b)


def _square_grid(n: int, size: int, pitch: int, shift: int) -> np.ndarray:
    """(n*pitch, n*pitch) map of n*n squares of side ``size``, moved by ``shift`` pixels down and right."""
    r = np.arange(n * pitch) - shift
    inside = (r >= 0) & (r % pitch < size)
    cell = np.where(inside, r // pitch, -1)
    ids = cell[:, None] * n + cell[None, :] + 1
    return np.where(inside[:, None] & inside[None, :], ids, 0)


def test_thousands_of_nuclei_take_the_sorted_pair_histogram() -> None:
    # 4096 squares of 6x6 and the same squares moved by one pixel: every pair overlaps 5x5 = 25 of 36 + 36 - 25 = 47
    n = 64 * 64
    gt, moved = _square_grid(64, 6, 8, 0), _square_grid(64, 6, 8, 1)
    pred = np.where(moved > 0, np.random.default_rng(3).permutation(n)[moved - 1] + 1, 0)
    assert n * n > 4 * np.count_nonzero(gt | pred)  # too many pairs for a dense histogram
    gt_type = np.where(gt > 0, (gt - 1) % 4 + 1, 0)
    pred_type = np.roll(gt_type, (1, 1), axis=(0, 1))  # each moved square keeps its class
    score = M.evaluate_image(gt, gt_type, pred, pred_type, NUM_CLASSES, detection_radius_px=None)
    np.testing.assert_allclose(score.binary_counts, [n, 0, 0, n * 25 / 47], rtol=1e-12)
    np.testing.assert_allclose(score.class_counts, [[n / 4, 0, 0, n / 4 * 25 / 47]] * 4, rtol=1e-12)
    assert score.aji == pytest.approx(25 / 47, abs=1e-12) and score.aji_plus == pytest.approx(25 / 47, abs=1e-12)
    assert score.dice == pytest.approx(25 / 36, abs=1e-12)


def _class_counts_by_definition(gi: np.ndarray, gt: np.ndarray, pi: np.ndarray, pt: np.ndarray, c: int) -> list[float]:
    """[TP, FP, FN, sum IoU] of the class-c instances ``inst * (type == c)``, one pair of masks at a time."""
    g_c, p_c = gi * (gt == c), pi * (pt == c)
    g_ids, p_ids = np.unique(g_c[g_c > 0]), np.unique(p_c[p_c > 0])
    ious = []
    for g in g_ids:
        gm = g_c == g
        for p in np.unique(p_c[gm & (p_c > 0)]):
            pm = p_c == p
            iou = (gm & pm).sum() / (gm | pm).sum()
            if iou > 0.5:
                ious.append(iou)
    return [len(ious), len(p_ids) - len(ious), len(g_ids) - len(ious), sum(ious)]


def test_nuclei_of_several_classes_match_the_definition(fixture_maps) -> None:
    # nuclei get a second class on vertical stripes 6 px wide: class overlaps need the class of each pixel
    m = fixture_maps
    cols = np.arange(256)[None, :]
    for i in (2, 17, 31):
        gi, pi = m["gt_inst"][i], m["ref_inst"][i]
        gt = np.where((gi > 0) & (cols // 6 % 2 == 1), m["gt_type"][i] % (NUM_CLASSES - 1) + 1, m["gt_type"][i])
        pt = np.where((pi > 0) & ((cols + 1) // 6 % 2 == 1), m["ref_type"][i] % (NUM_CLASSES - 1) + 1, m["ref_type"][i])
        gts = M._instances(gi, np.flatnonzero(gi), gt, NUM_CLASSES)
        assert not M._single_class(gts)
        score = M.evaluate_image(gi, gt, pi, pt, NUM_CLASSES, detection_radius_px=None)
        expected = [_class_counts_by_definition(gi, gt, pi, pt, c) for c in range(1, NUM_CLASSES)]
        np.testing.assert_allclose(score.class_counts, expected, rtol=1e-12)
        _, per_class = M.class_overlaps(gi, gt, pi, pt, NUM_CLASSES)
        np.testing.assert_allclose([M.pq_counts(o) for o in per_class], expected, rtol=1e-12)


def _assert_same_scores(a: M.ImageScores, b: M.ImageScores) -> None:
    np.testing.assert_allclose(a.binary_counts, b.binary_counts, rtol=1e-12)
    np.testing.assert_allclose(a.binary_quality, b.binary_quality, rtol=1e-12)
    np.testing.assert_allclose(a.class_counts, b.class_counts, rtol=1e-12)
    np.testing.assert_allclose(a.class_quality, b.class_quality, rtol=1e-12)
    np.testing.assert_allclose(
        [a.aji, a.aji_plus, a.dice, a.jaccard], [b.aji, b.aji_plus, b.dice, b.jaccard], rtol=1e-12
    )


# --- independent brute-force definitions for property tests ------------------------------------------------------


def _masks(inst: np.ndarray) -> list[np.ndarray]:
    return [inst == k for k in np.unique(inst) if k != 0]


def _naive_aji(gt: np.ndarray, pred: np.ndarray, plus: bool) -> float:
    """MoNuSeg AJI / AJI+ straight from the definition, one mask at a time."""
    gms, pms = _masks(gt), _masks(pred)
    inter = np.array([[np.logical_and(g, p).sum() for p in pms] for g in gms], dtype=float).reshape(len(gms), len(pms))
    union = np.array([[np.logical_or(g, p).sum() for p in pms] for g in gms], dtype=float).reshape(inter.shape)
    iou = inter / (union + 1e-6)
    if plus:
        rows, cols = linear_sum_assignment(-iou)
        keep = iou[rows, cols] > 0
        pairs = list(zip(rows[keep], cols[keep]))
    else:
        pairs = [(g, int(np.argmax(iou[g]))) for g in range(len(gms)) if len(pms) and iou[g].max() > 0]
    used_g, used_p = {g for g, _ in pairs}, {p for _, p in pairs}
    total_inter = sum(inter[g, p] for g, p in pairs)
    total_union = sum(union[g, p] for g, p in pairs)
    total_union += sum(gms[g].sum() for g in range(len(gms)) if g not in used_g)
    total_union += sum(pms[p].sum() for p in range(len(pms)) if p not in used_p)
    return total_inter / total_union if total_union else float("nan")


@st.composite
def label_maps(draw: st.DrawFn, size: int = 20, max_objects: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """(inst, type) maps painted with overlapping rectangles: touching nuclei, non-contiguous ids."""
    inst = np.zeros((size, size), dtype=np.int32)
    types = np.zeros((size, size), dtype=np.int32)
    for _ in range(draw(st.integers(0, max_objects))):
        r, c = draw(st.integers(0, size - 2)), draw(st.integers(0, size - 2))
        h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        inst[r : r + h, c : c + w] = draw(st.integers(1, 60))
        types[r : r + h, c : c + w] = draw(st.integers(1, NUM_CLASSES - 1))
    types[inst == 0] = 0
    return inst, types


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(label_maps(), label_maps())
def test_random_maps_match_monai_and_brute_force(gt: tuple, pred: tuple) -> None:
    (gi, gt_t), (pi, pt) = gt, pred
    score = M.evaluate_image(gi, gt_t, pi, pt, NUM_CLASSES)
    np.testing.assert_allclose(score.binary_counts, _monai_counts(pi, gi), atol=1e-5)
    for c in range(1, NUM_CLASSES):
        np.testing.assert_allclose(score.class_counts[c - 1], _monai_counts(pi * (pt == c), gi * (gt_t == c)),
                                   atol=1e-5)
    overlap = M.instance_overlap(gi, pi)
    for thr in (0.3, 0.75):
        monai = compute_panoptic_quality(
            torch.as_tensor(pi), torch.as_tensor(gi), match_iou_threshold=thr, output_confusion_matrix=True
        )
        np.testing.assert_allclose(M.pq_counts(overlap, thr), monai.double().numpy(), atol=1e-5)
    np.testing.assert_allclose(score.aji, _naive_aji(gi, pi, plus=False), atol=1e-12)
    np.testing.assert_allclose(score.aji_plus, _naive_aji(gi, pi, plus=True), atol=1e-12)
    fg_g, fg_p = gi > 0, pi > 0
    if fg_g.any() or fg_p.any():
        inter = (fg_g & fg_p).sum()
        assert score.dice == pytest.approx(2 * inter / (fg_g.sum() + fg_p.sum()), abs=1e-12)
        assert score.jaccard == pytest.approx(inter / (fg_g | fg_p).sum(), abs=1e-12)


@PROPERTY
@given(label_maps(), label_maps(), st.randoms(use_true_random=False))
def test_permuting_ids_changes_nothing(gt: tuple, pred: tuple, rnd) -> None:
    (gi, gt_t), (pi, pt) = gt, pred
    perm_g = np.array([0] + rnd.sample(range(1, 1000), 60))
    perm_p = np.array([0] + rnd.sample(range(1, 1000), 60))
    a = M.evaluate_image(gi, gt_t, pi, pt, NUM_CLASSES)
    b = M.evaluate_image(perm_g[gi], gt_t, perm_p[pi], pt, NUM_CLASSES)
    _assert_same_scores(a, b)
    summary_a, summary_b = M.summarize([a], NUM_CLASSES), M.summarize([b], NUM_CLASSES)
    # Equidistant centroids make the Hungarian pairing ambiguous: which pair is kept may follow the id
    # order and move a match between classes, but never changes how many pairs there are.
    for summary in (summary_a, summary_b):
        for row in summary["per_class"]:
            for key in [k for k in row if k.startswith("detection")]:
                del row[key]
    assert json.dumps(summary_a) == json.dumps(summary_b)


@PROPERTY
@given(label_maps())
def test_prediction_equal_to_ground_truth_scores_one(gt: tuple) -> None:
    gi, gt_t = gt
    score = M.evaluate_image(gi, gt_t, gi, gt_t, NUM_CLASSES)
    if gi.max() == 0:
        assert np.isnan(score.binary_quality).all() and np.isnan(score.aji) and np.isnan(score.jaccard)
        assert score.dice == 0.0  # the official convention for an image where both maps are empty
        return
    np.testing.assert_allclose(score.binary_quality, 1.0, atol=1e-6)
    assert score.aji == score.aji_plus == score.dice == score.jaccard == 1.0
    present = ~np.isnan(score.class_quality[:, 2])
    assert present.any()
    np.testing.assert_allclose(score.class_quality[present], 1.0, atol=1e-6)
    summary = M.summarize([score], NUM_CLASSES)
    assert summary["detection_f1"] == 1.0
    assert summary["mpq"] == pytest.approx(1.0, abs=1e-6)


@PROPERTY
@given(label_maps(), label_maps())
def test_swapping_prediction_and_ground_truth_keeps_pq(gt: tuple, pred: tuple) -> None:
    (gi, gt_t), (pi, pt) = gt, pred
    a = M.evaluate_image(gi, gt_t, pi, pt, NUM_CLASSES)
    b = M.evaluate_image(pi, pt, gi, gt_t, NUM_CLASSES)
    np.testing.assert_allclose(b.binary_counts, a.binary_counts[[0, 2, 1, 3]], rtol=1e-12)
    if gi.max() > 0 and pi.max() > 0:
        np.testing.assert_allclose(a.binary_quality, b.binary_quality, rtol=1e-12)
    assert a.dice == pytest.approx(b.dice, nan_ok=True) and a.aji_plus == pytest.approx(b.aji_plus, nan_ok=True)


@PROPERTY
@given(st.lists(st.tuples(label_maps(), label_maps()), min_size=1, max_size=4), label_maps())
def test_adding_an_empty_image(pairs: list, pred_only: tuple) -> None:
    scores = [M.evaluate_image(g[0], g[1], p[0], p[1], NUM_CLASSES) for g, p in pairs]
    base = M.summarize(scores, NUM_CLASSES)
    empty = np.zeros((20, 20), dtype=np.int32)
    both_empty = M.summarize(scores + [M.evaluate_image(empty, empty, empty, empty, NUM_CLASSES)], NUM_CLASSES)
    for key in set(M.METRIC_KEYS) - {"dice"}:
        assert both_empty[key] == pytest.approx(base[key], nan_ok=True, abs=1e-12), key
    # Dice counts it as 0 (the official convention): every image has a Dice, the new one lowers the mean
    assert both_empty["dice"] == pytest.approx(base["dice"] * len(scores) / (len(scores) + 1), abs=1e-12)
    assert both_empty["n_images"] == base["n_images"] + 1
    # nuclei predicted where the ground truth has none: excluded from bPQ and mPQ (PanNuke), counted as
    # false positives by mPQ+ (CoNIC) and detection, and a Dice of 0
    pi, pt = pred_only
    if pi.max() == 0:
        return
    fp_image = M.evaluate_image(empty, empty, pi, pt, NUM_CLASSES)
    with_fp = M.summarize(scores + [fp_image], NUM_CLASSES)
    for key in ("bpq", "bdq", "bsq", "mpq"):
        assert with_fp[key] == pytest.approx(base[key], nan_ok=True, abs=1e-12), key
    assert fp_image.dice == 0.0 and fp_image.aji == 0.0
    assert with_fp["detection_fp"] == base["detection_fp"] + len(np.unique(pi)) - 1
    fp_classes = {c["name"]: c["fp"] for c in with_fp["per_class"]}
    for c, entry in enumerate(base["per_class"], 1):
        n_fp = len(np.unique(pi[pt == c])) - (0 in np.unique(pi[pt == c]))
        assert fp_classes[entry["name"]] == entry["fp"] + n_fp


# --- detection -----------------------------------------------------------------------------------------------------


def _disk_map(points: list[tuple[float, float]], types: list[int], size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    inst = np.zeros((size, size), dtype=np.int32)
    tmap = np.zeros((size, size), dtype=np.int32)
    for k, ((x, y), t) in enumerate(zip(points, types), 1):
        disk = (xx - x) ** 2 + (yy - y) ** 2 <= 4
        inst[disk], tmap[disk] = k, t
    return inst, tmap


def test_detection_counts_by_hand() -> None:
    # GT: A(10,10) t1, B(50,10) t2, C(80,80) t1; prediction: a(13,14) t1 -> A (5 px), b(50,18) t1 -> B (8 px),
    # d(30,60) t2 unmatched; C unmatched.
    gi, gt = _disk_map([(10, 10), (50, 10), (80, 80)], [1, 2, 1])
    pi, pt = _disk_map([(13, 14), (50, 18), (30, 60)], [1, 1, 2])
    score = M.evaluate_image(gi, gt, pi, pt, 3, detection_radius_px=12.0)
    det = M.detection_scores([score.detection], 3)
    assert (det["tp"], det["fp"], det["fn"]) == (2, 1, 1)
    assert det["f1"] == pytest.approx(4 / 6)
    # class 1: pairs (A,a) both 1 -> tp 1; (B,b) pred 1 only -> fp_dt 1; unpaired: fn_d = C (1), fp_d = 0
    c1 = det["per_class"][0]
    assert c1["f1"] == pytest.approx(2 / (2 + 2 + 0 + 0 + 1))
    assert c1["precision"] == pytest.approx(1 / (1 + 2 + 0))
    assert c1["recall"] == pytest.approx(1 / (1 + 0 + 1))
    # class 2: (B,b) GT 2 only -> fn_dt 1; unpaired prediction d -> fp_d 1; tp 0
    c2 = det["per_class"][1]
    assert c2["f1"] == 0.0 and c2["precision"] == 0.0 and c2["recall"] == 0.0
    # a 6-pixel radius (20x) loses the 8-pixel pair
    narrow = M.evaluate_image(gi, gt, pi, pt, 3, detection_radius_px=6.0)
    assert M.detection_scores([narrow.detection], 3)["tp"] == 1


def test_detection_dummy_point_switch() -> None:
    empty = np.zeros((96, 96), dtype=np.int32)
    pi, pt = _disk_map([(3, 4)], [1])
    fixed = M.evaluate_image(empty, empty, pi, pt, 2)
    quirk = M.evaluate_image(empty, empty, pi, pt, 2, dummy_points=True)
    assert M.detection_scores([fixed.detection], 2)["fp"] == 1
    det = M.detection_scores([quirk.detection], 2)
    assert (det["tp"], det["fp"], det["fn"]) == (1, 0, 0)  # the dummy (0, 0) GT point pairs with (3, 4)
    both_empty = M.evaluate_image(empty, empty, empty, empty, 2, dummy_points=True)
    assert M.detection_scores([both_empty.detection], 2)["tp"] == 1


def test_detection_on_real_data_matches_pairwise_definition(fixture_maps, fixture_scores) -> None:
    """Pooled detection scores against a per-pair loop over hover_net's definition (12 px at 40x)."""
    m = fixture_maps
    paired, unpaired_gt, unpaired_pred = [], [], []
    for i in range(40):
        gxy, gtype = M.instance_centroids_and_types(m["gt_inst"][i], m["gt_type"][i], NUM_CLASSES)
        pxy, ptype = M.instance_centroids_and_types(m["ref_inst"][i], m["ref_type"][i], NUM_CLASSES)
        dist = np.linalg.norm(gxy[:, None] - pxy[None], axis=-1)
        rows, cols = linear_sum_assignment(dist)
        ok = dist[rows, cols] <= 12
        paired += [(gtype[r], ptype[c]) for r, c in zip(rows[ok], cols[ok])]
        unpaired_gt += [gtype[r] for r in set(range(len(gxy))) - set(rows[ok])]
        unpaired_pred += [ptype[c] for c in set(range(len(pxy))) - set(cols[ok])]
    summary = M.summarize(fixture_scores, NUM_CLASSES)
    tp, fp, fn = len(paired), len(unpaired_pred), len(unpaired_gt)
    assert (summary["detection_tp"], summary["detection_fp"], summary["detection_fn"]) == (tp, fp, fn)
    assert summary["detection_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    for t in range(1, NUM_CLASSES):
        tp_t = sum(1 for g, p in paired if g == t and p == t)
        fp_dt = sum(1 for g, p in paired if g != t and p == t)
        fn_dt = sum(1 for g, p in paired if g == t and p != t)
        fp_d, fn_d = unpaired_pred.count(t), unpaired_gt.count(t)
        f1 = 2 * tp_t / (2 * tp_t + 2 * fp_dt + 2 * fn_dt + fp_d + fn_d)
        assert summary["per_class"][t - 1]["detection_f1"] == pytest.approx(f1, abs=1e-12)
    assert 0.85 < summary["detection_f1"] < 0.99


# --- tissues, robustness, errors -----------------------------------------------------------------------------------


def test_per_tissue_summary_restricts_the_means(fixture_scores, reference) -> None:
    scores = [M.ImageScores(**{**s.__dict__, "tissue": "a" if i % 3 else "b"}) for i, s in enumerate(fixture_scores)]
    summary = M.summarize(scores, NUM_CLASSES, ["background", "other", "inflammatory", "epithelial", "spindle"])
    for tissue, keep in (("a", lambda i: i % 3 != 0), ("b", lambda i: i % 3 == 0)):
        expected = np.mean([r["binary_dq_sq_pq"][2] for i, r in enumerate(reference["per_image"]) if keep(i)])
        assert summary["per_tissue"][tissue]["bpq"] == pytest.approx(expected, abs=1e-12)
    assert [c["name"] for c in summary["per_class"]] == ["other", "inflammatory", "epithelial", "spindle"]


def test_empty_and_degenerate_images() -> None:
    empty = np.zeros((8, 8), dtype=np.int32)
    score = M.evaluate_image(empty, empty, empty, empty, 3)
    assert np.isnan(score.binary_quality).all() and np.isnan(score.class_quality).all()
    assert np.isnan([score.aji, score.aji_plus, score.jaccard]).all() and score.dice == 0.0
    summary = M.summarize([score], 3)
    assert np.isnan(summary["bpq"]) and np.isnan(summary["mpq"]) and summary["mpq_plus"] == 0.0
    one = empty.copy()
    one[2:5, 2:5] = 9
    missed = M.evaluate_image(one, one // 9, empty, empty, 3)
    np.testing.assert_array_equal(missed.binary_counts, [0, 0, 1, 0])
    assert missed.binary_quality[2] == 0.0 and missed.aji == 0.0 and missed.dice == 0.0
    assert len(M.summarize([], 3)["per_class"]) == 2


def test_predicted_nuclei_typed_background_are_not_scored(fixture_maps) -> None:
    """The protocol scores the typed prediction: nuclei the type vote calls background (no foreground pixel; nuclei
    without a valid contour are typed so) are left out of every score, checked against MONAI on the real maps
    with those nuclei removed by hand. A binary evaluation (one class) has no types and keeps them."""
    m = fixture_maps
    for i in range(0, 40, 4):
        gi, gt, pi, pt = m["gt_inst"][i], m["gt_type"][i], m["ref_inst"][i], m["ref_type"][i].copy()
        ids = np.unique(pi)[1:]
        dropped = ids[::3]
        pt[np.isin(pi, dropped)] = 0
        partly = np.argwhere(pi == ids[1])  # one foreground pixel is enough to keep a nucleus
        pt[tuple(partly.T)] = 0
        pt[tuple(partly[0])] = 2
        typed = np.where(np.isin(pi, dropped), 0, pi)
        score = M.evaluate_image(gi, gt, pi, pt, NUM_CLASSES)
        np.testing.assert_allclose(score.binary_counts, _monai_counts(typed, gi), atol=1e-5)
        _assert_same_scores(score, M.evaluate_image(gi, gt, typed, pt, NUM_CLASSES))
        detected = score.detection.paired_pred_types.size + score.detection.unpaired_pred_types.size
        assert detected == len(ids) - len(dropped) and 0 not in score.detection.unpaired_pred_types
        binary = M.evaluate_image(gi, gt * 0, pi, pt * 0, 1)
        np.testing.assert_allclose(binary.binary_counts, _monai_counts(pi, gi), atol=1e-5)
        assert binary.binary_counts[:2].sum() == len(ids) and score.binary_counts[:2].sum() == len(ids) - len(dropped)


def test_bad_input_raises_clear_errors() -> None:
    a = np.zeros((4, 4), dtype=np.int32)
    with pytest.raises(ValueError, match="differ in shape"):
        M.instance_overlap(a, np.zeros((4, 5), dtype=np.int32))
    with pytest.raises(ValueError, match="negative"):
        M.instance_overlap(a - 1, a)
    with pytest.raises(ValueError, match="integer labels"):
        M.instance_overlap(a + 0.5, a)
    with pytest.raises(ValueError, match="integer labels"):
        M.instance_overlap(np.full((4, 4), np.nan), a)
    with pytest.raises(ValueError, match="2-D"):
        M.instance_overlap(a[None], a[None])
    with pytest.raises(ValueError, match="holds class 3 but num_classes is 3"):
        M.evaluate_image(a, a + 3, a, a, 3)
    with pytest.raises(ValueError, match="iou_threshold"):
        M.pq_counts(M.instance_overlap(a, a), 0.0)
    with pytest.raises(ValueError, match="class_names"):
        M.summarize([], 3, ["background", "x"])


def test_float_and_bool_maps_are_accepted() -> None:
    inst = np.zeros((6, 6))
    inst[1:4, 1:4] = 2.0
    assert M.panoptic_quality(inst, inst.astype(np.int16))[0] == 1.0
    assert M.panoptic_quality(inst > 0, inst)[0] == 1.0
    np.testing.assert_array_equal(M.remap_label(inst * 7), (inst > 0).astype(np.int32))


def test_overlap_pairs_are_exhaustive_and_sorted() -> None:
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [0, 3, 3, 0], [0, 3, 3, 0]])
    pred = np.array([[5, 5, 5, 0], [5, 5, 5, 0], [0, 4, 4, 4], [0, 0, 0, 0]])
    o = M.instance_overlap(gt, pred)
    np.testing.assert_array_equal(o.gt_area, [4, 4, 4])
    np.testing.assert_array_equal(o.pred_area, [3, 6])  # ids 4, 5 in ascending order
    got = list(zip(o.gt_index.tolist(), o.pred_index.tolist(), o.inter.tolist()))
    assert got == [(0, 1, 4), (1, 1, 2), (2, 0, 2)]
    assert got == sorted(got)
    for perm in permutations([1, 2, 3]):
        lut = np.array([0, *perm])
        assert M.pq_counts(M.instance_overlap(lut[gt], pred)).tolist() == M.pq_counts(o).tolist()


def test_metrics_module_does_not_import_torch() -> None:
    code = "import sys, scripts.nuclei.metrics, scripts.nuclei.evaluation; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT / "bundles" / "cellvta", capture_output=True)
    assert result.returncode == 0, result.stderr.decode()
