"""CellVTA and CellViT: an encoder (a ViT with or without the adapter, SAM, or a hierarchical model) and a
HoVer-Net style decoder.

Both return a dict of raw maps for a ``(B, 3, H, W)`` normalised image (H, W multiples of 16, or of the
hierarchical encoder's ``input_multiple``): ``nuclei_binary_map (B, 2, H, W)``, ``hv_map (B, 2, H, W)``
(channel 0 horizontal, 1 vertical), ``nuclei_type_map (B, C, H, W)`` (C includes background 0),
``tissue_types (B, T)`` (when the tissue head exists), and on request ``features (B, D, H/16, W/16)`` for
per-cell embeddings. ``forward_features`` runs the encoder, ``forward_head`` the decoder.

The constructors build modules only (randomly initialised); weights load through
``scripts.model.weights.load_weights``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

from .adapter import AdapterEncoder
from .backbones import apply_freeze_policy, create_backbone, create_vit, image_statistics
from .blocks import Conv2DBlock, Deconv2DBlock
from .encoders import HierarchicalEncoder, ViTEncoder

BRANCHES = ("nuclei_binary_map", "hv_map", "nuclei_type_map")
DECODER_STRIDES = (2, 4, 8, 16)  # of the decoder's skips 1..3 and of its bottleneck


class Branch(nn.Module):
    """One decoder branch: from the bottleneck up to full resolution, merging the skips.

    Args:
        in_dim: encoder width ``D`` (of the 1/16 features).
        widths: skip widths at full, 1/2, 1/4 and 1/8 resolution (e.g. 64, 128, 256, 512).
        out_channels: channels of the branch's output map.
        deconv_bottleneck: the bottleneck upsampler is a Deconv2DBlock (CellVTA) or a bare
            transposed convolution (CellViT).
        dropout: dropout of every block (MC-dropout at inference for uncertainty).
    """

    def __init__(self, in_dim: int, widths: Sequence[int], out_channels: int, deconv_bottleneck: bool,
                 dropout: float = 0.0):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.bottleneck_upsampler = (
            nn.Sequential(Deconv2DBlock(in_dim, w3, dropout)) if deconv_bottleneck
            else nn.ConvTranspose2d(in_dim, w3, 2, 2)
        )
        self.decoder3_upsampler = nn.Sequential(
            Conv2DBlock(2 * w3, w3, dropout), Conv2DBlock(w3, w3, dropout), Conv2DBlock(w3, w3, dropout),
            nn.ConvTranspose2d(w3, w2, 2, 2),
        )
        self.decoder2_upsampler = nn.Sequential(
            Conv2DBlock(2 * w2, w2, dropout), Conv2DBlock(w2, w2, dropout), nn.ConvTranspose2d(w2, w1, 2, 2)
        )
        self.decoder1_upsampler = nn.Sequential(
            Conv2DBlock(2 * w1, w1, dropout), Conv2DBlock(w1, w1, dropout), nn.ConvTranspose2d(w1, w0, 2, 2)
        )
        self.decoder0_header = nn.Sequential(
            Conv2DBlock(2 * w0, w0, dropout), Conv2DBlock(w0, w0, dropout), nn.Conv2d(w0, out_channels, 1)
        )

    def forward(self, skips: Sequence[torch.Tensor], bottleneck: torch.Tensor) -> torch.Tensor:
        """``skips`` at full, 1/2, 1/4, 1/8 resolution and the 1/16 ``bottleneck`` -> ``(B, out, H, W)``."""
        b = self.bottleneck_upsampler(bottleneck)
        b = self.decoder3_upsampler(torch.cat([skips[3], b], 1))
        b = self.decoder2_upsampler(torch.cat([skips[2], b], 1))
        b = self.decoder1_upsampler(torch.cat([skips[1], b], 1))
        return self.decoder0_header(torch.cat([skips[0], b], 1))


def decoder_widths(embed_dim: int) -> tuple[int, int, int, int]:
    """Skip widths at full, 1/2, 1/4, 1/8 resolution: the bottleneck is 512 wide from ``D >= 512``, else 312."""
    return 64, 128, 256, 512 if embed_dim >= 512 else 312


class HoVerDecoder(nn.Module):
    """Shared skip processors and the NP, HV and NC branches.

    Args:
        skips: four modules turning ``[image, z1, z2, z3]`` into maps at full, 1/2, 1/4, 1/8 resolution.
        in_dim: encoder width ``D``.
        num_nuclei_classes: NC channels, background included.
        deconv_bottleneck, dropout: see ``Branch``.
    """

    def __init__(self, skips: Sequence[nn.Module], in_dim: int, num_nuclei_classes: int, deconv_bottleneck: bool,
                 dropout: float = 0.0):
        super().__init__()
        self.decoder0, self.decoder1, self.decoder2, self.decoder3 = skips
        widths = decoder_widths(in_dim)
        outputs = {"nuclei_binary_map": 2, "hv_map": 2, "nuclei_type_map": num_nuclei_classes}
        self.branches = nn.ModuleDict(
            {name: Branch(in_dim, widths, ch, deconv_bottleneck, dropout) for name, ch in outputs.items()}
        )

    def forward(self, image: torch.Tensor, features: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``image (B, 3, H, W)`` and encoder ``features [z1, z2, z3, z4]`` -> the three maps."""
        skips = [self.decoder0(image), self.decoder1(features[0]), self.decoder2(features[1]),
                 self.decoder3(features[2])]
        return {name: branch(skips, features[3]) for name, branch in self.branches.items()}


def skip_path(in_ch: int, out_ch: int, in_stride: int, out_stride: int, intermediate: Sequence[int],
              dropout: float = 0.0) -> nn.Sequential:
    """Bring an encoder map ``(B, in_ch, H/in_stride, ...)`` to a decoder skip ``(B, out_ch, H/out_stride, ...)``.

    Same stride: two Conv2DBlocks (CellVTA's skips). Finer target: one Deconv2DBlock per factor 2, through
    the ``intermediate`` widths (CellViT's skips from 1/16: 3, 2 and 1 Deconv2DBlocks).

    Raises:
        ValueError: the target is coarser than the map or the ratio is not a power of 2.
    """
    steps = math.log2(in_stride / out_stride)
    if steps < 0 or steps != int(steps):
        raise ValueError(f"an encoder map at stride {in_stride} cannot feed a decoder skip at stride {out_stride}")
    steps = int(steps)
    if steps == 0:
        return nn.Sequential(Conv2DBlock(in_ch, out_ch, dropout), Conv2DBlock(out_ch, out_ch, dropout))
    widths = [in_ch, *intermediate[:steps - 1], out_ch]
    return nn.Sequential(*(Deconv2DBlock(a, b, dropout) for a, b in zip(widths[:-1], widths[1:])))


def build_decoder(encoder: nn.Module, num_nuclei_classes: int, deconv_bottleneck: bool,
                  drop_rate: float = 0.0) -> HoVerDecoder:
    """The HoVer-Net decoder for an encoder's ``feature_channels`` and ``feature_strides``.

    The image skip is two Conv2DBlocks (3 -> 32 -> 64); each encoder map ``i`` feeds the skip at
    ``DECODER_STRIDES[i]`` through ``skip_path``; the last map is the bottleneck (stride 16).
    """
    d = encoder.embed_dim
    w0, w1, w2, w3 = decoder_widths(d)
    if encoder.feature_strides[3] != DECODER_STRIDES[3]:
        raise ValueError(f"the encoder's last map has stride {encoder.feature_strides[3]}: the decoder's "
                         f"bottleneck needs {DECODER_STRIDES[3]}")
    intermediate = (512, 256) if d >= 512 else (256, 128)
    skips = [nn.Sequential(Conv2DBlock(3, 32, drop_rate), Conv2DBlock(32, w0, drop_rate))]
    for ch, stride, target, width in zip(encoder.feature_channels, encoder.feature_strides, DECODER_STRIDES,
                                         (w1, w2, w3)):
        skips.append(skip_path(ch, width, stride, target, intermediate, drop_rate))
    return HoVerDecoder(skips, d, num_nuclei_classes, deconv_bottleneck=deconv_bottleneck, dropout=drop_rate)


class _NucleiNet(nn.Module):
    """Common forward of CellVTA and CellViT: encoder features -> decoder maps (+ tissue, features).

    Attributes:
        backbone: the preset or timm name of the encoder; vit_kwargs: its extra timm arguments.
        family: ``vit``, ``sam`` or ``hierarchical``.
        mean, std: the image statistics the network expects (RGB in [0, 1]).
        requested: the weight-dependent switches as given to the constructor (``None``: not given, the
            weights may set them; see ``scripts.model.weights.load_weights``).
    """

    encoder: nn.Module
    decoder: HoVerDecoder

    def _setup(self, backbone: str, family: str, vit_kwargs: dict | None, official_normalization: bool | None,
               freeze: str, requested: dict) -> None:
        self.backbone = backbone
        self.vit_kwargs = dict(vit_kwargs or {})
        self.family = family
        self.requested = {**requested, "official_normalization": official_normalization}
        self.set_official_normalization(bool(official_normalization))
        apply_freeze_policy(self, freeze)

    def set_official_normalization(self, official: bool) -> None:
        """Expect images normalised with 0.5 / 0.5 (official weights) or with the backbone's statistics."""
        self.official_normalization = official
        self.mean, self.std = image_statistics(self.backbone, official)

    def forward_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """``(B, 3, H, W)`` -> the encoder's four maps (see the encoder) and tissue logits ``(B, T)`` or ``None``."""
        return self.encoder(x)

    def forward_head(self, x: torch.Tensor, features: Sequence[torch.Tensor], tissue: torch.Tensor | None = None,
                     return_features: bool = False) -> dict[str, torch.Tensor]:
        """The image, the encoder's maps and tissue logits -> dict of maps (see the module docstring)."""
        out = self.decoder(x, features)
        if tissue is not None:
            out["tissue_types"] = tissue
        if return_features:
            out["features"] = features[3]
        return out

    def forward(self, x: torch.Tensor, return_features: bool = False) -> dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` normalised image -> dict of maps (see the module docstring)."""
        features, tissue = self.forward_features(x)
        return self.forward_head(x, features, tissue, return_features)


def _device_scope(device: torch.device | str | None):
    return torch.device(device) if device is not None else nullcontext()


class CellVTA(_NucleiNet):
    """CellVTA: a ViT (or SAM's image encoder) + the adapter + HoVer-Net decoder.

    Args:
        backbone: a ViT or SAM preset of ``scripts.model.backbones.PRESETS`` (``uni``, ``uni2-h``,
            ``virchow2``, ``sam-l``, ``vit-s``, ...) or any timm ViT name.
        num_nuclei_classes: NC channels including background (PanNuke 6, CoNIC 7, CoNSeP 5).
        num_tissue_classes: tissue head width (0 for no head).
        freeze: ``frozen`` (ViT frozen, the paper's), ``full`` or ``decoder_only``.
        cls_through_blocks: fix of the official class-token defect (``None``: ``True`` unless loaded
            weights need ``False``, as official checkpoints do).
        official_init: reproduce the official overwritten MSDA initialisation.
        official_normalization: mean = std = 0.5 (official) instead of the backbone's statistics
            (``None``: ``False`` unless loaded weights need it).
        skip_blocks: the last ViT block (0-based) of each of the four interactions (default: quarters).
        drop_rate: decoder dropout. drop_path_rate: ViT stochastic depth.
        conv_inplane, extra_extractors, extractor_drop_path, n_points, deform_num_heads, deform_ratio,
            cffn_ratio, init_values: the adapter's hyper-parameters (``AdapterEncoder``).
        vit_kwargs: extra timm arguments (e.g. ``{"depth": 4}`` for a small experiment).
        device: build the parameters there (``"meta"`` to inspect the model for free).

    Raises:
        TypeError: a hierarchical backbone (it needs no adapter: use ``CellViT``).
    """

    def __init__(self, backbone: str = "uni", num_nuclei_classes: int = 6, num_tissue_classes: int = 19,
                 freeze: str = "frozen", cls_through_blocks: bool | None = None, official_init: bool = False,
                 official_normalization: bool | None = None, skip_blocks: Sequence[int] | None = None,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, extractor_drop_path: float = 0.4,
                 conv_inplane: int = 64, extra_extractors: int = 2, n_points: int = 4, deform_num_heads: int = 8,
                 deform_ratio: float = 0.5, cffn_ratio: float = 0.25, init_values: float = 1e-5,
                 vit_kwargs: dict | None = None, device: torch.device | str | None = None):
        super().__init__()
        with _device_scope(device):
            vit, _ = create_vit(backbone, drop_path_rate, **(vit_kwargs or {}))
            self.encoder = AdapterEncoder(
                vit, num_tissue_classes, conv_inplane=conv_inplane, n_points=n_points,
                deform_num_heads=deform_num_heads, deform_ratio=deform_ratio, cffn_ratio=cffn_ratio,
                init_values=init_values, extractor_drop_path=extractor_drop_path, extra_extractors=extra_extractors,
                cls_through_blocks=cls_through_blocks is not False, official_init=official_init,
                skip_blocks=skip_blocks)
            self.decoder = build_decoder(self.encoder, num_nuclei_classes, deconv_bottleneck=True, drop_rate=drop_rate)
        family = "sam" if self.encoder.sam else "vit"
        self._setup(backbone, family, vit_kwargs, official_normalization, freeze,
                    {"cls_through_blocks": cls_through_blocks})


class CellViT(_NucleiNet):
    """CellViT: an encoder without adapter + the same decoder.

    ViT and SAM backbones feed the decoder with the tokens after ``skip_blocks`` (CellViT, CellViT-SAM);
    hierarchical backbones (``convnext-t``, ``swinv2-t``, ``maxvit-t``, ``resnet50``, any timm
    ``features_only`` model) with their stages at native strides (``HierarchicalEncoder``).

    Arguments as ``CellVTA`` (without the adapter's); ``vit_kwargs`` are the timm arguments of any family.
    """

    def __init__(self, backbone: str = "uni", num_nuclei_classes: int = 6, num_tissue_classes: int = 19,
                 freeze: str = "frozen", official_normalization: bool | None = None,
                 skip_blocks: Sequence[int] | None = None, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 vit_kwargs: dict | None = None, device: torch.device | str | None = None):
        super().__init__()
        with _device_scope(device):
            model, preset, family = create_backbone(backbone, drop_path_rate, **(vit_kwargs or {}))
            if family == "hierarchical":
                if skip_blocks is not None:
                    raise ValueError(f"skip_blocks {list(skip_blocks)}: the {backbone!r} encoder is hierarchical; "
                                     "its stages feed the decoder at their native strides")
                self.encoder = HierarchicalEncoder(model, num_tissue_classes, preset.input_multiple, backbone,
                                                   drop_rate)
            else:
                self.encoder = ViTEncoder(model, num_tissue_classes, skip_blocks)
            self.decoder = build_decoder(self.encoder, num_nuclei_classes, deconv_bottleneck=False,
                                         drop_rate=drop_rate)
        self._setup(backbone, family, vit_kwargs, official_normalization, freeze, {})
