"""Whole-slide inference: a slide, or a cohort of slides, in; every nucleus with its class out.

For each slide:

1. open it (:mod:`.slides`), read its microns per pixel and choose the level and resampling that give the
   network its training resolution (``target_mpp``); a slide whose level 0 is within ``mpp_tolerance`` of it is
   analysed at its own pixels;
2. find tissue on a thumbnail (:mod:`.tissue`) and lay overlapping tiles over it (:class:`.tiling.TileGrid`);
3. read tiles in threads, run the predictor on batches (bfloat16 on capable CPUs, autocast on CUDA), and
   post-process every tile in a pool of worker processes (:func:`.tile_cells.tile_cells`) so the predictor
   never waits for the watershed; each nucleus is kept once, by the tile it lies in most centrally;
4. save the nuclei of every ``chunk_tiles`` consecutive tiles as a part file: a killed run, started again with
   the same command, skips the parts it has and ends with the same outputs as an uninterrupted run;
5. stream the parts into the outputs, each published atomically when complete:

   * ``<slide>.geojson``: QuPath detections (class name and colour, measurements);
   * ``<slide>.csv``: ``id, x, y`` (level-0 pixels), ``x_um, y_um``, ``type_id, type, probability, area_um2``;
   * ``<slide>_embeddings.npy`` and ``<slide>_embedding_ids.npy`` (optional): one encoder token vector per nucleus;
   * ``<slide>_overlay.png``: the thumbnail with every nucleus as a dot in its class colour;
   * ``<slide>.json``: the slide, the analysis settings, counts per class, written last (a slide with this file
     and the same settings is skipped when a cohort is run again).

All coordinates are level-0 pixels of the slide. With ``torchrun --nproc_per_node N`` each process takes every
N-th slide of the cohort.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from .cell_table import CellTable
from .predictors import PredictedMaps
from .readers import Slide, SlideError, open_slide
from .tile_cells import TileMaps, tile_cells
from .tiling import TileGrid
from .tissue import tissue_mask
from ..inference.writers import CSVStream, GeoJSONStream, class_color, class_name, closed_rings, detection_feature, write_png

__all__ = ["SLIDE_SUFFIXES", "SlideGeometry", "WSISettings", "list_slides", "run_cohort", "run_slide", "slide_geometry",
           "weights_id"]

SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff")
Predictor = Callable[[np.ndarray, np.ndarray], PredictedMaps]


@dataclass(frozen=True)
class WSISettings:
    """How slides are analysed (every field is a key of ``configs/wsi_inference.yaml``).

    Attributes:
        target_mpp: microns per pixel the network was trained at (0.25 for 40x models).
        mpp: microns per level-0 pixel to use when the slide does not say (None: the slide must say).
        mpp_tolerance: relative difference to ``target_mpp`` within which level 0 is analysed as it is.
        tile_size, overlap: tile side and overlap of neighbouring tiles, in analysed pixels.
        magnification: post-processing preset (40 or 20) matching ``target_mpp``.
        batch_size: tiles per predictor call.
        postprocess_workers: worker processes for post-processing (0: in the main process).
        read_threads: threads reading tiles.
        backend: slide reader, ``auto``, ``openslide`` or ``tifffile``.
        thumbnail_size: longer side of the thumbnail used for tissue detection and the overlay.
        min_saturation, min_tissue_fraction: tissue detection (see :func:`.tissue.tissue_mask`).
        chunk_tiles: tiles per saved part (the unit of resumption).
        embeddings: write per-nucleus embeddings.
    """

    target_mpp: float = 0.25
    mpp: float | None = None
    mpp_tolerance: float = 0.15
    tile_size: int = 256
    overlap: int = 64
    magnification: int = 40
    batch_size: int = 8
    postprocess_workers: int = 2
    read_threads: int = 2
    backend: str = "auto"
    thumbnail_size: int = 2048
    min_saturation: int = 20
    min_tissue_fraction: float = 0.05
    chunk_tiles: int = 64
    embeddings: bool = False


@dataclass(frozen=True)
class SlideGeometry:
    """Where the analysed image comes from.

    Attributes:
        mpp: microns per level-0 pixel.
        level: the pyramid level tiles are read from.
        scale: level-0 pixels per analysed pixel (1: level 0 as it is).
        width, height: the analysed image, in analysed pixels.
    """

    mpp: float
    level: int
    scale: float
    width: int
    height: int


def slide_geometry(slide: Slide, settings: WSISettings) -> SlideGeometry:
    """The level and scale giving ``settings.target_mpp``.

    Raises:
        SlideError: the slide has no resolution and ``settings.mpp`` is not set.
    """
    mpp = settings.mpp if settings.mpp is not None else slide.mpp
    if mpp is None or not mpp > 0:
        raise SlideError(f"{slide.path}: the slide does not record its resolution (microns per pixel); "
                         f"give it with --mpp (e.g. --mpp 0.25 for a 40x scan)")
    ratio = settings.target_mpp / mpp
    scale = 1.0 if abs(ratio - 1) <= settings.mpp_tolerance else ratio
    width, height = slide.dimensions
    return SlideGeometry(mpp=float(mpp), level=slide.best_level(scale), scale=scale,
                         width=math.ceil(width / scale), height=math.ceil(height / scale))


def read_tile(slide: Slide, geometry: SlideGeometry, x: int, y: int, size: int) -> np.ndarray:
    """``(size, size, 3)`` uint8 RGB of the analysed image at ``(x, y)`` (analysed pixels)."""
    downsample = slide.level_downsamples[geometry.level]
    step = geometry.scale / downsample  # level pixels per analysed pixel
    if step == 1.0 and geometry.scale == downsample:
        return slide.read_region(x, y, size, size, geometry.level)
    left, top = x * step, y * step
    x0, y0 = math.floor(left), math.floor(top)
    extent = math.ceil(size * step) + 2
    region = slide.read_region(x0, y0, extent, extent, geometry.level)
    shift = (step - 1) / 2
    matrix = np.array([[step, 0, left - x0 + shift], [0, step, top - y0 + shift]], dtype=np.float64)
    return cv2.warpAffine(region, matrix, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def list_slides(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Slides named by ``inputs``: a slide, a folder of slides, a text file listing one path per line, or a list."""
    if isinstance(inputs, (str, Path)):
        path = Path(inputs)
        if path.is_dir():
            return sorted(p for p in path.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES and not p.name.startswith("."))
        if path.suffix.lower() == ".txt":
            if not path.is_file():
                raise FileNotFoundError(f"{path}: slide list not found")
            return [Path(line.strip()) for line in path.read_text().splitlines() if line.strip()]
        return [path]
    return [Path(p) for p in inputs]


def weights_id(path: str | Path) -> str:
    """Identity of a weights file (path, size, modification time): resuming with other weights starts over."""
    path = Path(path)
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _fingerprint(slide_path: Path, geometry: SlideGeometry, settings: WSISettings, predictor_id: str) -> str:
    stat = slide_path.stat()
    keys = {k: v for k, v in asdict(settings).items() if k not in {"batch_size", "postprocess_workers", "read_threads"}}
    ident = {"slide": str(slide_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
             "geometry": asdict(geometry), "settings": keys, "predictor": predictor_id}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


class _Parts:
    """The part files of one slide's run: ``<output>/.<slide>.parts/part_<k>.npz`` plus the run's fingerprint."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = folder
        stamp = folder / "fingerprint.txt"
        if folder.is_dir() and (not stamp.is_file() or stamp.read_text() != fingerprint):
            shutil.rmtree(folder)  # parts of another slide version or other settings: not resumable
        folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint)

    def path(self, k: int) -> Path:
        return self.folder / f"part_{k:06d}.npz"

    def done(self, k: int) -> bool:
        return self.path(k).is_file()


def _chunks(tiles: np.ndarray, size: int) -> list[np.ndarray]:
    return [tiles[i : i + size] for i in range(0, len(tiles), size)]


def _tile_batches(slide: Slide, geometry: SlideGeometry, grid: TileGrid, tiles: np.ndarray, batch_size: int,
                  readers: ThreadPoolExecutor) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(tiles (B, 2) row/col, origins (B, 2) x/y, images (B, T, T, 3))`` with the next batch read ahead."""
    batches = [tiles[i : i + batch_size] for i in range(0, len(tiles), batch_size)]

    def submit(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Future]]:
        origins = np.array([grid.origin(r, c) for r, c in batch], dtype=np.int64).reshape(-1, 2)
        return batch, origins, [readers.submit(read_tile, slide, geometry, x, y, grid.size) for x, y in origins]

    def collect(batch: np.ndarray, origins: np.ndarray, futures: list[Future]) -> tuple:
        return batch, origins, np.stack([f.result() for f in futures])

    pending: deque[tuple] = deque()
    for batch in batches:
        pending.append(submit(batch))
        if len(pending) > 1:
            yield collect(*pending.popleft())
    while pending:
        yield collect(*pending.popleft())


def _predict_parts(slide: Slide, geometry: SlideGeometry, grid: TileGrid, todo: list[tuple[int, np.ndarray]],
                   parts: _Parts, predictor: Predictor, settings: WSISettings, pool: Executor | None,
                   progress: tqdm) -> None:
    """Run the predictor and post-processing over the tiles of the parts in ``todo`` and save each part."""
    if not todo:
        return
    tiles = np.concatenate([t for _, t in todo])
    owners = np.concatenate([np.full(len(t), k) for k, t in todo])
    remaining = {k: len(t) for k, t in todo}
    collected: dict[int, list[CellTable]] = {k: [] for k, _ in todo}
    in_flight: deque[tuple[int, Future | CellTable]] = deque()
    limit = max(2 * settings.batch_size, 4 * max(settings.postprocess_workers, 1))
    found = 0

    def drain(keep: int) -> None:
        nonlocal found
        while len(in_flight) > keep:
            k, job = in_flight.popleft()
            table = job.result() if isinstance(job, Future) else job
            collected[k].append(table)
            remaining[k] -= 1
            found += len(table)
            progress.set_postfix(nuclei=found, refresh=False)
            progress.update(1)
            if remaining[k] == 0:
                CellTable.concat(collected.pop(k)).save(parts.path(k))

    index = 0
    with ThreadPoolExecutor(settings.read_threads) as readers:
        for batch, origins, images in _tile_batches(slide, geometry, grid, tiles, settings.batch_size, readers):
            maps = predictor(images, origins)
            for i, (row, col) in enumerate(batch.tolist()):
                job = TileMaps(row, col, maps.nuclei_prob[i], maps.hv_map[i], maps.type_map[i],
                               predictor.num_classes, None if maps.features is None else maps.features[i],
                               None if maps.inst_map is None else maps.inst_map[i])
                k = int(owners[index])
                index += 1
                in_flight.append((k, pool.submit(tile_cells, job, grid, settings.magnification) if pool
                                  else tile_cells(job, grid, settings.magnification)))
            drain(limit)
    drain(0)


def _csv_rows(table: CellTable, ids: np.ndarray, geometry: SlideGeometry, class_names: Sequence[str]) -> list[list]:
    xy = table.centroid * geometry.scale
    area = table.area * (geometry.scale * geometry.mpp) ** 2
    return [[int(i), round(x, 2), round(y, 2), round(x * geometry.mpp, 3), round(y * geometry.mpp, 3), int(t),
             class_name(class_names, int(t)), round(float(p), 4), round(float(a), 2)]
            for i, (x, y), t, p, a in zip(ids.tolist(), xy.tolist(), table.type, table.probability, area)]


def _features(table: CellTable, ids: np.ndarray, geometry: SlideGeometry, class_names: Sequence[str]) -> list[dict]:
    area = table.area * (geometry.scale * geometry.mpp) ** 2
    rings = closed_rings(table.contour_xy, table.contour_start, geometry.scale)
    return [detection_feature(ring, int(t), class_names, {"cell_id": int(i), "type_probability": round(float(p), 4),
                                                          "area_um2": round(float(a), 2)})
            for ring, i, t, p, a in zip(rings, ids, table.type, table.probability, area)]


class _EmbeddingStream:
    """``<stem>_embeddings.npy`` (N, D) float32 filled part by part, and ``<stem>_embedding_ids.npy`` (N,)."""

    def __init__(self, stem: Path, total: int, dim: int) -> None:
        self.paths = [stem.parent / f"{stem.name}_embeddings.npy", stem.parent / f"{stem.name}_embedding_ids.npy"]
        self.tmps = [p.with_name(f".{p.stem}.tmp.npy") for p in self.paths]
        self.store = np.lib.format.open_memmap(self.tmps[0], mode="w+", dtype=np.float32, shape=(total, dim))
        self.ids = np.lib.format.open_memmap(self.tmps[1], mode="w+", dtype=np.int64, shape=(total,))
        self.filled = 0

    def write(self, ids: np.ndarray, embedding: np.ndarray) -> None:
        self.store[self.filled : self.filled + len(ids)] = embedding
        self.ids[self.filled : self.filled + len(ids)] = ids
        self.filled += len(ids)

    def close(self) -> None:
        self.store.flush()
        self.ids.flush()
        del self.store, self.ids
        for tmp, path in zip(self.tmps, self.paths):
            os.replace(tmp, path)


def _assemble(parts: _Parts, n_parts: int, stem: Path, geometry: SlideGeometry, thumbnail: np.ndarray,
              thumb_scale: float, class_names: Sequence[str], embeddings: bool) -> np.ndarray:
    """Stream the parts into the outputs; return the nuclei count per class id."""
    sizes = []
    dim = 0
    for k in range(n_parts):
        with np.load(parts.path(k)) as part:
            sizes.append(len(part["type"]))
            dim = part["embedding"].shape[1] if embeddings else 0
    writers = [GeoJSONStream(stem.with_suffix(".geojson")),
               CSVStream(stem.with_suffix(".csv"),
                         ["id", "x", "y", "x_um", "y_um", "type_id", "type", "probability", "area_um2"])]
    vectors = _EmbeddingStream(stem, sum(sizes), dim) if embeddings else None
    colours = np.array([class_color(t) for t in range(len(class_names))], dtype=np.uint8)
    counts = np.zeros(len(class_names), dtype=np.int64)
    overlay = thumbnail.copy()
    next_id = 1
    for k in range(n_parts):
        table = CellTable.load(parts.path(k))
        ids = np.arange(next_id, next_id + len(table))
        next_id += len(table)
        writers[0].write(_features(table, ids, geometry, class_names))
        writers[1].write(_csv_rows(table, ids, geometry, class_names))
        if vectors is not None:
            vectors.write(ids, table.embedding)
        types = np.minimum(table.type, len(class_names) - 1)
        counts += np.bincount(types, minlength=len(class_names))
        dots = np.floor(table.centroid * geometry.scale / thumb_scale).astype(np.int64)
        dots = np.minimum(dots, np.array(overlay.shape[1::-1]) - 1)
        overlay[dots[:, 1], dots[:, 0]] = colours[types]
    for writer in writers + ([vectors] if vectors is not None else []):
        writer.close()
    write_png(stem.parent / f"{stem.name}_overlay.png", overlay)
    return counts


def run_slide(slide_path: str | Path, output_dir: str | Path, predictor: Predictor, class_names: Sequence[str],
              settings: WSISettings = WSISettings(), predictor_id: str = "", pool: Executor | None = None,
              position: int = 0) -> dict:
    """Analyse one slide (see the module docstring) and return its summary (also written as ``<slide>.json``).

    Args:
        slide_path: the slide.
        output_dir: where the outputs go (created).
        predictor: tiles -> maps (:mod:`.predictors`).
        class_names: class names, background first.
        settings: analysis settings.
        predictor_id: identifies the predictor's weights, so resuming with other weights starts over.
        pool: post-processing workers (None: post-process in this process).
        position: line of the progress bar.
    """
    slide_path = Path(slide_path)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = output_dir / slide_path.name.split(".")[0]
    with open_slide(slide_path, settings.backend) as slide:
        geometry = slide_geometry(slide, settings)
        fingerprint = _fingerprint(slide_path, geometry, settings, predictor_id)
        summary_path = stem.with_suffix(".json")
        if summary_path.is_file():
            previous = json.loads(summary_path.read_text())
            if previous.get("fingerprint") == fingerprint:
                return previous
        started = time.perf_counter()
        thumbnail, thumb_scale = slide.thumbnail(settings.thumbnail_size)
        mask = tissue_mask(thumbnail, settings.min_saturation)
        grid = TileGrid(geometry.width, geometry.height, settings.tile_size, settings.overlap)
        grid = grid.with_processed(grid.tissue_tiles(mask, thumb_scale / geometry.scale, settings.min_tissue_fraction))
        tiles = np.argwhere(grid.processed)
        chunks = _chunks(tiles, settings.chunk_tiles)
        parts = _Parts(output_dir / f".{stem.name}.parts", fingerprint)
        todo = [(k, t) for k, t in enumerate(chunks) if not parts.done(k)]
        progress = tqdm(total=len(tiles), initial=len(tiles) - sum(len(t) for _, t in todo), unit="tile",
                        desc=slide_path.name, position=position, dynamic_ncols=True, mininterval=1.0)
        with progress:
            _predict_parts(slide, geometry, grid, todo, parts, predictor, settings, pool, progress)
        counts = _assemble(parts, len(chunks), stem, geometry, thumbnail, thumb_scale, class_names,
                           settings.embeddings)
        width, height = slide.dimensions
    summary = {
        "slide": str(slide_path), "width": width, "height": height, "mpp": geometry.mpp,
        "analysed_mpp": geometry.mpp * geometry.scale, "level": geometry.level, "scale": geometry.scale,
        "tiles": int(len(tiles)), "tiles_total": int(np.prod(grid.shape)), "cells": int(counts.sum()),
        "cells_per_class": {class_name(class_names, i): int(c) for i, c in enumerate(counts) if i > 0},
        "settings": asdict(settings), "predictor": predictor_id, "fingerprint": fingerprint,
        "seconds": round(time.perf_counter() - started, 2),
    }
    tmp = summary_path.with_name(f".{summary_path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, summary_path)
    shutil.rmtree(parts.folder)
    return summary


def postprocess_pool(workers: int) -> ProcessPoolExecutor | None:
    """Worker processes for post-processing (started by ``spawn``: they import numpy, not torch)."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 0 else None


def run_cohort(inputs: str | Path | Sequence[str | Path], output_dir: str | Path, predictor: Predictor,
               class_names: Sequence[str], settings: WSISettings = WSISettings(), predictor_id: str = "",
               rank: int | None = None, world_size: int | None = None) -> list[dict]:
    """Analyse every slide of ``inputs`` (see :func:`list_slides`); this process takes every ``world_size``-th
    slide from ``rank`` (default: torchrun's ``RANK``/``WORLD_SIZE``, else all).

    Slides that fail are reported together at the end; the others are still analysed.

    Raises:
        SlideError: listing the slides that failed and why.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    slides = list_slides(inputs)[rank::world_size]
    summaries, failures = [], []
    pool = postprocess_pool(settings.postprocess_workers)
    try:
        for path in slides:
            try:
                summaries.append(run_slide(path, output_dir, predictor, class_names, settings, predictor_id, pool,
                                           position=rank))
            except (SlideError, OSError) as err:
                failures.append(f"{path}: {err}" if str(path) not in str(err) else str(err))
    finally:
        if pool is not None:
            pool.shutdown()
    if failures:
        raise SlideError(f"{len(failures)} of {len(slides)} slides failed:\n" + "\n".join(failures))
    return summaries
