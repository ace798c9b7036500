"""DICOM whole-slide images in whole-slide inference: a series written by the test (pydicom, uncompressed tiles)
holding the pixels of every level of a pyramidal TIFF is listed, named, read and analysed like that TIFF."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from scripts.slides.cohort import list_slides
from scripts.slides.pyramid import write_pyramidal_tiff
from scripts.slides.readers import SlideError, open_slide
from scripts.slides.wsi import run_cohort
from tests.oracle import GroundTruthPredictor
from tests.test_wsi import CLASSES, SETTINGS, HematoxylinPredictor, mosaic  # noqa: F401 (the fixture)

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def write_dicom_level(path: Path, image: np.ndarray, level0_shape: tuple[int, int], mpp: float, series: str,
                      tile: int = 256, image_type: str = "VOLUME") -> None:
    """One level of a DICOM whole-slide series: ``image`` (H, W, 3) uint8 as TILED_FULL uncompressed RGB frames of
    ``tile`` pixels (white beyond the image), its pixel spacing that of ``mpp`` microns per level-0 pixel of a
    level 0 of ``level0_shape`` (H, W)."""
    height, width = image.shape[:2]
    rows, cols = -(-height // tile), -(-width // tile)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = WSI_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series, series, series
    ds.Modality, ds.PatientName, ds.PatientID, ds.SeriesNumber, ds.InstanceNumber = "SM", "test", "test", 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY" if image_type == "VOLUME" else "DERIVED", image_type, "NONE"]
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows, ds.TotalPixelMatrixFocalPlanes = width, height, 1
    ds.Rows, ds.Columns, ds.NumberOfFrames = tile, tile, rows * cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = level0_shape[1] * mpp / 1000, level0_shape[0] * mpp / 1000
    ds.ImagedVolumeDepth = 0.001
    spacing = mpp * level0_shape[1] / width / 1000  # millimetres per pixel of this level
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [spacing, spacing], 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.SpecimenLabelInImage, ds.BurnedInAnnotation, ds.FocusMethod, ds.ExtendedDepthOfField = "NO", "NO", "AUTO", "NO"
    ds.ContainerIdentifier = "1"
    padded = np.full((rows * tile, cols * tile, 3), 255, np.uint8)
    padded[:height, :width] = image
    ds.PixelData = padded.reshape(rows, tile, cols, tile, 3).swapaxes(1, 2).tobytes()
    ds.save_as(path, enforce_file_format=True)


def dicom_from_tiff(tiff: Path, folder: Path, mpp: float, prefix: str = "level") -> str:
    """Write every level of ``tiff`` into ``folder`` as one DICOM series (``<prefix><k>.dcm``); its series UID."""
    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    with tifffile.TiffFile(tiff) as tif:
        levels = [level.asarray() for level in tif.series[0].levels]
    for k, image in enumerate(levels):
        write_dicom_level(folder / f"{prefix}{k}.dcm", image, levels[0].shape[:2], mpp, series)
    return series


@pytest.fixture(scope="module")
def cohort(mosaic, tmp_path_factory) -> Path:
    """A folder holding ``mosaic.tif`` and the folder ``mosaic_dicom`` (the same pixels as a DICOM series)."""
    folder = tmp_path_factory.mktemp("cohort")
    write_pyramidal_tiff(folder / "mosaic.tif", mosaic[0], mpp=0.25, factor=2, min_size=200)
    dicom_from_tiff(folder / "mosaic.tif", folder / "mosaic_dicom", mpp=0.25)
    return folder


def test_a_dicom_series_reads_the_pixels_levels_and_resolution_of_its_tiff(cohort):
    with open_slide(cohort / "mosaic.tif") as tiff, open_slide(cohort / "mosaic_dicom") as dicom:
        assert dicom.level_dimensions == tiff.level_dimensions == [(900, 1000), (450, 500), (225, 250)]
        assert dicom.level_downsamples == tiff.level_downsamples and dicom.mpp == pytest.approx(0.25)
        assert dicom.files == [cohort / "mosaic_dicom" / f"level{k}.dcm" for k in range(3)]
        for level, (x, y, w, h) in [(0, (0, 0, 900, 1000)), (0, (250, 300, 333, 77)), (1, (100, 50, 400, 460)),
                                    (2, (200, 240, 64, 64))]:
            np.testing.assert_array_equal(dicom.read_region(x, y, w, h, level), tiff.read_region(x, y, w, h, level))
    with open_slide(cohort / "mosaic_dicom" / "level1.dcm") as one_file:  # a slide named by one of its files
        assert one_file.level_dimensions[0] == (900, 1000) and len(one_file.files) == 3


@pytest.mark.parametrize("predictor", ["ground_truth", "hematoxylin"])
def test_a_dicom_slide_in_a_cohort_folder_gives_the_nuclei_of_the_same_slide_as_tiff(cohort, mosaic, predictor,
                                                                                     tmp_path):
    _, inst, types = mosaic
    model = GroundTruthPredictor(inst, types, len(CLASSES)) if predictor == "ground_truth" else HematoxylinPredictor()
    assert [e.path for e in list_slides(cohort)] == [cohort / "mosaic.tif", cohort / "mosaic_dicom"]
    tiff, dicom = run_cohort(cohort, tmp_path, model, CLASSES, SETTINGS)
    assert dicom["slide"] == str(cohort / "mosaic_dicom") and dicom["cells"] == tiff["cells"] > 50
    assert {k: dicom[k] for k in ("width", "height", "mpp", "level", "tiles")} == \
           {k: tiff[k] for k in ("width", "height", "mpp", "level", "tiles")}
    for suffix in (".csv", ".geojson", "_overlay.png", "_mask.png"):
        assert (tmp_path / f"mosaic_dicom{suffix}").read_bytes() == (tmp_path / f"mosaic.tif{suffix}").read_bytes()


def test_a_dicom_slide_resumes_and_is_analysed_again_when_one_of_its_files_changes(cohort, tmp_path):
    series = tmp_path / "case7"
    dicom_from_tiff(cohort / "mosaic.tif", series, mpp=0.25)
    first = run_cohort(series, tmp_path / "out", HematoxylinPredictor(), CLASSES, SETTINGS)[0]
    assert first["outputs"][0].startswith("case7.")  # the folder given as input is the slide
    assert run_cohort(series, tmp_path / "out", HematoxylinPredictor(), CLASSES, SETTINGS) == [first]
    stat = (series / "level2.dcm").stat()
    os.utime(series / "level2.dcm", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = run_cohort(series, tmp_path / "out", HematoxylinPredictor(), CLASSES, SETTINGS)[0]
    assert again["fingerprint"] != first["fingerprint"] and again["cells"] == first["cells"]
    assert json.loads((tmp_path / "out" / "case7.json").read_text())["fingerprint"] == again["fingerprint"]


def test_listing_takes_dicom_series_folders_beside_slide_files_and_refuses_loose_dcm_beside_slides(tmp_path):
    (tmp_path / "b.svs").write_bytes(b"")
    (tmp_path / "a.dicom").mkdir()
    (tmp_path / "a.dicom" / "x.dcm").write_bytes(b"")
    (tmp_path / "c").mkdir()  # a folder without .dcm files is not a slide
    (tmp_path / "c" / "notes.txt").write_text("")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "y.dcm").write_bytes(b"")
    assert [e.path.name for e in list_slides(tmp_path)] == ["a.dicom", "b.svs"]
    assert [e.path for e in list_slides(tmp_path / "a.dicom")] == [tmp_path / "a.dicom"]
    (tmp_path / "a.dicom" / "z.tif").write_bytes(b"")
    with pytest.raises(ValueError, match=r"a\.dicom: holds \.dcm files .*\(z\.tif"):
        list_slides(tmp_path / "a.dicom")


def test_bad_dicom_series_fail_alone_with_the_folder_or_file_named(cohort, tmp_path):
    two = tmp_path / "two_series"
    first = dicom_from_tiff(cohort / "mosaic.tif", two, mpp=0.25, prefix="a")
    second = dicom_from_tiff(cohort / "mosaic.tif", two, mpp=0.5, prefix="b")
    with pytest.raises(SlideError, match=rf"two_series: holds 2 DICOM whole-slide series \(series {first}: a0.dcm"):
        open_slide(two)
    with open_slide(two / "b1.dcm") as slide:  # one series named by one of its files
        assert slide.mpp == pytest.approx(0.5) and [p.name for p in slide.files] == ["b0.dcm", "b1.dcm", "b2.dcm"]
    assert pydicom.dcmread(two / "b0.dcm", stop_before_pixels=True).SeriesInstanceUID == second
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "level0.dcm").write_bytes(b"DICM")
    with pytest.raises(SlideError, match=r"level0\.dcm: not a readable DICOM file"):
        open_slide(truncated)
    with pytest.raises(SlideError, match="tifffile backend"):
        open_slide(cohort / "mosaic_dicom", "tifffile")
    good = tmp_path / "good"
    dicom_from_tiff(cohort / "mosaic.tif", good, mpp=0.25)
    with pytest.raises(SlideError, match=r"2 of 3 slides failed") as failed:
        run_cohort([two, truncated, good], tmp_path / "out", HematoxylinPredictor(), CLASSES, SETTINGS)
    assert "two_series: holds 2" in str(failed.value) and "level0.dcm: not a readable" in str(failed.value)
    assert (tmp_path / "out" / "good.json").is_file()


def make_sparse(path: Path, tile: int, missing: tuple[int, int]) -> None:
    """Rewrite the TILED_FULL level at ``path`` as TILED_SPARSE without the frame at (row, column) ``missing``."""
    ds = pydicom.dcmread(path)
    rows, cols = -(-ds.TotalPixelMatrixRows // tile), -(-ds.TotalPixelMatrixColumns // tile)
    frames = np.frombuffer(ds.PixelData, np.uint8).reshape(rows * cols, tile, tile, 3)
    kept = [(r, c) for r in range(rows) for c in range(cols) if (r, c) != missing]
    positions = []
    for r, c in kept:
        position = Dataset()
        position.ColumnPositionInTotalImagePixelMatrix = c * tile + 1
        position.RowPositionInTotalImagePixelMatrix = r * tile + 1
        position.XOffsetInSlideCoordinateSystem = position.YOffsetInSlideCoordinateSystem = 0
        position.ZOffsetInSlideCoordinateSystem = 0
        frame = Dataset()
        frame.PlanePositionSlideSequence = [position]
        positions.append(frame)
    ds.DimensionOrganizationType = "TILED_SPARSE"
    ds.PerFrameFunctionalGroupsSequence = positions
    ds.NumberOfFrames = len(kept)
    ds.PixelData = b"".join(frames[r * cols + c].tobytes() for r, c in kept)
    ds.save_as(path, enforce_file_format=True)


def test_the_tiles_a_sparse_dicom_slide_lacks_read_as_glass_not_black(tmp_path):
    image = np.random.default_rng(0).integers(0, 200, (128, 192, 3), dtype=np.uint8)  # no pixel is white
    slide = tmp_path / "sparse"
    slide.mkdir()
    write_dicom_level(slide / "level0.dcm", image, image.shape[:2], 0.25, generate_uid(), tile=64)
    make_sparse(slide / "level0.dcm", tile=64, missing=(0, 1))
    with open_slide(slide) as s:
        region = s.read_region(0, 0, 192, 128)
    assert (region[:64, 64:128] == 255).all()  # the missing frame: white, the colour of glass
    region[:64, 64:128] = image[:64, 64:128]
    assert np.array_equal(region, image)  # every present frame exactly
