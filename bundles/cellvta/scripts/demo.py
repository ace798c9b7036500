"""The bundle's main command: train, evaluate and run inference end to end through the bundle's workflows.

Without a dataset it writes a small SYNTHETIC H&E-like dataset (``scripts.data.prepare synthetic``: not real
tissue) and trains a small CellVTA on it for a few minutes on CPU; given ``--dataset_dir`` (a folder written
by ``scripts.data.prepare``) it trains on that data. Then it evaluates the best checkpoint on the test split
(metrics tables in JSON and Markdown) and runs inference on the test images (instance and type maps,
GeoJSON, overlay PNGs), and prints where everything is.

From ``bundles/cellvta``::

    python -m scripts.demo                                   # synthetic data, a few minutes on CPU
    python -m scripts.demo --dataset_dir data/consep --dataset_name consep --epochs 30 --backbone vit-s
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.bundle import run

from .data.datasets import read_info
from .workflows.configs import config_files
from .workflows.demo_data import demo_dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

# a CellVTA small enough to train in minutes on a 2-core CPU
DEMO_NETWORK = {"backbone": "vit-t", "vit_kwargs": {"depth": 4}, "patch_size": 128}


def _workflow(run_id: str, overrides: Mapping[str, Any]) -> None:
    run(run_id=run_id, config_file=config_files(run_id), **overrides)


def _test_images(dataset_dir: Path, split: str) -> list[str]:
    names = [s["name"] for s in read_info(dataset_dir).samples if s["split"] == split]
    images = dataset_dir / "images"
    return [str(p) for p in sorted(images.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in set(names)]


def main(
    out: str = "demo_output",
    dataset_dir: str | None = None,
    dataset_name: str = "folder",
    epochs: int = 4,
    n_synthetic: int = 48,
    synthetic_size: int = 128,
    num_workers: int = 0,
    test_split: str = "test",
    **network: Any,
) -> dict[str, str]:
    """Run the whole job and return the paths of its outputs.

    Args:
        out: output folder (models, evaluation, inference; the synthetic data too when generated).
        dataset_dir: a dataset folder written by ``scripts.data.prepare``; None generates synthetic data.
        dataset_name: its kind (``pannuke``, ``conic``, ``consep``, ``monuseg``, ``folder``), which picks the splits.
        epochs: training epochs.
        n_synthetic, synthetic_size: number and side of the synthetic tiles.
        num_workers: data-loader workers.
        test_split: the split evaluated and sent through inference.
        network: overrides of the network keys of ``configs/common.yaml`` (e.g. ``backbone=vit-s``);
            the defaults are :data:`DEMO_NETWORK`.
    """
    out_dir = Path(out).resolve()
    if dataset_dir is None:
        data = Path(demo_dataset(str(out_dir / "data" / "synthetic"), n=n_synthetic, size=synthetic_size))
    else:
        data = Path(dataset_dir).resolve()
        read_info(data)
    shared = {
        "bundle_root": str(out_dir),
        "dataset_dir": str(data),
        "dataset_name": dataset_name,
        "num_workers": num_workers,
        **DEMO_NETWORK,
        **network,
    }
    started = time.perf_counter()
    _workflow("training", {**shared, "epochs": epochs, "progress_bar": False})
    trained = time.perf_counter()
    _workflow("evaluating", {**shared, "eval_split": test_split})
    images = _test_images(data, test_split)
    _workflow("inferring", {**shared, "input_images": images})
    done = time.perf_counter()

    outputs = {
        "model": str(out_dir / "models" / "model.pt"),
        "metrics": str(out_dir / "eval" / "metrics.md"),
        "metrics_json": str(out_dir / "eval" / "metrics.json"),
        "inference": str(out_dir / "inference"),
    }
    print((out_dir / "eval" / "metrics.md").read_text())
    print(f"training {trained - started:.0f} s, evaluation and inference {done - trained:.0f} s")
    print("outputs:\n" + json.dumps(outputs, indent=1))
    return outputs


if __name__ == "__main__":
    from monai.utils import optional_import

    fire, _ = optional_import("fire")
    fire.Fire(main)
