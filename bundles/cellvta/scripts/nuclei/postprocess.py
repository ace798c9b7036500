"""HoVer-Net post-processing: nuclei instances, types, centroids, boxes and contours from the network's maps.

The algorithm is CellViT's ``DetectionCellPostProcessor`` (reference §7.1) and reproduces it exactly, except on
tiles without background (see the deviation below):

1. nuclei mask = ``nuclei_prob >= 0.5``; 4-connected components under 10 px are removed;
2. each HV channel is min-max normalised to [0, 1] (a constant channel becomes 0);
3. Sobel derivative of HV-x along x and of HV-y along y (kernel 21 at 40x, 11 at 20x), each min-max
   normalised and inverted: ``s = 1 - norm(sobel)``;
4. ``overall = max(s_x, s_y) - (1 - mask)`` clipped at 0;
5. ``dist = -GaussianBlur((1 - overall) * mask, 3x3, sigma 0.8)``;
6. markers = ``mask`` minus the border ``overall >= 0.4``, holes filled, opened with a 5x5 ellipse,
   4-connected components under the marker size (10 at 40x, 3 at 20x) removed;
7. ``skimage.segmentation.watershed(dist, markers, mask=mask)``, label for label; skimage's flood runs only on
   the connected parts of the mask where markers of several labels meet (:func:`marker_watershed`).

Per-nucleus work is vectorised over the whole tile (``bincount`` for areas, centroids and type votes,
``find_objects`` for boxes); only the contour is traced per nucleus, on its own bounding-box crop.

Types follow the project's one vote rule (:func:`.primitives.vote_types`): the majority class, and the most
frequent foreground class when the background wins but a foreground class is present (the reference's rule).

One deviation: on a tile where every pixel belongs to a nucleus (no 0 in the instance map) the reference drops
the smallest instance id from its per-nucleus results, because it takes the first unique value of the map to be
the background. Here every instance keeps its entry; on tiles with a background pixel the two agree.

Nuclei whose contour has fewer than 3 points (straight lines one pixel wide) follow the reference:
they stay in the instance map but are left out of :class:`Nuclei`, so ``Nuclei.ids`` lists the
instance ids that have an entry, and :meth:`Nuclei.type_map` gives such nuclei type 0 (background).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache

import cv2
import numpy as np
from scipy import ndimage
from skimage.segmentation._watershed_cy import watershed_raveled

from .primitives import centroids, class_histogram, vote_types

__all__ = [
    "MAGNIFICATION_PRESETS",
    "Nuclei",
    "PostProcessSettings",
    "hovernet_postprocess",
    "instance_centroids",
    "instance_map_from_hv",
    "marker_watershed",
    "nuclei_from_instance_map",
    "postprocess_settings",
]

MIN_CONTOUR_POINTS = 3


@dataclass(frozen=True)
class PostProcessSettings:
    """Thresholds and sizes of the post-processing (steps of the module docstring), for one magnification.

    Attributes:
        mask_threshold: nucleus probability from which a pixel is nucleus (step 1).
        mask_min_size: 4-connected nucleus components below this many pixels are removed (step 1).
        sobel_kernel_size: Sobel kernel of the HV derivatives (step 3; 21 at 40x, 11 at 20x).
        marker_threshold: ``overall`` from which a pixel is a border, not a marker (step 6).
        marker_opening_size: side of the elliptic kernel that opens the markers (step 6).
        marker_min_size: 4-connected markers below this many pixels are removed (step 6; 10 at 40x, 3 at 20x).
    """

    mask_threshold: float = 0.5
    mask_min_size: int = 10
    sobel_kernel_size: int = 21
    marker_threshold: float = 0.4
    marker_opening_size: int = 5
    marker_min_size: int = 10


#: The reference's settings per magnification (reference §7.1); the configs state every value
#: (``postprocessing_presets`` in configs/common.yaml).
MAGNIFICATION_PRESETS: dict[int, PostProcessSettings] = {
    40: PostProcessSettings(),
    20: PostProcessSettings(sobel_kernel_size=11, marker_min_size=3),
}


def postprocess_settings(
    magnification: int = 40, presets: Mapping[int | str, PostProcessSettings | Mapping[str, float]] | None = None
) -> PostProcessSettings:
    """The settings for ``magnification`` from ``presets`` (magnification -> settings or a dict of their fields;
    keys may be strings, as YAML configs write them), by default :data:`MAGNIFICATION_PRESETS`.

    Raises:
        ValueError: for a magnification without preset or an unknown setting.
    """
    table = {int(k): v for k, v in (MAGNIFICATION_PRESETS if presets is None else presets).items()}
    if magnification not in table:
        raise ValueError(f"magnification must be one of {sorted(table)}, got {magnification}")
    entry = table[magnification]
    if isinstance(entry, PostProcessSettings):
        return entry
    unknown = set(entry) - {f.name for f in fields(PostProcessSettings)}
    if unknown:
        raise ValueError(f"post-processing preset {magnification}: unknown settings {sorted(unknown)}")
    return PostProcessSettings(**entry)


@lru_cache(maxsize=8)
def _opening_kernel(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


@dataclass
class Nuclei:
    """Per-nucleus results, one row per entry of ``ids`` (ascending instance ids of the instance map).

    Attributes:
        ids: (N,) int32 instance ids in the instance map.
        types: (N,) int32 class by majority vote (0 only when no type prediction was given).
        type_probs: (N,) float32 fraction of the nucleus' pixels voting for ``types`` (0 without types).
        centroids: (N, 2) float64 centre of mass as (x, y) in pixels.
        bboxes: (N, 2, 2) int32 ``[[rmin, cmin], [rmax, cmax]]``, max exclusive.
        contours: N arrays (K, 2) int32 of (x, y) outer-contour vertices (OpenCV simple chain), K >= 3.
    """

    ids: np.ndarray
    types: np.ndarray
    type_probs: np.ndarray
    centroids: np.ndarray
    bboxes: np.ndarray
    contours: list[np.ndarray]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def empty(cls) -> Nuclei:
        """No nuclei."""
        return cls(
            ids=np.zeros(0, np.int32),
            types=np.zeros(0, np.int32),
            type_probs=np.zeros(0, np.float32),
            centroids=np.zeros((0, 2), np.float64),
            bboxes=np.zeros((0, 2, 2), np.int32),
            contours=[],
        )

    def type_map(self, inst_map: np.ndarray) -> np.ndarray:
        """Type of each pixel: the type of its nucleus, 0 for background and for nuclei without an entry.

        Args:
            inst_map: (..., H, W) integer instance map these nuclei were taken from.

        Returns:
            (..., H, W) int32 type map.
        """
        lut = np.zeros(int(max(inst_map.max(initial=0), self.ids.max(initial=0))) + 1, np.int32)
        lut[self.ids] = self.types
        return np.take(lut, inst_map)


def _check_maps(nuclei_prob: np.ndarray, hv_map: np.ndarray, type_prob: np.ndarray | None) -> None:
    """Raise ValueError naming the argument when a map has the wrong shape or non-finite values."""
    if nuclei_prob.ndim != 2:
        raise ValueError(f"nuclei_prob must have shape (H, W), got {nuclei_prob.shape}")
    shape = nuclei_prob.shape
    if hv_map.shape != (2, *shape):
        raise ValueError(f"hv_map must have shape (2, H, W) = (2, {shape[0]}, {shape[1]}), got {hv_map.shape}")
    if type_prob is not None and (type_prob.ndim != 3 or type_prob.shape[1:] != shape or type_prob.shape[0] < 1):
        raise ValueError(f"type_prob must have shape (C, {shape[0]}, {shape[1]}) with C >= 1, got {type_prob.shape}")
    named = (("nuclei_prob", nuclei_prob), ("hv_map", hv_map), ("type_prob", type_prob))
    for name, arr in named:
        if arr is not None and arr.dtype.kind == "f" and not _all_finite(arr):
            raise ValueError(f"{name} contains NaN or infinite values")


def _all_finite(arr: np.ndarray) -> bool:
    """Whether a float array holds no NaN or infinity: one summation, and an element-wise look only when the
    sum is not finite (a NaN or infinity, or finite values that overflow)."""
    with np.errstate(over="ignore", invalid="ignore"):
        total = arr.sum()
    return bool(np.isfinite(total)) or bool(np.isfinite(arr).all())


def _large_components(binary: np.ndarray, min_size: int) -> tuple[np.ndarray, int]:
    """4-connected components of at least ``min_size`` pixels, numbered 1..n in raster order of their first pixel.

    Same components and numbering as ``ndimage.label`` followed by removal of the small ones and relabelling.

    Args:
        binary: (H, W) bool.

    Returns:
        (H, W) int32 labels and n.
    """
    count, labels = cv2.connectedComponents(binary.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    flat = np.flatnonzero(binary)
    found = labels.ravel()[flat]
    keep = np.bincount(found, minlength=count) >= min_size
    keep[0] = False
    n = int(keep.sum())
    if n == count - 1:
        return labels, n
    lut = np.zeros(count, np.int32)
    lut[keep] = np.arange(1, n + 1, dtype=np.int32)
    relabelled = np.zeros_like(labels)
    relabelled.ravel()[flat] = lut[found]
    return relabelled, n


def _fill_holes(binary: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes``: background not 4-connected to the image edge becomes foreground.

    One flood fill from outside a one-pixel frame marks the background that reaches the edge.

    Args:
        binary: (H, W) bool.

    Returns:
        (H, W) bool.
    """
    framed = np.zeros((binary.shape[0] + 2, binary.shape[1] + 2), np.uint8)
    framed[1:-1, 1:-1] = binary
    cv2.floodFill(framed, None, (0, 0), 2, flags=4)
    return framed[1:-1, 1:-1] != 2


def _minmax(img: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1] as float32 (``cv2.normalize``, NORM_MINMAX; a constant image becomes 0)."""
    return cv2.normalize(img, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)


def instance_map_from_hv(
    nuclei_prob: np.ndarray,
    hv_map: np.ndarray,
    magnification: int = 40,
    presets: Mapping[int | str, PostProcessSettings | Mapping[str, float]] | None = None,
) -> np.ndarray:
    """Watershed instance map from the nuclei probability and the HV maps (steps 1-7 of the module docstring).

    Args:
        nuclei_prob: (H, W) float nucleus probability.
        hv_map: (2, H, W) float HV maps, channel 0 horizontal (x), channel 1 vertical (y).
        magnification: selects the settings in ``presets`` (40 or 20 by default).
        presets: settings per magnification (:func:`postprocess_settings`); None for :data:`MAGNIFICATION_PRESETS`.

    Returns:
        (H, W) int32 instance map, 0 background, nuclei numbered 1..N in raster order of their markers.
    """
    settings = postprocess_settings(magnification, presets)
    ksize = settings.sobel_kernel_size

    mask = np.asarray(nuclei_prob, dtype=np.float32) >= np.float32(settings.mask_threshold)
    regions, n_regions = _large_components(mask, settings.mask_min_size)
    if n_regions == 0:
        return np.zeros(mask.shape, np.int32)
    mask = regions > 0

    hv = np.asarray(hv_map, dtype=np.float32)
    sobel_x = cv2.Sobel(_minmax(hv[0]), cv2.CV_64F, 1, 0, ksize=ksize)
    sobel_y = cv2.Sobel(_minmax(hv[1]), cv2.CV_64F, 0, 1, ksize=ksize)
    overall = np.subtract(1, _minmax(sobel_x))
    np.maximum(overall, np.subtract(1, _minmax(sobel_y)), out=overall)

    energy = np.zeros(mask.shape, np.float64)
    np.subtract(1.0, overall, out=energy, where=mask, dtype=np.float64)
    dist = cv2.GaussianBlur(energy, (3, 3), 0)
    np.negative(dist, out=dist)

    marker = _fill_holes(mask & (overall < np.float64(settings.marker_threshold)))
    kernel = _opening_kernel(settings.marker_opening_size)
    marker = cv2.morphologyEx(marker.view(np.uint8), cv2.MORPH_OPEN, kernel)
    markers, n_markers = _large_components(marker.view(bool), settings.marker_min_size)
    if n_markers == 0:
        return np.zeros(mask.shape, np.int32)
    return marker_watershed(dist, markers, regions, n_regions)


def _framed(height: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The arrays skimage's watershed floods: a one-pixel zero frame around the (H, W) inputs.

    Returns:
        (H+2, W+2) float64 height, int8 mask and int32 labels (the markers inside the mask, 0 elsewhere).
    """
    shape = (mask.shape[0] + 2, mask.shape[1] + 2)
    image = np.zeros(shape, np.float64)
    image[1:-1, 1:-1] = height
    flood = np.zeros(shape, np.int8)
    flood[1:-1, 1:-1] = mask
    labels = np.zeros(shape, np.int32)
    np.multiply(markers, mask, out=labels[1:-1, 1:-1])
    return image, flood, labels


def _frontier(flood: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Raveled indices, in raster order, of the labelled pixels with an unlabelled 4-neighbour in the mask.

    The other marker pixels push nothing when skimage pops them: every neighbour is labelled or masked out.
    """
    free = (flood != 0) & (labels == 0)
    near = cv2.dilate(free.view(np.uint8), _CROSS, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return np.flatnonzero(near.view(bool) & (labels != 0))


def _flood(image: np.ndarray, flood: np.ndarray, labels: np.ndarray, seeds: np.ndarray) -> None:
    """skimage's priority flood (4-connected, no compactness, no watershed line) on :func:`_framed` arrays.

    This is the compiled core that ``skimage.segmentation.watershed`` runs (scikit-image 0.25.2 to 0.26), given
    the arrays its wrapper builds: the framed image, mask and labels and the neighbour offsets up, left, right,
    down; only the seeds may be fewer than every marker pixel.

    Args:
        image, flood, labels: (H+2, W+2) arrays from :func:`_framed`; ``labels`` is filled in place.
        seeds: (K,) raveled indices of labelled pixels to start from, in raster order.
    """
    width = labels.shape[1]
    neighbours = np.array([-width, -1, 1, width], np.intp)
    strides = np.array([width, 1], np.intp)
    watershed_raveled(image.ravel(), seeds, neighbours, flood.ravel(), strides, 0.0, labels.ravel(), False)


def marker_watershed(height: np.ndarray, markers: np.ndarray, regions: np.ndarray, n_regions: int) -> np.ndarray:
    """``skimage.segmentation.watershed(height, markers, mask=regions > 0)``, label for label, with the flood
    run only where markers of several labels compete.

    skimage floods from a priority queue ordered by (height, age): age is 0 for every marker pixel and a push
    counter, unique and increasing, for every other pixel; a pixel takes its label when it is pushed.
    ``regions`` are the 4-connected components of the mask (the flood's own neighbourhood), so none is reached
    from another, and:

    * a region whose marker pixels all carry one label is flooded whole by it, and one without marker pixels
      stays 0, whatever the heights;
    * the regions with several labels are flooded on their bounding box, starting from the marker pixels
      that touch an unlabelled pixel (the others push nothing when popped). Within a region, the pops that
      push then come in the order of that region's own keys, as in the full flood, provided no two of these
      starting pixels tie in height; otherwise the order among them follows the layout of the whole heap,
      and the whole mask is flooded from every marker pixel, exactly as skimage does.

    Args:
        height: (H, W) float64 relief.
        markers: (H, W) int32 seeds, 0 elsewhere (pixels outside the regions are ignored, as skimage does).
        regions: (H, W) int32 4-connected components of the mask, numbered 1..n_regions, 0 outside it.
        n_regions: the number of regions.

    Returns:
        (H, W) int32 labels of ``markers``, 0 outside the regions and in regions without markers.
    """
    seeds = np.flatnonzero(markers != 0)
    seed_labels = markers.ravel()[seeds]
    seed_regions = regions.ravel()[seeds]
    label_of = np.zeros(n_regions + 1, np.int32)
    label_of[seed_regions] = seed_labels
    label_of[seed_regions[label_of[seed_regions] != seed_labels]] = -1
    label_of[0] = 0
    out = label_of[regions]
    flood_mask = out < 0
    if not flood_mask.any():
        return out
    np.maximum(out, 0, out=out)

    rows, cols = np.flatnonzero(flood_mask.any(axis=1)), np.flatnonzero(flood_mask.any(axis=0))
    box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    image, flood, labels = _framed(height[box], markers[box], flood_mask[box])
    starts = _frontier(flood, labels)
    if _ties_within_regions(image.ravel()[starts], starts, regions[box]):
        image, flood, labels = _framed(height, markers, regions != 0)
        _flood(image, flood, labels, np.flatnonzero(labels))
        return labels[1:-1, 1:-1]
    _flood(image, flood, labels, starts)
    out[box] += labels[1:-1, 1:-1]
    return out


def _ties_within_regions(heights: np.ndarray, starts: np.ndarray, regions: np.ndarray) -> bool:
    """Whether two starting pixels of the same region have equal heights.

    Args:
        heights: (K,) heights of the starting pixels.
        starts: (K,) their raveled indices in the framed (H+2, W+2) arrays.
        regions: (H, W) region of each pixel (unframed).
    """
    ordered = np.sort(heights)
    tied = ordered[1:][ordered[1:] == ordered[:-1]]
    if tied.size == 0:
        return False
    pick = np.isin(heights, tied)
    rows, cols = np.divmod(starts[pick], regions.shape[1] + 2)
    values, groups = heights[pick], regions[rows - 1, cols - 1]
    order = np.lexsort((values, groups))
    values, groups = values[order], groups[order]
    return bool(np.any((values[1:] == values[:-1]) & (groups[1:] == groups[:-1])))


def _argmax_channels(prob: np.ndarray) -> np.ndarray:
    """``prob.argmax(axis=0)`` (first maximum wins) in C vectorised passes, several times faster for small C.

    A channel that beats every earlier one is the largest index so far, so the index is a running maximum.

    Args:
        prob: (C, ...) array.

    Returns:
        (...) channel index, of the smallest unsigned integer type that holds C - 1.
    """
    dtype = np.min_scalar_type(prob.shape[0] - 1)
    best = prob[0].copy()
    index = np.zeros(prob.shape[1:], dtype)
    better = np.empty(prob.shape[1:], bool)
    for c in range(1, prob.shape[0]):
        np.greater(prob[c], best, out=better)
        np.maximum(index, np.multiply(better, dtype.type(c), dtype=dtype), out=index)
        np.maximum(best, prob[c], out=best)
    return index


def _foreground(inst_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices (M,) of the non-zero pixels of an (H, W) instance map and their ids (M,)."""
    flat = np.flatnonzero(inst_map != 0)
    return flat, inst_map.ravel()[flat]


def _vote_types(
    labels: np.ndarray, pixel_types: np.ndarray, n_classes: int, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Type of each nucleus by :func:`.primitives.vote_types` and the fraction of its pixels of that type.

    ``type_prob`` = winner's pixel count / (area + 1e-6).

    Args:
        labels: (M,) instance id of each foreground pixel.
        pixel_types: (M,) int class of each foreground pixel, in [0, n_classes).
        n_classes: number of classes including background.
        ids: (N,) instance ids to vote for, ascending.

    Returns:
        types (N,) int32 and type_probs (N,) float64.
    """
    counts = class_histogram(labels, pixel_types, n_classes, ids)
    types = vote_types(counts)
    probs = counts[np.arange(ids.shape[0]), types] / (counts.sum(axis=1) + 1.0e-6)
    return types.astype(np.int32), probs


def instance_centroids(inst_map: np.ndarray, ids: np.ndarray, top_left: np.ndarray) -> np.ndarray:
    """Centre of mass (x, y) of each nucleus, bit-identical to ``cv2.moments`` on its bounding-box crop.

    One pass over the tile's foreground (``bincount``); the moments are taken relative to each box's top-left
    corner, as ``cv2.moments`` on the crop does, so the result matches it to the last bit.

    Args:
        inst_map: (H, W) integer instance map.
        ids: (N,) instance ids present in the map, ascending.
        top_left: (N, 2) int (rmin, cmin) of each nucleus' bounding box.

    Returns:
        (N, 2) float64 (x, y).
    """
    flat, labels = _foreground(inst_map)
    return centroids(flat, labels, inst_map.shape[1], ids, top_left)


def _contours(inst_map: np.ndarray, ids: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """Outer contour of each nucleus from its bounding-box crop (``cv2.findContours``, simple chain).

    The reference takes the first contour of the ``RETR_TREE`` hierarchy: the first outer contour, which is also
    the first one ``RETR_EXTERNAL`` returns, without tracing the holes.

    Args:
        inst_map: (H, W) integer instance map.
        ids: (N,) instance ids.
        boxes: (N, 2, 2) int ``[[rmin, cmin], [rmax, cmax]]``.

    Returns:
        N arrays (K, 2) int32 of (x, y) in tile coordinates (K may be < 3).
    """
    out = []
    for i, (r0, c0), (r1, c1) in zip(ids.tolist(), boxes[:, 0].tolist(), boxes[:, 1].tolist()):
        crop = (inst_map[r0:r1, c0:c1] == i).view(np.uint8)
        out.append(cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE,
                                    offset=(c0, r0))[0][0].reshape(-1, 2))
    return out


def nuclei_from_instance_map(inst_map: np.ndarray, type_prob: np.ndarray | None = None) -> Nuclei:
    """Per-nucleus boxes, centroids, contours and types of an instance map (ids need not be contiguous).

    Nuclei whose contour has fewer than 3 points get no entry (reference §7.1 step 8).

    Args:
        inst_map: (H, W) non-negative integer instance map, 0 background.
        type_prob: (C, H, W) class probabilities (or logits, or one-hot) including background 0, or None;
            only their per-pixel argmax is used. Without it every type is 0 and every type_prob 0.

    Returns:
        :class:`Nuclei` in ascending id order.

    Raises:
        ValueError: for a non-integer or negative instance map, or a type map of the wrong shape.
    """
    inst_map = np.asarray(inst_map)
    if inst_map.ndim != 2 or inst_map.dtype.kind not in "iu":
        raise ValueError(f"inst_map must be an (H, W) integer array, got {inst_map.dtype} {inst_map.shape}")
    if inst_map.dtype.kind == "i" and inst_map.min(initial=0) < 0:
        raise ValueError("inst_map has negative ids")
    if inst_map.dtype == np.uint64:
        inst_map = inst_map.astype(np.int64)
    if type_prob is not None:
        type_prob = np.asarray(type_prob)
        if type_prob.ndim != 3 or type_prob.shape[1:] != inst_map.shape:
            raise ValueError(f"type_prob must have shape (C, *{inst_map.shape}), got {type_prob.shape}")
    slices = ndimage.find_objects(inst_map)
    ids = np.array([i for i, s in enumerate(slices, start=1) if s is not None], np.int64)
    if ids.size == 0:
        return Nuclei.empty()

    boxes = np.array(
        [[[s[0].start, s[1].start], [s[0].stop, s[1].stop]] for s in slices if s is not None], np.int32
    )
    contours = _contours(inst_map, ids, boxes)
    keep = np.array([c.shape[0] >= MIN_CONTOUR_POINTS for c in contours])
    flat, labels = _foreground(inst_map)
    xy = centroids(flat, labels, inst_map.shape[1], ids, boxes[:, 0])
    if type_prob is None:
        types, type_probs = np.zeros(ids.shape[0], np.int32), np.zeros(ids.shape[0], np.float64)
    else:
        pixel_types = _argmax_channels(type_prob.reshape(type_prob.shape[0], -1).take(flat, axis=1))
        types, type_probs = _vote_types(labels, pixel_types, type_prob.shape[0], ids)
    return Nuclei(
        ids=ids[keep].astype(np.int32),
        types=types[keep],
        type_probs=type_probs[keep].astype(np.float32),
        centroids=xy[keep],
        bboxes=boxes[keep],
        contours=[c for c, k in zip(contours, keep) if k],
    )


def hovernet_postprocess(
    nuclei_prob: np.ndarray,
    hv_map: np.ndarray,
    type_prob: np.ndarray | None = None,
    magnification: int = 40,
    presets: Mapping[int | str, PostProcessSettings | Mapping[str, float]] | None = None,
) -> tuple[np.ndarray, Nuclei]:
    """CellViT's HoVer-Net post-processing of one tile.

    Args:
        nuclei_prob: (H, W) float probability of the nucleus class (softmax channel 1 of the NP branch).
        hv_map: (2, H, W) float HV maps, channel 0 horizontal (x), channel 1 vertical (y).
        type_prob: (C, H, W) float class probabilities (or logits) including background 0, or None;
            only their per-pixel argmax is used.
        magnification: selects the settings in ``presets`` (40 or 20 by default).
        presets: settings per magnification (:func:`postprocess_settings`); None for :data:`MAGNIFICATION_PRESETS`.

    Returns:
        The (H, W) int32 instance map (0 background, 1..N) and the :class:`Nuclei` with an entry for every
        instance whose contour has at least 3 points.

    Raises:
        ValueError: for wrong shapes, NaN or infinite values, or an unknown magnification.
    """
    nuclei_prob, hv_map = np.asarray(nuclei_prob), np.asarray(hv_map)
    type_prob = None if type_prob is None else np.asarray(type_prob)
    _check_maps(nuclei_prob, hv_map, type_prob)
    inst_map = instance_map_from_hv(nuclei_prob, hv_map, magnification, presets)
    return inst_map, nuclei_from_instance_map(inst_map, type_prob)
