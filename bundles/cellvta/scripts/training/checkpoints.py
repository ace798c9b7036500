"""Epoch checkpoints: finding the one to resume from."""

from __future__ import annotations

import re
from pathlib import Path

_EPOCH_FILE = re.compile(r"epoch=(\d+)\.pt$")


def latest_checkpoint(ckpt_dir: str | Path) -> str | None:
    """Path of the ``*epoch=<n>.pt`` checkpoint with the largest ``n`` in ``ckpt_dir``, or None if there is none."""
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("*epoch=*.pt") if (m := _EPOCH_FILE.search(p.name))]
    return str(max(found)[1]) if found else None


def resume_path(ckpt_dir: str | Path, resume: bool | str) -> str | None:
    """The checkpoint to resume from: ``resume`` as a path, the latest in ``ckpt_dir`` if True, None if False.

    Raises FileNotFoundError when a resume is asked for and there is nothing to resume from.
    """
    if resume is False or resume is None or resume == "":
        return None
    path = latest_checkpoint(ckpt_dir) if resume is True else str(resume)
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"resume requested but no checkpoint found ({path or f'{ckpt_dir}/*epoch=*.pt'})")
    return path
