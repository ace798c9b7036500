"""The network record: the config keys that describe a trained network, saved beside its weights.

``<ckpt_dir>/overrides.json`` holds the keys of ``configs/common.yaml`` that build the network the checkpoint
fits (backbone, its timm arguments, adapter or not, normalisation, patch size). It is a valid ``--args_file`` of
the bundle's workflows, and the MONAI Label and Deploy apps read it, so a trained model folder describes itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..files import write_text_atomic

RECORD_FILE = "overrides.json"


def save_network_record(model_dir: str | Path, settings: Mapping[str, Any]) -> Path:
    """Write ``settings`` (JSON-serialisable config values) to ``<model_dir>/overrides.json`` atomically."""
    return write_text_atomic(Path(model_dir) / RECORD_FILE, json.dumps(dict(settings), indent=1))
