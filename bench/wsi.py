"""Benchmark: whole-slide inference at the scale of a large resection slide, with bounded memory.

A 2048 x 2048 mosaic of 64 real CoNSeP patches (../shared/data) is repeated into a pyramidal JPEG TIFF of
``--side`` x ``--side`` pixels at 0.25 um/px (45056 by default: about 1.1 million nuclei), written once and kept
in ``--cache``. The whole-slide pipeline (``scripts.slides.wsi.run_slide``: tissue detection, tiles of 256 with 64 of
overlap, reading, post-processing workers, merging, streamed GeoJSON/CSV/Parquet/overlay) runs on it in a child process
with the network replaced by the ground-truth oracle (``GroundTruthPredictor``), so the figures measure the
pipeline itself. The peak resident memory of the child's whole process tree (sum of the RSS of the child and its
workers, sampled every 0.2 s) is recorded.

Duplicates: every nucleus written must be a distinct ground-truth nucleus. Each written centroid is matched to
the nearest ground-truth centroid of the periodic mosaic (kd-tree); a nucleus the oracle gives whole lands within
0.01 px of it. The key (period row, period column, ground-truth id) of two written nuclei must never be equal.
Nuclei within 64 px of the slide's right or bottom edge (cut by it) are left out of the matching.

    python bench/wsi.py [--side 45056] [--workers 2] [--gzip-level 1] [--cache outputs/bench_wsi]

The seconds the run spent formatting and writing each table format are reported (``write_seconds``: geojson, csv,
parquet and geojson.gz, the GeoJSON gzip-compressed at ``--gzip-level``). The whole-slide GeoJSON writer (bulk
formatting, :func:`scripts.slides.outputs.geojson_features`) is then timed against the per-feature writer it
replaced (``json.dumps`` of each feature dict, :func:`reference_text`, kept here only to measure the ratio) on
as many nuclei as the run wrote: the mosaic's nuclei repeated across the slide, one block per period as the parts
are, both written to a file. The two files must be byte-identical; the ratio is ``geojson_write_speedup``.

The last line of stdout is ``{"cells", "duplicates", "unmatched", "peak_rss_gb", "tiles_per_s", "cells_per_s", ...}``.
CellViT's own pipeline is reported to need 120 GB of RAM for 914k cells; the target here is 2 GB.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from record import record

REPO = Path(__file__).resolve().parents[1]
CONSEP = REPO.parent / "shared" / "data" / "consep" / "consep_train.npz"
PERIOD = 2048
CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle-shaped"]


def mosaic() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(2048, 2048, 3) image, int64 instance ids unique over the mosaic, uint8 types: the first 64 patches."""
    if not CONSEP.is_file():
        raise SystemExit(f"{CONSEP}: CoNSeP patches not found")
    with np.load(CONSEP) as data:
        images, inst, types = data["images"][:64], data["inst_map"][:64].astype(np.int64), data["type_map"][:64]
    inst = np.where(inst > 0, inst + (np.arange(64) * 100_000)[:, None, None], 0)

    def tile(a: np.ndarray) -> np.ndarray:
        a = a.reshape(8, 8, 256, 256, *a.shape[3:])
        return np.ascontiguousarray(a.swapaxes(1, 2).reshape(PERIOD, PERIOD, *a.shape[4:]))

    return tile(images), tile(inst), tile(types)


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total


def run_child(slide: Path, gt: Path, out: Path, workers: int, gzip_level: int) -> None:
    """The measured process: whole-slide inference with the ground-truth oracle."""
    sys.path[:0] = [str(REPO), str(REPO / "bundles" / "cellvta")]
    from scripts.slides.wsi import WSISettings, postprocess_pool, run_slide
    from tests.oracle import GroundTruthPredictor

    with np.load(gt) as data:
        predictor = GroundTruthPredictor(data["inst"], data["types"], len(CLASSES), periodic=True)
    pool = postprocess_pool(workers)
    settings = WSISettings(postprocess_workers=workers, batch_size=16, chunk_tiles=256, geojson_gzip=gzip_level)
    started = time.perf_counter()
    summary = run_slide(slide, out, predictor, CLASSES, settings, predictor_id="ground-truth", pool=pool)
    summary["wall_seconds"] = time.perf_counter() - started
    (out / "bench_summary.json").write_text(json.dumps(summary))
    if pool is not None:
        pool.shutdown()


def count_duplicates(csv_path: Path, inst: np.ndarray, side: int) -> tuple[int, int, int]:
    """``(cells, duplicates, unmatched)`` of a run's CSV (see the module docstring)."""
    from scipy.ndimage import center_of_mass
    from scipy.spatial import cKDTree

    ids = np.unique(inst)[1:]
    centres = np.array(center_of_mass(np.ones_like(inst), inst, ids))[:, ::-1]  # (x, y)
    tree = cKDTree(centres)
    keys, cells, unmatched = [], 0, 0
    for block in _csv_blocks(csv_path):
        xy = block[:, :2]
        cells += len(xy)
        inner = (xy[:, 0] < side - 64) & (xy[:, 1] < side - 64)
        dist, index = tree.query(np.mod(xy[inner], PERIOD))
        matched = dist < 0.01
        unmatched += int((~matched).sum())
        period = np.floor((xy[inner][matched] - centres[index[matched]]) / PERIOD + 0.5).astype(np.int64)
        keys.append(np.column_stack([period, ids[index[matched]]]))
    keys = np.concatenate(keys) if keys else np.zeros((0, 3), np.int64)
    return cells, len(keys) - len(np.unique(keys, axis=0)), unmatched


def _csv_blocks(path: Path, rows: int = 200_000):
    """(n, 2) float64 ``x, y`` blocks of a run's CSV."""
    with open(path) as f:
        f.readline()
        while True:
            lines = [f.readline() for _ in range(rows)]
            lines = [line for line in lines if line]
            if not lines:
                return
            yield np.array([[float(v) for v in line.split(",")[1:3]] for line in lines])


def reference_text(rings: list[np.ndarray], ids: np.ndarray, types: np.ndarray, probability: np.ndarray,
                   area: np.ndarray) -> str:
    """The per-feature GeoJSON formatting the bulk formatter replaced: a feature dict per nucleus, ``json.dumps`` of
    each, joined by ``",\\n"``."""
    from scripts.inference.writers import detection_feature

    return ",\n".join(json.dumps(detection_feature(r, int(t), CLASSES, {
        "cell_id": int(i), "type_probability": round(float(p), 4), "area_um2": round(float(a), 2)}),
        separators=(",", ":")) for r, i, t, p, a in zip(rings, ids, types, probability, area))


def geojson_speedup(inst: np.ndarray, types: np.ndarray, features: int, folder: Path) -> dict[str, float]:
    """Seconds per million nuclei to format and write GeoJSON, the whole-slide writer against the per-feature one,
    on about ``features`` nuclei: the mosaic's, repeated across the slide period by period (one block each)."""
    from scripts.inference.writers import PALETTE, closed_rings
    from scripts.nuclei.postprocess import nuclei_from_instance_map
    from scripts.slides.outputs import GeoJSONStream, geojson_features

    nuclei = nuclei_from_instance_map(np.unique(inst, return_inverse=True)[1].reshape(inst.shape).astype(np.int32))
    lengths = [len(c) for c in nuclei.contours]
    xy, start = np.concatenate(nuclei.contours), np.concatenate([[0], np.cumsum(lengths)])
    cls = types[tuple(np.floor(nuclei.centroids[:, ::-1]).astype(int).T)]
    copies = max(1, round(features / len(lengths)))
    side = int(np.ceil(np.sqrt(copies)))

    def blocks():
        """``(rings, ids, types, probability, area_um2)`` of each period."""
        for k in range(copies):
            rings = closed_rings(xy, start, offset=(PERIOD * (k % side), PERIOD * (k // side)))
            yield (rings, np.arange(1, len(rings) + 1) + k * len(rings), cls, nuclei.type_probs,
                   np.array(lengths) * 0.0625)

    clock = time.perf_counter
    bulk_s = reference_s = 0.0
    stream = GeoJSONStream(folder / "bulk.geojson")
    for block in blocks():
        started = clock()
        stream.write(geojson_features(*block, CLASSES, np.array(PALETTE)))
        bulk_s += clock() - started
    stream.close()
    with open(folder / "reference.geojson", "w", encoding="utf-8") as f:
        f.write('{"type": "FeatureCollection", "features": [\n')
        for k, block in enumerate(blocks()):
            started = clock()
            text = reference_text(*block)
            f.write(text if k == 0 else ",\n" + text)
            reference_s += clock() - started
        f.write("\n]}\n")
    if not filecmp.cmp(folder / "bulk.geojson", folder / "reference.geojson", shallow=False):
        raise SystemExit("the whole-slide GeoJSON writer disagrees with the per-feature writer")
    for name in ("bulk.geojson", "reference.geojson"):
        (folder / name).unlink()
    n = copies * len(lengths)
    return {"geojson_write_features": n, "geojson_write_s_per_million": round(bulk_s / n * 1e6, 1),
            "reference_write_s_per_million": round(reference_s / n * 1e6, 1),
            "geojson_write_speedup": round(reference_s / bulk_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=45056)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gzip-level", type=int, default=1, help="zlib level of <slide>.geojson.gz")
    parser.add_argument("--cache", type=Path, default=REPO / "outputs" / "bench_wsi")
    parser.add_argument("--child", nargs=3, metavar=("SLIDE", "GT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(*(Path(p) for p in args.child), args.workers, args.gzip_level)
        return

    sys.path[:0] = [str(REPO), str(REPO / "bundles" / "cellvta")]
    from scripts.slides.pyramid import PeriodicImage, write_pyramidal_tiff

    args.cache.mkdir(parents=True, exist_ok=True)
    image, inst, types = mosaic()
    slide, gt = args.cache / f"consep_{args.side}.tif", args.cache / "mosaic_gt.npz"
    if not slide.is_file():
        started = time.perf_counter()
        write_pyramidal_tiff(slide, PeriodicImage(image, args.side, args.side), mpp=0.25)
        print(f"wrote {slide} ({slide.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.0f} s",
              file=sys.stderr)
    np.savez(gt, inst=inst, types=types)
    out = args.cache / "run"
    shutil.rmtree(out, ignore_errors=True)
    child = subprocess.Popen([sys.executable, __file__, "--workers", str(args.workers), "--gzip-level",
                              str(args.gzip_level),
                              "--child", str(slide), str(gt), str(out)])
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_rss(child.pid))
        time.sleep(0.2)
    if child.returncode:
        raise SystemExit(f"whole-slide run failed with exit code {child.returncode}")
    summary = json.loads((out / "bench_summary.json").read_text())
    stem = slide.name  # outputs are named after the slide's full file name
    cells, duplicates, unmatched = count_duplicates(out / f"{stem}.csv", inst, args.side)
    wall = summary["wall_seconds"]
    record("wsi", {
        "cells": cells, "duplicates": duplicates, "unmatched": unmatched, "peak_rss_gb": round(peak / 2**30, 3),
        "tiles_per_s": round(summary["tiles"] / wall, 1), "cells_per_s": round(cells / wall, 1),
        "tiles": summary["tiles"], "wall_s": round(wall, 1), "slide_px": args.side, "workers": args.workers,
        "geojson_gb": round((out / f"{stem}.geojson").stat().st_size / 2**30, 3),
        "parquet_gb": round((out / f"{stem}.parquet").stat().st_size / 2**30, 3),
        "geojson_gz_gb": round((out / f"{stem}.geojson.gz").stat().st_size / 2**30, 3), "gzip_level": args.gzip_level,
        "write_seconds": summary["write_seconds"], **geojson_speedup(inst, types, cells, out),
    })


if __name__ == "__main__":
    main()
