"""CellVTA and CellViT: a timm ViT encoder (with or without the adapter) and a HoVer-Net style decoder.

Both return a dict of raw maps for a ``(B, 3, H, W)`` normalised image (H, W multiples of 16):
``nuclei_binary_map (B, 2, H, W)``, ``hv_map (B, 2, H, W)`` (channel 0 horizontal, 1 vertical),
``nuclei_type_map (B, C, H, W)`` (C includes background 0), ``tissue_types (B, T)`` (when the
tissue head exists), and on request ``features (B, D, H/16, W/16)`` for per-cell embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

from .adapter import AdapterEncoder, tokens_to_map
from .backbones import (
    OFFICIAL_MEAN, OFFICIAL_STD, apply_freeze_policy, create_vit, load_exactly, load_vit_weights, read_state_dict,
)
from .convert import convert_official_state_dict, is_official_state_dict

BRANCHES = ("nuclei_binary_map", "hv_map", "nuclei_type_map")


class Conv2DBlock(nn.Module):
    """3x3 convolution, BatchNorm, ReLU, dropout: ``(B, in, H, W)`` -> ``(B, out, H, W)``."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, 1, 1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
                                   nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Deconv2DBlock(nn.Module):
    """2x upsampling transposed convolution, 3x3 convolution, BatchNorm, ReLU, dropout: ``H`` -> ``2H``."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.block = nn.Sequential(nn.ConvTranspose2d(in_ch, out_ch, 2, 2), nn.Conv2d(out_ch, out_ch, 3, 1, 1),
                                   nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


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
            nn.Sequential(Deconv2DBlock(in_dim, w3, dropout)) if deconv_bottleneck else nn.ConvTranspose2d(in_dim, w3, 2, 2)
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


class ViTEncoder(nn.Module):
    """A timm ViT returning the patch tokens after each quarter of its blocks (CellViT's skips).

    Args:
        vit: timm ``VisionTransformer`` (``dynamic_img_size=True``, no classifier).
        num_tissue_classes: width of the tissue head on the class token (0 for none).
    """

    def __init__(self, vit: nn.Module, num_tissue_classes: int = 0):
        super().__init__()
        self.vit = vit
        self.embed_dim = vit.embed_dim
        depth = len(vit.blocks)
        self.extract = [round(depth * k / 4) - 1 for k in range(1, 5)]
        self.head = nn.Linear(self.embed_dim, num_tissue_classes) if num_tissue_classes else None

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """``(B, 3, H, W)`` -> four ``(B, D, H/16, W/16)`` token maps and tissue logits ``(B, T)``."""
        b, _, h, w = x.shape
        p = self.vit.patch_embed.patch_size[0]
        if p != 16:
            x = nn.functional.interpolate(x, size=(h // 16 * p, w // 16 * p), mode="bilinear", align_corners=False)
        seq = self.vit.norm_pre(self.vit._pos_embed(self.vit.patch_embed(x)))
        n_prefix = self.vit.num_prefix_tokens
        outs = []
        for i, block in enumerate(self.vit.blocks):
            seq = block(seq)
            if i in self.extract:
                outs.append(tokens_to_map(seq[:, n_prefix:], h // 16, w // 16))
        tissue = None
        if self.head is not None:
            normed = self.vit.norm(seq)
            tissue = self.head(normed[:, 0] if self.vit.cls_token is not None else normed[:, n_prefix:].mean(1))
        return outs, tissue


class _NucleiNet(nn.Module):
    """Common forward of CellVTA and CellViT: encoder features -> decoder maps (+ tissue, features)."""

    encoder: nn.Module
    decoder: HoVerDecoder

    def _setup(self, preset, official_normalization: bool, pretrained: str | None, backbone: str,
               checkpoint: str | None, freeze: str) -> None:
        self.mean = OFFICIAL_MEAN if official_normalization else preset.mean
        self.std = OFFICIAL_STD if official_normalization else preset.std
        if pretrained:
            load_vit_weights(self.encoder.vit, pretrained, backbone)
        if checkpoint:
            load_network_checkpoint(self, checkpoint)
        apply_freeze_policy(self, freeze)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` normalised image -> dict of maps (see the module docstring)."""
        features, tissue = self.encoder(x)
        out = self.decoder(x, features)
        if tissue is not None:
            out["tissue_types"] = tissue
        if return_features:
            out["features"] = features[3]
        return out


def _device_scope(device: torch.device | str | None):
    return torch.device(device) if device is not None else nullcontext()


class CellVTA(_NucleiNet):
    """CellVTA: foundation ViT + adapter + HoVer-Net decoder.

    Args:
        backbone: a preset of ``scripts.model.backbones.PRESETS`` (``uni``, ``uni2-h``, ``virchow2``,
            ``h-optimus-0``, ``dinov2-s/b/l``, ``vit-t/s/b/l``) or any timm ViT name.
        num_nuclei_classes: NC channels including background (PanNuke 6, CoNIC 7, CoNSeP 5).
        num_tissue_classes: tissue head width (0 for no head).
        freeze: ``frozen`` (ViT frozen, the paper's), ``full`` or ``decoder_only``.
        pretrained: ViT weights, a local file or ``hf-hub:<repo>``, loaded strictly.
        checkpoint: a whole-network state dict (ours, or an official CellVTA checkpoint, converted).
        cls_through_blocks: fix of the official class-token defect; ``False`` for official weights.
        official_init: reproduce the official overwritten MSDA initialisation.
        official_normalization: use mean = std = 0.5 (official) instead of the backbone's statistics.
        drop_rate: decoder dropout. drop_path_rate: ViT stochastic depth.
        extractor_drop_path: drop path of the adapter's extractor FFNs.
        vit_kwargs: extra timm arguments (e.g. ``{"depth": 4}`` for a small experiment).
        device: build the parameters there (``"meta"`` to inspect the model for free).
    """

    def __init__(self, backbone: str = "uni", num_nuclei_classes: int = 6, num_tissue_classes: int = 19,
                 freeze: str = "frozen", pretrained: str | None = None, checkpoint: str | None = None,
                 cls_through_blocks: bool = True, official_init: bool = False, official_normalization: bool = False,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, extractor_drop_path: float = 0.4,
                 conv_inplane: int = 64, extra_extractors: int = 2, vit_kwargs: dict | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        with _device_scope(device):
            vit, preset = create_vit(backbone, drop_path_rate, **(vit_kwargs or {}))
            self.encoder = AdapterEncoder(vit, num_tissue_classes, conv_inplane=conv_inplane,
                                          extractor_drop_path=extractor_drop_path, extra_extractors=extra_extractors,
                                          cls_through_blocks=cls_through_blocks, official_init=official_init)
            d = vit.embed_dim
            w0, w1, w2, w3 = decoder_widths(d)
            skips = [
                nn.Sequential(Conv2DBlock(3, 32, drop_rate), Conv2DBlock(32, w0, drop_rate)),
                nn.Sequential(Conv2DBlock(d, w1, drop_rate), Conv2DBlock(w1, w1, drop_rate)),
                nn.Sequential(Conv2DBlock(d, w2, drop_rate), Conv2DBlock(w2, w2, drop_rate)),
                nn.Sequential(Conv2DBlock(d, w3, drop_rate), Conv2DBlock(w3, w3, drop_rate)),
            ]
            self.decoder = HoVerDecoder(skips, d, num_nuclei_classes, deconv_bottleneck=True, dropout=drop_rate)
        self._setup(preset, official_normalization, pretrained, backbone, checkpoint, freeze)


class CellViT(_NucleiNet):
    """CellViT: foundation ViT (no adapter) with skips from its blocks + the same decoder.

    Arguments as ``CellVTA`` (without the adapter's).
    """

    def __init__(self, backbone: str = "uni", num_nuclei_classes: int = 6, num_tissue_classes: int = 19,
                 freeze: str = "frozen", pretrained: str | None = None, checkpoint: str | None = None,
                 official_normalization: bool = False, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 vit_kwargs: dict | None = None, device: torch.device | str | None = None):
        super().__init__()
        with _device_scope(device):
            vit, preset = create_vit(backbone, drop_path_rate, **(vit_kwargs or {}))
            self.encoder = ViTEncoder(vit, num_tissue_classes)
            d = vit.embed_dim
            w0, w1, w2, w3 = decoder_widths(d)
            skip11, skip12 = (512, 256) if d >= 512 else (256, 128)
            skips = [
                nn.Sequential(Conv2DBlock(3, 32, drop_rate), Conv2DBlock(32, w0, drop_rate)),
                nn.Sequential(Deconv2DBlock(d, skip11, drop_rate), Deconv2DBlock(skip11, skip12, drop_rate),
                              Deconv2DBlock(skip12, w1, drop_rate)),
                nn.Sequential(Deconv2DBlock(d, skip11, drop_rate), Deconv2DBlock(skip11, w2, drop_rate)),
                nn.Sequential(Deconv2DBlock(d, w3, drop_rate)),
            ]
            self.decoder = HoVerDecoder(skips, d, num_nuclei_classes, deconv_bottleneck=False, dropout=drop_rate)
        self._setup(preset, official_normalization, pretrained, backbone, checkpoint, freeze)


def load_network_checkpoint(model: nn.Module, path: str) -> None:
    """Load a whole-network checkpoint strictly; official CellVTA checkpoints are converted first.

    Raises:
        KeyError / ValueError: keys or shapes that do not match, named.
    """
    state = read_state_dict(path)
    if is_official_state_dict(state):
        state = convert_official_state_dict(state)
    load_exactly(model, state, f"{path}: network weights")
