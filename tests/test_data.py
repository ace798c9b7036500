"""Dataset layout (scripts.data.datasets) and oversampling weights (scripts.data.sampling)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scripts.data.datasets import (
    DatasetWriter,
    cell_counts,
    class_names,
    dataset_list,
    instance_types,
    read_image,
    read_info,
    read_label,
    relabel_sequential,
    split_groups,
    tissue_names,
)
from scripts.data.sampling import CellTissueSampler, cell_weights, sampling_weights, tissue_weights

CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle-shaped"]


@pytest.fixture(scope="module")
def small_layout(tmp_path_factory, consep) -> Path:
    """Twelve real CoNSeP patches written in the layout, three splits by tile."""
    root = tmp_path_factory.mktemp("layout")
    with DatasetWriter(root, "consep-mini", CLASSES, ["colon", "other"], 40) as w:
        for i in range(12):
            split = ("train", "val", "test")[i % 3]
            w.add(f"p{i:02d}", consep["images"][i], consep["inst_map"][i], consep["type_map"][i], split, tissue=i % 2)
    return root


def test_roundtrip_of_the_layout(small_layout, consep):
    info = read_info(small_layout)
    assert info.classes == CLASSES and info.tissues == ["colon", "other"] and info.magnification == 40
    items = dataset_list(small_layout)
    assert [d["name"] for d in items] == [f"p{i:02d}" for i in range(12)]
    for i, d in enumerate(items):
        np.testing.assert_array_equal(read_image(d["image"]), consep["images"][i])
        np.testing.assert_array_equal(read_label(d["inst_map"], "inst_map"), consep["inst_map"][i])
        np.testing.assert_array_equal(read_label(d["type_map"], "type_map"), consep["type_map"][i])
        assert d["tissue"] == i % 2
    assert class_names(small_layout, include_background=False) == CLASSES[1:]
    assert tissue_names(small_layout) == ["colon", "other"]


def test_dataset_list_filters_splits(small_layout):
    assert {d["split"] for d in dataset_list(small_layout, "val")} == {"val"}
    assert len(dataset_list(small_layout, ["train", "test"])) == 8
    with pytest.raises(ValueError, match="unknown split.*'fold9'"):
        dataset_list(small_layout, "fold9")


def test_cell_counts_match_a_per_nucleus_loop(consep):
    for i in range(0, 40, 7):
        inst, types = consep["inst_map"][i], consep["type_map"][i]
        expected = np.zeros(5, int)
        for k in np.unique(inst)[1:]:
            votes = np.bincount(types[inst == k], minlength=5)
            # the project's vote: background only when no pixel of the nucleus has a foreground class
            expected[votes[1:].argmax() + 1 if votes[1:].any() else 0] += 1
        assert cell_counts(inst, types, 5) == expected.tolist()
        ids, _ = instance_types(inst, types, 5)
        np.testing.assert_array_equal(ids, np.unique(inst)[1:])
    assert cell_counts(np.zeros((8, 8), np.int32), np.zeros((8, 8), np.uint8), 3) == [0, 0, 0]


def test_missing_dataset_json_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "dataset.json")):
        read_info(tmp_path)


def test_writer_rejects_bad_samples(tmp_path):
    img = np.zeros((32, 32, 3), np.uint8)
    inst = np.zeros((32, 32), np.int32)
    inst[4:9, 4:9] = 1
    types = (inst > 0).astype(np.uint8) * 2
    w = DatasetWriter(tmp_path, "bad", ["background", "a", "b"], ["t"], 40)
    with pytest.raises(ValueError, match="s1: grayscale image"):
        w.add("s1", img[..., 0], inst, types, "train")
    with pytest.raises(ValueError, match="s2: image dtype uint16"):
        w.add("s2", img.astype(np.uint16), inst, types, "train")
    with pytest.raises(ValueError, match=r"s3: instance map of shape \(16, 32\) differs from image size \(32, 32\)"):
        w.add("s3", img, inst[:16], types, "train")
    with pytest.raises(ValueError, match=r"s4: unknown class ids \[7\]"):
        w.add("s4", img, inst, types * 7 // 2, "train")
    with pytest.raises(ValueError, match="s5: tissue id 3"):
        w.add("s5", img, inst, types, "train", tissue=3)
    rgba = np.concatenate([img + 9, np.full((32, 32, 1), 255, np.uint8)], 2)
    w.add("ok", rgba, inst, types, "train")
    w.close()
    np.testing.assert_array_equal(read_image(tmp_path / "images" / "ok.png"), img + 9)
    assert dataset_list(tmp_path)[0]["cell_counts"] == [0, 0, 1]


def test_a_write_that_fails_midway_leaves_no_file_and_no_sample(tmp_path, monkeypatch, consep):
    """A full disk while a label file is written: the error propagates, no truncated or temporary file is left and
    the sample is not listed; the next sample is written as if nothing happened."""
    def disk_full(file, **arrays):
        Path(file).write_bytes(b"PK\x03\x04 truncated")
        raise OSError(28, "No space left on device")

    w = DatasetWriter(tmp_path, "full", CLASSES, ["t"], 40)
    with monkeypatch.context() as m:
        m.setattr(np, "savez_compressed", disk_full)
        with pytest.raises(OSError, match="No space left"):
            w.add("p0", consep["images"][0], consep["inst_map"][0], consep["type_map"][0], "train")
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["p0.png"]  # rewritten whole by a retry
    w.add("p1", consep["images"][1], consep["inst_map"][1], consep["type_map"][1], "train")
    w.close()
    assert [d["name"] for d in dataset_list(tmp_path)] == ["p1"]
    np.testing.assert_array_equal(read_label(tmp_path / "labels" / "p1.npz", "inst_map"), consep["inst_map"][1])


def test_read_image_converts_rgba_and_rejects_16_bit(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    bgra = np.concatenate([rgb[..., ::-1], np.full((8, 8, 1), 128, np.uint8)], 2)
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)
    cv2.imwrite(str(tmp_path / "b.png"), rgb.astype(np.uint16) * 256)
    with pytest.raises(ValueError, match="b.png: image dtype uint16"):
        read_image(tmp_path / "b.png")
    with pytest.raises(FileNotFoundError, match="c.png: image file not found"):
        read_image(tmp_path / "c.png")


def test_relabel_and_group_split():
    inst = np.array([[0, 7, 7], [40, 0, 3]])
    np.testing.assert_array_equal(relabel_sequential(inst), [[0, 2, 2], [3, 0, 1]])
    groups = [f"g{i // 4}" for i in range(200)]
    split = split_groups(groups, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=3)
    assert sorted(split) == sorted(set(groups))
    assert [list(split.values()).count(s) for s in ("train", "val", "test")] == [30, 10, 10]
    assert split == split_groups(groups, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=3)


def _spec_weights(counts: np.ndarray, tissues: np.ndarray | None, gamma: float) -> np.ndarray:
    """Reference section 6.2 written as loops over images and classes."""
    n, c = counts.shape
    f = [sum(1 for i in range(n) if counts[i, j] > 0) for j in range(c)]
    k = sum(f)
    cell = []
    for i in range(n):
        b = [1.0 if counts[i, j] > 0 else 0.0 for j in range(c)]
        cell.append((1 - gamma) * max(b) + gamma * sum(b[j] * k / (gamma * f[j] + (1 - gamma) * k) for j in range(c)))
    cell = np.array(cell)
    cell[cell == 0] = cell[cell > 0].min()
    out = cell / cell.max()
    if tissues is not None:
        n_t = {t: int((tissues == t).sum()) for t in set(tissues.tolist())}
        total = len(tissues)
        tw = np.array([total / (gamma * n_t[t] + (1 - gamma) * total) for t in tissues.tolist()])
        out = out + tw / tw.max()
    return out


def test_sampling_weights_follow_the_reference_formula():
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.uniform(0.05, 4, 5), (60, 5))
    counts[3] = 0
    tissues = rng.integers(0, 4, 60)
    np.testing.assert_allclose(sampling_weights(counts, tissues, 0.85), _spec_weights(counts, tissues, 0.85))
    np.testing.assert_allclose(sampling_weights(counts, None, 0.85), _spec_weights(counts, None, 0.85))
    np.testing.assert_allclose(tissue_weights(tissues, 0.0), 1.0)
    rare = np.zeros((2, 5))
    rare[0, 0], rare[1, 3] = 1, 1
    w = cell_weights(rare, 0.85, class_factors=[4191, 4132, 6140, 232, 1528])
    v_dead = 16223 / (0.85 * 232 + 0.15 * 16223)
    v_neo = 16223 / (0.85 * 4191 + 0.15 * 16223)
    np.testing.assert_allclose(w, [0.15 + 0.85 * v_neo, 0.15 + 0.85 * v_dead])


def test_sampler_oversamples_rare_classes(small_layout):
    data = dataset_list(small_layout)
    rare = max(range(len(data)), key=lambda i: data[i]["cell_counts"][1])
    sampler = CellTissueSampler(data, gamma=0.85, seed=19, num_samples=20000)
    draws = np.bincount(torch.as_tensor(list(sampler)).numpy(), minlength=len(data)) / 20000
    expected = sampler.sample_weights / sampler.sample_weights.sum()
    np.testing.assert_allclose(draws, expected, atol=0.01)
    assert list(CellTissueSampler(data, seed=19)) == list(CellTissueSampler(data, seed=19))
    assert sampler.sample_weights[rare] > np.median(sampler.sample_weights)
    single = [dict(d, tissue=0) for d in data]
    counts = np.array([d["cell_counts"] for d in data])[:, 1:]
    np.testing.assert_allclose(CellTissueSampler(single).sample_weights, sampling_weights(counts, None))
    with pytest.raises(ValueError, match="without 'cell_counts'"):
        CellTissueSampler([{"name": "x", "tissue": 0}])


def test_dataset_json_is_plain_json(small_layout):
    raw = json.loads((small_layout / "dataset.json").read_text())
    assert raw["samples"][0] == {
        "name": "p00",
        "split": "train",
        "tissue": 0,
        "group": "p00",
        "cell_counts": raw["samples"][0]["cell_counts"],
    }
    assert (
        sum(raw["samples"][0]["cell_counts"])
        == len(np.unique(read_label(small_layout / "labels/p00.npz", "inst_map"))) - 1
    )
