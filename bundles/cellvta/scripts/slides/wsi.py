"""Whole-slide inference: a slide, or a cohort of slides, in; every nucleus with its class out.

For each slide:

1. open it (:mod:`.slides`), read its microns per pixel and choose the level and resampling that give the
   network its training resolution (``target_mpp``); a slide whose level 0 is within ``mpp_tolerance`` of it is
   analysed at its own pixels;
2. find tissue on a thumbnail (:mod:`.tissue`) and lay overlapping tiles over it (:class:`.tiling.TileGrid`);
3. read tiles in threads, run the predictor on batches (bfloat16 on capable CPUs, autocast on CUDA), and
   post-process every tile in a pool of worker processes (:func:`.tile_cells.tile_cells`) so the predictor
   never waits for the watershed; each nucleus is kept once, by the tile it lies in most centrally (of a
   nucleus no tile sees whole, the largest fragment, :mod:`.cut_nuclei`);
4. save the nuclei of every ``chunk_tiles`` consecutive tiles as a part file: a killed run, started again with
   the same command, skips the parts it has and ends with the same outputs as an uninterrupted run (byte for byte,
   but for the run time in ``<slide>.json`` and ``<slide>_report.html``);
5. stream the parts into the outputs (:mod:`.outputs`), published together when all are complete.
   ``<slide>`` is the slide's full file name (``case.1.tif`` -> ``case.1.tif.geojson``; a DICOM series folder:
   the folder's name); a cohort holding two slides of the same file name is refused before any work:

   * ``<slide>.geojson``: QuPath detections (class name and colour, measurements); with a cell classifier
     (:class:`.predictors.SlideClassifier`) each nucleus's class and probability are the classifier's (softmax
     over its classes, applied to the nucleus's embedding) and the names and colours are its own;
   * ``<slide>.geojson.gz`` (optional, ``geojson_gzip``): the same text gzip-compressed;
   * ``<slide>.csv``: ``id, x, y`` (level-0 pixels), ``x_um, y_um``, ``type_id, type, probability, area_um2``;
   * ``<slide>.parquet``: the same columns plus ``perimeter_um, solidity, eccentricity`` (and ``embedding`` when
     requested), a columnar table (:class:`.outputs.ParquetStream`);
   * ``<slide>_embeddings.npy`` and ``<slide>_embedding_ids.npy`` (optional): per nucleus its embedding, the
     ``embedding_source`` map (``vit``: the ViT's last-block tokens after its final norm, weighted by the nucleus'
     pixels in each token; ``decoder``: the last feature map of the decoder branch ``embedding_branch``, the type
     branch by default, averaged over the nucleus) of the tile that kept it, as :mod:`scripts.cells.embeddings`
     computes it on an image;
   * ``<slide>_overlay.png``: the thumbnail with every nucleus as a dot in its class colour;
   * ``<slide>_tissue.png`` (networks with a tissue head): one pixel per tile, the tile's predicted tissue class
     (:mod:`.tissue_map`), with the fraction of analysed tiles and the mean probability of each class in
     ``<slide>.json`` (``tissue``);
   * ``<slide>_report.html``: a self-contained page to open (:mod:`.report`): overlay, density of each class,
     tissue map, counts, model, run time and settings;
   * ``<slide>.json``: the slide, the analysis settings, counts per class, written last (a slide with this file,
     the same settings and all its outputs is skipped when a cohort is run again; any other summary is deleted
     before new outputs are published).

All coordinates are level-0 pixels of the slide. With ``torchrun --nproc_per_node N`` each process takes every
N-th slide of the cohort.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import yaml
from tqdm import tqdm

from ..files import write_text_atomic
from .cell_table import CellTable
from .cohort import SLIDE_SUFFIXES, list_slides
from .cut_nuclei import duplicate_fragments
from .outputs import (CSVStream, GeoJSONStream, ParquetStream, SlideOutputs, check_unique_names, geojson_features,
                      morphometrics, output_path)
from .readers import Slide, SlideError, open_slide
from .report import write_report
from .regions import Region, find_region, read_region
from .tile_cells import PredictedMaps, TileMaps, tile_cells
from .tiling import TileGrid
from .tissue import focus_measure, pen_mask, tissue_mask
from .tissue_map import tissue_map, tissue_summary
from .workers import postprocess_pool
from ..inference.writers import class_color, class_name, closed_rings

__all__ = ["SLIDE_SUFFIXES", "SlideGeometry", "WSISettings", "list_slides", "run_cohort", "run_slide", "slide_geometry",
           "weights_id"]

Predictor = Callable[[np.ndarray, np.ndarray], PredictedMaps]


class Classifier(Protocol):
    """A cell classifier on embeddings (:class:`.predictors.SlideClassifier`): ``(N, D)`` -> ``(N, K)`` softmax,
    with ``names`` and ``colours`` (background first), ``path`` and ``digest`` (the file's SHA-256)."""

    names: Sequence[str]
    colours: Sequence[tuple[int, int, int]]
    path: Path
    digest: str

    def __call__(self, embeddings: np.ndarray) -> np.ndarray: ...


SETTINGS_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "wsi_inference.yaml"


def _config_defaults(path: Path = SETTINGS_CONFIG) -> dict:
    """The top-level keys of ``configs/wsi_inference.yaml``: the one place the whole-slide defaults are written."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as err:
        raise ImportError(f"{path}: the whole-slide defaults cannot be read ({err})") from err


_DEFAULTS = _config_defaults()


@dataclass(frozen=True)
class WSISettings:
    """How slides are analysed. Every field is a key of ``configs/wsi_inference.yaml``, whose value is the field's
    default (read from that file, the one place the defaults are written).

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
        embedding_source, embedding_branch: what an embedding is, ``vit`` or ``decoder`` (the last feature map of
            the decoder branch ``embedding_branch``), see :mod:`scripts.cells.embeddings`; the predictor's (and a
            classifier's) source.
        exclude_pen_marks: leave pen marks out of the analysis (see :func:`.tissue.pen_mask`).
        pen_hue_min, pen_hue_max, pen_min_saturation, pen_max_black_value: what counts as ink.
        exclude_blur: leave out-of-focus tiles out of the analysis (:func:`.tissue.focus_measure` below
            ``blur_min_focus``, measured at ``blur_mpp`` microns per pixel).
        stain_normalization: re-render tiles in target H&E stains (Macenko, :mod:`scripts.data.stain`) fitted once
            per slide on its thumbnail's tissue.
        stain_reference: an RGB image whose stains are the target (None: ``stain_vectors``).
        stain_vectors, stain_max_concentrations: (3, 2) target stain vectors and (2,) concentrations (None:
            Macenko's reference H&E).
        geojson_gzip: also write ``<slide>.geojson.gz``, the GeoJSON gzip-compressed at this zlib level (1 fastest
            to 9 smallest; 0: not written).
        report_grid_um: side in microns of the squares of the report's density maps (:mod:`.report`).
    """

    target_mpp: float = _DEFAULTS["target_mpp"]
    mpp: float | None = _DEFAULTS["mpp"]
    mpp_tolerance: float = _DEFAULTS["mpp_tolerance"]
    tile_size: int = _DEFAULTS["tile_size"]
    overlap: int = _DEFAULTS["overlap"]
    magnification: int = _DEFAULTS["magnification"]
    batch_size: int = _DEFAULTS["batch_size"]
    postprocess_workers: int = _DEFAULTS["postprocess_workers"]
    read_threads: int = _DEFAULTS["read_threads"]
    backend: str = _DEFAULTS["backend"]
    thumbnail_size: int = _DEFAULTS["thumbnail_size"]
    min_saturation: int = _DEFAULTS["min_saturation"]
    min_tissue_fraction: float = _DEFAULTS["min_tissue_fraction"]
    chunk_tiles: int = _DEFAULTS["chunk_tiles"]
    embeddings: bool = _DEFAULTS["embeddings"]
    embedding_source: str = _DEFAULTS["embedding_source"]
    embedding_branch: str = _DEFAULTS["embedding_branch"]
    exclude_pen_marks: bool = _DEFAULTS["exclude_pen_marks"]
    pen_hue_min: int = _DEFAULTS["pen_hue_min"]
    pen_hue_max: int = _DEFAULTS["pen_hue_max"]
    pen_min_saturation: int = _DEFAULTS["pen_min_saturation"]
    pen_max_black_value: int = _DEFAULTS["pen_max_black_value"]
    exclude_blur: bool = _DEFAULTS["exclude_blur"]
    blur_mpp: float = _DEFAULTS["blur_mpp"]
    blur_min_focus: float = _DEFAULTS["blur_min_focus"]
    stain_normalization: bool = _DEFAULTS["stain_normalization"]
    stain_reference: str | None = _DEFAULTS["stain_reference"]
    stain_vectors: Sequence[Sequence[float]] | None = _DEFAULTS["stain_vectors"]
    stain_max_concentrations: Sequence[float] | None = _DEFAULTS["stain_max_concentrations"]
    geojson_gzip: int = _DEFAULTS["geojson_gzip"]
    report_grid_um: float = _DEFAULTS["report_grid_um"]


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


def slide_geometry(slide: Slide, settings: WSISettings, mpp: float | None = None) -> SlideGeometry:
    """The level and scale giving ``settings.target_mpp``.

    Args:
        slide: the open slide.
        settings: ``target_mpp``, ``mpp_tolerance`` and ``mpp``, the resolution of slides that record none.
        mpp: this slide's microns per level-0 pixel, overriding what it records (a cohort CSV's ``mpp``).

    Raises:
        SlideError: no resolution: none given, none recorded and ``settings.mpp`` not set.
    """
    if mpp is None:
        mpp = slide.mpp if slide.mpp is not None and slide.mpp > 0 else settings.mpp
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


def weights_id(path: str | Path) -> str:
    """Identity of a weights file (path, size, modification time): resuming with other weights starts over."""
    path = Path(path)
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _fingerprint(slide: Slide, geometry: SlideGeometry, settings: WSISettings, predictor_id: str,
                 region: Region | None, classifier: Classifier | None) -> str:
    stats = [p.stat() for p in slide.files]  # a DICOM series: every file of it
    keys = {k: v for k, v in asdict(settings).items() if k not in {"batch_size", "postprocess_workers", "read_threads"}}
    ident = {"slide": str(slide.path.resolve()), "size": sum(s.st_size for s in stats),
             "mtime_ns": max(s.st_mtime_ns for s in stats),
             "geometry": asdict(geometry), "settings": keys, "predictor": predictor_id,
             "roi": None if region is None else hashlib.sha256(region.source.read_bytes()).hexdigest(),
             "classifier": None if classifier is None else classifier.digest}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


class _Parts:
    """The part files of one slide's run: ``<output>/.<slide>.parts/part_<k>.npz`` plus the run's fingerprint.

    A part holds the nuclei of its tiles (:class:`.cell_table.CellTable`), its tiles ``tissue_tiles`` (M, 2)
    ``(row, col)`` and their tissue softmax ``tissue`` (M, K) (K = 0 without a tissue head).
    """

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = folder
        stamp = folder / "fingerprint.txt"
        if folder.is_dir() and (not stamp.is_file() or stamp.read_text() != fingerprint):
            shutil.rmtree(folder)  # parts of another slide version or other settings: not resumable
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(stamp, fingerprint)

    def path(self, k: int) -> Path:
        return self.folder / f"part_{k:06d}.npz"

    def done(self, k: int) -> bool:
        return self.path(k).is_file()

    def save(self, k: int, table: CellTable, tiles: np.ndarray, tissue: np.ndarray) -> None:
        table.save(self.path(k), tissue_tiles=tiles, tissue=tissue)

    def load(self, k: int) -> tuple[CellTable, np.ndarray, np.ndarray]:
        """Part ``k``'s nuclei, tiles and tissue softmax."""
        table = CellTable.load(self.path(k))
        with np.load(self.path(k)) as data:
            return table, data["tissue_tiles"], data["tissue"]


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
                   progress: tqdm, stain: Callable[[np.ndarray], np.ndarray] | None = None,
                   classifier: Classifier | None = None) -> None:
    """Run the predictor (on tiles re-stained by ``stain`` when given) and post-processing over the tiles of the
    parts in ``todo``, type the nuclei with ``classifier`` when given (:func:`_classified`) and save each part."""
    if not todo:
        return
    tiles = np.concatenate([t for _, t in todo])
    owners = np.concatenate([np.full(len(t), k) for k, t in todo])
    drop_background = classifier is None  # a classifier types every nucleus the network detects
    part_tiles = dict(todo)
    remaining = {k: len(t) for k, t in todo}
    collected: dict[int, list[CellTable]] = {k: [] for k, _ in todo}
    tissue: dict[int, list[np.ndarray]] = {k: [] for k, _ in todo}
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
                table = _classified(CellTable.concat(collected.pop(k)), classifier, settings.embeddings)
                parts.save(k, table, part_tiles[k], np.stack(tissue.pop(k)))

    index = 0
    with ThreadPoolExecutor(settings.read_threads) as readers:
        for batch, origins, images in _tile_batches(slide, geometry, grid, tiles, settings.batch_size, readers):
            if stain is not None:
                images = np.stack([stain(image) for image in images])
            maps = predictor(images, origins)
            probs = np.zeros((len(batch), 0), np.float32) if maps.tissue is None else maps.tissue.astype(np.float32)
            for i, (row, col) in enumerate(batch.tolist()):
                job = TileMaps(row, col, maps.nuclei_prob[i], maps.hv_map[i], maps.type_map[i],
                               predictor.num_classes, None if maps.features is None else maps.features[i],
                               None if maps.inst_map is None else maps.inst_map[i])
                k = int(owners[index])
                index += 1
                tissue[k].append(probs[i])
                in_flight.append((k, pool.submit(tile_cells, job, grid, settings.magnification, drop_background)
                                  if pool else tile_cells(job, grid, settings.magnification, drop_background)))
            drain(limit)
    drain(0)


def _classified(table: CellTable, classifier: Classifier | None, keep_embedding: bool) -> CellTable:
    """The nuclei typed by ``classifier`` (type id ``k + 1`` for its class ``k``, probability its softmax), their
    embeddings dropped unless ``keep_embedding``."""
    if classifier is not None:
        if table.embedding.shape[1] == 0:
            raise ValueError("the predictor gives no embeddings for the cell classifier "
                             f"{classifier.path} (NetworkPredictor(classifier=...) computes them)")
        probs = classifier(table.embedding)
        table = replace(table, type=(probs.argmax(axis=1) + 1).astype(np.int16),
                        probability=probs.max(axis=1, initial=0.0).astype(np.float32))
    return table if keep_embedding else replace(table, embedding=table.embedding[:, :0])


def _csv_rows(table: CellTable, ids: np.ndarray, geometry: SlideGeometry, class_names: Sequence[str]) -> list[list]:
    xy = table.centroid * geometry.scale
    area = table.area * (geometry.scale * geometry.mpp) ** 2
    return [[int(i), round(x, 2), round(y, 2), round(x * geometry.mpp, 3), round(y * geometry.mpp, 3), int(t),
             class_name(class_names, int(t)), round(float(p), 4), round(float(a), 2)]
            for i, (x, y), t, p, a in zip(ids.tolist(), xy.tolist(), table.type, table.probability, area)]


def _columns(table: CellTable, ids: np.ndarray, rings: list[np.ndarray], geometry: SlideGeometry,
             class_names: Sequence[str]) -> dict[str, np.ndarray]:
    """The cell table's columns (:class:`.outputs.ParquetStream`) of one block of nuclei."""
    xy = table.centroid * geometry.scale
    shape = morphometrics(rings)
    columns = {"id": ids, "x": xy[:, 0], "y": xy[:, 1],
               "x_um": xy[:, 0] * geometry.mpp, "y_um": xy[:, 1] * geometry.mpp,
               "type_id": table.type, "type": np.array([class_name(class_names, int(t)) for t in table.type], object),
               "probability": table.probability, "area_um2": table.area * (geometry.scale * geometry.mpp) ** 2,
               "perimeter_um": shape["perimeter"] * geometry.mpp, "solidity": shape["solidity"],
               "eccentricity": shape["eccentricity"]}
    return columns | ({"embedding": table.embedding} if table.embedding.shape[1] else {})


class _EmbeddingStream:
    """``<slide>_embeddings.npy`` (N, D) float32 filled part by part, and ``<slide>_embedding_ids.npy`` (N,)."""

    def __init__(self, vectors: Path, ids: Path, total: int, dim: int) -> None:
        self.store = np.lib.format.open_memmap(vectors, mode="w+", dtype=np.float32, shape=(total, dim))
        self.ids = np.lib.format.open_memmap(ids, mode="w+", dtype=np.int64, shape=(total,))
        self.filled = 0

    def write(self, ids: np.ndarray, embedding: np.ndarray) -> None:
        self.store[self.filled : self.filled + len(ids)] = embedding
        self.ids[self.filled : self.filled + len(ids)] = ids
        self.filled += len(ids)

    def close(self) -> None:
        self.store.flush()
        self.ids.flush()
        del self.store, self.ids


OUTPUTS = (".geojson", ".csv", ".parquet", "_overlay.png", "_mask.png")
EMBEDDING_OUTPUTS = ("_embeddings.npy", "_embedding_ids.npy")
GZIP_OUTPUT = ".geojson.gz"
REPORT_OUTPUT = "_report.html"  # written after the other outputs, before <slide>.json
TISSUE_OUTPUT = "_tissue.png"
ALL_OUTPUTS = OUTPUTS + EMBEDDING_OUTPUTS + (GZIP_OUTPUT, REPORT_OUTPUT, TISSUE_OUTPUT)


@dataclass
class _Thumbnail:
    """The slide's thumbnail (H, W, 3) uint8, its level-0 pixels per pixel, (H, W) bool what was analysed, and
    (H, W) bool pen marks to leave out (or None)."""

    image: np.ndarray
    scale: float
    analysed: np.ndarray
    ink: np.ndarray | None = None


def _kept(table: CellTable, geometry: SlideGeometry, region: Region | None, thumbnail: _Thumbnail,
          duplicates: np.ndarray) -> np.ndarray:
    """(N,) bool: the nuclei whose centroid lies in the region (all without one) and not on a pen mark, less the
    rows ``duplicates`` (fragments of a cut nucleus another tile keeps larger, :mod:`.cut_nuclei`)."""
    xy = table.centroid * geometry.scale
    keep = np.ones(len(table), dtype=bool) if region is None else region.contains(xy)
    keep[duplicates] = False
    if thumbnail.ink is not None:
        h, w = thumbnail.ink.shape
        cols = np.clip((xy[:, 0] / thumbnail.scale).astype(np.int64), 0, w - 1)
        rows = np.clip((xy[:, 1] / thumbnail.scale).astype(np.int64), 0, h - 1)
        keep &= ~thumbnail.ink[rows, cols]
    return keep


def _assemble(parts: _Parts, n_parts: int, output_dir: Path, name: str, geometry: SlideGeometry, grid: TileGrid,
              thumbnail: _Thumbnail, class_names: Sequence[str], colours: np.ndarray, tissue_names: Sequence[str],
              embeddings: bool, region: Region | None, timings: dict[str, float],
              gzip_level: int = 0) -> tuple[np.ndarray, dict | None]:
    """Stream the parts into the outputs, published together when all are complete; return the nuclei count per
    class id and the tissue summary (:func:`.tissue_map.tissue_summary` with the map's name and ``tile_stride``,
    level-0 pixels per map pixel; None without a tissue head) (``timings``: see :func:`_stream`)."""
    total = 0
    dim = 0
    tiles, tissue = [np.zeros((0, 2), np.int64)], [np.zeros((0, 0), np.float32)]
    found = duplicate_fragments((parts.load(k)[0] for k in range(n_parts)), grid)
    duplicates = [found.get(k, np.zeros(0, np.int64)) for k in range(n_parts)]
    for k in range(n_parts):
        table, part_tiles, part_tissue = parts.load(k)
        total += int(_kept(table, geometry, region, thumbnail, duplicates[k]).sum())
        dim = table.embedding.shape[1] if embeddings else 0
        tiles.append(part_tiles)
        tissue.append(part_tissue)
    probabilities = np.concatenate(tissue[1:]) if n_parts else tissue[0]
    suffixes = (OUTPUTS + (EMBEDDING_OUTPUTS if embeddings else ())
                + ((TISSUE_OUTPUT,) if probabilities.shape[1] else ()))
    suffixes += (GZIP_OUTPUT,) if gzip_level else ()
    with SlideOutputs(output_dir, name, suffixes) as tmp:
        if not cv2.imwrite(str(tmp["_mask.png"]), thumbnail.analysed.astype(np.uint8) * 255):
            raise OSError(f"could not write {tmp['_mask.png']}")
        summary = None
        if TISSUE_OUTPUT in tmp:
            image = tissue_map(np.concatenate(tiles), probabilities, grid.shape)
            if not cv2.imwrite(str(tmp[TISSUE_OUTPUT]), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
                raise OSError(f"could not write {tmp[TISSUE_OUTPUT]}")
            summary = {"map": f"{name}{TISSUE_OUTPUT}", "tile_stride": grid.stride * geometry.scale,
                       **tissue_summary(probabilities, tissue_names)}
        counts = _stream(parts, duplicates, tmp, total, dim, geometry, thumbnail, class_names, colours, embeddings,
                         region, timings, gzip_level)
    return counts, summary


def _stream(parts: _Parts, duplicates: list[np.ndarray], tmp: dict[str, Path], total: int, dim: int,
            geometry: SlideGeometry, thumbnail: _Thumbnail, class_names: Sequence[str], colours: np.ndarray,
            embeddings: bool, region: Region | None, timings: dict[str, float], gzip_level: int = 0) -> np.ndarray:
    """Write the parts (less each one's ``duplicates`` rows) into the temporaries ``tmp`` (by output suffix), each
    class id in its name and (C, 3) RGB colour; return the nuclei count per class id and
    add the seconds spent formatting and writing each table format to ``timings`` (the polygons, shared by
    GeoJSON and Parquet, count for GeoJSON; ``geojson.gz`` the compression of the same text at ``gzip_level``, 0:
    none)."""
    geojson = GeoJSONStream(tmp[".geojson"])
    compressed = GeoJSONStream(tmp[GZIP_OUTPUT], gzip_level) if gzip_level else None
    table_csv = CSVStream(tmp[".csv"], ["id", "x", "y", "x_um", "y_um", "type_id", "type", "probability", "area_um2"])
    cells = ParquetStream(tmp[".parquet"], dim if embeddings else 0)
    vectors = _EmbeddingStream(tmp[EMBEDDING_OUTPUTS[0]], tmp[EMBEDDING_OUTPUTS[1]], total, dim) if embeddings else None
    counts = np.zeros(len(class_names), dtype=np.int64)
    overlay = thumbnail.image.copy()
    next_id = 1
    clock = time.perf_counter
    try:
        for k, left_out in enumerate(duplicates):
            table = CellTable.load(parts.path(k))
            table = table.select(_kept(table, geometry, region, thumbnail, left_out))
            ids = np.arange(next_id, next_id + len(table))
            next_id += len(table)
            t0 = clock()
            rings = closed_rings(table.contour_xy, table.contour_start, geometry.scale)
            area = table.area * (geometry.scale * geometry.mpp) ** 2
            text = geojson_features(rings, ids, table.type, table.probability, area, class_names, colours)
            geojson.write(text)
            t1 = clock()
            if compressed is not None:
                compressed.write(text)
                timings[GZIP_OUTPUT] = timings.get(GZIP_OUTPUT, 0.0) + clock() - t1
                t1 = clock()
            table_csv.write(_csv_rows(table, ids, geometry, class_names))
            t2 = clock()
            cells.write(_columns(table, ids, rings, geometry, class_names))
            t3 = clock()
            for suffix, seconds in ((".geojson", t1 - t0), (".csv", t2 - t1), (".parquet", t3 - t2)):
                timings[suffix] = timings.get(suffix, 0.0) + seconds
            if vectors is not None:
                vectors.write(ids, table.embedding)
            types = np.minimum(table.type, len(class_names) - 1)
            counts += np.bincount(types, minlength=len(class_names))
            dots = np.floor(table.centroid * geometry.scale / thumbnail.scale).astype(np.int64)
            dots = np.minimum(dots, np.array(overlay.shape[1::-1]) - 1)
            overlay[dots[:, 1], dots[:, 0]] = colours[types]
        geojson.close()
        if compressed is not None:
            t0 = clock()
            compressed.close()
            timings[GZIP_OUTPUT] += clock() - t0
        table_csv.close()
        cells.close()
    except BaseException:
        geojson.discard()
        if compressed is not None:
            compressed.discard()
        table_csv.discard()
        cells.discard()
        raise
    finally:
        if vectors is not None:
            vectors.close()
    if not cv2.imwrite(str(tmp["_overlay.png"]), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {tmp['_overlay.png']}")
    return counts


def run_slide(slide_path: str | Path, output_dir: str | Path, predictor: Predictor, class_names: Sequence[str],
              settings: WSISettings = WSISettings(), predictor_id: str = "", pool: Executor | None = None,
              position: int = 0, roi: str | Path | None = None, classifier: Classifier | None = None,
              tissue_names: Sequence[str] = (), mpp: float | None = None) -> dict:
    """Analyse one slide (see the module docstring) and return its summary (also written as ``<slide>.json``).

    Args:
        slide_path: the slide.
        output_dir: where the outputs go (created).
        predictor: tiles -> maps (:mod:`.predictors`).
        class_names: class names of the predictor's type branch, background first.
        settings: analysis settings.
        predictor_id: identifies the predictor's weights, so resuming with other weights starts over.
        pool: post-processing workers (None: post-process in this process).
        position: line of the progress bar.
        roi: a region file (:mod:`.regions`): only tiles meeting it are analysed and only nuclei whose centroid
            lies in it are kept (None: the whole slide).
        classifier: types every nucleus from its embedding, with its own class names and colours (None: the
            predictor's types, ``class_names``).
        tissue_names: names of the tissue head's classes (``tissue_<k>`` beyond them).
        mpp: this slide's microns per level-0 pixel, overriding what it records (None: what it records, else
            ``settings.mpp``).

    Raises:
        SlideError: the slide cannot be read or has no resolution.
        ValueError, FileNotFoundError: the region file is missing, unreadable or does not fit the slide.
    """
    slide_path = Path(slide_path)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    name = slide_path.name
    summary_path = output_path(output_dir, name, ".json")
    parts_folder = output_dir / f".{name}.parts"
    with open_slide(slide_path, settings.backend) as slide:
        geometry = slide_geometry(slide, settings, mpp)
        region = None if roi is None else read_region(roi, *slide.dimensions)
        fingerprint = _fingerprint(slide, geometry, settings, predictor_id, region, classifier)
        previous = _finished(summary_path, fingerprint)
        if previous is not None:
            shutil.rmtree(parts_folder, ignore_errors=True)  # left by a run killed after publishing its summary
            return previous
        started = time.perf_counter()
        thumbnail, thumb_scale = slide.thumbnail(settings.thumbnail_size)
        mask = tissue_mask(thumbnail, settings.min_saturation)
        ink = None
        if settings.exclude_pen_marks:
            ink = pen_mask(thumbnail, (settings.pen_hue_min, settings.pen_hue_max), settings.pen_min_saturation,
                           settings.pen_max_black_value)
            mask &= ~ink
        if region is not None:
            mask &= region.raster(mask.shape, thumb_scale)
        grid = TileGrid(geometry.width, geometry.height, settings.tile_size, settings.overlap)
        grid = grid.with_processed(grid.tissue_tiles(mask, thumb_scale / geometry.scale, settings.min_tissue_fraction))
        out_of_focus = None
        if settings.exclude_blur:
            blurred = _out_of_focus(slide, geometry, grid, settings)
            out_of_focus = int(blurred.sum())
            grid = grid.with_processed(grid.processed & ~blurred)
        tiles = np.argwhere(grid.processed)
        analysed = _covered(grid, tiles, mask.shape, thumb_scale / geometry.scale)
        if region is not None:
            analysed &= region.raster(mask.shape, thumb_scale)
        if ink is not None:
            analysed &= ~ink
        chunks = _chunks(tiles, settings.chunk_tiles)
        parts = _Parts(parts_folder, fingerprint)
        todo = [(k, t) for k, t in enumerate(chunks) if not parts.done(k)]
        progress = tqdm(total=len(tiles), initial=len(tiles) - sum(len(t) for _, t in todo), unit="tile",
                        desc=slide_path.name, position=position, dynamic_ncols=True, mininterval=1.0)
        stain = _stain_normalizer(settings, thumbnail[mask]) if settings.stain_normalization and todo else None
        with progress:
            _predict_parts(slide, geometry, grid, todo, parts, predictor, settings, pool, progress, stain, classifier)
        view = _Thumbnail(thumbnail, thumb_scale, analysed, ink)
        timings: dict[str, float] = {}
        if classifier is not None:
            class_names = list(classifier.names)
        colours = np.array(classifier.colours if classifier is not None else
                           [class_color(t) for t in range(len(class_names))], dtype=np.uint8).reshape(-1, 3)
        counts, tissue = _assemble(parts, len(chunks), output_dir, name, geometry, grid, view, class_names, colours,
                                   tissue_names, settings.embeddings, region, timings, settings.geojson_gzip)
        width, height = slide.dimensions
    summary = {
        "slide": str(slide_path), "width": width, "height": height, "mpp": geometry.mpp,
        "analysed_mpp": geometry.mpp * geometry.scale, "level": geometry.level, "scale": geometry.scale,
        "tiles": int(len(tiles)), "tiles_total": int(np.prod(grid.shape)),
        "tiles_out_of_focus": out_of_focus, "cells": int(counts.sum()),
        "cells_per_class": {class_name(class_names, i): int(c) for i, c in enumerate(counts) if i > 0},
        "class_colours": {class_name(class_names, i): c.tolist() for i, c in enumerate(colours) if i > 0},
        "classifier": None if classifier is None else str(classifier.path),
        "embedding_source": settings.embedding_source if settings.embeddings or classifier is not None else None,
        "tissue": tissue,
        "settings": asdict(settings), "predictor": predictor_id, "fingerprint": fingerprint,
        "roi": None if region is None else str(region.source),
        "seconds": round(time.perf_counter() - started, 2),
        "write_seconds": {suffix.lstrip("."): round(t, 2) for suffix, t in timings.items()},
        "outputs": [f"{name}{suffix}" for suffix in OUTPUTS + (EMBEDDING_OUTPUTS if settings.embeddings else ())
                    + ((TISSUE_OUTPUT,) if tissue is not None else ())
                    + ((GZIP_OUTPUT,) if settings.geojson_gzip else ()) + (REPORT_OUTPUT,)],
    }
    write_report(output_path(output_dir, name, REPORT_OUTPUT), summary, output_dir, settings.report_grid_um)
    for suffix in ALL_OUTPUTS:  # an earlier run's outputs this one does not write would describe other nuclei
        if f"{name}{suffix}" not in summary["outputs"]:
            output_path(output_dir, name, suffix).unlink(missing_ok=True)
    write_text_atomic(summary_path, json.dumps(summary, indent=1))
    shutil.rmtree(parts.folder)
    return summary


def _out_of_focus(slide: Slide, geometry: SlideGeometry, grid: TileGrid, settings: WSISettings) -> np.ndarray:
    """(rows, cols) bool: the processed tiles whose :func:`.tissue.focus_measure` is below ``settings.blur_min_focus``,
    each tile read from the pyramid level nearest ``settings.blur_mpp`` (not coarser) and area-averaged to it."""
    focus_scale = settings.blur_mpp / geometry.mpp  # level-0 pixels per pixel of the focus measure
    level = slide.best_level(focus_scale)
    downsample = slide.level_downsamples[level]
    extent = math.ceil(grid.size * geometry.scale / downsample)
    side = max(8, round(grid.size * geometry.scale / focus_scale))
    blurred = np.zeros(grid.shape, dtype=bool)
    for row, col in np.argwhere(grid.processed):
        x, y = grid.origin(row, col)
        image = slide.read_region(int(x * geometry.scale / downsample), int(y * geometry.scale / downsample), extent,
                                  extent, level)
        image = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
        blurred[row, col] = focus_measure(image, settings.min_saturation) < settings.blur_min_focus
    return blurred


def _stain_normalizer(settings: WSISettings, tissue: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Macenko normalisation to the configured target, fitted on the slide's (N, 3) tissue pixels."""
    from ..data.stain import MacenkoNormalizer  # imports torch

    normalizer = MacenkoNormalizer(settings.stain_vectors, settings.stain_max_concentrations, settings.stain_reference)
    normalizer.fit_source(tissue)  # too little tissue: each tile is estimated on its own
    return normalizer


def _covered(grid: TileGrid, tiles: np.ndarray, shape: tuple[int, int], scale: float) -> np.ndarray:
    """(H, W) bool of a thumbnail of ``shape`` (``scale`` analysed pixels per pixel): the area of the tiles."""
    covered = np.zeros(shape, dtype=bool)
    for row, col in tiles.tolist():
        x, y = grid.origin(row, col)
        rows = slice(int(y // scale), math.ceil((y + grid.size) / scale))
        covered[rows, int(x // scale) : math.ceil((x + grid.size) / scale)] = True
    return covered


def _finished(summary_path: Path, fingerprint: str) -> dict | None:
    """The summary of a finished run with this fingerprint whose outputs are all there, else None.

    A summary that does not qualify is deleted before anything else is written, so outputs of a new run never
    sit beside the summary of another (a later run with the old settings would take them as its own).
    """
    if not summary_path.is_file():
        return None
    try:
        previous = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        previous = {}
    outputs = previous.get("outputs") if isinstance(previous, dict) else None
    if (previous.get("fingerprint") == fingerprint and isinstance(outputs, list)
            and all((summary_path.parent / n).is_file() for n in outputs)):
        return previous
    summary_path.unlink()
    directory = os.open(summary_path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the deletion reaches the disk before any new output
    finally:
        os.close(directory)
    return None


def run_cohort(inputs: str | Path | Sequence[str | Path], output_dir: str | Path, predictor: Predictor,
               class_names: Sequence[str], settings: WSISettings = WSISettings(), predictor_id: str = "",
               rank: int | None = None, world_size: int | None = None, roi: str | Path | None = None,
               classifier: Classifier | None = None, tissue_names: Sequence[str] = ()) -> list[dict]:
    """Analyse every slide of ``inputs`` (:func:`.cohort.list_slides`: a slide, folder, ``.txt`` or ``.csv`` list);
    this process takes every ``world_size``-th slide from ``rank`` (default: torchrun's ``RANK``/``WORLD_SIZE``,
    else all).

    A slide's own ``mpp`` (CSV column) overrides the resolution it records; ``settings.mpp`` is used only for slides
    that record none. A slide's ``roi`` (CSV column) takes precedence over ``roi`` (a region file for every slide,
    or a folder of them named after the slides, :func:`.regions.find_region`). Whatever stops a slide is reported
    with the others that failed at the end; the others are still analysed. ``classifier`` and
    ``tissue_names``: see :func:`run_slide`.

    Raises:
        ValueError: before any work, when two slides would write the same outputs (equal file names).
        SlideError: listing the slides that failed and why.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    entries = list_slides(inputs)
    check_unique_names([e.path for e in entries if e.problem is None])
    entries = entries[rank::world_size]
    summaries, failures = [], [e.problem for e in entries if e.problem is not None]
    pool = postprocess_pool(settings.postprocess_workers)
    try:
        for entry in (e for e in entries if e.problem is None):
            path = entry.path
            try:
                region = entry.roi if entry.roi is not None or roi is None else find_region(roi, path)
                summaries.append(run_slide(path, output_dir, predictor, class_names, settings, predictor_id,
                                           pool, position=rank, roi=region, classifier=classifier,
                                           tissue_names=tissue_names, mpp=entry.mpp))
            except Exception as err:  # one bad slide (unreadable, malformed region file, ...) never stops a cohort
                expected = isinstance(err, (SlideError, OSError, ValueError))
                reason = str(err) if expected else f"{type(err).__name__}: {err}"
                failures.append(reason if str(path) in reason else f"{path}: {reason}")
    finally:
        if pool is not None:
            pool.shutdown()
    if failures:
        raise SlideError(f"{len(failures)} of {len(entries)} slides failed:\n" + "\n".join(failures))
    return summaries
