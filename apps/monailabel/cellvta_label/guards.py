"""The datastore as the server exposes it: every image and label id resolved inside the studies folder, labels
validated before they are stored, answers without server paths.

Refusals are ``fastapi.HTTPException`` (400 for a malformed request, 404 for an unknown id) raised from the
datastore itself, so every MONAI Label endpoint that reaches it answers with the reason instead of HTTP 500.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from .labels import LABEL_SUFFIXES, validate_label
from .regions import SLIDE_SUFFIXES, image_extent

logger = logging.getLogger(__name__)

TILE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_SUFFIXES = tuple(sorted(set(TILE_SUFFIXES + SLIDE_SUFFIXES)))
MAX_NAME = 200


def _patterns(suffixes: tuple[str, ...]) -> list[str]:
    """``*.ext`` patterns of ``suffixes`` in lower and upper case (the local datastore matches case-sensitively)."""
    return [f"*{s}" for s in suffixes] + [f"*{s.upper()}" for s in suffixes]


def check_name(value: Any, what: str) -> str:
    """``value`` if it is a plain file name (no folder part, no leading dot), else HTTP 400."""
    if not isinstance(value, str) or not value:
        raise HTTPException(400, f"{what}: missing")
    if (len(value) > MAX_NAME or value.startswith(".") or any(c in value for c in "/\\\0")
            or Path(value).is_absolute()):
        raise HTTPException(400, f"{what} {value!r}: not an id of the datastore (a plain name: no folders, no "
                                 "leading dot)")
    return value


def public_message(message: str, roots: dict[str, str]) -> str:
    """``message`` with every server folder of ``roots`` (folder -> what to say instead) replaced."""
    for folder, name in sorted(roots.items(), key=lambda kv: -len(kv[0])):
        message = message.replace(folder.rstrip("/") + "/", name).replace(folder, name.rstrip("/") or "<server>")
    return message


def is_upload(path: str) -> bool:
    """True for the temporary file MONAI Label writes an uploaded image to (``<tmp>/tmpXXXXXXXX.<ext>``)."""
    candidate = Path(path)
    return (candidate.parent == Path(tempfile.gettempdir()) and candidate.name.startswith("tmp")
            and candidate.is_file())


class SafeDatastore(LocalDatastore):
    """MONAI Label's local datastore with ids confined to the studies folder and validated labels.

    Images: PNG/JPEG tiles and slides (every suffix of ``IMAGE_SUFFIXES``, any case). Labels: ASAP XML, GeoJSON
    and ``.npz`` maps (``labels.LABEL_SUFFIXES``), checked against their image before they are stored. Removing a
    label removes its file and its entry at once.

    Args:
        studies: the studies folder.
        auto_reload: watch the folder for images added or removed by hand.
        read_only: do not reconcile the datastore file with the folder at start.
        num_classes: callable giving the served model's class count (background included) for ``.npz`` labels.
    """

    def __init__(self, studies: str, auto_reload: bool, read_only: bool, num_classes) -> None:
        self._num_classes = num_classes
        self._context = threading.local()
        super().__init__(studies, extensions=_patterns(IMAGE_SUFFIXES + LABEL_SUFFIXES), auto_reload=auto_reload,
                         read_only=read_only)
        self.roots = {str(Path(studies).resolve()): "", tempfile.gettempdir(): "upload:"}

    # -- listing: images only in the studies folder, label files only in the label folders -------------------
    def _list_files(self, path, patterns):
        is_images = Path(path).resolve() == Path(self._datastore.image_path()).resolve()
        allowed = _patterns(IMAGE_SUFFIXES if is_images else LABEL_SUFFIXES)
        return super()._list_files(path, [p for p in patterns if p in allowed])

    def owns(self, path: str) -> bool:
        """True when ``path`` is the file of an image of the datastore."""
        candidate = Path(path)
        if not candidate.is_absolute() or candidate.parent.resolve() != Path(self._datastore.image_path()).resolve():
            return False
        image_id, _ = self._to_id(candidate.name)
        obj = self._datastore.objects.get(image_id)
        return obj is not None and candidate.name == self._filename(image_id, obj.image.ext)

    def datalist(self, full_path: bool = True) -> list[dict[str, str]]:
        """Labelled images as ``{"image", "label"}`` paths relative to the studies folder (what ``GET /datastore``
        shows); :meth:`local_datalist` gives the files."""
        if getattr(self._context, "absolute", False):
            return self.local_datalist()
        root = Path(self._datastore_path).resolve()
        return [{k: str(Path(v).relative_to(root)) for k, v in row.items()} for row in self.local_datalist()]

    def get_dataset_archive(self, limit_cases: int | None) -> str:
        self._context.absolute = True  # MONAI Label's archive reads the files datalist() names
        try:
            return super().get_dataset_archive(limit_cases)
        finally:
            self._context.absolute = False

    def local_datalist(self) -> list[dict[str, str]]:
        """Labelled images as ``{"image", "label"}`` absolute file paths (for training)."""
        return super().datalist()

    # -- ids ---------------------------------------------------------------------------------------------------
    def _known_image(self, image_id: Any) -> str:
        check_name(image_id, "image")
        if image_id not in self._datastore.objects:
            raise HTTPException(404, f"image {image_id!r}: not in the datastore")
        return image_id

    def _known_label(self, label_id: Any, tag: Any) -> tuple[str, str]:
        self._known_image(label_id)
        check_name(tag, "tag")
        if tag not in self._datastore.objects[label_id].labels:
            raise HTTPException(404, f"label {label_id!r} (tag {tag!r}): not in the datastore")
        return label_id, tag

    def get_image_uri(self, image_id: str) -> str:
        return super().get_image_uri(self._known_image(image_id))

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        info = super().get_image_info(self._known_image(image_id))
        info.pop("path", None)
        return info

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        return super().get_label_uri(*self._known_label(label_id, label_tag))

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        return super().get_label_info(*self._known_label(label_id, label_tag))

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        return super().update_image_info(self._known_image(image_id), info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        return super().update_label_info(*self._known_label(label_id, label_tag), info)

    # -- changes -------------------------------------------------------------------------------------------------
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        suffix = next((s for s in IMAGE_SUFFIXES if image_filename.lower().endswith(s)), None)
        if suffix is None:
            raise HTTPException(400, f"image upload: unsupported file type {Path(image_filename).suffix!r} "
                                     f"(expected one of {', '.join(IMAGE_SUFFIXES)})")
        if image_id:
            check_name(image_id, "image")
        try:
            image_extent(image_filename)
        except (ValueError, OSError) as err:
            raise HTTPException(400, f"image upload {image_id or ''}: unreadable "
                                     f"({public_message(str(err), self.roots)})") from err
        return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id: str) -> None:
        super().remove_image(self._known_image(image_id))
        self.refresh()

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        self._known_image(image_id)
        check_name(label_tag, "tag")
        image = self.get_image_uri(image_id)
        try:
            validate_label(label_filename, image_extent(image), self._num_classes())
        except ValueError as err:
            message = str(err).replace(label_filename, f"label for {image_id}")
            raise HTTPException(400, public_message(message, self.roots)) from err
        previous = self._datastore.objects[image_id].labels.get(label_tag)
        if previous is not None and not label_filename.lower().endswith(previous.ext.lower()):
            # a label saved before in another format would otherwise stay beside the new one
            Path(super().get_label_uri(image_id, label_tag)).unlink(missing_ok=True)
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        label_id, label_tag = self._known_label(label_id, label_tag)
        Path(super().get_label_uri(label_id, label_tag)).unlink(missing_ok=True)
        self._datastore.objects[label_id].labels.pop(label_tag, None)
        self._update_datastore_file()
        logger.info(f"removed label {label_id!r} (tag {label_tag!r})")
