"""Converters (scripts.data.prepare) on miniature files in the official formats, and CoNSeP on real patches."""

from __future__ import annotations

import csv
import filecmp
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from scipy.io import savemat
from scripts.data import prepare
from scripts.data.datasets import dataset_list, read_image, read_info, read_label
from shapely.geometry import Polygon


def _labels(item: dict) -> tuple[np.ndarray, np.ndarray]:
    return read_label(item["inst_map"], "inst_map"), read_label(item["type_map"], "type_map")


def test_synthetic_is_deterministic_and_complete(tmp_path):
    a = prepare.synthetic(str(tmp_path / "a"), n=20, size=128, seed=3)
    b = prepare.synthetic(str(tmp_path / "b"), n=20, size=128, seed=3)
    c = prepare.synthetic(str(tmp_path / "c"), n=20, size=128, seed=4)
    assert filecmp.cmp(Path(a, "images/synthetic_00007.png"), Path(b, "images/synthetic_00007.png"), shallow=False)
    assert not filecmp.cmp(Path(a, "images/synthetic_00007.png"), Path(c, "images/synthetic_00007.png"), shallow=False)
    info = read_info(a)
    assert info.classes == prepare.SYNTHETIC_CLASSES and len(info.tissues) == 2
    assert [len(dataset_list(a, s)) for s in ("train", "val", "test")] == [14, 3, 3]
    counts = np.array([s["cell_counts"] for s in info.samples])
    assert counts[:, 0].sum() == 0 and np.all(counts[:, 1:].sum(0) > 0)
    for item in dataset_list(a)[:5]:
        image = read_image(item["image"])
        inst, types = _labels(item)
        assert image.shape == (128, 128, 3)
        nuclei, stroma = image[inst > 0].mean(0), image[inst == 0].mean(0)
        assert nuclei[1] < stroma[1] - 60 and stroma[0] > 200
        assert np.all((inst > 0) == (types > 0))


def _write_pannuke(root: Path, fold: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    images = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.float64)
    masks = np.zeros((n, 32, 32, 6))
    masks[..., 5] = 1
    for i in range(n):
        for c in range(5):
            for k in range(c % 3 + 1):
                top, left = 2 + 9 * k, 2 + 6 * c
                masks[i, top : top + 5, left : left + 4, c] = k + 1
                masks[i, top : top + 5, left : left + 4, 5] = 0
    img_dir, mask_dir = (
        root / f"Fold {fold}" / "images" / f"fold{fold}",
        root / f"Fold {fold}" / "masks" / f"fold{fold}",
    )
    img_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    np.save(img_dir / "images.npy", images)
    np.save(img_dir / "types.npy", np.array(["Breast", "Colon", "Kidney"][:n]))
    np.save(mask_dir / "masks.npy", masks)
    return images, masks


def test_pannuke_relabels_colliding_ids_and_keeps_folds(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    images1, masks1 = _write_pannuke(src, 1, 3, rng)
    _write_pannuke(src, 2, 2, rng)
    out = prepare.pannuke(str(src), str(tmp_path / "out"), folds=(1, 2))
    info = read_info(out)
    assert info.classes == prepare.PANNUKE_CLASSES and info.tissues == ["Breast", "Colon", "Kidney"]
    items = dataset_list(out, "fold1")
    assert len(items) == 3 and len(dataset_list(out, "fold2")) == 2
    for i, item in enumerate(items):
        inst, types = _labels(item)
        n_source = sum(len(np.unique(masks1[i, ..., c])) - 1 for c in range(5))
        assert n_source == 9 and np.unique(inst).size - 1 == n_source
        np.testing.assert_array_equal(np.sort(np.unique(inst))[1:], np.arange(1, 10))
        for c in range(5):
            np.testing.assert_array_equal(types[masks1[i, ..., c] > 0], c + 1)
        np.testing.assert_array_equal(read_image(item["image"]), images1[i].astype(np.uint8))
        assert info.tissues[item["tissue"]] == ["Breast", "Colon", "Kidney"][i]


def test_pannuke_overlap_is_reported_and_missing_fold_named(tmp_path):
    masks = np.zeros((16, 16, 6))
    masks[2:6, 2:6, 0] = 1
    masks[2:6, 2:6, 1] = 1
    with pytest.warns(UserWarning, match=r"tile9: 2 nuclei in the class channels but 1 after merging"):
        prepare.pannuke_instances(masks, "tile9")
    with pytest.raises(FileNotFoundError, match="no images.npy found in a 'fold3'"):
        prepare.pannuke(str(tmp_path), str(tmp_path / "out"), folds=(3,))


def test_conic_split_by_patient(tmp_path):
    rng = np.random.default_rng(1)
    n = 60
    images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    labels = np.zeros((n, 16, 16, 2), np.int32)
    labels[:, 3:7, 3:7, 0] = 5
    labels[:, 3:7, 3:7, 1] = rng.integers(1, 7, n)[:, None, None]
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "labels.npy", labels)
    names = [f"{['consep', 'crag'][i // 30]}_{i // 3}-{i:04d}" for i in range(n)]
    with (tmp_path / "patch_info.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["patch_info"], *[[x] for x in names]])
    out = prepare.conic(str(tmp_path), str(tmp_path / "out"), seed=19)
    info = read_info(out)
    assert info.magnification == 20 and info.classes == prepare.CONIC_CLASSES
    split_of_group: dict[str, set] = {}
    for s in info.samples:
        split_of_group.setdefault(s["group"], set()).add(s["split"])
    assert all(len(v) == 1 for v in split_of_group.values())
    n_groups = {sp: sum(v == {sp} for v in split_of_group.values()) for sp in ("train", "val", "test")}
    assert n_groups == {"test": 4, "train": 13, "val": 3}
    item = dataset_list(out)[5]
    inst, types = _labels(item)
    assert inst.max() == 1 and types[4, 4] == labels[5, 4, 4, 1]


def _write_consep(root: Path, consep: dict, idx: list[int]) -> None:
    unmerge = {1: 1, 2: 2, 3: 4, 4: 6}
    for split in ("Train", "Test"):
        (root / split / "Images").mkdir(parents=True)
        (root / split / "Labels").mkdir(parents=True)
    for j, i in enumerate(idx):
        split = "Train" if j < len(idx) - 1 else "Test"
        rgba = np.concatenate([consep["images"][i], np.full((256, 256, 1), 255, np.uint8)], 2)
        cv2.imwrite(str(root / split / "Images" / f"t{i}.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
        inst = consep["inst_map"][i]
        ids = np.unique(inst)[1:]
        types = [unmerge[int(consep["type_map"][i][inst == k][0])] for k in ids]
        savemat(
            root / split / "Labels" / f"t{i}.mat",
            {"inst_map": inst.astype(np.float64), "inst_type": np.array(types, np.float64)[:, None]},
        )


def test_consep_official_format_on_real_patches(tmp_path, consep):
    idx = [0, 50, 100, 150]
    _write_consep(tmp_path / "src", consep, idx)
    out = prepare.consep(str(tmp_path / "src"), str(tmp_path / "out"), patch_size=None)
    by_name = {d["name"]: d for d in dataset_list(out)}
    splits = [d["split"] for d in dataset_list(out)]
    assert [splits.count(s) for s in ("train", "val", "test")] == [2, 1, 1]
    for i in idx:
        item = by_name[f"t{i}"]
        inst, types = _labels(item)
        np.testing.assert_array_equal(read_image(item["image"]), consep["images"][i])
        np.testing.assert_array_equal(inst, consep["inst_map"][i])
        np.testing.assert_array_equal(types, consep["type_map"][i])
    patched = prepare.consep(
        str(tmp_path / "src"), str(tmp_path / "patched"), patch_size=128, stride=128, val_fraction=0.0
    )
    items = dataset_list(patched, "train")
    assert len(items) == 12 and items[0]["name"] == "t0_000"
    inst, types = _labels(items[3])
    np.testing.assert_array_equal(inst > 0, consep["inst_map"][0][128:, 128:] > 0)
    np.testing.assert_array_equal(types, consep["type_map"][0][128:, 128:])
    assert np.unique(inst).size - 1 == inst.max()


def test_consep_bad_labels_are_named(tmp_path, consep):
    _write_consep(tmp_path / "src", consep, [0, 1])
    mat = tmp_path / "src" / "Train" / "Labels" / "t0.mat"
    savemat(mat, {"inst_map": consep["inst_map"][0].astype(float), "inst_type": np.full((400, 1), 9.0)})
    with pytest.raises(ValueError, match=r"t0.mat: unknown CoNSeP class ids \[9\]"):
        prepare.consep(str(tmp_path / "src"), str(tmp_path / "out"))
    mat.unlink()
    with pytest.raises(FileNotFoundError, match="t0.mat: CoNSeP label file not found"):
        prepare.consep(str(tmp_path / "src"), str(tmp_path / "out"))


def test_monuseg_polygons(tmp_path):
    polys = [[(10.2, 10.0), (30.0, 12.5), (26.0, 30.0), (12.0, 25.0)], [(40, 40), (55, 42), (50, 58)]]
    vertices = ["".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in p) for p in polys]
    regions = "".join(f'<Region Id="{k}"><Vertices>{v}</Vertices></Region>' for k, v in enumerate(vertices, 1))
    train, test = tmp_path / "train", tmp_path / "MoNuSegTestData"
    (train / "Annotations").mkdir(parents=True)
    (train / "Tissue Images").mkdir()
    test.mkdir()
    xml = f'<Annotations><Annotation Id="1"><Regions>{regions}</Regions></Annotation></Annotations>'
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for stem in ("TCGA-1", "TCGA-2", "TCGA-3", "TCGA-4", "TCGA-5"):
        (train / "Annotations" / f"{stem}.xml").write_text(xml)
        tifffile.imwrite(train / "Tissue Images" / f"{stem}.tif", image)
    (test / "TCGA-9.xml").write_text(xml)
    tifffile.imwrite(test / "TCGA-9.tif", image)
    out = prepare.monuseg(str(train), str(tmp_path / "out"), test_src=str(test), val_fraction=0.2)
    assert [len(dataset_list(out, s)) for s in ("train", "val", "test")] == [4, 1, 1]
    item = dataset_list(out, "test")[0]
    inst, types = _labels(item)
    np.testing.assert_array_equal(read_image(item["image"]), image)
    assert inst.max() == 2 and np.all(types == (inst > 0))
    for k, p in enumerate(polys, 1):
        poly = Polygon(p)
        assert abs((inst == k).sum() - poly.area) < poly.length
    (train / "Annotations" / "TCGA-3.xml").unlink()
    with pytest.raises(FileNotFoundError, match="TCGA-3.tif: no annotation TCGA-3.xml"):
        prepare.monuseg(str(train), str(tmp_path / "out2"))


def test_folder_of_user_images(tmp_path, consep):
    for d in ("img", "inst", "types"):
        (tmp_path / d).mkdir()
    for i in range(3):
        cv2.imwrite(str(tmp_path / "img" / f"s{i}.png"), consep["images"][i][..., ::-1])
        np.save(tmp_path / "inst" / f"s{i}.npy", consep["inst_map"][i])
        cv2.imwrite(str(tmp_path / "types" / f"s{i}.png"), consep["type_map"][i])
    out = prepare.folder(
        str(tmp_path / "img"),
        str(tmp_path / "inst"),
        str(tmp_path / "out"),
        types=str(tmp_path / "types"),
        classes="other,inflammatory,epithelial,spindle",
        fractions={"val": 1.0},
    )
    assert read_info(out).classes == ["background", "other", "inflammatory", "epithelial", "spindle"]
    for i, item in enumerate(dataset_list(out, "val")):
        inst, types = _labels(item)
        np.testing.assert_array_equal(inst, consep["inst_map"][i])
        np.testing.assert_array_equal(types, consep["type_map"][i])
    with pytest.raises(ValueError, match=r"s0.png: unknown class ids \[3"):
        prepare.folder(
            str(tmp_path / "img"),
            str(tmp_path / "inst"),
            str(tmp_path / "o2"),
            types=str(tmp_path / "types"),
            classes="a,b",
        )
    np.save(tmp_path / "inst" / "s1.npy", consep["inst_map"][1][:100])
    with pytest.raises(ValueError, match=r"s1.npy: instance map size \(100, 256\) differs"):
        prepare.folder(str(tmp_path / "img"), str(tmp_path / "inst"), str(tmp_path / "o3"))
    (tmp_path / "inst" / "s1.npy").unlink()
    with pytest.raises(FileNotFoundError, match="no instance map for image 's1'"):
        prepare.folder(str(tmp_path / "img"), str(tmp_path / "inst"), str(tmp_path / "o4"))
    cv2.imwrite(str(tmp_path / "img" / "s0.png"), consep["images"][0][..., 0])
    with pytest.raises(ValueError, match="s0.png: grayscale image"):
        prepare.folder(str(tmp_path / "img"), str(tmp_path / "inst"), str(tmp_path / "o5"))


def test_arrays_split_by_group_on_real_patches(tmp_path, consep):
    sub = {k: consep[k][:48] for k in ("images", "inst_map", "type_map", "tile", "source_name")}
    np.savez(tmp_path / "tiles.npz", **sub)
    out = prepare.arrays(
        str(tmp_path / "tiles.npz"),
        str(tmp_path / "out"),
        classes=prepare.CONSEP_CLASSES[1:],
        group_key="tile",
        name_key="source_name",
        fractions={"train": 2 / 3, "val": 1 / 3},
    )
    items = dataset_list(out)
    assert len(items) == 48 and items[0]["name"] == str(sub["source_name"][0])
    splits_per_tile = {}
    for s in read_info(out).samples:
        splits_per_tile.setdefault(s["group"], set()).add(s["split"])
    assert sorted(map(len, splits_per_tile.values())) == [1, 1, 1]
    assert sum(sum(s["cell_counts"]) for s in read_info(out).samples) == sum(
        np.unique(m).size - 1 for m in sub["inst_map"]
    )


def test_command_line(tmp_path):
    bundle = Path(__file__).resolve().parents[1] / "bundles" / "cellvta"
    cmd = [
        sys.executable,
        "-m",
        "scripts.data.prepare",
        "synthetic",
        "--out",
        str(tmp_path / "s"),
        "--n",
        "5",
        "--size",
        "64",
    ]
    subprocess.run(cmd, cwd=bundle, check=True, capture_output=True)
    assert len(dataset_list(tmp_path / "s")) == 5


def _nuclei_map(size: int = 32) -> np.ndarray:
    inst = np.zeros((size, size), np.int32)
    inst[2:10, 2:10], inst[14:22, 6:12], inst[20:30, 20:28] = 1, 2, 3
    return inst


def _user_folder(root: Path, inst: np.ndarray, types: np.ndarray | None = None) -> dict[str, str]:
    for sub in ("images", "inst", "types"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(root / "images" / "t.png"), np.full((*inst.shape, 3), 200, np.uint8))
    np.save(root / "inst" / "t.npy", inst)
    if types is not None:
        np.save(root / "types" / "t.npy", types)
    return {"images": str(root / "images"), "instances": str(root / "inst"), "out": str(root / "out"),
            **({"types": str(root / "types"), "classes": "a,b"} if types is not None else {})}


def test_label_maps_with_non_integer_nan_or_negative_ids_are_refused_naming_the_file(tmp_path):
    inst = _nuclei_map()
    resized = cv2.resize(cv2.resize(inst.astype(np.float32), (64, 64), interpolation=cv2.INTER_LINEAR), (32, 32))
    assert np.unique(resized).size > 4  # a bilinear resize invents ids between the nuclei's
    cases = {
        "bilinear": (resized, r"inst[/\\]t\.npy: instance map has \d+ non-integer values"),
        "nan": (np.where(inst > 0, inst, np.nan), rf"inst[/\\]t\.npy: instance map has {(inst == 0).sum()} NaN"),
        "negative": (np.where(np.arange(32)[None] < 4, -1, inst), r"inst[/\\]t\.npy: instance map has negative ids"),
    }
    for name, (bad, message) in cases.items():
        args = _user_folder(tmp_path / name, bad)
        with pytest.raises(ValueError, match=message):
            prepare.folder(**args)
        assert not (tmp_path / name / "out" / "labels").exists() or \
               not list((tmp_path / name / "out" / "labels").iterdir())
    # the same maps with integer values convert
    args = _user_folder(tmp_path / "good", inst.astype(np.float64))
    inst_out, _ = _labels(dataset_list(prepare.folder(**args))[0])
    assert inst_out.max() == 3


def test_type_map_errors_name_the_type_map_file(tmp_path):
    inst = _nuclei_map()
    for name, types, message in (("nan", np.where(inst > 0, 1.0, np.nan), f"type map has {(inst == 0).sum()} NaN"),
                                 ("size", np.zeros((16, 16), np.uint8), r"type map size \(16, 16\) differs")):
        args = _user_folder(tmp_path / name, inst, types)
        with pytest.raises(ValueError, match=rf"types[/\\]t\.npy: {message}"):
            prepare.folder(**args)


def test_every_converter_refuses_non_integer_ids(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "pannuke"
    _, masks = _write_pannuke(src, 1, 2, rng)
    masks[1, 0, 0, 2] = 0.5
    np.save(src / "Fold 1" / "masks" / "fold1" / "masks.npy", masks)
    with pytest.raises(ValueError, match=r"masks\.npy\[1\]: channel 2 of the mask has 1 non-integer values"):
        prepare.pannuke(str(src), str(tmp_path / "out_pannuke"), folds=(1,))

    conic = tmp_path / "conic"
    conic.mkdir()
    labels = np.zeros((2, 16, 16, 2), np.float32)
    labels[:, 3:7, 3:7] = 1
    labels[1, 0, 0, 1] = np.nan
    np.save(conic / "images.npy", rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    np.save(conic / "labels.npy", labels)
    (conic / "patch_info.csv").write_text("patch_info\na-1\nb-2\n")
    with pytest.raises(ValueError, match=r"labels\.npy\[1\]: class map has 1 NaN"):
        prepare.conic(str(conic), str(tmp_path / "out_conic"))

    inst = _nuclei_map(16)
    np.savez(tmp_path / "tiles.npz", images=np.full((1, 16, 16, 3), 200, np.uint8), inst_map=inst[None] - 1,
             type_map=(inst > 0)[None].astype(np.uint8))
    with pytest.raises(ValueError, match=r"tiles\.npz\[inst_map\]\[0\]: instance map has negative ids"):
        prepare.arrays(str(tmp_path / "tiles.npz"), str(tmp_path / "out_arrays"), classes="a")

    mat = tmp_path / "t0.mat"
    savemat(mat, {"inst_map": np.where(inst > 0, inst, np.nan), "inst_type": np.ones((3, 1))})
    with pytest.raises(ValueError, match=rf"t0\.mat: inst_map has {(inst == 0).sum()} NaN"):
        prepare.consep_labels(mat)
