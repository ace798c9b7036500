"""H&E stain normalisation (Macenko) and stain augmentation (HED jitter).

* :class:`MacenkoNormalizer` estimates an image's (or a whole slide's) hematoxylin and eosin optical-density
  vectors with torchstain's Macenko implementation (numpy backend) and re-renders images with a target's
  vectors and maximal concentrations: either stored vectors (the defaults are Macenko's reference H&E, as in
  torchstain and CellViT) or those fitted on a reference image. :class:`NormalizeStaind` is its MONAI dict form,
  used by tile inference (each tile its own source). Whole-slide inference fits once per slide (on its thumbnail's
  tissue) and applies the same mapping to every tile, which keeps tiles of one slide consistent.
* :class:`RandHEStain` / :class:`RandHEStaind` scale and shift each channel of the HED colour deconvolution
  (scikit-image's ``rgb2hed``/``hed2rgb``; Tellez et al., 2018) for training.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform, Transform
from skimage.color import hed2rgb, rgb2hed
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

from .datasets import read_image
from .transforms import RandImageDict

__all__ = ["MacenkoNormalizer", "NormalizeStaind", "RandHEStain", "RandHEStaind"]

# Macenko's reference H&E (columns: hematoxylin, eosin optical-density unit vectors in RGB) and the 99th
# percentiles of their concentrations
REFERENCE_STAINS = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
REFERENCE_MAX_CONCENTRATIONS = (1.9705, 1.0308)


class MacenkoNormalizer(Transform):
    """Macenko stain normalisation of (H, W, 3) uint8 RGB images.

    Args:
        stains: (3, 2) target optical-density vectors (hematoxylin, eosin columns); None: Macenko's reference H&E.
        max_concentrations: (2,) target 99th-percentile concentrations; None: Macenko's reference.
        reference: an (H, W, 3) uint8 RGB image, or the path of one, to take the target from instead.
        io: transmitted light intensity.
        alpha: percentile of the angle extremes (Macenko's robustness parameter).
        beta: optical density below which a pixel is background.
        min_pixels: images (or fit inputs) with fewer stained pixels are left as they are.

    Call :meth:`fit_source` with a slide's tissue pixels to use one source estimate for all its tiles; otherwise
    every image is estimated on its own.
    """

    backend = ["numpy"]

    def __init__(self, stains: Sequence[Sequence[float]] | None = None,
                 max_concentrations: Sequence[float] | None = None,
                 reference: np.ndarray | str | Path | None = None, io: float = 240, alpha: float = 1,
                 beta: float = 0.15, min_pixels: int = 500) -> None:
        self.io, self.alpha, self.beta, self.min_pixels = io, alpha, beta, min_pixels
        self.target = (np.asarray(REFERENCE_STAINS if stains is None else stains, np.float64),
                       np.asarray(REFERENCE_MAX_CONCENTRATIONS if max_concentrations is None else max_concentrations,
                                  np.float64))
        if self.target[0].shape != (3, 2) or self.target[1].shape != (2,):
            raise ValueError(f"stain vectors must be 3 x 2 (H and E columns) and maximal concentrations 2 numbers, got "
                             f"shapes {self.target[0].shape} and {self.target[1].shape}")
        if reference is not None:
            name = "the stain reference image"
            if isinstance(reference, (str, Path)):
                name, reference = str(reference), read_image(reference)
            fitted = self.estimate(reference)
            if fitted is None:
                raise ValueError(f"{name}: too few stained pixels to fit the target stains")
            self.target = fitted
        self.source: tuple[np.ndarray, np.ndarray] | None = None

    def _od(self, pixels: np.ndarray) -> np.ndarray:
        return -np.log((pixels.reshape(-1, 3).astype(np.float64) + 1) / self.io)

    def estimate(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(3, 2) stain vectors and (2,) maximal concentrations of RGB ``pixels`` (any shape ending in 3), or
        None when fewer than ``min_pixels`` are stained."""
        od = self._od(pixels)
        if int((~np.any(od < self.beta, axis=1)).sum()) < self.min_pixels:
            return None
        fit = NumpyMacenkoNormalizer()
        fit.fit(np.ascontiguousarray(pixels.reshape(-1, 1, 3)), Io=self.io, alpha=self.alpha, beta=self.beta)
        return np.asarray(fit.HERef, np.float64), np.asarray(fit.maxCRef, np.float64)

    def fit_source(self, pixels: np.ndarray) -> bool:
        """Estimate the source stains once (e.g. from a slide thumbnail's tissue pixels); False when too few."""
        self.source = self.estimate(pixels)
        return self.source is not None

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> the same image in the target stains."""
        source = self.source if self.source is not None else self.estimate(image)
        if source is None:
            return image
        stains, max_c = source
        concentrations = np.linalg.lstsq(stains, self._od(image).T, rcond=None)[0]
        concentrations *= (self.target[1] / max_c)[:, None]
        out = self.io * np.exp(-self.target[0] @ concentrations)
        return np.clip(out, 0, 255).T.reshape(image.shape).astype(np.uint8)


class NormalizeStaind(MapTransform):
    """Dictionary version of :class:`MacenkoNormalizer`, each image its own source (same arguments: ``stains``,
    ``max_concentrations``, ``reference``, ...; the keys ``stain_vectors``, ``stain_max_concentrations`` and
    ``stain_reference`` of the inference configs).

    Images: (H, W, 3) uint8 RGB, or (3, H, W) float RGB in [0, 1] (as :class:`~scripts.data.transforms.LoadSampled`
    gives them; rounded to 8 bits, normalised and returned as float32 in the same layout).
    """

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False, **kwargs) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalizer = MacenkoNormalizer(**kwargs)

    def _normalize(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.dtype == np.uint8:
            return self.normalizer(image)
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"stain normalisation takes (H, W, 3) uint8 or (3, H, W) float images, got "
                             f"{image.dtype} of shape {image.shape}")
        rgb = np.clip(np.rint(np.moveaxis(image, 0, -1) * 255), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.moveaxis(self.normalizer(rgb), -1, 0)).astype(np.float32) / 255

    def __call__(self, data: Mapping[Hashable, np.ndarray]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._normalize(d[key])
        return d


class RandHEStain(RandomizableTransform):
    """Random H&E stain variation: each HED channel ``c`` becomes ``c * a + b`` with ``a`` drawn from
    ``[1 - sigma, 1 + sigma]`` and ``b`` from ``[-bias, bias]`` (per channel). ``bias`` is in scikit-image's HED
    units, where the hematoxylin of real H&E spans about 0-0.15: on real CoNSeP tiles the default 0.01 moves RGB
    values by about 11 grey levels on average, ``sigma`` 0.05 by about 1.

    Input and output: (3, H, W) float RGB in [0, 1] (output clipped to [0, 1]).
    """

    backend = ["numpy", "torch"]

    def __init__(self, sigma: float = 0.05, bias: float = 0.01, prob: float = 0.5) -> None:
        super().__init__(prob)
        self.sigma, self.bias = sigma, bias
        self._scale, self._shift = np.ones(3), np.zeros(3)

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        self._scale = self.R.uniform(1 - self.sigma, 1 + self.sigma, 3)
        self._shift = self.R.uniform(-self.bias, self.bias, 3)

    def __call__(self, image: np.ndarray | torch.Tensor, randomize: bool = True) -> np.ndarray | torch.Tensor:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return image
        is_tensor = isinstance(image, torch.Tensor)
        array = image.detach().cpu().numpy() if is_tensor else np.asarray(image)
        hed = rgb2hed(np.clip(np.moveaxis(array, 0, -1), 0, 1))
        rgb = np.clip(hed2rgb(hed * self._scale + self._shift), 0, 1).astype(np.float32)
        out = np.ascontiguousarray(np.moveaxis(rgb, -1, 0))
        return torch.as_tensor(out, device=image.device) if is_tensor else out


class RandHEStaind(RandImageDict):
    """Dictionary version of :class:`RandHEStain`: one draw, applied to every key."""

    def __init__(self, keys: KeysCollection = "image", sigma: float = 0.05, bias: float = 0.01,
                 prob: float = 0.5) -> None:
        super().__init__(keys, prob, RandHEStain(sigma, bias, prob=1.0))
