"""Time of the MONAI Label app's answer to QuPath's default request: a 1024 x 1024 region at level 0 on CPU.

Runs in the Label environment (``.venv-label/bin/python bench/label_region.py``): the app (``apps/monailabel``)
is created in this process with a freshly initialised network of the demo's size (``scripts.demo.DEMO_NETWORK``;
timing does not depend on the weights), a pyramidal TIFF of CoNSeP tiles at 0.25 um/px as its study, and asked
``infer_wsi`` as QuPath's MONAI Label extension asks it (``level 0``, ``size 1024 x 1024``, ``tile_size 1024``,
``output asap``). The peer in the same run is the bundle's pre-processing and sliding-window network on the same
pixels (no post-processing, no app): the ratio is what the app adds (reading, post-processing, annotation XML).
The app's progress lines (``cellvta_label.infer``) are counted to show the log reports the region while it runs.
The MSDA op is the pure-PyTorch reference unless ``CELLVTA_MSDA_IMPL`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "monailabel"
BUNDLE = REPO / "bundles" / "cellvta"
CONSEP = Path("/work/shared/data/consep/consep_train.npz")


class Lines(logging.Handler):
    """Keeps the messages of one logger."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def mosaic(side: int) -> np.ndarray:
    """``(side, side, 3)`` uint8 of CoNSeP's 256 x 256 training patches side by side."""
    with np.load(CONSEP) as d:
        images = d["images"]
    n = side // 256
    rows = [np.concatenate(list(images[r * n:(r + 1) * n]), 1) for r in range(n)]
    return np.ascontiguousarray(np.concatenate(rows, 0))


def write_pyramid(path: Path, rgb: np.ndarray, mpp: float) -> None:
    """A tiled TIFF with level 0 and a half-resolution level 1 recording ``mpp`` microns per pixel."""
    import cv2
    import tifffile

    per_cm = 1e4 / mpp
    half = cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] // 2), interpolation=cv2.INTER_AREA)
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(256, 256), photometric="rgb", compression="zlib", subifds=1,
                  resolution=(per_cm, per_cm), resolutionunit=3)
        tif.write(half, tile=(256, 256), photometric="rgb", compression="zlib", subfiletype=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="region side in level-0 pixels (QuPath: 1024)")
    parser.add_argument("--margin", type=int, default=64, help="the app's context around the region (default 64)")
    args = parser.parse_args()
    if not CONSEP.is_file():
        sys.exit(f"{CONSEP}: not found (CoNSeP patches are needed for the slide)")

    os.environ.setdefault("CELLVTA_MSDA_IMPL", "reference")
    os.environ["MONAI_LABEL_DATASTORE_AUTO_RELOAD"] = "false"  # no file watcher racing the clean-up
    sys.path.insert(0, str(APP_DIR))
    import torch
    from cellvta_label.bundle import bundle_parser, use_bundle_scripts

    use_bundle_scripts(BUNDLE)
    from scripts.demo import DEMO_NETWORK

    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        studies, model = root / "studies", root / "model"
        studies.mkdir()
        model.mkdir()
        write_pyramid(studies / "slide.tiff", mosaic(2 * args.size), mpp=0.25)
        (model / "dataset.json").write_text(json.dumps({
            "classes": ["background", "other", "inflammatory", "epithelial", "spindle-shaped"],
            "tissues": ["colon"], "magnification": 40, "samples": []}))
        network = bundle_parser(BUNDLE, "inferring", {"model_dir": str(model), **DEMO_NETWORK})
        torch.manual_seed(0)
        torch.save(network.get_parsed_content("network_def", instantiate=True).state_dict(), model / "model.pt")
        (model / "overrides.json").write_text(json.dumps(DEMO_NETWORK))

        from main import CellVTAApp

        app = CellVTAApp(str(APP_DIR), str(studies), {"model_dir": str(model), "work_dir": str(root / "work"),
                                                      "margin": str(args.margin)})
        progress = Lines()
        logging.getLogger("cellvta_label.infer").addHandler(progress)
        logging.getLogger("cellvta_label.infer").setLevel(logging.INFO)
        logging.getLogger("cellvta_label.infer").addHandler(logging.StreamHandler(sys.stderr))
        request = {"model": "cellvta", "image": "slide", "level": 0, "location": [args.size // 2, args.size // 2],
                   "size": [args.size, args.size], "tile_size": [1024, 1024], "output": "asap"}
        start = time.perf_counter()
        answer = app.infer_wsi(dict(request))
        app_s = time.perf_counter() - start

        from cellvta_label.regions import read_region
        from monai.transforms import Compose

        pixels, _ = read_region(studies / "slide.tiff", request["location"], request["size"], 0, args.margin)
        net = app.model.network("cpu")
        start = time.perf_counter()
        image = Compose(app.model.preprocessing())({"image": pixels})["image"]
        with torch.no_grad():
            app.model.inferer()(torch.as_tensor(image)[None], net)
        network_s = time.perf_counter() - start
        annotations = (Path(answer["file"]).read_text().count("<Annotation ") if answer.get("file") else None)

    from record import record

    record("label_region", {
        "region_px": args.size, "margin_px": args.margin, "network": DEMO_NETWORK, "threads": torch.get_num_threads(),
        "app_request_s": round(app_s, 1), "network_only_s": round(network_s, 1),
        "app_over_network": round(app_s / network_s, 2), "nuclei_returned": annotations,
        "progress_lines": len(progress.messages),
        "last_progress_line": progress.messages[-1] if progress.messages else None,
    })


if __name__ == "__main__":
    main()
