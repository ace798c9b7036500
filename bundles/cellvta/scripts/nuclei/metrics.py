"""The PQ metric family for nuclei instance segmentation and classification (numpy and scipy only).

Every function takes instance maps ``(H, W)`` of non-negative integers (0 is background, any other
value is one nucleus; ids need not be contiguous) and, where classes matter, type maps ``(H, W)``
with values in ``0..num_classes-1`` (0 is background; ``num_classes`` counts the background, like the
network's type channels and ``classes`` in ``configs/common.yaml``; MONAI's ``num_classes`` is one less).
The class-``c`` instances of an image are the pixels of its instances whose type is ``c`` (HoVer-Net
and CoNIC convention: ``inst * (type == c)``).

All instance overlaps of an image come from one histogram of paired (ground-truth id, predicted
id) over the pixels of either map's nuclei, restricted to the pairs that occur; the per-class
overlaps follow from the instances' classes (or, for nuclei of several classes, from a second
histogram). The cost is a few passes over those pixels whatever the number of nuclei.

Definitions (docs/protocol.md, "Metrics"):

- per image, binary and per class: matches are pairs with IoU > 0.5 (unique); ``DQ = TP / (TP +
  FP/2 + FN/2)``, ``SQ = sum(IoU) / (TP + 1e-6)``, ``PQ = DQ * SQ`` (hover_net ``get_fast_pq``).
  Binary PQ of an image without ground-truth nuclei, and class-``c`` PQ of an image without
  ground-truth nuclei of class ``c``, are NaN: the image (class) is excluded from the means, and
  false positives of a class absent from an image's ground truth are not counted (PanNuke rule).
- PanNuke mPQ: nanmean over classes within each image, then nanmean over images.
- CoNIC mPQ+: TP, FP, FN and IoU sums per class over the dataset, ``PQ_c = TP / (TP + FP/2 + FN/2
  + 1e-6) * IoU / (TP + 1e-6)``, then the mean over classes (a class never seen gives 0).
- AJI (MoNuSeg) and AJI+ (unique Hungarian pairing), as hover_net; NaN when both maps are empty.
- Dice and Jaccard of the binary foreground. When both maps are empty Dice is 0 and counts in the mean, as in the
  official evaluation (kept on purpose, docs/official_checkpoints.md); Jaccard is NaN.
- The prediction scored is the typed one: with classes (``num_classes > 1``), predicted instances typed
  background by the type vote (:func:`.primitives.vote_types`: no pixel of a foreground class; post-processing
  also types nuclei without a valid contour so) are not nuclei of the prediction, for every score.
- Detection: Hungarian pairing of centroids on Euclidean distance, pairs farther than the radius
  dropped, pooled over the dataset; per-class F1, precision and recall with the HoVer-Net weights.
  Images without nuclei add nothing unless ``dummy_points`` reproduces the reference's (0, 0)
  point of type 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from .primitives import centroids, class_histogram, compact_ids, relabel_sequential, vote_types

__all__ = [
    "Overlap",
    "ImageScores",
    "DetectionMatch",
    "remap_label",
    "instance_overlap",
    "class_overlaps",
    "pq_counts",
    "quality_from_counts",
    "panoptic_quality",
    "aji",
    "aji_plus",
    "dice_jaccard",
    "typed_prediction",
    "instance_centroids_and_types",
    "match_centroids",
    "detection_scores",
    "evaluate_image",
    "summarize",
    "METRIC_KEYS",
]

SQ_SMOOTH = 1e-6
CONIC_DQ_SMOOTH = 1e-6


@dataclass(frozen=True)
class Overlap:
    """Pixel overlap between the instances of a ground-truth and a predicted map.

    Instances are indexed ``0..Ng-1`` and ``0..Np-1`` in ascending id order.

    Attributes:
        gt_area: ``(Ng,)`` int64 pixel counts.
        pred_area: ``(Np,)`` int64 pixel counts.
        gt_index: ``(K,)`` intp, ground-truth index of each overlapping pair (sorted, then ``pred_index``).
        pred_index: ``(K,)`` intp, predicted index of each pair.
        inter: ``(K,)`` int64 intersection of each pair (> 0).
    """

    gt_area: np.ndarray
    pred_area: np.ndarray
    gt_index: np.ndarray
    pred_index: np.ndarray
    inter: np.ndarray

    @property
    def union(self) -> np.ndarray:
        """``(K,)`` int64 union of each pair."""
        return self.gt_area[self.gt_index] + self.pred_area[self.pred_index] - self.inter

    @property
    def iou(self) -> np.ndarray:
        """``(K,)`` float64 IoU of each pair."""
        return self.inter / self.union


@dataclass(frozen=True)
class DetectionMatch:
    """Centroid pairing of one image, reduced to the types the detection scores need.

    Attributes:
        paired_gt_types: ``(K,)`` int64 ground-truth type of each pair.
        paired_pred_types: ``(K,)`` int64 predicted type of each pair.
        unpaired_gt_types: ``(U,)`` int64 types of unmatched ground-truth nuclei (false negatives).
        unpaired_pred_types: ``(V,)`` int64 types of unmatched predicted nuclei (false positives).
    """

    paired_gt_types: np.ndarray
    paired_pred_types: np.ndarray
    unpaired_gt_types: np.ndarray
    unpaired_pred_types: np.ndarray


@dataclass
class ImageScores:
    """Scores of one image.

    Attributes:
        binary_counts: ``(4,)`` float64 ``[TP, FP, FN, sum IoU]`` of the binary (class-agnostic) matching.
        binary_quality: ``(3,)`` ``[DQ, SQ, PQ]``, NaN when the ground truth has no nucleus.
        class_counts: ``(num_classes - 1, 4)`` per-class ``[TP, FP, FN, sum IoU]`` (classes 1..num_classes-1).
        class_quality: ``(num_classes - 1, 3)`` per-class ``[DQ, SQ, PQ]``, NaN where the ground truth has no
            nucleus of that class.
        aji: AJI; aji_plus: AJI+; dice, jaccard: of the binary foreground.
        detection: centroid pairing, or None when detection was not requested.
        name: image name; tissue: tissue label (None when unknown).
    """

    binary_counts: np.ndarray
    binary_quality: np.ndarray
    class_counts: np.ndarray
    class_quality: np.ndarray
    aji: float
    aji_plus: float
    dice: float
    jaccard: float
    detection: DetectionMatch | None = None
    name: str = ""
    tissue: str | int | None = None


def _check_map(arr: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (H, W) map, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.intp)
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(f"{what} must hold integer labels, got dtype {arr.dtype} with non-integer values")
        arr = arr.astype(np.int64)
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise ValueError(f"{what} has negative labels (min {arr.min()}); labels must be >= 0")
    return arr


def _check_pair(gt: np.ndarray, pred: np.ndarray, what: str = "instance map") -> tuple[np.ndarray, np.ndarray]:
    gt = _check_map(gt, f"ground-truth {what}")
    pred = _check_map(pred, f"predicted {what}")
    if gt.shape != pred.shape:
        raise ValueError(f"ground-truth and predicted {what}s differ in shape: {gt.shape} vs {pred.shape}")
    return gt, pred


def _check_types(types: np.ndarray, shape: tuple[int, ...], num_classes: int, what: str) -> np.ndarray:
    types = _check_map(types, what)
    if types.shape != shape:
        raise ValueError(f"{what} has shape {types.shape}, the instance map has {shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes counts the background and must be >= 1, got {num_classes}")
    if types.size and types.max() >= num_classes:
        raise ValueError(
            f"{what} holds class {types.max()} but num_classes is {num_classes} (classes 0..{num_classes - 1})"
        )
    return types


def remap_label(inst: np.ndarray) -> np.ndarray:
    """Relabel an instance map ``(H, W)`` to contiguous ids ``1..N`` in ascending original-id order.

    Returns:
        ``(H, W)`` int32 map (0 stays background).
    """
    return relabel_sequential(_check_map(inst, "instance map"))


def _small_ids(inst: np.ndarray) -> np.ndarray:
    """The map itself when its ids can index a histogram (max id below the pixel count), else compacted."""
    return inst if int(inst.max(initial=0)) < max(inst.size, 1024) else compact_ids(inst)


@dataclass(frozen=True)
class _Instances:
    """The instances of one map: ``rank`` maps a label (0..L-1) to its index 0..N-1 (-1 for absent labels),
    ``class_area`` ``(N, n_types)`` int64 counts the pixels of each class inside each instance."""

    labels: np.ndarray
    rank: np.ndarray
    class_area: np.ndarray

    @property
    def area(self) -> np.ndarray:
        return self.class_area.sum(axis=1)


def _instances(labels: np.ndarray, at: np.ndarray, types: np.ndarray | None, n_types: int) -> _Instances:
    """Instances of an ``(H, W)`` map of small labels and their per-class pixel counts, from one bincount over the
    pixels at the flat indices ``at`` ``(M,)`` (a superset of the map's non-zero pixels)."""
    values = labels.ravel()[at]
    key = np.multiply(values, n_types, dtype=np.intp)
    if types is not None:
        key += types.ravel()[at]
    n_labels = int(values.max(initial=0)) + 1
    hist = np.bincount(key, minlength=n_labels * n_types).reshape(n_labels, n_types)
    present = hist.any(axis=1)
    present[0] = False
    return _Instances(labels, np.cumsum(present) - 1, hist[present])


def _histogram(key: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values ``(K,)`` (ascending) of a key array with values in ``0..size-1`` and their counts ``(K,)``:
    a dense bincount when ``size`` is at most four times the number of keys, a sort otherwise."""
    if size <= 4 * key.size:
        counts = np.bincount(key.ravel(), minlength=size)
        codes = np.flatnonzero(counts)
        return codes, counts[codes]
    return np.unique(key, return_counts=True)


def _single_class(instances: _Instances) -> bool:
    """Whether every instance has all its pixels in one class."""
    return np.array_equal(instances.class_area.max(axis=1, initial=0), instances.area)


@dataclass(frozen=True)
class _ClassPairs:
    """Per class, the overlaps of the class-``c`` instances: the ``(K,)`` pairs of instances (indices into both
    maps; within a class sorted by ground truth, then prediction), their class ``c >= 1`` and their pixels of
    class ``c`` in both."""

    gt_index: np.ndarray
    pred_index: np.ndarray
    cls: np.ndarray
    inter: np.ndarray


def _joint(
    gt_inst: np.ndarray, gt_type: np.ndarray | None, pred_inst: np.ndarray, pred_type: np.ndarray | None, n_types: int
) -> tuple[_Instances, _Instances, Overlap, _ClassPairs]:
    """Instances of both maps, the binary overlap and the per-class pairs of an image.

    Only the pixels of either map's nuclei are visited. The pairs come from one histogram of (gt id, pred id),
    restricted to the pairs that occur. When every instance of both maps has a single class (the usual case), the
    class-``c`` overlap of a pair is its whole overlap if both are of class ``c`` and nothing otherwise; else a
    second histogram of (pair, class) over the pixels whose two classes agree gives it.
    """
    gt_lab, pred_lab = _small_ids(gt_inst), _small_ids(pred_inst)
    fg = np.flatnonzero(np.logical_or(gt_lab, pred_lab))
    gts, preds = _instances(gt_lab, fg, gt_type, n_types), _instances(pred_lab, fg, pred_type, n_types)
    n_p = preds.rank.size
    pair = np.multiply(gt_lab.ravel()[fg], n_p, dtype=np.intp)
    pair += pred_lab.ravel()[fg]
    codes, count = _histogram(pair, gts.rank.size * n_p)
    g, p = np.divmod(codes, n_p)
    both = (g > 0) & (p > 0)
    gi, pi, inter = gts.rank[g[both]], preds.rank[p[both]], count[both]
    binary = Overlap(gts.area, preds.area, gi, pi, inter)
    if n_types == 1:
        return gts, preds, binary, _ClassPairs(gi[:0], pi[:0], gi[:0], inter[:0])

    if _single_class(gts) and _single_class(preds):
        g_class, p_class = gts.class_area.argmax(axis=1)[gi], preds.class_area.argmax(axis=1)[pi]
        keep = (g_class == p_class) & (g_class > 0)
        return gts, preds, binary, _ClassPairs(gi[keep], pi[keep], g_class[keep], inter[keep])

    n_pairs = gts.rank.size * n_p
    gt_fg_type = gt_type.ravel()[fg]
    agree = np.multiply(gt_fg_type, n_pairs, dtype=np.intp)
    agree += pair
    agree[gt_fg_type != pred_type.ravel()[fg]] = 0
    codes, count = _histogram(agree, n_pairs * n_types)
    cls, codes = np.divmod(codes, n_pairs)
    g, p = np.divmod(codes, n_p)
    keep = (g > 0) & (p > 0) & (cls > 0)
    return gts, preds, binary, _ClassPairs(gts.rank[g[keep]], preds.rank[p[keep]], cls[keep], count[keep])


def _class_overlaps(gts: _Instances, preds: _Instances, pairs: _ClassPairs) -> list[Overlap]:
    """The overlap of the class-``c`` instances for each class ``c = 1..n_types-1``."""
    per_class = []
    for c in range(1, gts.class_area.shape[1]):
        g_sel = gts.class_area[:, c] > 0
        p_sel = preds.class_area[:, c] > 0
        k = pairs.cls == c
        g_rank = np.cumsum(g_sel) - 1
        p_rank = np.cumsum(p_sel) - 1
        per_class.append(
            Overlap(
                gts.class_area[g_sel, c],
                preds.class_area[p_sel, c],
                g_rank[pairs.gt_index[k]],
                p_rank[pairs.pred_index[k]],
                pairs.inter[k],
            )
        )
    return per_class


def _class_counts(gts: _Instances, preds: _Instances, pairs: _ClassPairs, iou_threshold: float) -> np.ndarray:
    """``(n_types - 1, 4)`` per-class ``[TP, FP, FN, sum IoU]``, as :func:`pq_counts` of each class overlap.

    From 0.5 up the matches are the pairs above the threshold, counted for all classes at once.
    """
    if iou_threshold < 0.5:
        return np.array([pq_counts(o, iou_threshold) for o in _class_overlaps(gts, preds, pairs)]).reshape(-1, 4)
    n_types = gts.class_area.shape[1]
    union = gts.class_area[pairs.gt_index, pairs.cls] + preds.class_area[pairs.pred_index, pairs.cls] - pairs.inter
    iou = pairs.inter / union
    matched = iou > iou_threshold
    tp = np.bincount(pairs.cls[matched], minlength=n_types)[1:]
    iou_sum = np.bincount(pairs.cls[matched], weights=iou[matched], minlength=n_types)[1:]
    n_gt = np.count_nonzero(gts.class_area, axis=0)[1:]
    n_pred = np.count_nonzero(preds.class_area, axis=0)[1:]
    return np.stack([tp, n_pred - tp, n_gt - tp, iou_sum], axis=1).astype(np.float64)


def _centroids_and_types(instances: _Instances) -> tuple[np.ndarray, np.ndarray]:
    """Centroids ``(N, 2)`` float64 ``(x, y)`` (pixel means) and types ``(N,)`` int64 (:func:`.primitives.vote_types`)
    of the instances, in ascending label order."""
    flat = np.flatnonzero(instances.labels)
    ids = np.flatnonzero(np.diff(instances.rank, prepend=-1))
    xy = centroids(flat, instances.labels.ravel()[flat], instances.labels.shape[1], ids)
    return xy, vote_types(instances.class_area)


def instance_overlap(gt_inst: np.ndarray, pred_inst: np.ndarray) -> Overlap:
    """Overlap of all instance pairs of two maps ``(H, W)`` from one bincount."""
    gt_inst, pred_inst = _check_pair(gt_inst, pred_inst)
    return _joint(gt_inst, None, pred_inst, None, 1)[2]


def class_overlaps(
    gt_inst: np.ndarray, gt_type: np.ndarray, pred_inst: np.ndarray, pred_type: np.ndarray, num_classes: int
) -> tuple[Overlap, list[Overlap]]:
    """Binary overlap and the overlaps of the class-``c`` instances for ``c = 1..num_classes-1``.

    Args:
        gt_inst, pred_inst: ``(H, W)`` instance maps.
        gt_type, pred_type: ``(H, W)`` type maps with values in ``0..num_classes-1``.
        num_classes: number of classes, background included.

    Returns:
        (binary overlap, list of ``num_classes - 1`` per-class overlaps).
    """
    gt_inst, pred_inst = _check_pair(gt_inst, pred_inst)
    gt_type = _check_types(gt_type, gt_inst.shape, num_classes, "ground-truth type map")
    pred_type = _check_types(pred_type, gt_inst.shape, num_classes, "predicted type map")
    if num_classes > 1:
        pred_inst = typed_prediction(pred_inst, pred_type, num_classes)
    gts, preds, binary, pairs = _joint(gt_inst, gt_type, pred_inst, pred_type, num_classes)
    return binary, _class_overlaps(gts, preds, pairs)


def pq_counts(overlap: Overlap, iou_threshold: float = 0.5) -> np.ndarray:
    """``[TP, FP, FN, sum IoU]`` ``(4,)`` float64 of the unique matching at IoU > ``iou_threshold``.

    For thresholds below 0.5 the matching is the maximal-IoU Hungarian assignment (hover_net, MONAI).
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    iou = overlap.iou
    if iou_threshold >= 0.5:
        matched = iou[iou > iou_threshold]
    else:
        dense = np.zeros((overlap.gt_area.size, overlap.pred_area.size))
        dense[overlap.gt_index, overlap.pred_index] = iou
        rows, cols = linear_sum_assignment(-dense)
        matched = dense[rows, cols]
        matched = matched[matched > iou_threshold]
    tp = matched.size
    return np.array([tp, overlap.pred_area.size - tp, overlap.gt_area.size - tp, matched.sum()], dtype=np.float64)


def quality_from_counts(counts: np.ndarray, dq_smooth: float = 0.0) -> np.ndarray:
    """``[DQ, SQ, PQ]`` ``(..., 3)`` from ``[TP, FP, FN, sum IoU]`` counts ``(..., 4)``.

    ``DQ = TP / (TP + FP/2 + FN/2 + dq_smooth)`` (NaN for 0/0), ``SQ = sum IoU / (TP + 1e-6)``,
    ``PQ = DQ * SQ``. Per image ``dq_smooth = 0`` (hover_net); CoNIC's aggregated PQ uses 1e-6.
    """
    counts = np.asarray(counts, dtype=np.float64)
    tp, fp, fn, iou_sum = np.moveaxis(counts, -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        dq = tp / (tp + 0.5 * fp + 0.5 * fn + dq_smooth)
    sq = iou_sum / (tp + SQ_SMOOTH)
    return np.stack([dq, sq, dq * sq], axis=-1)


def panoptic_quality(gt_inst: np.ndarray, pred_inst: np.ndarray, iou_threshold: float = 0.5) -> np.ndarray:
    """``[DQ, SQ, PQ]`` ``(3,)`` of two instance maps ``(H, W)``; NaN when the ground truth is empty."""
    overlap = instance_overlap(gt_inst, pred_inst)
    if overlap.gt_area.size == 0:
        return np.full(3, np.nan)
    return quality_from_counts(pq_counts(overlap, iou_threshold))


def _aji_ratio(overlap: Overlap, gt_sel: np.ndarray, pred_sel: np.ndarray, used_pred: np.ndarray) -> float:
    inter = overlap.inter[gt_sel].sum()
    union = overlap.union[gt_sel].sum()
    paired_gt = np.zeros(overlap.gt_area.size, dtype=bool)
    paired_gt[overlap.gt_index[gt_sel]] = True
    paired_pred = np.zeros(overlap.pred_area.size, dtype=bool)
    paired_pred[used_pred] = True
    union = union + overlap.gt_area[~paired_gt].sum() + overlap.pred_area[~paired_pred].sum()
    return float(inter / union) if union > 0 else float("nan")


def _eps_iou(overlap: Overlap) -> np.ndarray:
    return overlap.inter / (overlap.union + 1.0e-6)


def aji(overlap: Overlap) -> float:
    """Aggregated Jaccard Index (MoNuSeg): each ground-truth nucleus takes its best-IoU prediction.

    A prediction may serve several ground-truth nuclei; unused instances of both maps join the union.
    """
    if overlap.inter.size == 0:
        return _aji_ratio(overlap, np.zeros(0, dtype=bool), np.zeros(0, dtype=bool), np.zeros(0, dtype=np.intp))
    order = np.lexsort((overlap.pred_index, -_eps_iou(overlap), overlap.gt_index))
    first = np.ones(order.size, dtype=bool)
    first[1:] = overlap.gt_index[order[1:]] != overlap.gt_index[order[:-1]]
    best = order[first]
    sel = np.zeros(overlap.inter.size, dtype=bool)
    sel[best] = True
    return _aji_ratio(overlap, sel, sel, overlap.pred_index[best])


def _used_rank(index: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """Rank of each of the ``(K,)`` indices (into ``0..size-1``) among the distinct ones, and how many there are."""
    used = np.zeros(size, dtype=bool)
    used[index] = True
    rank = np.cumsum(used) - 1
    return rank[index], int(rank[-1]) + 1


def aji_plus(overlap: Overlap) -> float:
    """AJI+ : AJI with a unique (Hungarian, maximal IoU) pairing of ground-truth and predicted nuclei."""
    sel = np.zeros(overlap.inter.size, dtype=bool)
    if overlap.inter.size:
        row_idx, n_rows = _used_rank(overlap.gt_index, overlap.gt_area.size)
        col_idx, n_cols = _used_rank(overlap.pred_index, overlap.pred_area.size)
        dense = np.zeros((n_rows, n_cols))
        dense[row_idx, col_idx] = _eps_iou(overlap)
        pair_of = np.full(dense.shape, -1, dtype=np.intp)
        pair_of[row_idx, col_idx] = np.arange(overlap.inter.size)
        rows, cols = linear_sum_assignment(-dense)
        chosen = pair_of[rows, cols]
        sel[chosen[chosen >= 0]] = True
    return _aji_ratio(overlap, sel, sel, overlap.pred_index[sel])


def dice_jaccard(overlap: Overlap) -> tuple[float, float]:
    """Dice and Jaccard of the binary foregrounds; when both are empty, Dice 0 (the official convention) and
    Jaccard NaN."""
    inter = float(overlap.inter.sum())
    total = float(overlap.gt_area.sum() + overlap.pred_area.sum())
    if total == 0:
        return 0.0, float("nan")
    return 2.0 * inter / total, inter / (total - inter)


def typed_prediction(pred_inst: np.ndarray, pred_type: np.ndarray, num_classes: int) -> np.ndarray:
    """``pred_inst`` ``(H, W)`` without the instances that the type vote over ``pred_type`` calls background."""
    untyped = (pred_inst > 0) & (pred_type == 0)
    if not untyped.any():  # the usual case: every nucleus pixel has a foreground class
        return pred_inst
    flat = np.flatnonzero(pred_inst)
    labels = pred_inst.ravel()[flat]
    ids = np.unique(labels)
    background = ids[vote_types(class_histogram(labels, pred_type.ravel()[flat], num_classes, ids)) == 0]
    return np.where(np.isin(pred_inst, background), 0, pred_inst) if background.size else pred_inst


def instance_centroids_and_types(
    inst: np.ndarray, types: np.ndarray | None = None, num_classes: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Centroids and types of the instances of a map, in ascending id order.

    Args:
        inst: ``(H, W)`` instance map.
        types: ``(H, W)`` type map or None (all types 0).
        num_classes: number of classes in ``types``, background included.

    Returns:
        centroids ``(N, 2)`` float64 ``(x, y)`` (pixel means), types ``(N,)`` int64 by the project's type vote
        (:func:`.primitives.vote_types`: the majority class, a foreground class over background when any).
    """
    inst = _check_map(inst, "instance map")
    if types is not None:
        types = _check_types(types, inst.shape, num_classes, "type map")
    n_types = num_classes if types is not None else 1
    labels = _small_ids(inst)
    return _centroids_and_types(_instances(labels, np.flatnonzero(labels != 0), types, n_types))


def match_centroids(
    gt_xy: np.ndarray, pred_xy: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hungarian pairing of two point sets on Euclidean distance; pairs farther than ``radius`` are dropped.

    As hover_net's ``pair_coordinates``: the assignment minimises the total distance over all points,
    then pairs with distance > ``radius`` are discarded.

    Args:
        gt_xy: ``(A, 2)`` points; pred_xy: ``(B, 2)`` points; radius: in the points' unit.

    Returns:
        pairs ``(K, 2)`` intp (gt index, pred index), unpaired gt indices ``(A-K,)``, unpaired pred ``(B-K,)``.
    """
    gt_xy = np.asarray(gt_xy, dtype=np.float64).reshape(-1, 2)
    pred_xy = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    if gt_xy.shape[0] == 0 or pred_xy.shape[0] == 0:
        return np.zeros((0, 2), dtype=np.intp), np.arange(gt_xy.shape[0]), np.arange(pred_xy.shape[0])
    dist = np.sqrt(((gt_xy[:, None, :] - pred_xy[None, :, :]) ** 2).sum(-1))
    rows, cols = linear_sum_assignment(dist)
    keep = dist[rows, cols] <= radius
    pairs = np.stack([rows[keep], cols[keep]], axis=1)
    unpaired_gt = np.setdiff1d(np.arange(gt_xy.shape[0]), pairs[:, 0])
    unpaired_pred = np.setdiff1d(np.arange(pred_xy.shape[0]), pairs[:, 1])
    return pairs, unpaired_gt, unpaired_pred


def _detection_match(
    gt_xy: np.ndarray, gt_types: np.ndarray, pred_xy: np.ndarray, pred_types: np.ndarray, radius: float, dummy: bool
) -> DetectionMatch:
    if dummy and gt_xy.shape[0] == 0:
        gt_xy, gt_types = np.zeros((1, 2)), np.zeros(1, dtype=np.int64)
    if dummy and pred_xy.shape[0] == 0:
        pred_xy, pred_types = np.zeros((1, 2)), np.zeros(1, dtype=np.int64)
    pairs, un_gt, un_pred = match_centroids(gt_xy, pred_xy, radius)
    return DetectionMatch(gt_types[pairs[:, 0]], pred_types[pairs[:, 1]], gt_types[un_gt], pred_types[un_pred])


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def detection_scores(matches: Iterable[DetectionMatch], num_classes: int) -> dict[str, object]:
    """Dataset-level detection precision, recall and F1, binary and per class (HoVer-Net/PanNuke rules).

    Per class ``t``, on the pairs where the ground truth or the prediction is ``t``: ``tp`` both ``t``,
    ``fp_dt`` prediction ``t`` only, ``fn_dt`` ground truth ``t`` only; ``fp_d``/``fn_d`` unpaired predictions
    / ground truth of type ``t``. ``F1 = 2tp / (2tp + 2fp_dt + 2fn_dt + fp_d + fn_d)``,
    ``P = tp / (tp + 2fp_dt + fp_d)``, ``R = tp / (tp + 2fn_dt + fn_d)``.

    Returns:
        ``{"precision", "recall", "f1", "tp", "fp", "fn", "per_class": [{"precision", "recall", "f1"}, ...]}``
        with ``num_classes - 1`` entries for classes 1..num_classes-1 (NaN where undefined).
    """
    matches = list(matches)

    def cat(attr: str) -> np.ndarray:
        arrays = [getattr(m, attr) for m in matches]
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)

    pg, pp, ug, up = (cat(a) for a in ("paired_gt_types", "paired_pred_types", "unpaired_gt_types",
                                       "unpaired_pred_types"))
    tp, fp, fn = pg.size, up.size, ug.size
    per_class = []
    for t in range(1, num_classes):
        tp_t = int(((pg == t) & (pp == t)).sum())
        fp_dt = int(((pg != t) & (pp == t)).sum())
        fn_dt = int(((pg == t) & (pp != t)).sum())
        fp_d, fn_d = int((up == t).sum()), int((ug == t).sum())
        per_class.append(
            {
                "precision": _ratio(tp_t, tp_t + 2 * fp_dt + fp_d),
                "recall": _ratio(tp_t, tp_t + 2 * fn_dt + fn_d),
                "f1": _ratio(2 * tp_t, 2 * tp_t + 2 * fp_dt + 2 * fn_dt + fp_d + fn_d),
            }
        )
    return {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "per_class": per_class,
    }


def evaluate_image(
    gt_inst: np.ndarray,
    gt_type: np.ndarray,
    pred_inst: np.ndarray,
    pred_type: np.ndarray,
    num_classes: int,
    iou_threshold: float = 0.5,
    detection_radius_px: float | None = 12.0,
    dummy_points: bool = False,
    name: str = "",
    tissue: str | int | None = None,
) -> ImageScores:
    """All per-image scores of one prediction against its ground truth.

    Args:
        gt_inst, pred_inst: ``(H, W)`` instance maps (any non-negative integer ids).
        gt_type, pred_type: ``(H, W)`` type maps, values ``0..num_classes-1``.
        num_classes: number of classes, background included; above 1, predicted instances typed background are
            left out (:func:`typed_prediction`).
        iou_threshold: PQ matching threshold.
        detection_radius_px: centroid matching radius in pixels (``radius_um / pixel_size_um``: 12 px =
            3 µm at 0.25 µm/px); None skips detection.
        dummy_points: reproduce the reference's (0, 0) type-0 point in images without nuclei.
        name, tissue: carried into the result for the per-tissue tables.
    """
    gt_inst, pred_inst = _check_pair(gt_inst, pred_inst)
    gt_type = _check_types(gt_type, gt_inst.shape, num_classes, "ground-truth type map")
    pred_type = _check_types(pred_type, gt_inst.shape, num_classes, "predicted type map")
    if num_classes > 1:
        pred_inst = typed_prediction(pred_inst, pred_type, num_classes)
    gts, preds, binary, pairs = _joint(gt_inst, gt_type, pred_inst, pred_type, num_classes)

    counts = np.concatenate([pq_counts(binary, iou_threshold)[None], _class_counts(gts, preds, pairs, iou_threshold)])
    quality = quality_from_counts(counts)
    quality[counts[:, 0] + counts[:, 2] == 0] = np.nan
    binary_counts, class_counts = counts[0], counts[1:]
    binary_quality, class_quality = quality[0], quality[1:]
    dice, jaccard = dice_jaccard(binary)

    detection = None
    if detection_radius_px is not None:
        gt_xy, gt_t = _centroids_and_types(gts)
        pred_xy, pred_t = _centroids_and_types(preds)
        detection = _detection_match(gt_xy, gt_t, pred_xy, pred_t, detection_radius_px, dummy_points)

    return ImageScores(
        binary_counts=binary_counts,
        binary_quality=binary_quality,
        class_counts=class_counts,
        class_quality=class_quality,
        aji=aji(binary),
        aji_plus=aji_plus(binary),
        dice=dice,
        jaccard=jaccard,
        detection=detection,
        name=name,
        tissue=tissue,
    )


def _nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    values = np.asarray(values, dtype=np.float64)
    valid = ~np.isnan(values)
    total = np.where(valid, values, 0.0).sum(axis=axis)
    count = valid.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
    return float(mean) if np.ndim(mean) == 0 else mean


METRIC_KEYS = (
    "bpq",
    "bdq",
    "bsq",
    "mpq",
    "mdq",
    "msq",
    "mpq_plus",
    "aji",
    "aji_plus",
    "dice",
    "jaccard",
    "detection_f1",
    "detection_precision",
    "detection_recall",
)


def _summary_of(scores: Sequence[ImageScores], num_classes: int) -> dict[str, object]:
    n = len(scores)
    n_fg = num_classes - 1
    bq = np.array([s.binary_quality for s in scores]).reshape(n, 3)
    cq = np.array([s.class_quality for s in scores]).reshape(n, n_fg, 3)
    cc = np.array([s.class_counts for s in scores]).reshape(n, n_fg, 4)
    per_image_m = _nanmean(cq, axis=1) if n else np.zeros((0, 3))
    summed = cc.sum(axis=0)
    conic = quality_from_counts(summed, dq_smooth=CONIC_DQ_SMOOTH)
    summary: dict[str, object] = {
        "n_images": n,
        "n_images_with_nuclei": int(np.sum(~np.isnan(bq[:, 2]))),
        "bdq": _nanmean(bq[:, 0]),
        "bsq": _nanmean(bq[:, 1]),
        "bpq": _nanmean(bq[:, 2]),
        "mdq": _nanmean(per_image_m[:, 0]),
        "msq": _nanmean(per_image_m[:, 1]),
        "mpq": _nanmean(per_image_m[:, 2]),
        "mpq_plus": float(conic[:, 2].mean()) if n_fg else float("nan"),
        "aji": _nanmean([s.aji for s in scores]),
        "aji_plus": _nanmean([s.aji_plus for s in scores]),
        "dice": _nanmean([s.dice for s in scores]),
        "jaccard": _nanmean([s.jaccard for s in scores]),
    }
    class_means = _nanmean(cq, axis=0) if n else np.full((n_fg, 3), np.nan)
    per_class = [
        {
            "dq": float(class_means[c, 0]),
            "sq": float(class_means[c, 1]),
            "pq": float(class_means[c, 2]),
            "pq_plus": float(conic[c, 2]),
            "dq_plus": float(conic[c, 0]),
            "sq_plus": float(conic[c, 1]),
            "tp": float(summed[c, 0]),
            "fp": float(summed[c, 1]),
            "fn": float(summed[c, 2]),
            "iou_sum": float(summed[c, 3]),
        }
        for c in range(n_fg)
    ]
    matches = [s.detection for s in scores if s.detection is not None]
    if matches:
        det = detection_scores(matches, num_classes)
        summary.update(
            detection_f1=det["f1"], detection_precision=det["precision"], detection_recall=det["recall"],
            detection_tp=det["tp"], detection_fp=det["fp"], detection_fn=det["fn"],
        )
        for entry, d in zip(per_class, det["per_class"]):
            entry.update(detection_f1=d["f1"], detection_precision=d["precision"], detection_recall=d["recall"])
    summary["per_class"] = per_class
    return summary


def summarize(
    scores: Sequence[ImageScores], num_classes: int, class_names: Sequence[str] | None = None
) -> dict[str, object]:
    """Dataset summary of per-image scores, overall, per class and per tissue.

    Returns:
        a JSON-ready dict: the keys of ``METRIC_KEYS`` (NaN when undefined), ``n_images``,
        ``per_class`` (list of dicts with ``name``, PanNuke ``pq``/``dq``/``sq`` (nanmean over images),
        CoNIC ``pq_plus`` and summed counts, detection scores) and ``per_tissue`` (tissue -> the same
        summary restricted to that tissue's images; empty when no image has a tissue).
    """
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(
            f"class_names has {len(class_names)} names for num_classes={num_classes} (background first)"
        )
    names = list(class_names[1:]) if class_names is not None else [f"class_{c}" for c in range(1, num_classes)]
    summary = _summary_of(scores, num_classes)
    tissues = sorted({s.tissue for s in scores if s.tissue is not None}, key=str)
    per_tissue = {}
    for tissue in tissues:
        sub = _summary_of([s for s in scores if s.tissue == tissue], num_classes)
        for entry, name in zip(sub["per_class"], names):
            entry["name"] = name
        per_tissue[str(tissue)] = sub
    for entry, name in zip(summary["per_class"], names):
        entry["name"] = name
    summary["per_tissue"] = per_tissue
    return summary
