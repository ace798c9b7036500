"""Nucleus primitives (scripts.nuclei.primitives): one type vote, one relabelling, one centroid, used alike by
the dataset code, the post-processing, the metrics and the upscale protocol."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from scripts.data.datasets import cell_counts, instance_types
from scripts.data.transforms import hv_maps
from scripts.inference.upscale import ToLabelSized
from scripts.nuclei.metrics import instance_centroids_and_types, remap_label
from scripts.nuclei.postprocess import hovernet_postprocess, nuclei_from_instance_map
from scripts.nuclei.primitives import centroids, class_histogram, compact_ids, relabel_sequential, vote_types


def _vote_case() -> tuple[np.ndarray, np.ndarray]:
    """Four 2x10 nuclei: 1 background majority with class 2 runner-up; 2 classes 3 and 1 tie; 3 background only;
    4 background and class 2 tie."""
    inst = np.repeat(np.arange(1, 5, dtype=np.int32), 2)[:, None].repeat(10, axis=1)
    rows = [[0, 0, 0, 0, 0, 0, 2, 2, 1, 0], [3, 3, 1, 1, 0, 0, 0, 0, 0, 0], [0] * 10, [0] * 5 + [2] * 5]
    return inst, np.repeat(np.array(rows), 2, axis=0).astype(np.uint8)


def test_vote_types_rule():
    counts = np.array([[6, 1, 2, 0], [6, 2, 0, 2], [10, 0, 0, 0], [5, 0, 5, 0], [1, 3, 3, 0]])
    # background wins only without any foreground pixel; ties go to the smaller class id
    assert vote_types(counts).tolist() == [2, 1, 0, 2, 1]
    assert vote_types(np.array([[4], [0]])).tolist() == [0, 0]
    assert vote_types(np.zeros((0, 3), np.int64)).shape == (0,)


def test_data_postprocessing_and_metrics_vote_alike():
    inst, types = _vote_case()
    expected = [2, 1, 0, 2]
    ids, data_types = instance_types(inst, types, 4)
    assert ids.tolist() == [1, 2, 3, 4] and data_types.tolist() == expected
    # before the common rule the dataset let background win nucleus 1 and counted [2, 1, 1, 0]
    assert cell_counts(inst, types, 4) == [1, 1, 2, 0]
    assert nuclei_from_instance_map(inst, np.eye(4)[types].transpose(2, 0, 1)).types.tolist() == expected
    assert instance_centroids_and_types(inst, types, 4)[1].tolist() == expected


def test_relabel_keeps_every_nucleus_of_a_map_without_background():
    full = np.array([[7, 7, 3], [40, 40, 3]])
    np.testing.assert_array_equal(relabel_sequential(full), [[2, 2, 1], [3, 3, 1]])
    np.testing.assert_array_equal(relabel_sequential(np.array([[0, 7, 7], [40, 0, 3]])), [[0, 2, 2], [3, 0, 1]])
    huge = np.array([[0, 2**40], [5, 2**40]], np.int64)  # the np.unique path
    np.testing.assert_array_equal(compact_ids(huge), [[0, 2], [1, 2]])
    np.testing.assert_array_equal(remap_label(full), relabel_sequential(full))
    assert relabel_sequential(full).dtype == np.int32
    with pytest.raises(ValueError, match="must be >= 0"):
        relabel_sequential(np.array([[-1, 2]]))


def test_centroids_equal_cv2_moments_of_the_crop_and_pixel_means(consep):
    inst = consep["inst_map"][3]
    flat = np.flatnonzero(inst)
    labels = inst.ravel()[flat]
    ids = np.unique(labels)
    origins = np.array([np.argwhere(inst == i).min(axis=0) for i in ids])
    xy = centroids(flat, labels, inst.shape[1], ids, origins)
    for k in range(0, ids.size, 5):
        (r0, c0), (r1, c1) = origins[k], np.argwhere(inst == ids[k]).max(axis=0) + 1
        m = cv2.moments((inst[r0:r1, c0:c1] == ids[k]).astype(np.uint8), binaryImage=True)
        assert xy[k].tolist() == [m["m10"] / m["m00"] + c0, m["m01"] / m["m00"] + r0]
        rows, cols = np.nonzero(inst == ids[k])
        np.testing.assert_allclose(xy[k], [cols.mean(), rows.mean()], rtol=0, atol=1e-9)
    means = centroids(flat, labels, inst.shape[1], ids)
    np.testing.assert_allclose(means, xy, rtol=0, atol=1e-9)
    hist = class_histogram(labels, consep["type_map"][3].ravel()[flat].astype(np.int64), 5, ids)
    assert hist.shape == (ids.size, 5) and hist.sum() == flat.size


def test_all_nucleus_tile_keeps_its_smallest_id():
    """Deviation from the reference: it drops the first unique id of a map without background (it takes that
    value for the background); here both halves of a tile that is nucleus everywhere keep their entry."""
    gt = np.ones((48, 64), np.int32)
    gt[:, 32:] = 2
    inst_map, nuclei = hovernet_postprocess(np.ones(gt.shape), hv_maps(gt))
    np.testing.assert_array_equal(inst_map, gt)
    assert nuclei.ids.tolist() == [1, 2]
    reference_ids = np.unique(inst_map)[1:]
    assert reference_ids.tolist() == [2]


def test_upscale_keeps_the_first_nucleus_of_a_full_tile():
    pred_inst = np.ones((1, 8, 8), np.int32)
    pred_inst[0, :, 4:] = 2
    data = {"pred": {"inst_map": pred_inst, "type_map": np.ones((1, 8, 8), np.int32)},
            "label": {"inst_map": np.zeros((1, 4, 4), np.int32)}}
    out = ToLabelSized(num_classes=2)(data)["pred"]
    np.testing.assert_array_equal(out["inst_map"][0], np.repeat([[1, 1, 2, 2]], 4, axis=0))
    assert out["nuclei"].ids.tolist() == [1, 2] and out["nuclei"].types.tolist() == [1, 1]
