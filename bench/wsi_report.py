"""The README's picture of a slide report: ``bench/results/wsi_report.png``.

A slide is assembled from the real CoNSeP Train patches (../shared/data): the 16 256-px patches of each CoNSeP
tile side by side in a 4 x 4 block (crops of that tile, so one tissue per block, with seams between patches: the
source does not record where each crop lies), the 27 blocks in a 6 x 5 grid with glass in the last three places:
a 6144 x 5120 px pyramidal TIFF at 0.25 um/px. The whole-slide
pipeline (``scripts.slides.wsi.run_slide``) analyses it with the network replaced by the ground-truth oracle
(``tests.oracle.GroundTruthPredictor``: every nucleus and class are CoNSeP's annotations, no trained model is
involved) and writes ``case.tif_report.html``; headless Chromium renders the page's first ``--height`` CSS pixels
(the settings table below them is left out) to the PNG, scaled by ``--scale`` and palette-quantised to stay small.

    python bench/wsi_report.py [--cache outputs/bench_wsi_report] [--height 2050] [--scale 0.8]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONSEP = REPO.parent / "shared" / "data" / "consep" / "consep_train.npz"
CLASSES = ["background", "other", "inflammatory", "epithelial", "spindle-shaped"]
COLUMNS, ROWS, SIDE = 6, 5, 1024


def consep_slide() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(5120, 6144, 3) image (white glass around), int64 instance ids unique over the slide, uint8 types."""
    if not CONSEP.is_file():
        raise SystemExit(f"{CONSEP}: CoNSeP patches not found")
    with np.load(CONSEP) as data:
        images, inst, types, tiles = data["images"], data["inst_map"], data["type_map"], data["tile"]
    image = np.full((ROWS * SIDE, COLUMNS * SIDE, 3), 255, np.uint8)
    ids = np.zeros(image.shape[:2], np.int64)
    classes = np.zeros(image.shape[:2], np.uint8)
    for k, name in enumerate(dict.fromkeys(tiles.tolist())):  # the CoNSeP tiles in order, 16 patches each
        top, left = (k // COLUMNS) * SIDE, (k % COLUMNS) * SIDE
        for p, index in enumerate(np.flatnonzero(tiles == name)):
            y, x = top + (p // 4) * 256, left + (p % 4) * 256
            image[y : y + 256, x : x + 256] = images[index]
            ids[y : y + 256, x : x + 256] = np.where(inst[index] > 0, inst[index] + index * 1000, 0)
            classes[y : y + 256, x : x + 256] = types[index]
    return image, ids, classes


def screenshot(page: Path, png: Path, width: int, height: int, scale: float) -> None:
    """Render ``page`` in headless Chromium to ``png`` (``width`` x ``height`` CSS pixels), scaled by ``scale`` and
    palette-quantised."""
    from PIL import Image

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("headless Chromium not found (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "page.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={folder}/profile", f"--window-size={width},{height}",
                        f"--screenshot={raw}", page.resolve().as_uri()], check=True, capture_output=True,
                       timeout=300)
        image = Image.open(raw).convert("RGB")
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
        image.quantize(colors=256, dither=Image.Dither.NONE).save(png, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / "outputs" / "bench_wsi_report")
    parser.add_argument("--height", type=int, default=2050, help="CSS pixels of the page in the picture")
    parser.add_argument("--scale", type=float, default=0.8, help="picture pixels per CSS pixel")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "wsi_report.png")
    args = parser.parse_args()
    sys.path[:0] = [str(REPO), str(REPO / "bundles" / "cellvta")]
    from scripts.slides.pyramid import write_pyramidal_tiff
    from scripts.slides.wsi import WSISettings, run_slide
    from tests.oracle import GroundTruthPredictor

    image, inst, types = consep_slide()
    args.cache.mkdir(parents=True, exist_ok=True)
    slide = args.cache / "case.tif"
    if not slide.is_file():
        write_pyramidal_tiff(slide, image, mpp=0.25)
    out = args.cache / "run"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    settings = WSISettings(postprocess_workers=0, report_grid_um=100)
    summary = run_slide(slide, out, GroundTruthPredictor(inst, types, len(CLASSES)), CLASSES, settings,
                        predictor_id="ground-truth oracle (CoNSeP annotations, no network)")
    print(f"{summary['cells']} nuclei in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    screenshot(out / "case.tif_report.html", args.out, 1100, args.height, args.scale)
    print(f"{args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
