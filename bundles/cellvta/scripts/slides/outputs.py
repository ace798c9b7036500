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
import functools
import gzip
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


_MINUS = ord("-")


def _bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8)


def _text_table(texts: Sequence[str], width: int, dtype: type = np.uint8) -> np.ndarray:
    """(len(texts), width / itemsize) ``dtype`` views of ASCII texts, each right-aligned in ``width`` bytes and padded
    with NULs."""
    return np.frombuffer("".join(t.rjust(width, "\0") for t in texts).encode("ascii"), dtype).reshape(len(texts), -1)


@functools.cache
def _digit_tables() -> tuple[np.ndarray, np.ndarray]:
    """(20000,) uint32 views of 4 ASCII bytes: at ``i < 10000`` the number ``i`` right-aligned, NUL-padded (a leading
    group, zero all NULs in the first table and ``\0\0\00`` in the second, for a number's only group), at
    ``10000 + i`` the number zero-padded (``0042``, a group after a leading one)."""
    numbers = list(map(str, range(10000)))
    padded = [n.zfill(4) for n in numbers]
    return (_text_table(["", *numbers[1:], *padded], 4, np.uint32).ravel(),
            _text_table(numbers + padded, 4, np.uint32).ravel())


@functools.cache
def _fraction_table(digits: int, after: str = "") -> np.ndarray:
    """(10**digits, F) uint32 views of ``4 F`` ASCII bytes: ``.`` and the decimals of ``i / 10**digits`` without
    trailing zeros (one kept), NUL-padded, then ``after`` in the last bytes: ``.0``, ``.01``, ..., ``.5``."""
    width = 4 * -(-(digits + 1 + len(after)) // 4)
    texts = [("." + str(i).zfill(digits).rstrip("0")).ljust(2, "0").ljust(width - len(after), "\0") + after
             for i in range(10**digits)]
    return np.frombuffer("".join(texts).encode("ascii"), np.uint32).reshape(10**digits, -1)


def _integer_groups(values: np.ndarray, extra: int = 0) -> np.ndarray:
    """(N, G + extra) uint32: in the first G columns the ASCII decimal digits of (N,) non-negative int64 values,
    four bytes a column, NULs in place of leading zeros; ``extra`` columns left for the caller."""
    groups = []
    rest = values
    while True:
        higher = rest // 10000
        groups.append(rest - higher * 10000)
        rest = higher
        if not rest.any():
            break
    leading, only = _digit_tables()
    text = np.empty((len(values), len(groups) + extra), dtype=np.uint32)
    index = groups.pop()
    for j, group in enumerate(reversed(groups)):
        text[:, j] = leading[index]
        index = group + (index > 0) * 10000  # zero-padded once a higher group is not zero
    text[:, len(groups)] = only[index]
    return text


def _number_words(values: np.ndarray, digits: int, after: str = "", python_round: bool = False) -> np.ndarray:
    """(N, W) uint32 views of ASCII text, NUL-padded: per value the text ``json.dumps`` gives it rounded to
    ``digits`` (1 to 4) decimals by ``np.round`` (by Python's ``round`` when ``python_round``), then ``after``.

    A double rounded to a few decimals prints as its shortest round-trip repr, which for magnitudes below 1e13 is
    the decimal with trailing zeros removed (one kept): ``12.5``, ``3.0``, ``0.07``, ``-0.0``.

    Raises:
        ValueError: a value is not finite or too large to print without an exponent.
    """
    x = np.asarray(values, dtype=np.float64)
    unit = 10**digits
    scaled = x * unit
    k = np.rint(scaled)  # np.round is rint(x * 10**d) / 10**d
    if python_round:  # the decimal nearest the exact binary value: may differ where x * 10**d is near a half
        near = np.flatnonzero(np.abs(np.abs(scaled - np.trunc(scaled)) - 0.5) < 1e-6 * np.maximum(1, np.abs(scaled)))
        k[near] = [round(round(v, digits) * unit) for v in x[near].tolist()]
    if not np.isfinite(k).all() or (len(k) and np.abs(k).max() >= 1e15):
        raise ValueError("GeoJSON numbers must be finite and below 1e13")
    whole = np.abs(k).astype(np.int64)
    integral = whole // unit
    fraction = _fraction_table(digits, after)
    text = _integer_groups(integral, fraction.shape[1])
    text[:, -fraction.shape[1] :] = fraction[whole - integral * unit]
    negative = np.signbit(k)
    if negative.any():
        return np.hstack([np.where(negative, _MINUS, 0).astype(np.uint32)[:, None], text])
    return text


def _number_text(values: np.ndarray, digits: int, python_round: bool = False) -> np.ndarray:
    """:func:`_number_words` as (N, 4 W) uint8."""
    return _number_words(values, digits, python_round=python_round).view(np.uint8)


def _columns(*columns: np.ndarray | str, n: int) -> np.ndarray:
    """(n, W) uint8: text columns side by side, each an (n, w) uint8 array or a ``str`` repeated on every row."""
    blocks = [_bytes(c) if isinstance(c, str) else c for c in columns]
    table = np.empty((n, sum(b.shape[-1] for b in blocks)), dtype=np.uint8)
    at = 0
    for block in blocks:
        table[:, at : at + block.shape[-1]] = block
        at += block.shape[-1]
    return table


def geojson_features(rings: Sequence[np.ndarray], ids: np.ndarray, types: np.ndarray, probability: np.ndarray,
                     area_um2: np.ndarray, class_names: Sequence[str], colors: np.ndarray) -> bytes:
    """QuPath detections as compact JSON text joined by ``",\\n"``, formatted by array operations on bytes.

    Each feature's text equals ``json.dumps(feature, separators=(",", ":"))`` of
    ``{"type": "Feature", "geometry": Polygon(ring rounded to 2 decimals by np.round), "properties": {"objectType":
    "detection", "classification": {"name", "color"}, "measurements": {"cell_id", "type_probability",
    "area_um2"}}}``, with probability and area rounded by Python's ``round`` to 4 and 2 decimals.

    The text is laid out as a table of NUL-padded rows, one per vertex, each ring's vertices followed by rows
    holding the end of its feature and the start of the next, and read out with the NULs dropped.

    Args:
        rings: N closed rings, (K + 1, 2) float ``(x, y)``.
        ids, types: (N,) int cell ids and class ids.
        probability, area_um2: (N,) float.
        class_names: names by class id (ids beyond the list are ``class_<id>``).
        colors: (C, 3) int RGB by class id (ids beyond it cycle through it after background).

    Returns:
        ASCII text (empty without rings).
    """
    n = len(rings)
    if not n:
        return b""
    ends = np.cumsum([len(r) for r in rings])
    coords = np.concatenate(rings)
    following = np.full((len(coords), 1), np.frombuffer(b",[\0\0", np.uint32)[0], dtype=np.uint32)
    following[ends - 1] = 0
    # a vertex ``x,y],[`` in 4-byte words, the ``[`` of a ring's first vertex written by the text before it
    vertices = np.hstack([_number_words(coords[:, 0], 2, ","), _number_words(coords[:, 1], 2, "]"),
                          following]).view(np.uint8)

    types = np.asarray(types, dtype=np.int64)
    present = np.unique(types)
    labels = []
    for t in present.tolist():
        name = class_names[t] if t < len(class_names) else f"class_{t}"
        color = colors[t] if t < len(colors) else colors[1 + (t - 1) % (len(colors) - 1)]
        labels.append('%s,"color":[%d,%d,%d]' % (json.dumps(name), *map(int, color)))
    head = '{"type":"Feature","geometry":{"type":"Polygon","coordinates":[[['
    following = np.tile(_bytes(",\n" + head), (n, 1))
    following[-1] = 0
    tails = _columns(']]},"properties":{"objectType":"detection","classification":{"name":',
                     _text_table(labels, max(map(len, labels)))[np.searchsorted(present, types)],
                     '},"measurements":{"cell_id":', _integer_groups(np.asarray(ids, dtype=np.int64)).view(np.uint8),
                     ',"type_probability":', _number_text(probability, 4, python_round=True),
                     ',"area_um2":', _number_text(area_um2, 2, python_round=True), "}}}", following, n=n)

    width = vertices.shape[1]
    per = -(-tails.shape[1] // width)  # rows of the vertex width holding one tail
    lead = -(-len(head) // width)  # rows holding the first feature's start
    tail_rows = ((lead + ends + np.arange(n) * per)[:, None] + np.arange(per)).ravel()
    text = bytearray((lead + len(coords) + n * per) * width)
    table = np.frombuffer(text, dtype=np.uint8).reshape(-1, width)
    table.reshape(-1)[: len(head)] = _bytes(head)
    is_vertex = np.ones(len(table), dtype=bool)
    is_vertex[:lead] = is_vertex[tail_rows] = False
    table[is_vertex] = vertices
    table[tail_rows] = np.pad(tails, ((0, 0), (0, per * width - tails.shape[1]))).reshape(-1, width)
    return bytes(text.translate(None, b"\0"))


class GeoJSONStream:
    """A GeoJSON FeatureCollection written block by block into a file, gzip-compressed when ``gzip_level`` is given
    (with no file name or time in the gzip header, so equal collections give equal files)."""

    def __init__(self, path: Path, gzip_level: int | None = None) -> None:
        self._file = open(path, "wb")
        self._out = self._file if gzip_level is None else gzip.GzipFile(
            filename="", mode="wb", compresslevel=gzip_level, fileobj=self._file, mtime=0)
        self._out.write(b'{"type": "FeatureCollection", "features": [\n')
        self._first = True

    def write(self, features: bytes) -> None:
        """Append features given as JSON text (:func:`geojson_features`)."""
        if not features:
            return
        if not self._first:
            self._out.write(b",\n")
        self._out.write(features)
        self._first = False

    def close(self) -> None:
        """Finish the collection."""
        self._out.write(b"\n]}\n")
        self._out.close()
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
