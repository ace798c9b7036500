"""The files one slide's analysis publishes: names that cannot collide, streamed writers, all-or-nothing publication.

Every output of a slide is named after the slide's full file name (``case.1.tif`` -> ``case.1.tif.geojson``,
``case.1.tif.csv``, ``case.1.tif_overlay.png``, ``case.1.tif.json``), so two slides of one folder never share an
output, whatever their extensions or dots. Slides of one cohort from different folders with the same file name
are refused before any work (:func:`check_unique_names`).

:class:`SlideOutputs` writes each file to a hidden temporary beside its final name (:func:`scripts.files.atomic_path`)
and publishes all of them only when every one is complete; on any error (a full disk, an interrupt) every
temporary is removed and no output of the failed run appears.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType

import numpy as np
import shapely

from ..files import atomic_path

__all__ = ["CSVStream", "GeoJSONStream", "SlideOutputs", "check_unique_names", "geojson_features", "output_path"]


def output_path(output_dir: str | Path, slide_name: str, suffix: str) -> Path:
    """``<output_dir>/<slide_name><suffix>``, e.g. ``("out", "case.1.tif", ".csv") -> out/case.1.tif.csv``.

    Raises:
        ValueError: ``slide_name`` is not a plain file name (it would lead outside ``output_dir``).
    """
    if not slide_name or slide_name in {".", ".."} or Path(slide_name).name != slide_name:
        raise ValueError(f"{slide_name!r}: not a slide file name")
    return Path(output_dir) / f"{slide_name}{suffix}"


def check_unique_names(slides: Sequence[str | Path]) -> None:
    """Refuse slides whose outputs would share names: equal file names (ignoring case, as some file systems do).

    Raises:
        ValueError: naming both slides of the first collision.
    """
    seen: dict[str, Path] = {}
    for slide in map(Path, slides):
        key = slide.name.casefold()
        if key in seen and seen[key].resolve() != slide.resolve():
            raise ValueError(f"{seen[key]} and {slide} would write the same outputs ({slide.name}.*): "
                             f"rename one or analyse them into different output folders")
        seen.setdefault(key, slide)


def _rounded(values: np.ndarray, digits: int) -> list[float]:
    return [round(v, digits) for v in np.asarray(values, dtype=np.float64).tolist()]


def geojson_features(rings: Sequence[np.ndarray], ids: np.ndarray, types: np.ndarray, probability: np.ndarray,
                     area_um2: np.ndarray, class_names: Sequence[str], colors: np.ndarray) -> list[str]:
    """QuPath detections as compact JSON text, one string per nucleus, formatted in bulk.

    The text equals ``json.dumps(feature, separators=(",", ":"))`` of the feature
    ``{"type": "Feature", "geometry": Polygon(ring rounded to 2 decimals), "properties": {"objectType": "detection",
    "classification": {"name", "color"}, "measurements": {"cell_id", "type_probability", "area_um2"}}}``.

    Args:
        rings: N closed rings, (K + 1, 2) float ``(x, y)``.
        ids, types: (N,) int cell ids and class ids.
        probability, area_um2: (N,) float, rounded to 4 and 2 decimals.
        class_names: names by class id (ids beyond the list are ``class_<id>``).
        colors: (C, 3) int RGB by class id (ids beyond it cycle through it after background).
    """
    if not len(rings):
        return []
    coords = np.concatenate(rings).round(2)
    vertices = (("[%r,%r]\n" * len(coords)) % tuple(coords.ravel().tolist())).split("\n")
    bounds = np.concatenate([[0], np.cumsum([len(r) for r in rings])]).tolist()
    names = {}
    template = ('{"type":"Feature","geometry":{"type":"Polygon","coordinates":[[%s]]},"properties":{"objectType":'
                '"detection","classification":{"name":%s,"color":[%d,%d,%d]},"measurements":{"cell_id":%d,'
                '"type_probability":%r,"area_um2":%r}}}')
    out = []
    for k, (t, i, p, a) in enumerate(zip(np.asarray(types).tolist(), np.asarray(ids).tolist(),
                                         _rounded(probability, 4), _rounded(area_um2, 2))):
        if t not in names:
            name = class_names[t] if t < len(class_names) else f"class_{t}"
            color = colors[t] if t < len(colors) else colors[1 + (t - 1) % (len(colors) - 1)]
            names[t] = (json.dumps(name), *map(int, color))
        out.append(template % (",".join(vertices[bounds[k] : bounds[k + 1]]), *names[t], i, p, a))
    return out


class GeoJSONStream:
    """A GeoJSON FeatureCollection written block by block into an open text file."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "w", encoding="utf-8")
        self._file.write('{"type": "FeatureCollection", "features": [\n')
        self._first = True

    def write(self, features: Sequence[str]) -> None:
        """Append features given as JSON text (:func:`geojson_features`)."""
        if not features:
            return
        text = ",\n".join(features)
        self._file.write(text if self._first else ",\n" + text)
        self._first = False

    def close(self) -> None:
        """Finish the collection."""
        self._file.write("\n]}\n")
        self._file.close()

    def discard(self) -> None:
        """Close the file unfinished (after an error)."""
        self._file.close()


class CSVStream:
    """A CSV table written block by block."""

    def __init__(self, path: Path, header: Sequence[str]) -> None:
        self._file = open(path, "w", encoding="utf-8", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(header)

    def write(self, rows: Sequence[Sequence[object]]) -> None:
        """Append rows."""
        self._writer.writerows(rows)

    def close(self) -> None:
        """Flush and close."""
        self._file.close()

    discard = close


class SlideOutputs:
    """Temporaries for a slide's output files, published together when the ``with`` block completes.

    Example::

        with SlideOutputs(out, "case.1.tif", [".geojson", ".csv"]) as tmp:
            tmp[".csv"].write_text(...)   # out/.case.1.tmp-<pid>.tif.csv
        # out/case.1.tif.geojson and out/case.1.tif.csv now exist; after an error neither they nor a temporary do
    """

    def __init__(self, output_dir: str | Path, slide_name: str, suffixes: Sequence[str]) -> None:
        self.paths = {s: output_path(output_dir, slide_name, s) for s in suffixes}
        self._stack = ExitStack()

    def __enter__(self) -> dict[str, Path]:
        with ExitStack() as stack:
            tmps = {s: stack.enter_context(atomic_path(p)) for s, p in self.paths.items()}
            self._stack = stack.pop_all()
        return tmps

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> bool:
        return bool(self._stack.__exit__(kind, error, traceback))


def morphometrics(rings: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Shape measurements of N closed polygon rings ((K + 1, 2) ``(x, y)``, first vertex repeated), computed in bulk.

    Returns:
        ``perimeter`` (N,) in the rings' units; ``solidity`` (N,) area over convex-hull area; ``eccentricity``
        (N,) of the ellipse with the polygon's second moments (0 a circle, towards 1 a line).
    """
    if not len(rings):
        return {k: np.zeros(0) for k in ("perimeter", "solidity", "eccentricity")}
    counts = np.array([len(r) for r in rings])
    coords = np.concatenate(rings).astype(np.float64)
    polygons = shapely.polygons(shapely.linearrings(coords, indices=np.repeat(np.arange(len(rings)), counts)))
    area = shapely.area(polygons)
    hull = shapely.area(shapely.convex_hull(polygons))
    # second moments by Green's theorem over each ring's edges (vertex i to i + 1 within a ring)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    x0, y0, x1, y1 = coords[:-1, 0], coords[:-1, 1], coords[1:, 0], coords[1:, 1]
    cross = x0 * y1 - x1 * y0
    edge = np.ones(len(coords) - 1, dtype=bool)
    edge[(first + counts - 1)[:-1]] = False  # the step from one ring's last vertex to the next ring's first

    def ring_sum(values: np.ndarray) -> np.ndarray:
        return np.add.reduceat(np.where(edge, values, 0.0), first)[: len(rings)]

    signed = ring_sum(cross) / 2
    safe = np.where(signed == 0, 1.0, signed)
    cx, cy = ring_sum((x0 + x1) * cross) / (6 * safe), ring_sum((y0 + y1) * cross) / (6 * safe)
    mu20 = ring_sum((x0 * x0 + x0 * x1 + x1 * x1) * cross) / (12 * safe) - cx * cx
    mu02 = ring_sum((y0 * y0 + y0 * y1 + y1 * y1) * cross) / (12 * safe) - cy * cy
    mu11 = ring_sum((x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) * cross) / (24 * safe) - cx * cy
    half_gap = np.sqrt(((mu20 - mu02) / 2) ** 2 + mu11**2)
    major, minor = (mu20 + mu02) / 2 + half_gap, np.maximum((mu20 + mu02) / 2 - half_gap, 0)
    eccentricity = np.sqrt(np.clip(1 - minor / np.where(major > 0, major, 1), 0, 1))
    solidity = np.where(hull > 0, area / np.where(hull > 0, hull, 1), 0.0)
    return {"perimeter": shapely.length(polygons), "solidity": solidity,
            "eccentricity": np.where(signed == 0, 0.0, eccentricity)}


class ParquetStream:
    """A columnar cell table (Parquet, one row group per block) written block by block.

    Columns: ``id`` int64; ``x, y`` level-0 pixels and ``x_um, y_um`` float64; ``type_id`` int16, ``type`` string;
    ``probability``, ``area_um2``, ``perimeter_um``, ``solidity``, ``eccentricity`` float32; and, when
    ``embedding_dim`` > 0, ``embedding`` as a fixed-size list of float32.
    """

    def __init__(self, path: Path, embedding_dim: int = 0) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pa = pa
        floats = ["probability", "area_um2", "perimeter_um", "solidity", "eccentricity"]
        fields = [pa.field("id", pa.int64())] + [pa.field(k, pa.float64()) for k in ("x", "y", "x_um", "y_um")]
        fields += [pa.field("type_id", pa.int16()), pa.field("type", pa.string())]
        fields += [pa.field(k, pa.float32()) for k in floats]
        if embedding_dim:
            fields.append(pa.field("embedding", pa.list_(pa.float32(), embedding_dim)))
        self.schema = pa.schema(fields)
        self._writer = pq.ParquetWriter(path, self.schema)

    def write(self, columns: dict[str, np.ndarray]) -> None:
        """Append a block given as arrays by column name (``embedding`` (N, D) when present)."""
        pa = self._pa
        arrays = []
        for field in self.schema:
            values = np.asarray(columns[field.name])
            if field.name == "embedding":
                flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).ravel())
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, values.shape[1]))
            elif field.name == "type":
                arrays.append(pa.array(values.tolist(), pa.string()))
            else:
                arrays.append(pa.array(values.astype(field.type.to_pandas_dtype())))
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))

    def close(self) -> None:
        """Write the footer and close."""
        self._writer.close()

    discard = close
