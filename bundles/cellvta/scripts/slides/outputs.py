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
