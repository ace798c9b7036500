"""Tile inference: one unreadable image never stops the run, every file is accounted for, outputs never collide."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from scripts.data.datasets import read_info, save_class_table
from scripts.inference.inputs import TileInputs

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cellvta"
TINY = ["--backbone", "vit-t", "--vit_kwargs", "{'depth': 4}", "--patch_size", "64", "--num_workers", "0"]


def tile(path: Path, seed: int, size: int = 64) -> Path:
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(path), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return path


def bad_folder(folder: Path) -> Path:
    """a_good.png, b_zero.png (0 bytes), c_trunc.png (half a PNG), d_gray.png, .hidden.png, notes.txt, z_good.jpeg."""
    folder.mkdir(parents=True)
    tile(folder / "a_good.png", 0)
    (folder / "b_zero.png").write_bytes(b"")
    whole = tile(folder / "c_trunc.png", 1).read_bytes()
    (folder / "c_trunc.png").write_bytes(whole[: len(whole) // 2])
    cv2.imwrite(str(folder / "d_gray.png"), np.full((64, 64), 128, np.uint8))
    tile(folder / ".hidden.png", 2)
    (folder / "notes.txt").write_text("not an image")
    tile(folder / "z_good.jpeg", 3)
    return folder


def test_unreadable_images_are_reported_and_the_others_kept(tmp_path):
    folder = bad_folder(tmp_path / "tiles")
    inputs = TileInputs(folder=folder)
    assert [d["name"] for d in inputs.data] == ["a_good", "z_good"]
    lines = inputs.report_lines()
    assert lines == [
        f"skipped {folder / '.hidden.png'}: hidden file (name starts with a dot)",
        f"skipped {folder / 'notes.txt'}: not an image (.png, .jpg, .jpeg, .tif, .tiff)",
        f"failed {folder / 'b_zero.png'}: not a readable image",
        f"failed {folder / 'c_trunc.png'}: not a readable image",
        f"failed {folder / 'd_gray.png'}: grayscale image (64, 64), expected RGB (H, W, 3)",
    ]
    with pytest.raises(SystemExit, match="3 image"):
        inputs.report()
    TileInputs(folder=folder, paths=[str(folder / "a_good.png")]).report()  # nothing failed: no exit


def test_two_images_with_one_stem_are_refused_naming_both(tmp_path):
    tile(tmp_path / "t.png", 0)
    tile(tmp_path / "t.jpeg", 1)
    with pytest.raises(ValueError, match=r"t\.jpeg and \S*t\.png would both write the outputs 't\.\*'"):
        TileInputs(folder=tmp_path)


@pytest.mark.slow
def test_inference_workflow_processes_every_good_image_and_exits_non_zero_listing_the_bad(tmp_path):
    data = tmp_path / "synthetic"
    subprocess.run([sys.executable, "-m", "scripts.data.prepare", "synthetic", "--out", str(data), "--n", "4",
                    "--size", "64"], cwd=BUNDLE, check=True, capture_output=True, timeout=300)
    root = tmp_path / "root"
    save_class_table(read_info(data), root / "models")
    parser = ConfigParser()  # an untrained network: the test is about files, not predictions
    parser.read_config(str(BUNDLE / "configs" / "common.yaml"))
    parser.update({"bundle_root": str(root), "dataset_dir": str(data), "backbone": "vit-t",
                   "vit_kwargs": {"depth": 4}, "patch_size": 64})
    torch.save(parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")
    folder = bad_folder(tmp_path / "tiles")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inferring", "--config_file",
           "['configs/common.yaml','configs/inference.yaml']", *TINY, "--bundle_root", str(root),
           "--input_dir", str(folder)]
    result = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-4000:]
    for name in ("b_zero.png", "c_trunc.png", "d_gray.png"):
        assert sum(line.startswith(f"failed {folder / name}: ") for line in log.splitlines()) == 1
    assert f"skipped {folder / '.hidden.png'}: hidden file" in log
    assert "2 images processed, 3 failed, 2 skipped" in log
    out = root / "inference"
    for stem in ("a_good", "z_good"):
        assert np.load(out / f"{stem}.npz")["inst_map"].shape == (64, 64)
        assert (out / f"{stem}.geojson").stat().st_size > 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("b_", "c_", "d_", ".h"))) == []
