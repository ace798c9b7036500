"""The upscale protocol for 20x tiles (CoNIC, reference §8.3), done without its defects.

The paper evaluates its 40x model on 256 x 256 CoNIC tiles (20x) by resizing each tile to 480 x 480
(= 2 (256 - 32) + 32) and cutting 2 x 2 crops of 256 overlapping by 32. Here:

* :class:`UpscaleInferer` resizes the normalised tile (bilinear, ``align_corners=False``) and runs the
  network over the same four crops with MONAI's sliding window, blending the maps of the overlaps (instead
  of merging cell polygons afterwards);
* the blended 480 x 480 maps are post-processed with the 40x settings;
* :class:`ToLabelSized` brings the instance and type maps back to the tile's own size by nearest-neighbour
  sampling of pixel centres, so no nucleus is lost (the official code paints the first nucleus of every tile
  with the background value) and no outline is shifted (it truncates scaled contours towards the origin).

Metrics are then computed at the tile's resolution; the detection radius must be given in its pixels
(3 um = 6 px at 0.5 um/px).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.inferers import Inferer, SlidingWindowInferer
from monai.transforms import MapTransform
from monai.utils import convert_to_numpy

from ..model.spatial_outputs import SpatialOutputs
from ..nuclei.postprocess import nuclei_from_instance_map
from ..nuclei.primitives import relabel_sequential
from .tissue import TISSUE_MAP_KEY

__all__ = ["ToLabelSized", "UpscaleInferer"]


class UpscaleInferer(Inferer):
    """Resize the batch by ``scale``, then sliding-window inference with ``roi_size`` crops overlapping by
    ``crop_overlap`` pixels.

    Args:
        scale: resize factor (480 / 256 for the paper's protocol).
        roi_size: crop side given to the network.
        crop_overlap: pixels shared by neighbouring crops.
        mode: blending of overlapping crops (``"constant"`` averages them).
        sw_batch_size: crops per network call.

    The configs state every value (``upscale_size``, ``patch_size``, ``upscale_crop_overlap``,
    ``upscale_blend_mode`` in configs/evaluate.yaml).
    """

    def __init__(self, scale: float = 480 / 256, roi_size: int = 256, crop_overlap: int = 32,
                 mode: str = "constant", sw_batch_size: int = 4) -> None:
        super().__init__()
        self.scale = scale
        self.window = SlidingWindowInferer(roi_size=(roi_size, roi_size), sw_batch_size=sw_batch_size,
                                           overlap=crop_overlap / roi_size, mode=mode)

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any
                 ) -> dict[str, torch.Tensor]:
        """``(B, C, H, W)`` normalised tiles -> the network's per-pixel maps at ``(H, W) * scale`` (with the
        tissue head's probabilities as a map, :mod:`.tissue`)."""
        size = [round(s * self.scale) for s in inputs.shape[-2:]]
        upscaled = F.interpolate(inputs, size=size, mode="bilinear", align_corners=False)
        spatial = (network if isinstance(network, SpatialOutputs)
                   else SpatialOutputs(network, tissue_key=TISSUE_MAP_KEY))
        return self.window(upscaled, spatial, *args, **kwargs)


def _nearest(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``array (..., h, w)`` sampled at the pixel centres of a ``shape`` grid covering the same extent."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * array.shape[-2] / shape[0]).astype(int), array.shape[-2] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * array.shape[-1] / shape[1]).astype(int), array.shape[-1] - 1)
    return array[..., rows[:, None], cols[None, :]]


class ToLabelSized(MapTransform):
    """Bring post-processed instance and type maps (``(1, h, w)``) to the size of the label's instance map,
    and recompute the :class:`.postprocess.Nuclei` from them; maps already at that size are left as they are.

    Args:
        keys: the post-processed prediction dict(s).
        label_key: the label dict, whose ``inst_map`` gives the size.
        instance_map_key, type_map_key, nuclei_key: entries of the prediction dict.
        num_classes: classes of the type map, background included.
    """

    def __init__(self, keys: KeysCollection = "pred", label_key: str = "label", num_classes: int = 2,
                 instance_map_key: str = "inst_map", type_map_key: str = "type_map", nuclei_key: str = "nuclei"
                 ) -> None:
        super().__init__(keys)
        self.label_key = label_key
        self.num_classes = num_classes
        self.instance_map_key, self.type_map_key, self.nuclei_key = instance_map_key, type_map_key, nuclei_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        shape = tuple(convert_to_numpy(d[self.label_key]["inst_map"]).shape[-2:])
        for key in self.key_iterator(d):
            pred = dict(d[key])
            inst = convert_to_numpy(pred[self.instance_map_key])
            if inst.shape[-2:] == shape:
                continue
            inst = _nearest(inst, shape).astype(np.int32)
            types = _nearest(convert_to_numpy(pred[self.type_map_key]), shape).astype(np.int32)
            one_hot = np.eye(self.num_classes, dtype=np.uint8)[types[0]].transpose(2, 0, 1)
            pred[self.instance_map_key] = relabel_sequential(inst)
            pred[self.nuclei_key] = nuclei_from_instance_map(pred[self.instance_map_key][0], one_hot)
            pred[self.type_map_key] = pred[self.nuclei_key].type_map(pred[self.instance_map_key][0])[None]
            d[key] = pred
        return d
