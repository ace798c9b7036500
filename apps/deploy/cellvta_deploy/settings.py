"""The app's own settings: the ``cellvta`` section of the application config (``app.yaml``).

    cellvta:
      maps: npz        # npz (as the bundle's inference workflow) or tiff (OME-TIFF)
      overlays: true   # also write <name>_overlay.png
      classifier: null # a cell classifier (classifier.pt) typing every nucleus
      stain_normalization: false      # Macenko, as configs/inference.yaml (each image its own source)
      stain_reference: null           # an RGB image whose stains are the target
      stain_vectors: null             # else these (3 x 2, H and E columns; null: Macenko's reference H&E)
      stain_max_concentrations: null  # and these (2 numbers)

Relative paths (``classifier``, ``stain_reference``) are in the model folder, which a MAP carries. The config is
``$HOLOSCAN_CONFIG_PATH`` when set (a MAP sets it; ``monai-deploy run --config`` replaces it), else the ``app.yaml``
beside the app.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .outputs import MAP_FORMATS

SECTION = "cellvta"
KEYS = ("maps", "overlays", "classifier", "stain_normalization", "stain_reference", "stain_vectors",
        "stain_max_concentrations")


def _path(value: object, source: str, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{source}: '{SECTION}.{key}' must be a file path or null, got {value!r}")
    return value


def _numbers(value: object, shape: tuple[int, ...], source: str, key: str) -> list | None:
    if value is None:
        return None
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.shape != shape or not np.isfinite(array).all():
        raise ValueError(f"{source}: '{SECTION}.{key}' must be {' x '.join(map(str, shape))} numbers or null, "
                         f"got {value!r}")
    return array.tolist()


@dataclass(frozen=True)
class AppSettings:
    """Output, classifier and stain options of the app (see the module docstring)."""

    maps: str = "npz"
    overlays: bool = True
    classifier: str | None = None
    stain_normalization: bool = False
    stain_reference: str | None = None
    stain_vectors: Sequence[Sequence[float]] | None = None
    stain_max_concentrations: Sequence[float] | None = None

    @classmethod
    def from_mapping(cls, section: Mapping[str, object], source: str) -> AppSettings:
        """Check and read the ``cellvta`` section of the config file ``source``.

        Raises:
            ValueError: unknown keys or values, naming ``source``.
        """
        unknown = sorted(set(section) - set(KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown} in section '{SECTION}' (known: {', '.join(KEYS)})")
        maps = section.get("maps", cls.maps)
        if maps not in MAP_FORMATS:
            raise ValueError(f"{source}: '{SECTION}.maps' must be one of {list(MAP_FORMATS)}, got {maps!r}")
        overlays = section.get("overlays", cls.overlays)
        if not isinstance(overlays, bool):
            raise ValueError(f"{source}: '{SECTION}.overlays' must be true or false, got {overlays!r}")
        stain = section.get("stain_normalization", cls.stain_normalization)
        if not isinstance(stain, bool):
            raise ValueError(f"{source}: '{SECTION}.stain_normalization' must be true or false, got {stain!r}")
        return cls(maps=str(maps), overlays=overlays, classifier=_path(section.get("classifier"), source, "classifier"),
                   stain_normalization=stain,
                   stain_reference=_path(section.get("stain_reference"), source, "stain_reference"),
                   stain_vectors=_numbers(section.get("stain_vectors"), (3, 2), source, "stain_vectors"),
                   stain_max_concentrations=_numbers(section.get("stain_max_concentrations"), (2,), source,
                                                     "stain_max_concentrations"))

    def config_overrides(self, model_dir: Path) -> dict[str, Any]:
        """Keys of the bundle's inference config these settings set; relative paths are in ``model_dir``.

        Raises:
            FileNotFoundError: the classifier or the stain reference does not exist, naming it.
        """
        overrides: dict[str, Any] = {"stain_normalization": self.stain_normalization,
                                     "stain_vectors": self.stain_vectors,
                                     "stain_max_concentrations": self.stain_max_concentrations}
        for key, what in (("stain_reference", "stain reference image"), ("classifier", "cell classifier")):
            value = getattr(self, key)
            if value is not None:
                path = Path(model_dir) / value
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: {what} not found ('{SECTION}.{key}', relative to the model "
                                            "folder)")
                overrides[key] = str(path)
        return overrides
