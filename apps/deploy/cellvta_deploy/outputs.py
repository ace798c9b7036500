"""Per-image outputs, each written atomically: QuPath GeoJSON, instance and type maps (npz or TIFF), overlay PNG.

* ``<name>.geojson``: one detection per nucleus (polygon, class, type probability, centroid) in level-0 pixels of
  the slide for a region, in pixels of the image for a tile;
* ``<name>.npz`` (``inst_map`` int32, ``type_map`` uint8) or ``<name>_maps.tif`` (OME-TIFF, int32, channels
  ``instance`` and ``type``), in pixels of the analysed image;
* ``<name>_overlay.png``: the image with every nucleus outlined in its class colour.

For a tile, the GeoJSON, npz and overlay are those the bundle's inference workflow writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
from scripts.data.datasets import write_png
from scripts.files import atomic_path, write_text_atomic
from scripts.inference.writers import Colours, nuclei_features, overlay, write_maps

from .bundle import NucleiPrediction
from .inputs import LoadedImage

MAP_FORMATS = ("npz", "tiff")


def write_geojson(path: Path, prediction: NucleiPrediction, class_names: list[str], origin: tuple[float, float],
                  downsample: float, colours: Colours = None) -> None:
    """The nuclei as a GeoJSON FeatureCollection, image coordinates mapped by ``x * downsample + origin``, in the
    class ``colours`` (background first; None: the bundle's palette)."""
    features = nuclei_features(prediction.nuclei, class_names, offset=origin, scale=downsample, colours=colours)
    write_text_atomic(path, json.dumps({"type": "FeatureCollection", "features": features}))


def write_maps_tiff(path: Path, inst_map: np.ndarray, type_map: np.ndarray) -> None:
    """``(H, W)`` instance and type maps as one OME-TIFF of shape ``(2, H, W)`` int32 (channels instance, type)."""
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, np.stack([inst_map, type_map]).astype(np.int32), ome=True, compression="zlib",
                         photometric="minisblack", metadata={"axes": "CYX", "Channel": {"Name": ["instance", "type"]}})


def write_outputs(output_dir: Path, loaded: LoadedImage, prediction: NucleiPrediction, class_names: list[str],
                  maps_format: str = "npz", overlays: bool = True, colours: Colours = None) -> list[Path]:
    """Write the outputs of one image into ``output_dir`` and return their paths (``maps_format``: npz or tiff;
    ``colours``: the class colours, background first, or None for the bundle's palette)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    geojson = output_dir / f"{loaded.name}.geojson"
    write_geojson(geojson, prediction, class_names, loaded.origin, loaded.downsample, colours)
    if maps_format == "npz":
        maps = output_dir / f"{loaded.name}.npz"
        write_maps(maps, prediction.inst_map, prediction.type_map)
    else:
        maps = output_dir / f"{loaded.name}_maps.tif"
        write_maps_tiff(maps, prediction.inst_map, prediction.type_map)
    written = [geojson, maps]
    if overlays:
        written.append(output_dir / f"{loaded.name}_overlay.png")
        write_png(written[-1], overlay(loaded.image, prediction.nuclei, colours))
    return written
