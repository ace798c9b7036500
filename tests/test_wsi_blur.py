"""Out-of-focus tiles left out of whole-slide inference: the focus measure on real CoNSeP tiles, and a generated
slide whose right half is blurred."""

from __future__ import annotations

import cv2
import numpy as np

from scripts.slides.pyramid import write_pyramidal_tiff
from scripts.slides.tissue import focus_measure
from scripts.slides.wsi import WSISettings, run_slide
from tests.test_wsi_stain import SeenTiles


def to_one_micron(tile: np.ndarray) -> np.ndarray:
    """A 256 px tile at 0.25 um/px area-averaged to 1 um/px."""
    return cv2.resize(tile, (64, 64), interpolation=cv2.INTER_AREA)


def test_focus_measure_separates_real_tiles_from_their_blurred_copies(consep):
    tiles = consep["images"][::6]
    sharp = np.array([focus_measure(to_one_micron(t)) for t in tiles])
    blurred = np.array([focus_measure(to_one_micron(cv2.GaussianBlur(t, (0, 0), 4))) for t in tiles])  # 1 um
    judged = ~np.isnan(sharp)
    assert judged.mean() > 0.9 and np.array_equal(judged, ~np.isnan(blurred))
    threshold = WSISettings().blur_min_focus
    assert (sharp[judged] < threshold).mean() < 0.02 and (blurred[judged] < threshold).mean() > 0.6
    assert np.all(blurred[judged] < sharp[judged])
    assert np.isnan(focus_measure(np.full((64, 64, 3), 240, np.uint8)))  # glass is not judged


def test_tiles_of_a_blurred_region_are_left_out_and_shown_in_the_mask(consep, tmp_path):
    tiles = consep["images"][:16]
    image = np.concatenate([np.concatenate(tiles[r * 4:(r + 1) * 4], axis=1) for r in range(4)], axis=0)
    image[:, 512:] = cv2.GaussianBlur(image, (0, 0), 8)[:, 512:]  # right half out of focus (sigma 2 um)
    write_pyramidal_tiff(tmp_path / "half.tif", image, mpp=0.25, min_size=128)
    settings = WSISettings(postprocess_workers=0, min_tissue_fraction=0.0, chunk_tiles=4)
    seen, summary = {}, {}
    for exclude in (False, True):
        seen[exclude] = SeenTiles()
        summary[exclude] = run_slide(tmp_path / "half.tif", tmp_path / str(exclude), seen[exclude],
                                     ["background", "nucleus"],
                                     WSISettings(**{**settings.__dict__, "exclude_blur": exclude}))
    everything, kept = set(seen[False].seen), set(seen[True].seen)
    assert len(everything) == 25 and kept < everything  # 5 x 5 tiles of 256 px, 192 px apart
    assert summary[False]["tiles_out_of_focus"] is None and summary[False]["tiles"] == 25
    assert summary[True]["tiles_out_of_focus"] == 25 - len(kept) and summary[True]["tiles"] == len(kept)
    report = (tmp_path / "True" / "half.tif_report.html").read_text()
    assert f"{len(kept)} of 25 tiles ({25 - len(kept)} tissue tiles out of focus, left out)" in report
    assert {(x, y) for x, y in everything if x + 256 <= 512} <= kept  # in focus: all analysed
    assert not {(x, y) for x, y in kept if x >= 512}  # wholly blurred: none
    mask = cv2.imread(str(tmp_path / "True" / "half.tif_mask.png"), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (1024, 1024)
    right = max(x for x, _ in kept) + 256
    assert right <= 640 and (mask[:, right:] == 0).all() and (mask[:, :512] == 255).mean() > 0.9
