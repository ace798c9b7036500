"""The images of a tile-inference run: which files are processed, skipped or unreadable, and the final report.

Every file of the input folder is accounted for: hidden files (names starting with a dot) and files that are not
PNG/JPEG/TIFF are listed as skipped; images that cannot be read (0-byte, truncated, grayscale, ...) are listed as
failed with the reason, and the others are all processed. Outputs are named after the image's stem, so two images
with one stem (``t.png``, ``t.jpeg``) are refused before any work, naming both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..data.datasets import read_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def folder_files(folder: str | Path) -> list[str]:
    """All regular files of ``folder`` (hidden ones included), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: input folder not found")
    return sorted(str(folder / n) for n in os.listdir(folder) if (folder / n).is_file())


@dataclass
class TileInputs:
    """Sort the files of ``folder`` (or ``paths``) into images to process, skipped files and unreadable images.

    Args:
        folder: the input folder, all of whose files are considered (:func:`folder_files`).
        paths: the files to consider instead, when given.

    Raises:
        ValueError: two images share a stem (their outputs would overwrite each other), naming both.
    """

    folder: str | Path | None = None
    paths: list[str] | None = None
    images: list[str] = field(init=False, default_factory=list)
    skipped: list[tuple[str, str]] = field(init=False, default_factory=list)
    failed: list[tuple[str, str]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.paths is None:
            if self.folder is None:
                raise ValueError("give the input folder or a list of image paths")
            self.paths = folder_files(self.folder)
        stems: dict[str, str] = {}
        for path in map(str, self.paths):
            name = os.path.basename(path)
            if name.startswith("."):
                self.skipped.append((path, "hidden file (name starts with a dot)"))
            elif not name.lower().endswith(IMAGE_SUFFIXES):
                self.skipped.append((path, f"not an image ({', '.join(IMAGE_SUFFIXES)})"))
            else:
                stem = os.path.splitext(name)[0]
                if stem in stems:
                    raise ValueError(f"{stems[stem]} and {path} would both write the outputs '{stem}.*': "
                                     "rename one of them")
                stems[stem] = path
                self.images.append(path)
        for path in list(self.images):
            try:
                read_image(path)
            except Exception as e:  # noqa: BLE001 - any unreadable image is reported, the others still run
                self.images.remove(path)
                reason = str(e).removeprefix(f"{path}: ") or type(e).__name__
                self.failed.append((path, reason))

    @property
    def data(self) -> list[dict[str, str]]:
        """The workflow's data list: ``image`` and ``path`` (the file), ``name`` (its stem, the outputs' name)."""
        return [{"image": p, "path": p, "name": os.path.splitext(os.path.basename(p))[0]} for p in self.images]

    def report_lines(self) -> list[str]:
        """One line per skipped or failed file (``skipped <file>: <why>``, ``failed <file>: <reason>``)."""
        return ([f"skipped {p}: {why}" for p, why in self.skipped]
                + [f"failed {p}: {why.splitlines()[0]}" for p, why in self.failed])

    def report(self) -> None:
        """Print the report; exit with status 1 when an image failed."""
        for line in self.report_lines():
            print(line, flush=True)
        print(f"{len(self.images)} images processed, {len(self.failed)} failed, {len(self.skipped)} skipped",
              flush=True)
        if self.failed:
            raise SystemExit(f"{len(self.failed)} image(s) could not be read: see the 'failed' lines above")
