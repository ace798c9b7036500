"""MONAI transforms that turn the network's maps into nuclei: an array transform and dict transform pair.

``HoVerNetPostProcessingd(implementation="cellvit")`` runs our exact port of CellViT's HoVer-Net
post-processing (:mod:`.postprocess`); ``implementation="monai"`` runs MONAI's own
``HoVerNetInstanceMapPostProcessing`` and ``HoVerNetNuclearTypePostProcessing`` (the array transforms that
MONAI's ``HoVerNetInstanceMapPostProcessingd`` and ``HoVerNetNuclearTypePostProcessingd`` delegate to),
configured for the magnification, with three of their problems corrected (reference §7.2 and §11.14):

* centroids: MONAI adds the box offsets in swapped order (wrong for any non-square box) and rounds to
  integers; they are recomputed as float (x, y) centres of mass;
* a constant HV channel (or a constant Sobel map) raises ``ValueError`` in MONAI; here it gives no nuclei,
  which is what CellViT's min-max normalisation leads to;
* MONAI builds the type map with one full-tile comparison per nucleus; here it is one lookup.

Both implementations return the same things: the instance map (1, H, W) int32 numbered 1..N, the type
map (1, H, W) int32 and a :class:`~.postprocess.Nuclei`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Literal

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_numpy, optional_import

from .postprocess import Nuclei, PostProcessSettings, hovernet_postprocess, instance_centroids, postprocess_settings

cv2, _ = optional_import("cv2")
expit, _ = optional_import("scipy.special", name="expit")
HoVerNetInstanceMapPostProcessing, _ = optional_import(
    "monai.apps.pathology.transforms.post.array", name="HoVerNetInstanceMapPostProcessing"
)
HoVerNetNuclearTypePostProcessing, _ = optional_import(
    "monai.apps.pathology.transforms.post.array", name="HoVerNetNuclearTypePostProcessing"
)

__all__ = ["GaussianBlur3x3", "HoVerNetPostProcessing", "HoVerNetPostProcessingd", "MonaiHoVerNetPostProcessing"]

Activation = Literal["softmax", "sigmoid"]
Presets = Mapping[int | str, PostProcessSettings | Mapping[str, float]]
PostProcessed = tuple[np.ndarray, np.ndarray, Nuclei]


def _numpy_maps(
    nuclei_binary_map: NdarrayOrTensor, hv_map: NdarrayOrTensor, nuclei_type_map: NdarrayOrTensor | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The three maps as numpy arrays, checked: (1|2, H, W), (2, H, W), (C, H, W) or None, all finite."""
    maps = {
        "nuclei_binary_map": convert_to_numpy(nuclei_binary_map),
        "hv_map": convert_to_numpy(hv_map),
        "nuclei_type_map": None if nuclei_type_map is None else convert_to_numpy(nuclei_type_map),
    }
    np_map = maps["nuclei_binary_map"]
    if np_map.ndim != 3 or np_map.shape[0] not in (1, 2):
        raise ValueError(f"nuclei_binary_map must have shape (1 or 2, H, W), got {np_map.shape}")
    for name, arr in maps.items():
        if arr is None:
            continue
        if arr.ndim != 3 or arr.shape[1:] != np_map.shape[1:]:
            raise ValueError(f"{name} must have shape (C, {np_map.shape[1]}, {np_map.shape[2]}), got {arr.shape}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    if maps["hv_map"].shape[0] != 2:
        raise ValueError(f"hv_map must have 2 channels (x, y), got {maps['hv_map'].shape[0]}")
    return maps["nuclei_binary_map"], maps["hv_map"], maps["nuclei_type_map"]


def _check_activation(activation: str) -> None:
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")


class HoVerNetPostProcessing(Transform):
    """CellViT's HoVer-Net post-processing (exact port, :func:`.postprocess.hovernet_postprocess`).

    Args:
        magnification: selects the settings in ``presets`` (by default 40 or 20: Sobel kernel 21 or 11, marker
            size 10 or 3).
        activation: ``"softmax"`` for a (2, H, W) NP map of logits, ``"sigmoid"`` for (1, H, W) logits.
        presets: thresholds and sizes per magnification (:func:`.postprocess.postprocess_settings`); None for
            the reference's.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, magnification: int = 40, activation: Activation = "softmax", presets: Presets | None = None
                 ) -> None:
        _check_activation(activation)
        self.settings = postprocess_settings(magnification, presets)
        self.magnification = magnification
        self.activation = activation

    def __call__(
        self,
        nuclei_binary_map: NdarrayOrTensor,
        hv_map: NdarrayOrTensor,
        nuclei_type_map: NdarrayOrTensor | None = None,
    ) -> PostProcessed:
        """
        Args:
            nuclei_binary_map: (2, H, W) or (1, H, W) NP logits of one image, as set by ``activation``.
            hv_map: (2, H, W) HV maps, channel 0 horizontal (x), channel 1 vertical (y).
            nuclei_type_map: (C, H, W) type logits or probabilities including background 0, or None.

        Returns:
            instance map (1, H, W) int32 (0 background, 1..N), type map (1, H, W) int32, :class:`Nuclei`.
        """
        np_map, hv, types = _numpy_maps(nuclei_binary_map, hv_map, nuclei_type_map)
        logits = np_map.astype(np.float64)
        if self.activation == "softmax":
            if logits.shape[0] != 2:
                raise ValueError(f"softmax activation needs a 2-channel nuclei_binary_map, got {logits.shape[0]}")
            nuclei_prob = expit(logits[1] - logits[0])
        else:
            nuclei_prob = expit(logits[-1])
        inst_map, nuclei = hovernet_postprocess(nuclei_prob, hv, types, self.magnification,
                                                {self.magnification: self.settings})
        return inst_map[None], nuclei.type_map(inst_map)[None], nuclei


class GaussianBlur3x3(Transform):
    """OpenCV's 3x3 Gaussian blur (sigma 0.8, border reflect-101) per channel: CellViT's distance smoothing.

    Used as MONAI's ``distance_smooth_fn``; input and output (C, H, W), same type as the input.
    """

    backend = [TransformBackends.NUMPY]

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        arr = convert_to_numpy(img)
        out = np.stack([cv2.GaussianBlur(channel, (3, 3), 0) for channel in arr])
        return convert_to_dst_type(out, img)[0]


class MonaiHoVerNetPostProcessing(Transform):
    """MONAI's HoVerNet post-processing configured for the magnification, with its problems corrected.

    MONAI ties the marker's minimum size to the mask's (10 px here) and opens markers with a disk of
    ``marker_radius``; contours come from ``skimage.measure.find_contours``. The distance map is smoothed with
    CellViT's 3x3 Gaussian. Centroids are recomputed, a constant HV or Sobel map gives no nuclei, and the type
    map is built in one lookup (see the module docstring).

    Args:
        magnification: selects the settings in ``presets`` (by default 40 or 20: Sobel kernel 21 or 11).
        activation: ``"softmax"`` for (2, H, W) NP logits, ``"sigmoid"`` for (1, H, W).
        marker_radius: radius of the disk that opens the markers.
        presets: settings per magnification (:func:`.postprocess.postprocess_settings`); MONAI uses their
            ``mask_min_size`` and ``sobel_kernel_size``.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, magnification: int = 40, activation: Activation = "softmax", marker_radius: int = 2,
                 presets: Presets | None = None) -> None:
        _check_activation(activation)
        settings = postprocess_settings(magnification, presets)
        self.instance_map = HoVerNetInstanceMapPostProcessing(
            activation=activation,
            min_object_size=settings.mask_min_size,
            sobel_kernel_size=settings.sobel_kernel_size,
            distance_smooth_fn=GaussianBlur3x3(),
            marker_radius=marker_radius,
        )
        self.nuclear_type = HoVerNetNuclearTypePostProcessing(activation="softmax", return_type_map=False)

    def _instances(self, np_map: np.ndarray, hv: np.ndarray) -> tuple[dict, np.ndarray]:
        """MONAI's instance info and (H, W) instance map; nothing when an HV or Sobel map is constant."""
        empty = ({}, np.zeros(hv.shape[1:], np.int64))
        if (np.ptp(hv.reshape(2, -1), axis=1) == 0).any():
            return empty
        try:
            info, inst_map = self.instance_map(np_map, hv)
        except ValueError as err:
            if str(err).startswith("Not a valid sobel gradient map"):
                return empty
            raise
        return info, convert_to_numpy(inst_map)[0]

    def __call__(
        self,
        nuclei_binary_map: NdarrayOrTensor,
        hv_map: NdarrayOrTensor,
        nuclei_type_map: NdarrayOrTensor | None = None,
    ) -> PostProcessed:
        """
        Args:
            nuclei_binary_map: (2, H, W) or (1, H, W) NP logits of one image, as set by ``activation``.
            hv_map: (2, H, W) HV maps, channel 0 horizontal (x), channel 1 vertical (y).
            nuclei_type_map: (C, H, W) type logits or probabilities including background 0, or None.

        Returns:
            instance map (1, H, W) int32 (0 background, 1..N), type map (1, H, W) int32, :class:`Nuclei`.
        """
        np_map, hv, types = _numpy_maps(nuclei_binary_map, hv_map, nuclei_type_map)
        info, monai_map = self._instances(np_map.astype(np.float32), hv.astype(np.float32))
        if types is not None and info:
            info, _ = self.nuclear_type(types.astype(np.float32), info, monai_map[None])

        labels = np.unique(monai_map)
        labels = labels[labels > 0]
        lut = np.zeros(int(labels[-1]) + 1 if labels.size else 1, np.int32)
        lut[labels] = np.arange(1, labels.size + 1, dtype=np.int32)
        inst_map = lut[monai_map]

        kept = sorted(info)
        ids = lut[np.array(kept, np.int64)] if kept else np.zeros(0, np.int32)
        # MONAI's bounding_box is [[rmin, rmax, cmin, cmax]]
        boxes = np.array([np.asarray(info[k]["bounding_box"]).reshape(4)[[0, 2, 1, 3]] for k in kept], np.int32)
        boxes = boxes.reshape(-1, 2, 2)
        nuclei = Nuclei(
            ids=ids,
            types=np.array([info[k].get("type", 0) for k in kept], np.int32),
            type_probs=np.array([info[k].get("type_prob", 0.0) for k in kept], np.float32),
            centroids=(
                instance_centroids(inst_map, ids, boxes[:, 0]) if kept else np.zeros((0, 2), np.float64)
            ),
            bboxes=boxes,
            contours=[np.asarray(info[k]["contour"], np.int32).reshape(-1, 2) for k in kept],
        )
        return inst_map[None], nuclei.type_map(inst_map)[None], nuclei


class HoVerNetPostProcessingd(MapTransform):
    """Dictionary wrapper of :class:`HoVerNetPostProcessing` (``implementation="cellvit"``, exact and fast) or
    :class:`MonaiHoVerNetPostProcessing` (``implementation="monai"``, MONAI's transforms corrected).

    Args:
        keys: the NP, HV and NC keys of the network output, in this order; the NC key may be omitted
            (no types: every type is 0).
        implementation: ``"cellvit"`` or ``"monai"``.
        magnification: 40 or 20 (a key of ``presets``).
        activation: ``"softmax"`` for (2, H, W) NP logits, ``"sigmoid"`` for (1, H, W).
        presets: thresholds and sizes per magnification (:func:`.postprocess.postprocess_settings`).
        instance_map_key: output key of the (1, H, W) int32 instance map.
        type_map_key: output key of the (1, H, W) int32 type map.
        nuclei_key: output key of the :class:`Nuclei`.
        marker_radius: only for ``implementation="monai"``.
    """

    def __init__(
        self,
        keys: KeysCollection = ("nuclei_binary_map", "hv_map", "nuclei_type_map"),
        implementation: Literal["cellvit", "monai"] = "cellvit",
        magnification: int = 40,
        activation: Activation = "softmax",
        instance_map_key: str = "inst_map",
        type_map_key: str = "type_map",
        nuclei_key: str = "nuclei",
        marker_radius: int = 2,
        presets: Presets | None = None,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) not in (2, 3):
            raise ValueError(f"keys must name the NP, HV and (optionally) NC maps, got {self.keys}")
        if implementation == "cellvit":
            self.transform: Transform = HoVerNetPostProcessing(magnification, activation, presets)
        elif implementation == "monai":
            self.transform = MonaiHoVerNetPostProcessing(magnification, activation, marker_radius, presets)
        else:
            raise ValueError(f"implementation must be 'cellvit' or 'monai', got {implementation!r}")
        self.instance_map_key = instance_map_key
        self.type_map_key = type_map_key
        self.nuclei_key = nuclei_key

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, object]:
        d = dict(data)
        missing = [k for k in self.keys if k not in d]
        if missing:
            raise KeyError(f"HoVerNetPostProcessingd: keys {missing} not in the data (it has {sorted(map(str, d))})")
        d[self.instance_map_key], d[self.type_map_key], d[self.nuclei_key] = self.transform(
            *(d[k] for k in self.keys)
        )
        return d
