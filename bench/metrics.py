"""Benchmark: the PQ family per 256x256 tile, ours against MONAI's compute_panoptic_quality.

On the 40 real CoNSeP fixture pairs (ground truth against CellViT's post-processing output),
ours computes every per-image PQ-family score (binary DQ/SQ/PQ, per-class PQ, AJI, AJI+, Dice,
Jaccard; no centroid detection); MONAI computes binary PQ and the per-class PQs (one call per class) on
the same pairs, torch at 1 thread. The two run interleaved tile by tile, and each tile's best time over the
rounds is kept, which filters out the time other processes take on a shared machine.

Usage: ``python bench/metrics.py [--rounds 5]``. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_panoptic_quality

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bundles" / "cellvta")]

from scripts.nuclei.metrics import evaluate_image  # noqa: E402

from record import record

FIXTURE = ROOT.parent / "shared" / "data" / "fixtures" / "postprocess_consep.npz"
NUM_CLASSES = 5


def ours(gi: np.ndarray, gt: np.ndarray, pi: np.ndarray, pt: np.ndarray) -> float:
    return float(evaluate_image(gi, gt, pi, pt, NUM_CLASSES, detection_radius_px=None).binary_quality[2])


def monai(gi: np.ndarray, gt: np.ndarray, pi: np.ndarray, pt: np.ndarray) -> float:
    pq = float(compute_panoptic_quality(torch.from_numpy(pi), torch.from_numpy(gi), metric_name="pq"))
    for c in range(1, NUM_CLASSES):
        if (gt == c).any():
            compute_panoptic_quality(torch.from_numpy(pi * (pt == c)), torch.from_numpy(gi * (gt == c)))
    return pq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not FIXTURE.exists():
        sys.exit(f"fixture not found: {FIXTURE} (needs ../shared/data beside the repository)")
    torch.set_num_threads(1)
    with np.load(FIXTURE) as d:
        pairs = list(zip(d["gt_inst"], d["gt_type"], d["ref_inst"], d["ref_type"]))
    runs = {"ours": ours, "monai": monai}
    fastest = {name: np.full(len(pairs), np.inf) for name in runs}
    results = {name: np.zeros(len(pairs)) for name in runs}
    for _ in range(args.rounds):
        for i, pair in enumerate(pairs):
            for name, fn in runs.items():
                start = time.perf_counter()
                results[name][i] = fn(*pair)
                fastest[name][i] = min(fastest[name][i], time.perf_counter() - start)
    ours_ms, monai_ms = (float(fastest[k].mean()) * 1e3 for k in runs)
    diff = float(np.max(np.abs(results["ours"] - results["monai"])))
    print(f"ours {ours_ms:.3f} ms per tile (all scores), MONAI {monai_ms:.3f} ms per tile (binary + class PQ)")
    record("metrics", {"pq_ms_per_tile": round(ours_ms, 3), "monai_pq_ms_per_tile": round(monai_ms, 3),
                      "speedup_vs_monai": round(monai_ms / ours_ms, 1), "max_abs_diff_vs_monai": diff})


if __name__ == "__main__":
    main()
