"""Encoders that feed the HoVer-Net decoder: ViT-style block skips (CellViT) and hierarchical stages.

Every encoder maps a normalised image ``(B, 3, H, W)`` to four maps for the decoder and tissue logits
``(B, T)`` (``None`` without a tissue head), and describes them by ``feature_strides`` and
``feature_channels`` (the decoder builds its skip paths from these) and ``embed_dim`` (the width of the
last map, the bottleneck). ``pretrained_parameters()`` are those the ``frozen`` policy freezes.

* ``ViTEncoder`` (CellViT, also over SAM): the patch tokens after the blocks ``skip_blocks`` (default the
  last block of each quarter), all at 1/16, through timm's ``forward_intermediates``.
* ``HierarchicalEncoder``: timm ``features_only`` stages at their native strides; the decoder's 1/2, 1/4
  and 1/8 skips take the stage of that stride (the finest stage when none is that fine), the 1/16
  bottleneck is the stride-16 stage plus the upsampled stride-32 stage.

The token helpers (``embed_tokens``, ``run_blocks``) let the adapter drive a ViT or SAM block by block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resample_abs_pos_embed_nhwc
from timm.models.vision_transformer_sam import VisionTransformerSAM
from torch import nn

from .blocks import Deconv2DBlock

GRID_STRIDE = 16  # the token grid every ViT-style encoder works on, whatever its patch size


def is_sam(vit: nn.Module) -> bool:
    """Whether ``vit`` is timm's SAM image encoder (tokens ``(B, h, w, D)``, windowed attention, neck)."""
    return isinstance(vit, VisionTransformerSAM)


def skip_block_indices(depth: int, skip_blocks: Sequence[int] | None = None) -> list[int]:
    """The four blocks (0-based) whose outputs feed the decoder; default the last block of each quarter.

    Raises:
        ValueError: not four strictly increasing indices in ``[0, depth)``.
    """
    if skip_blocks is None:
        if depth < 4:
            raise ValueError(f"the encoder has {depth} blocks: at least 4 are needed for 4 skips")
        return [round(depth * k / 4) - 1 for k in range(1, 5)]
    blocks = [int(b) for b in skip_blocks]
    if len(blocks) != 4 or any(b < 0 or b >= depth for b in blocks) or blocks != sorted(set(blocks)):
        raise ValueError(f"skip_blocks {list(skip_blocks)}: expected 4 strictly increasing block indices "
                         f"in [0, {depth}) (0-based)")
    return blocks


def resize_to_grid(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Resize ``(B, 3, H, W)`` so that a ``patch``-pixel patch grid is ``H/16 x W/16`` (identity for 16)."""
    if patch == GRID_STRIDE:
        return x
    h, w = x.shape[-2:]
    return F.interpolate(x, size=(h // GRID_STRIDE * patch, w // GRID_STRIDE * patch), mode="bilinear",
                         align_corners=False)


def embed_tokens(vit: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch tokens and prefix tokens of an image, before the first block.

    The position embedding is resampled to the input's grid with timm's ``resample_abs_pos_embed`` (as a
    ``dynamic_img_size`` ViT does); ``tests/test_encoders.py`` checks that the blocks run on these tokens
    give timm's ``forward_intermediates``.

    Args:
        vit: a timm ``VisionTransformer`` (``dynamic_img_size=True``) or ``VisionTransformerSAM``.
        x: ``(B, 3, H', W')`` image already at the patch grid's size (``resize_to_grid``).

    Returns:
        ``(B, N, D)`` patch tokens (row-major grid) and ``(B, Np, D)`` prefix tokens (class, registers; Np = 0
        for SAM).
    """
    patches = vit.patch_embed(x)  # (B, h, w, D)
    b, h, w, d = patches.shape
    if is_sam(vit):
        if vit.pos_embed is not None:
            patches = patches + resample_abs_pos_embed_nhwc(vit.pos_embed, (h, w))
        tokens = vit.norm_pre(vit.patch_drop(vit.pos_drop(patches)))
        return tokens.flatten(1, 2), tokens.new_zeros(b, 0, d)
    prefix = [t.expand(b, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    tokens = patches.flatten(1, 2)
    if vit.pos_embed is not None:
        n_embedded = 0 if vit.no_embed_class else vit.num_prefix_tokens
        pos = resample_abs_pos_embed(vit.pos_embed, new_size=(h, w), old_size=vit.patch_embed.grid_size,
                                     num_prefix_tokens=n_embedded)
        if vit.no_embed_class:
            seq = torch.cat([*prefix, tokens + pos], 1)
        else:
            seq = torch.cat([*prefix, tokens], 1) + pos
    else:
        seq = torch.cat([*prefix, tokens], 1)
    seq = vit.norm_pre(vit.patch_drop(vit.pos_drop(seq)))
    n_prefix = sum(t.shape[1] for t in prefix)
    return seq[:, n_prefix:], seq[:, :n_prefix]


def run_blocks(vit: nn.Module, blocks: nn.Module, seq: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Run ``blocks`` of ``vit`` on a token sequence ``(B, Np + h*w, D)`` -> same shape.

    SAM's blocks work on ``(B, h, w, D)`` maps (windowed attention): the sequence (no prefix tokens) is
    reshaped to the grid and back.
    """
    if is_sam(vit):
        return blocks(seq.unflatten(1, grid)).flatten(1, 2)
    return blocks(seq)


class ViTEncoder(nn.Module):
    """A ViT or SAM returning the patch tokens after four of its blocks (CellViT's skips), all at 1/16.

    Args:
        vit: timm ``VisionTransformer`` (``dynamic_img_size=True``, no classifier) or ``VisionTransformerSAM``.
        num_tissue_classes: width of the tissue head (0 for none): on the class token (or the mean patch
            token) after the final norm; for SAM on the mean of its 256-channel neck, as CellViT-SAM.
        skip_blocks: the four blocks (0-based) whose outputs feed the decoder (``skip_block_indices``).
    """

    def __init__(self, vit: nn.Module, num_tissue_classes: int = 0, skip_blocks: Sequence[int] | None = None):
        super().__init__()
        self.vit = vit
        self.sam = is_sam(vit)
        self.embed_dim = vit.embed_dim
        self.patch_size = vit.patch_embed.patch_size[0]
        self.skip_blocks = skip_block_indices(len(vit.blocks), skip_blocks)
        self.feature_strides = (GRID_STRIDE,) * 4
        self.feature_channels = (self.embed_dim,) * 4
        if self.sam and not num_tissue_classes:
            vit.neck = nn.Identity()  # the neck only feeds the tissue head
        head_in = vit.num_features if self.sam else self.embed_dim
        self.head = nn.Linear(head_in, num_tissue_classes) if num_tissue_classes else None

    def pretrained_parameters(self) -> Iterator[nn.Parameter]:
        """The ViT's parameters but its final norm and SAM's neck (they feed only the tissue head)."""
        return (p for n, p in self.vit.named_parameters() if not n.startswith(("norm.", "neck.")))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """``(B, 3, H, W)``, H and W multiples of 16 -> four ``(B, D, H/16, W/16)`` maps, tissue logits ``(B, T)``."""
        h, w = x.shape[-2:]
        if h % GRID_STRIDE or w % GRID_STRIDE:
            raise ValueError(f"input size {h}x{w} must be a multiple of {GRID_STRIDE}")
        x = resize_to_grid(x, self.patch_size)
        if self.sam:
            final, maps = self.vit.forward_intermediates(x, indices=self.skip_blocks)
            tissue = self.head(final.mean((2, 3))) if self.head is not None else None
            return maps, tissue
        final, maps = self.vit.forward_intermediates(x, indices=self.skip_blocks)
        tissue = None
        if self.head is not None:
            n_prefix = self.vit.num_prefix_tokens
            tissue = self.head(final[:, 0] if self.vit.cls_token is not None else final[:, n_prefix:].mean(1))
        return maps, tissue


class HierarchicalEncoder(nn.Module):
    """Stages of a timm ``features_only`` model at their native strides, arranged for the decoder.

    Args:
        backbone: a timm ``features_only`` model with stages at stride 16 and at most 32.
        num_tissue_classes: width of the tissue head on the mean of the deepest stage (0 for none).
        input_multiple: input sizes must be multiples of it (32, or more for windowed stages).
        name: the backbone's name, for error messages.
        drop_rate: dropout of the stride-32 fusion block.

    Raises:
        ValueError: the model has no stride-16 stage or stages deeper than 32.
    """

    def __init__(self, backbone: nn.Module, num_tissue_classes: int = 0, input_multiple: int = 32, name: str = "",
                 drop_rate: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.name = name or type(backbone).__name__
        self.input_multiple = input_multiple
        self.nhwc = str(getattr(backbone, "output_fmt", "NCHW")).endswith("NHWC")
        strides, channels = backbone.feature_info.reduction(), backbone.feature_info.channels()
        if GRID_STRIDE not in strides or max(strides) > 2 * GRID_STRIDE:
            raise ValueError(f"{self.name}: stage strides {strides}; the decoder needs a stride-16 stage and none "
                             "deeper than 32")
        finest = strides.index(min(strides))
        self.take = [strides.index(s) if s in strides else finest for s in (2, 4, 8)] + [strides.index(GRID_STRIDE)]
        self.deepest = strides.index(max(strides))
        bottleneck = channels[self.take[3]]
        self.fuse = (Deconv2DBlock(channels[self.deepest], bottleneck, drop_rate)
                     if strides[self.deepest] > GRID_STRIDE else None)
        self.feature_strides = tuple(strides[i] for i in self.take)
        self.feature_channels = tuple(channels[i] for i in self.take)
        self.embed_dim = bottleneck
        self.head = nn.Linear(channels[self.deepest], num_tissue_classes) if num_tissue_classes else None

    def pretrained_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter of the timm model."""
        return self.backbone.parameters()

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """``(B, 3, H, W)`` -> maps at ``feature_strides`` (``(B, C_i, H/s_i, W/s_i)``) and tissue logits ``(B, T)``.

        Raises:
            ValueError: H or W is not a multiple of ``input_multiple``.
        """
        h, w = x.shape[-2:]
        if h % self.input_multiple or w % self.input_multiple:
            raise ValueError(f"input size {h}x{w}: the {self.name} encoder needs sizes that are multiples of "
                             f"{self.input_multiple} (its deepest stage must hold whole windows and pixels)")
        stages = self.backbone(x)
        if self.nhwc:
            stages = [s.permute(0, 3, 1, 2) for s in stages]
        maps = [stages[i] for i in self.take]
        if self.fuse is not None:
            maps[3] = maps[3] + self.fuse(stages[self.deepest])
        tissue = self.head(stages[self.deepest].mean((2, 3))) if self.head is not None else None
        return maps, tissue
