"""MONAI transforms that load tiles of the bundle's layout, augment them and compute the training targets.

Array transforms act on one channel-first array; each has a dictionary version (suffix ``d``) that maps
keys and delegates. Geometric transforms take one interpolation mode per key so that images are
interpolated (bilinear) while instance and type maps keep their ids (nearest).

A sample after :func:`train_transforms` / :func:`val_transforms` holds:

* ``image`` (3, H, W) float32, normalised with the given mean/std;
* ``inst_map`` (1, H, W) int32, 0 background, nucleus ids as in the label file (ids cut away by a crop vanish);
* ``nuclei_binary_map`` (1, H, W) int64 in {0, 1};
* ``hv_map`` (2, H, W) float32: channel 0 horizontal (x), channel 1 vertical (y), in [-1, 1], 0 at each
  nucleus's centre of mass (design.md section 4);
* ``nuclei_type_map`` (1, H, W) int64, 0 background;
* ``tissue_types`` int64 scalar.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    DeleteItemsd,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    Rand2DElasticd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandRotate90d,
    RandSpatialCropd,
    Resized,
    Transform,
    Zoomd,
)
from monai.utils import convert_to_numpy, ensure_tuple_rep, optional_import

from ..nuclei.primitives import centroids
from .datasets import read_image, read_label

tv_functional, _ = optional_import("torchvision.transforms.v2.functional")
slic, _ = optional_import("skimage.segmentation", name="slic")

LABEL_KEYS = ("inst_map", "type_map")
IMAGE_KEY = "image"
TARGET_KEYS = ("image", "inst_map", "nuclei_binary_map", "hv_map", "nuclei_type_map", "tissue_types")


def _to_chw_image(image: np.ndarray | str) -> np.ndarray:
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = read_image(image)
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4) and image.shape[0] not in (3, 4):
        image = image[..., :3].transpose(2, 0, 1)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return image.astype(np.float32, copy=False)


class LoadTile(Transform):
    """Read an RGB tile: path (PNG/JPEG/TIFF) or array (H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""

    def __call__(self, image: np.ndarray | str) -> np.ndarray:
        return np.ascontiguousarray(_to_chw_image(image))


class LoadLabel(Transform):
    """Read a label map: npz path (array ``key``) or array (H, W) -> (1, H, W) int32."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, label: np.ndarray | str) -> np.ndarray:
        if isinstance(label, (str, bytes)) or hasattr(label, "__fspath__"):
            label = read_label(label, self.key)
        label = np.asarray(label)
        if label.ndim == 2:
            label = label[None]
        return label.astype(np.int32, copy=False)


class LoadSampled(MapTransform):
    """Load a sample of :func:`scripts.data.datasets.dataset_list` (paths) or of in-memory arrays.

    Args:
        image_key: key of the image (path or (H, W, 3) uint8 array) -> (3, H, W) float32 in [0, 1].
        label_keys: keys of label maps; a path value is an npz read at the array named like the key
            (``inst_map``, ``type_map``); an array value is (H, W) -> (1, H, W) int32.
    """

    def __init__(self, image_key: str = IMAGE_KEY, label_keys: Sequence[str] = LABEL_KEYS) -> None:
        super().__init__([image_key, *label_keys])
        self.image_key = image_key
        self.label_keys = tuple(label_keys)
        self.load_image = LoadTile()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        d[self.image_key] = self.load_image(d[self.image_key])
        opened: dict[str, np.lib.npyio.NpzFile] = {}
        try:
            for key in self.label_keys:
                value = d[key]
                if isinstance(value, str) and value.endswith(".npz"):
                    if value not in opened:
                        if not Path(value).is_file():
                            raise FileNotFoundError(f"{value}: label file not found")
                        opened[value] = np.load(value)
                    if key not in opened[value]:
                        raise ValueError(f"{value}: no '{key}' array (found {sorted(opened[value].files)})")
                    value = opened[value][key]
                d[key] = LoadLabel(key)(value)
        finally:
            for z in opened.values():
                z.close()
        shape = d[self.image_key].shape[1:]
        for key in self.label_keys:
            if d[key].shape[1:] != shape:
                raise ValueError(
                    f"{data.get('name', data[key])}: {key} size {d[key].shape[1:]} differs from image {shape}"
                )
        return d


def hv_maps(inst_map: np.ndarray) -> np.ndarray:
    """Horizontal and vertical distance maps of an instance map, vectorised over all nuclei.

    For each nucleus, x - cx (and y - cy) relative to its exact centre of mass, divided by the largest
    distance on the positive side and on the negative side separately, so each side reaches +1 / -1
    at the nucleus's extreme pixels. Background is 0.

    Args:
        inst_map: (H, W) or (1, H, W) integer instance ids, 0 background.

    Returns:
        (2, H, W) float32: channel 0 horizontal (x), channel 1 vertical (y).
    """
    inst = np.asarray(inst_map)
    if inst.ndim == 3:
        inst = inst[0]
    out = np.zeros((2, *inst.shape), dtype=np.float32)
    flat = np.flatnonzero(inst)
    if flat.size == 0:
        return out
    rows, cols = np.divmod(flat, inst.shape[1])
    _, lab = np.unique(inst.ravel()[flat], return_inverse=True)
    count = np.bincount(lab)
    order = np.argsort(lab, kind="stable")
    starts = np.r_[0, np.cumsum(count)[:-1]]
    centres = centroids(flat, lab, inst.shape[1], np.arange(count.size))
    for channel, coord in enumerate((cols, rows)):
        coord = coord.astype(np.float64)
        centre = centres[:, channel]
        lo = np.minimum.reduceat(coord[order], starts)
        hi = np.maximum.reduceat(coord[order], starts)
        dist = coord - centre[lab]
        scale = np.where(dist > 0, (hi - centre)[lab], (centre - lo)[lab])
        out[channel, rows, cols] = np.divide(dist, scale, out=np.zeros_like(dist), where=dist != 0)
    return out


class ComputeHVMaps(Transform):
    """(1, H, W) instance map -> (2, H, W) float32 HV maps (see :func:`hv_maps`)."""

    def __call__(self, inst_map: np.ndarray | torch.Tensor) -> np.ndarray:
        return hv_maps(np.rint(convert_to_numpy(inst_map)).astype(np.int64))


class NucleiTargetsd(MapTransform):
    """Training targets from the (augmented) instance map, type map and tissue label.

    Adds ``nuclei_binary_map`` (1, H, W) int64, ``hv_map`` (2, H, W) float32, ``nuclei_type_map``
    (1, H, W) int64 and ``tissue_types`` int64 scalar; ``inst_map`` becomes (1, H, W) int32; the type map
    and tissue keys are replaced by the target keys.

    Args:
        inst_key, type_key, tissue_key: input keys; a missing type map gives all nuclei class 1 and a
            missing tissue gives tissue 0.
    """

    def __init__(self, inst_key: str = "inst_map", type_key: str = "type_map", tissue_key: str = "tissue") -> None:
        super().__init__([inst_key], allow_missing_keys=False)
        self.inst_key, self.type_key, self.tissue_key = inst_key, type_key, tissue_key
        self.hv = ComputeHVMaps()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        inst = np.rint(convert_to_numpy(d[self.inst_key])).astype(np.int32)
        if inst.ndim == 2:
            inst = inst[None]
        fg = inst > 0
        if self.type_key in d:
            types = np.rint(convert_to_numpy(d.pop(self.type_key))).astype(np.int64).reshape(inst.shape)
            types = np.where(fg, types, 0)
        else:
            types = fg.astype(np.int64)
        d[self.inst_key] = inst
        d["nuclei_binary_map"] = fg.astype(np.int64)
        d["hv_map"] = self.hv(inst)
        d["nuclei_type_map"] = types
        d["tissue_types"] = torch.tensor(int(d.pop(self.tissue_key, 0)), dtype=torch.int64)
        return d


class RandColorJitter(RandomizableTransform):
    """Random brightness, contrast, saturation and hue changes, in random order, of an RGB image.

    Args:
        brightness, contrast, saturation: factors drawn from [1 - v, 1 + v].
        hue: shift drawn from [-v, v] (fraction of the colour circle, at most 0.5).
        prob: probability of applying the transform.

    Input and output: (3, H, W) float in [0, 1] (output clipped to [0, 1]).
    """

    def __init__(
        self,
        brightness: float = 0.25,
        contrast: float = 0.25,
        saturation: float = 0.1,
        hue: float = 0.05,
        prob: float = 0.2,
    ) -> None:
        super().__init__(prob)
        self.ranges = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue}
        self._params: list[tuple[str, float]] = []

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        params = []
        for name, v in self.ranges.items():
            if v > 0:
                low, high = (-v, v) if name == "hue" else (1 - v, 1 + v)
                params.append((name, float(self.R.uniform(low, high))))
        order = self.R.permutation(len(params))
        self._params = [params[i] for i in order]

    def __call__(self, image: np.ndarray | torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize()
        img = torch.as_tensor(image, dtype=torch.float32)
        if not self._do_transform:
            return img
        img = img.clamp(0, 1)
        for name, value in self._params:
            img = getattr(tv_functional, f"adjust_{name}")(img, value)
        return img


class RandImageDict(RandomizableTransform, MapTransform):
    """Dictionary wrapper of an image-only random transform ``self.inner``: one draw, applied to every key."""

    inner: RandomizableTransform

    def __init__(self, keys: KeysCollection, prob: float, inner: RandomizableTransform) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.inner = inner

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.inner.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize(None)
        if self._do_transform:
            self.inner.randomize()
            for key in self.key_iterator(d):
                d[key] = self.inner(d[key], randomize=False)
        return d


class RandColorJitterd(RandImageDict):
    """Dictionary version of :class:`RandColorJitter` (same parameters for all ``keys``)."""

    def __init__(
        self,
        keys: KeysCollection = IMAGE_KEY,
        brightness: float = 0.25,
        contrast: float = 0.25,
        saturation: float = 0.1,
        hue: float = 0.05,
        prob: float = 0.2,
    ) -> None:
        super().__init__(keys, prob, RandColorJitter(brightness, contrast, saturation, hue, prob=1.0))


class RandZoomBlur(RandomizableTransform):
    """Zoom blur: the mean of the image and centre zooms of it by factors 1, 1 + s, ... < ``max_factor``.

    Args:
        max_factor: largest zoom factor is drawn from (1, max_factor).
        step: zoom step is drawn from [step[0], step[1]].
        prob: probability of applying the transform.

    Input and output: (C, H, W) float32.
    """

    def __init__(self, max_factor: float = 1.05, step: tuple[float, float] = (0.01, 0.03), prob: float = 0.1) -> None:
        super().__init__(prob)
        self.max_factor, self.step = max_factor, step
        self._factors = np.zeros(0)

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        top = self.R.uniform(1.0, self.max_factor)
        self._factors = np.arange(1.0, top, self.R.uniform(*self.step))

    def __call__(self, image: np.ndarray | torch.Tensor, randomize: bool = True) -> np.ndarray:
        if randomize:
            self.randomize()
        img = convert_to_numpy(image).astype(np.float32, copy=False)
        if not self._do_transform or self._factors.size == 0:
            return img
        hwc = np.ascontiguousarray(img.transpose(1, 2, 0))
        h, w = hwc.shape[:2]
        total = hwc.copy()
        for z in self._factors:
            zh, zw = int(round(h * z)), int(round(w * z))
            zoomed = cv2.resize(hwc, (zw, zh), interpolation=cv2.INTER_LINEAR).reshape(zh, zw, -1)
            top, left = (zh - h) // 2, (zw - w) // 2
            total += zoomed[top : top + h, left : left + w]
        return (total / (len(self._factors) + 1)).transpose(2, 0, 1)


class RandZoomBlurd(RandImageDict):
    """Dictionary version of :class:`RandZoomBlur`."""

    def __init__(
        self,
        keys: KeysCollection = IMAGE_KEY,
        max_factor: float = 1.05,
        step: tuple[float, float] = (0.01, 0.03),
        prob: float = 0.1,
    ) -> None:
        super().__init__(keys, prob, RandZoomBlur(max_factor, step, prob=1.0))


class RandSuperpixels(RandomizableTransform):
    """Replace random SLIC superpixels of an RGB image by their mean colour.

    Args:
        p_replace: probability for each superpixel to be replaced.
        n_segments: number of SLIC segments.
        max_size: the image is segmented at a scale whose longer side is at most ``max_size``.
        prob: probability of applying the transform.

    Input and output: (3, H, W) float32.
    """

    def __init__(self, p_replace: float = 0.1, n_segments: int = 200, max_size: int = 128, prob: float = 0.1) -> None:
        super().__init__(prob)
        self.p_replace, self.n_segments, self.max_size = p_replace, n_segments, max_size
        self._draw = np.zeros(0)

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        self._draw = self.R.uniform(size=4 * self.n_segments)

    def __call__(self, image: np.ndarray | torch.Tensor, randomize: bool = True) -> np.ndarray:
        if randomize:
            self.randomize()
        img = convert_to_numpy(image).astype(np.float32, copy=False)
        if not self._do_transform:
            return img
        hwc = np.ascontiguousarray(img.transpose(1, 2, 0))
        h, w = hwc.shape[:2]
        scale = min(1.0, self.max_size / max(h, w))
        small = cv2.resize(hwc, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        segments = slic(small, n_segments=self.n_segments, compactness=10, start_label=0, channel_axis=-1)
        n = segments.max() + 1
        count = np.bincount(segments.ravel(), minlength=n)
        means = (
            np.stack([np.bincount(segments.ravel(), small[..., c].ravel(), n) for c in range(3)], 1) / count[:, None]
        )
        replace = self._draw[np.arange(n) % self._draw.size] < self.p_replace
        out = np.where(replace[segments][..., None], means[segments], small).astype(np.float32)
        return cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)


class RandSuperpixelsd(RandImageDict):
    """Dictionary version of :class:`RandSuperpixels`."""

    def __init__(
        self,
        keys: KeysCollection = IMAGE_KEY,
        p_replace: float = 0.1,
        n_segments: int = 200,
        max_size: int = 128,
        prob: float = 0.1,
    ) -> None:
        super().__init__(keys, prob, RandSuperpixels(p_replace, n_segments, max_size, prob=1.0))


_CV2_MODES = {"bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST, "area": cv2.INTER_AREA}


class RandSizedCrop(RandomizableTransform):
    """Crop a random square whose side is drawn from ``side_range`` (fraction of the shorter image side),
    then resize it to ``size``.

    Args:
        size: output (H, W).
        side_range: (min, max) side of the crop as a fraction of the shorter image side.
        prob: probability of applying the transform (otherwise the input is returned unchanged).

    Input and output: (C, H, W); ``mode`` "bilinear" for images, "nearest" for label maps.
    """

    def __init__(
        self, size: int | Sequence[int] = 256, side_range: tuple[float, float] = (0.5, 1.0), prob: float = 0.2
    ):
        super().__init__(prob)
        self.size = ensure_tuple_rep(size, 2)
        self.side_range = side_range
        self._box: tuple[int, int, int] = (0, 0, 0)

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        super().randomize(None)
        h, w = spatial_shape
        short = min(h, w)
        side = int(self.R.randint(round(self.side_range[0] * short), round(self.side_range[1] * short) + 1))
        self._box = (int(self.R.randint(0, h - side + 1)), int(self.R.randint(0, w - side + 1)), side)

    def __call__(
        self, img: np.ndarray | torch.Tensor, mode: str = "bilinear", randomize: bool = True
    ) -> np.ndarray | torch.Tensor:
        if randomize:
            self.randomize(img.shape[1:])
        if not self._do_transform:
            return img
        arr = convert_to_numpy(img)
        top, left, side = self._box
        crop = np.ascontiguousarray(arr[:, top : top + side, left : left + side].transpose(1, 2, 0))
        dtype = crop.dtype
        if mode == "nearest" and dtype not in (np.uint8, np.int16, np.uint16, np.float32):
            crop = crop.astype(np.float32)
        out = cv2.resize(crop, self.size[::-1], interpolation=_CV2_MODES[mode]).reshape(*self.size, -1)
        return out.transpose(2, 0, 1).astype(dtype)


class RandSizedCropd(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandSizedCrop`: the same box for all ``keys``.

    Args:
        mode: interpolation per key ("bilinear" image, "nearest" label maps).
    """

    def __init__(
        self,
        keys: KeysCollection = (IMAGE_KEY, *LABEL_KEYS),
        size: int | Sequence[int] = 256,
        side_range: tuple[float, float] = (0.5, 1.0),
        mode: str | Sequence[str] = ("bilinear", "nearest", "nearest"),
        prob: float = 0.2,
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.cropper = RandSizedCrop(size, side_range, prob=1.0)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.cropper.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        self.cropper.randomize(d[self.first_key(d)].shape[1:])
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = self.cropper(d[key], mode=mode, randomize=False)
        return d


def _geometric_keys(with_types: bool) -> tuple[list[str], tuple[str, ...], tuple[str, ...]]:
    keys = [IMAGE_KEY, "inst_map"] + (["type_map"] if with_types else [])
    modes = ("bilinear", "nearest", "nearest")[: len(keys)]
    padding = ("border", "zeros", "zeros")[: len(keys)]
    return keys, modes, padding


#: The augmentations of the CellVTA recipe (reference section 6.3), in the order they run, with their parameters;
#: ``configs/train.yaml`` (``augmentation``) states every value. Geometric ones act on image, instance and type maps.
#:
#: * ``rotate90``: ``prob``, ``max_k`` quarter turns; ``flip``: ``prob`` per axis (horizontal, then vertical);
#: * ``gaussian_smooth``: ``prob``, ``sigma`` range (albumentations' box blur as a Gaussian of equal spread);
#: * ``gaussian_noise``: ``prob``, ``variance`` in 8-bit intensity units (std ``sqrt(variance) / 255`` on [0, 1]),
#:   the std of each draw uniform in [0, that];
#: * ``color_jitter``: ``prob``, ``brightness``, ``contrast``, ``saturation``, ``hue`` (:class:`RandColorJitter`);
#: * ``superpixels``: ``prob``, ``p_replace``, ``n_segments``, ``max_size_fraction`` of the tile side
#:   (:class:`RandSuperpixels`);
#: * ``zoom_blur``: ``prob``, ``max_factor``, ``step`` (:class:`RandZoomBlur`);
#: * ``sized_crop``: ``prob``, ``side_range`` (:class:`RandSizedCrop`);
#: * ``elastic``: ``prob``, ``spacing_fraction`` of the tile side, ``magnitude_range``, ``rotate_range``,
#:   ``shear_range``, ``translate_range`` (px), ``scale_range`` (MONAI's Rand2DElastic standing in for the
#:   albumentations 1.3 ElasticTransform, mostly a random affine).
AUGMENTATION: dict[str, dict[str, object]] = {
    "rotate90": {"prob": 0.2, "max_k": 3},
    "flip": {"prob": 0.2},
    "gaussian_smooth": {"prob": 0.2, "sigma": (0.8, 2.6)},
    "gaussian_noise": {"prob": 0.5, "variance": 10.0},
    "color_jitter": {"prob": 0.2, "brightness": 0.25, "contrast": 0.25, "saturation": 0.1, "hue": 0.05},
    "superpixels": {"prob": 0.1, "p_replace": 0.1, "n_segments": 200, "max_size_fraction": 0.5},
    "zoom_blur": {"prob": 0.1, "max_factor": 1.05, "step": (0.01, 0.03)},
    "sized_crop": {"prob": 0.2, "side_range": (0.5, 1.0)},
    "elastic": {
        "prob": 0.2,
        "spacing_fraction": 0.25,
        "magnitude_range": (0.0, 1.0),
        "rotate_range": 0.1,
        "shear_range": 0.1,
        "translate_range": 8,
        "scale_range": 0.1,
    },
}


def augmentation_params(augmentation: Mapping[str, Mapping[str, object]] | None = None) -> dict[str, dict]:
    """:data:`AUGMENTATION` with the entries of ``augmentation`` (augmentation -> parameter -> value) replaced.

    Raises:
        ValueError: naming an unknown augmentation or parameter.
    """
    params = {name: dict(values) for name, values in AUGMENTATION.items()}
    for name, values in (augmentation or {}).items():
        if name not in params:
            raise ValueError(f"augmentation: unknown augmentation '{name}' (known: {sorted(params)})")
        unknown = set(values) - set(params[name])
        if unknown:
            known = sorted(params[name])
            raise ValueError(f"augmentation#{name}: unknown parameters {sorted(unknown)} (known: {known})")
        params[name].update(values)
    return params


def augmentations(
    size: int = 256,
    with_types: bool = True,
    superpixels: bool = True,
    zoom_blur: bool = True,
    augmentation: Mapping[str, Mapping[str, object]] | None = None,
) -> list:
    """The augmentations of the CellVTA recipe in its order (:data:`AUGMENTATION`).

    MONAI equivalents are used where they exist. Geometric transforms act on image, instance and type maps.

    Args:
        size: side of the training tiles.
        with_types: the samples carry a type map.
        superpixels, zoom_blur: include these two (slowest) colour augmentations.
        augmentation: parameters replacing those of :data:`AUGMENTATION` (see :func:`augmentation_params`).
    """
    p = augmentation_params(augmentation)
    keys, modes, padding = _geometric_keys(with_types)
    smooth, elastic = p["gaussian_smooth"], p["elastic"]
    ops = [
        RandRotate90d(keys, prob=p["rotate90"]["prob"], max_k=p["rotate90"]["max_k"], spatial_axes=(0, 1)),
        RandFlipd(keys, prob=p["flip"]["prob"], spatial_axis=1),
        RandFlipd(keys, prob=p["flip"]["prob"], spatial_axis=0),
        RandGaussianSmoothd(
            IMAGE_KEY, sigma_x=tuple(smooth["sigma"]), sigma_y=tuple(smooth["sigma"]), prob=smooth["prob"]
        ),
        RandGaussianNoised(
            IMAGE_KEY,
            prob=p["gaussian_noise"]["prob"],
            std=float(np.sqrt(float(p["gaussian_noise"]["variance"]))) / 255.0,
            sample_std=True,
        ),
        RandColorJitterd(IMAGE_KEY, **p["color_jitter"]),
    ]
    if superpixels:
        sp = dict(p["superpixels"])
        max_size = int(size * float(sp.pop("max_size_fraction")))
        ops.append(RandSuperpixelsd(IMAGE_KEY, max_size=max_size, **sp))
    if zoom_blur:
        zb = p["zoom_blur"]
        ops.append(RandZoomBlurd(IMAGE_KEY, max_factor=zb["max_factor"], step=tuple(zb["step"]), prob=zb["prob"]))
    spacing = int(size * float(elastic["spacing_fraction"]))
    ops += [
        RandSizedCropd(keys, size=size, side_range=tuple(p["sized_crop"]["side_range"]), mode=modes,
                       prob=p["sized_crop"]["prob"]),
        Rand2DElasticd(
            keys,
            spacing=(spacing, spacing),
            magnitude_range=tuple(elastic["magnitude_range"]),
            prob=elastic["prob"],
            rotate_range=elastic["rotate_range"],
            shear_range=elastic["shear_range"],
            translate_range=elastic["translate_range"],
            scale_range=elastic["scale_range"],
            mode=modes,
            padding_mode=padding,
        ),
    ]
    return ops


def _finish(mean: Sequence[float], std: Sequence[float]) -> list:
    return [
        NucleiTargetsd(),
        NormalizeIntensityd(IMAGE_KEY, subtrahend=list(mean), divisor=list(std), channel_wise=True),
        DeleteItemsd(["cell_counts", "split"]),
        EnsureTyped(list(TARGET_KEYS), track_meta=False),
    ]


def train_transforms(
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    size: int = 256,
    upscale: float = 1.0,
    augment: bool = True,
    superpixels: bool = True,
    zoom_blur: bool = True,
    augmentation: Mapping[str, Mapping[str, object]] | None = None,
) -> Compose:
    """The whole training chain: load, (upscale), augment, compute targets, normalise.

    Args:
        mean, std: per-channel normalisation of the [0, 1] image (the backbone's statistics).
        size: side of the training tiles.
        upscale: magnification factor for low-magnification data (2.0 turns 20x CoNIC tiles into 40x):
            a random crop of ``size / upscale`` is resized to ``size`` (bilinear image, nearest labels).
        augment: False gives the chain without augmentation.
        superpixels, zoom_blur: include these two (slowest) colour augmentations.
        augmentation: augmentation -> parameter -> value, replacing those of :data:`AUGMENTATION` (the
            training config states them all).
    """
    keys, modes, _ = _geometric_keys(True)
    ops: list = [LoadSampled()]
    if upscale != 1.0:
        ops += [
            RandSpatialCropd(keys, roi_size=int(round(size / upscale)), random_size=False),
            Resized(keys, spatial_size=(size, size), mode=modes),
        ]
    if augment:
        ops += augmentations(size, superpixels=superpixels, zoom_blur=zoom_blur, augmentation=augmentation)
    return Compose(ops + _finish(mean, std))


def val_transforms(
    mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5), upscale: float = 1.0
) -> Compose:
    """The validation chain: load, (zoom by ``upscale``), compute targets, normalise; no randomness."""
    keys, modes, _ = _geometric_keys(True)
    ops: list = [LoadSampled()]
    if upscale != 1.0:
        ops.append(Zoomd(keys, zoom=upscale, mode=modes, keep_size=False))
    return Compose(ops + _finish(mean, std))
