"""The app's own settings: the ``cellvta`` section of the application config (``app.yaml``).

    cellvta:
      maps: npz        # npz (as the bundle's inference workflow) or tiff (OME-TIFF)
      overlays: true   # also write <name>_overlay.png

The config is ``$HOLOSCAN_CONFIG_PATH`` when set (a MAP sets it; ``monai-deploy run --config`` replaces it), else
the ``app.yaml`` beside the app.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .outputs import MAP_FORMATS

SECTION = "cellvta"


@dataclass(frozen=True)
class AppSettings:
    """Output options of the app (see the module docstring)."""

    maps: str = "npz"
    overlays: bool = True

    @classmethod
    def from_mapping(cls, section: Mapping[str, object], source: str) -> AppSettings:
        """Check and read the ``cellvta`` section of the config file ``source``.

        Raises:
            ValueError: unknown keys or values, naming ``source``.
        """
        unknown = sorted(set(section) - {"maps", "overlays"})
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown} in section '{SECTION}' (known: maps, overlays)")
        maps = section.get("maps", cls.maps)
        if maps not in MAP_FORMATS:
            raise ValueError(f"{source}: '{SECTION}.maps' must be one of {list(MAP_FORMATS)}, got {maps!r}")
        overlays = section.get("overlays", cls.overlays)
        if not isinstance(overlays, bool):
            raise ValueError(f"{source}: '{SECTION}.overlays' must be true or false, got {overlays!r}")
        return cls(maps=str(maps), overlays=overlays)
