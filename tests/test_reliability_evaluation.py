"""Evaluation pairs images by name only and names every file it cannot read."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from scripts.nuclei.evaluation import evaluate


def maps(k: int) -> tuple[np.ndarray, np.ndarray]:
    """A (32, 32) instance map with k + 1 square nuclei and its type map (all class 1)."""
    inst = np.zeros((32, 32), np.int32)
    for i in range(k + 1):
        inst[2 + 7 * i : 6 + 7 * i, 2:6] = i + 1
    return inst, (inst > 0).astype(np.int32)


def folder(root: Path, names: list[str], order: list[int]) -> Path:
    root.mkdir(parents=True)
    for name, k in zip(names, order):
        inst, types = maps(k)
        np.savez(root / f"{name}.npz", inst_map=inst, type_map=types)
    return root


def test_images_are_paired_by_name_and_unpaired_names_are_listed(tmp_path):
    pred = folder(tmp_path / "pred", ["img_1", "img_2", "img_10"], [0, 1, 2])
    gt = folder(tmp_path / "gt", ["tile_01", "tile_02", "tile_10"], [0, 1, 2])
    with pytest.raises(ValueError) as error:
        evaluate(str(pred), str(gt), num_classes=2)
    message = str(error.value)
    assert "3 ground-truth images without a prediction: tile_01, tile_02, tile_10" in message
    assert "3 predictions without ground truth: img_1, img_10, img_2" in message and "--pair_by_order" in message
    # by order, as asked: folders are in name order, so img_10 meets tile_02 (a different image)
    by_order = evaluate(str(pred), str(gt), num_classes=2, pair_by_order=True)
    assert [r["name"] for r in by_order["per_image"]] == ["tile_01", "tile_02", "tile_10"]
    assert by_order["per_image"][0]["bpq"] == pytest.approx(1.0, abs=1e-5) and by_order["per_image"][1]["bpq"] < 0.9

    same = folder(tmp_path / "pred_named", ["tile_10", "tile_01", "tile_02", "extra"], [2, 0, 1, 0])
    with pytest.raises(ValueError, match=r"1 predictions without ground truth: extra \("):
        evaluate(str(same), str(gt), num_classes=2)
    (same / "extra.npz").unlink()
    result = evaluate(str(same), str(gt), num_classes=2)
    assert result["summary"]["bpq"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kind", ["empty_npy", "empty_npz", "corrupt_npz", "pickled_npy", "truncated_npy"])
def test_an_unreadable_prediction_file_is_named(tmp_path, kind):
    gt = folder(tmp_path / "gt", ["a", "b"], [0, 1])
    pred = folder(tmp_path / "pred", ["a"], [0])
    inst, types = maps(1)
    whole = np.stack([inst, types], -1)
    if kind == "empty_npy":
        bad = pred / "b.npy"
        bad.write_bytes(b"")
    elif kind == "empty_npz":
        bad = pred / "b.npz"
        bad.write_bytes(b"")
    elif kind == "corrupt_npz":
        bad = pred / "b.npz"
        bad.write_bytes(b"PK\x03\x04 not really a zip file")
    elif kind == "pickled_npy":
        bad = pred / "b.npy"
        np.save(bad, np.array([whole, "x"], dtype=object), allow_pickle=True)
    else:
        bad = pred / "b.npy"
        np.save(bad, whole)
        bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}: "):
        evaluate(str(pred), str(gt), num_classes=2)


def test_pickled_objects_in_a_file_are_never_loaded(tmp_path):
    class Boom:
        def __reduce__(self):
            return (Path(tmp_path / "unpickled").touch, ())

    gt = folder(tmp_path / "gt", ["a"], [0])
    (tmp_path / "pred").mkdir()
    np.save(tmp_path / "pred" / "a.npy", np.array([Boom()], dtype=object), allow_pickle=True)
    assert pickle.dumps(Boom())
    with pytest.raises(ValueError, match=r"a\.npy: .*allow_pickle"):
        evaluate(str(tmp_path / "pred"), str(gt), num_classes=2)
    assert not (tmp_path / "unpickled").exists()
