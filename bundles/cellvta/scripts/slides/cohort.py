"""The slides of a cohort, each with its own resolution and region of interest when given.

A cohort is named by one of:

* a slide: a file, or a DICOM series (a folder of ``.dcm`` files, or one of them: :mod:`.readers`);
* a folder: every slide in it (by extension, hidden files left out) and every sub-folder holding ``.dcm``
  files (a DICOM series, named by its folder: ``cohort/case7/*.dcm`` writes ``case7.geojson``, ...), in name
  order; a folder that itself holds ``.dcm`` files is one DICOM slide;
* a ``.txt`` file: one slide path per line;
* a ``.csv`` file with a header holding ``path`` and optionally ``mpp`` (microns per level-0 pixel, for slides
  that do not record it or record it wrongly) and ``roi`` (a region file, :mod:`.regions`); relative paths are
  relative to the CSV's folder, empty cells mean "not given";
* a list of paths.

A CSV row that cannot be used (no path, an mpp that is not a positive number) becomes an entry with a
``problem``: the cohort reports it at the end with the slides that failed, the other slides are analysed.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .readers import DICOM_SUFFIX

__all__ = ["SLIDE_SUFFIXES", "SlideEntry", "is_dicom_folder", "list_slides"]

SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff")


@dataclass(frozen=True)
class SlideEntry:
    """One slide of a cohort.

    Attributes:
        path: the slide.
        mpp: its microns per level-0 pixel, overriding what the slide records (None: the slide's, else the
            cohort's ``--mpp``).
        roi: its region file (None: the cohort's ``--roi``, else the whole slide).
        problem: why the entry cannot be analysed (None when it can).
    """

    path: Path
    mpp: float | None = None
    roi: Path | None = None
    problem: str | None = None


def _positive(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value > 0 and value != float("inf") else None


def _read_csv(path: Path) -> list[SlideEntry]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    columns = {c.strip().lower(): c for c in rows[0] if c is not None}
    if "path" not in columns:
        raise ValueError(f"{path}: a cohort CSV needs a 'path' column (and optionally 'mpp', 'roi'); "
                         f"found {sorted(columns)}")
    entries = []
    for line, row in enumerate(rows, start=2):
        cell = {key: (row.get(name) or "").strip() for key, name in columns.items()}
        where = f"{path}, line {line}"
        if not cell["path"]:
            entries.append(SlideEntry(Path(where), problem=f"{where}: no slide path"))
            continue
        slide = path.parent / cell["path"]
        mpp = _positive(cell.get("mpp", "")) if cell.get("mpp") else None
        if cell.get("mpp") and mpp is None:
            entries.append(SlideEntry(slide, problem=f"{where}: mpp {cell['mpp']!r} is not a positive number"))
            continue
        entries.append(SlideEntry(slide, mpp, path.parent / cell["roi"] if cell.get("roi") else None))
    return entries


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def is_dicom_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding ``.dcm`` files (a DICOM whole-slide series)."""
    return path.is_dir() and any(p.suffix.lower() == DICOM_SUFFIX for p in _visible(path))


def list_slides(inputs: str | Path | Sequence[str | Path]) -> list[SlideEntry]:
    """The slides named by ``inputs`` (see the module docstring).

    Raises:
        FileNotFoundError: a ``.txt`` or ``.csv`` list that does not exist.
        ValueError: a CSV without a ``path`` column; a folder holding both ``.dcm`` files and other slides.
    """
    if not isinstance(inputs, (str, Path)):
        return [SlideEntry(Path(p)) for p in inputs]
    path = Path(inputs)
    if path.is_dir():
        slides = [p for p in _visible(path)
                  if (p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES) or is_dicom_folder(p)]
        if not is_dicom_folder(path):
            return [SlideEntry(p) for p in slides]
        if slides:
            raise ValueError(f"{path}: holds .dcm files (one DICOM slide) and other slides ({slides[0].name}, ...): "
                             f"put the DICOM series in a folder of its own")
        return [SlideEntry(path)]
    if path.suffix.lower() in (".txt", ".csv"):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: slide list not found")
        if path.suffix.lower() == ".csv":
            return _read_csv(path)
        return [SlideEntry(Path(line.strip())) for line in path.read_text().splitlines() if line.strip()]
    return [SlideEntry(path)]
