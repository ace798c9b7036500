"""CellVTA's adapter: a CNN spatial prior injected into a frozen ViT by deformable attention.

Shapes are for an input of ``H x W`` (multiples of 16) and ViT width ``D`` (a timm ViT, or SAM's image
encoder: its windowed blocks run on the token grid reshaped to ``(B, H/16, W/16, D)``):
the spatial prior module (SPM) gives ``c1`` (B, D, H/2, W/2) and tokens at 1/4, 1/8 and 1/16;
before each group of ViT blocks the injector lets the ViT's patch tokens (B, HW/256, D) attend
to the SPM tokens; after it the extractor lets the SPM tokens attend to the ViT tokens. The
output is the pyramid ``f1..f4`` (B, D, H/2..H/16, W/2..W/16).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from custom_ops import MSDeformAttn

from .encoders import GRID_STRIDE, embed_tokens, is_sam, resize_to_grid, run_blocks, skip_block_indices

GridSizes = list[tuple[int, int]]


def conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> list[nn.Module]:
    """3x3 convolution (no bias), BatchNorm, ReLU."""
    return [nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """Convolutional stem with strides 2/4/8/16 and 1x1 projections to the ViT width.

    Args:
        inplanes: width of the stem (64 in CellVTA).
        embed_dim: ViT width ``D``.
    """

    def __init__(self, inplanes: int = 64, embed_dim: int = 1024):
        super().__init__()
        self.stem = nn.Sequential(
            *conv_bn_relu(3, inplanes), *conv_bn_relu(inplanes, inplanes), *conv_bn_relu(inplanes, inplanes),
            nn.Conv2d(inplanes, inplanes, 3, 2, 1, bias=False),
        )
        self.conv2 = nn.Sequential(*conv_bn_relu(inplanes, inplanes), *conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*conv_bn_relu(2 * inplanes, 2 * inplanes),
                                   *conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*conv_bn_relu(4 * inplanes, 4 * inplanes),
                                   *conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, 3, H, W)`` -> ``c1 (B, D, H/2, W/2)``, ``c2, c3, c4`` maps at 1/4, 1/8, 1/16."""
        s1 = self.stem(x)
        s2 = self.conv2(s1)
        s3 = self.conv3(s2)
        s4 = self.conv4(s3)
        return self.fc1(s1), self.fc2(s2), self.fc3(s3), self.fc4(s4)


def reference_points(grids: GridSizes, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Cell centres of row-major grids, ``(1, sum h*w, 1, 2)`` as normalised ``(x, y)``."""
    points = []
    for h, w in grids:
        y, x = torch.meshgrid(
            (torch.arange(h, device=device, dtype=dtype) + 0.5) / h,
            (torch.arange(w, device=device, dtype=dtype) + 0.5) / w,
            indexing="ij",
        )
        points.append(torch.stack([x.flatten(), y.flatten()], -1))
    return torch.cat(points)[None, :, None]


def tokens_to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Row-major tokens ``(B, h*w, C)`` as a map ``(B, C, h, w)`` (a channels-last view, no copy)."""
    return tokens.unflatten(1, (h, w)).permute(0, 3, 1, 2)


def level_layout(grids: GridSizes, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``spatial_shapes (L, 2)`` and ``level_start_index (L,)`` (int64) of the grids."""
    shapes = torch.tensor(grids, dtype=torch.int64, device=device)
    sizes = shapes.prod(1)
    return shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


class DWConv(nn.Module):
    """Depthwise 3x3 convolution applied to each level's map of a concatenated token sequence."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, grids: GridSizes) -> torch.Tensor:
        """``(B, sum h*w, C)`` -> same shape."""
        parts = x.split([h * w for h, w in grids], dim=1)
        out = [self.dwconv(tokens_to_map(p, h, w)).permute(0, 2, 3, 1).flatten(1, 2) for p, (h, w) in zip(parts, grids)]
        return torch.cat(out, dim=1)


class ConvFFN(nn.Module):
    """Linear -> depthwise conv per level -> GELU -> Linear, on ``(B, N, D)`` tokens."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, grids: GridSizes) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x), grids)))
        return self.drop(self.fc2(x))


class Injector(nn.Module):
    """ViT tokens attend to the SPM pyramid; the result is added with a learned scale ``gamma``."""

    def __init__(self, dim: int, n_heads: int, n_points: int, n_levels: int, deform_ratio: float, init_values: float):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(dim, n_levels, n_heads, n_points, deform_ratio)
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, query: torch.Tensor, ref: torch.Tensor, feat: torch.Tensor, shapes: torch.Tensor,
                starts: torch.Tensor) -> torch.Tensor:
        """``query (B, Nq, D)``, ``feat (B, Nf, D)`` -> ``(B, Nq, D)``."""
        return query + self.gamma * self.attn(self.query_norm(query), ref, self.feat_norm(feat), shapes, starts)


class Extractor(nn.Module):
    """SPM tokens attend to the ViT tokens, then a convolutional FFN."""

    def __init__(self, dim: int, n_heads: int, n_points: int, deform_ratio: float, cffn_ratio: float,
                 drop_path: float):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(dim, 1, n_heads, n_points, deform_ratio)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, query: torch.Tensor, ref: torch.Tensor, feat: torch.Tensor, shapes: torch.Tensor,
                starts: torch.Tensor, grids: GridSizes) -> torch.Tensor:
        """``query (B, Nc, D)`` SPM tokens of ``grids``, ``feat (B, Nv, D)`` ViT tokens -> ``(B, Nc, D)``."""
        query = query + self.attn(self.query_norm(query), ref, self.feat_norm(feat), shapes, starts)
        return query + self.drop_path(self.ffn(self.ffn_norm(query), grids))


class InteractionBlock(nn.Module):
    """Injector, a group of ViT blocks, extractor (and, for the last group, extra extractors)."""

    def __init__(self, dim: int, n_heads: int = 8, n_points: int = 4, deform_ratio: float = 0.5,
                 cffn_ratio: float = 0.25, init_values: float = 1e-5, drop_path: float = 0.4,
                 extra_extractors: int = 0):
        super().__init__()
        self.injector = Injector(dim, n_heads, n_points, 3, deform_ratio, init_values)
        self.extractor = Extractor(dim, n_heads, n_points, deform_ratio, cffn_ratio, drop_path)
        if extra_extractors:
            self.extra_extractors = nn.ModuleList(
                Extractor(dim, n_heads, n_points, deform_ratio, cffn_ratio, drop_path) for _ in range(extra_extractors)
            )
        else:
            self.extra_extractors = None

    def forward(self, x: torch.Tensor, prefix: torch.Tensor, c: torch.Tensor,
                blocks: Callable[[torch.Tensor], torch.Tensor], layout: dict,
                cls_through_blocks: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One interaction.

        Args:
            x: ``(B, Nv, D)`` ViT patch tokens.
            prefix: ``(B, Np, D)`` class and register tokens.
            c: ``(B, Nc, D)`` SPM tokens.
            blocks: the ViT blocks of this group, as a function of a ``(B, N, D)`` token sequence.
            layout: reference points and level layouts from ``AdapterEncoder.layout``.
            cls_through_blocks: run the blocks on ``[prefix, x]`` (fixed) or on ``x`` alone (official).

        Returns:
            ``x``, ``prefix``, ``c`` after the interaction.
        """
        x = self.injector(x, layout["inj_ref"], c, layout["inj_shapes"], layout["inj_starts"])
        if cls_through_blocks:
            n_prefix = prefix.shape[1]
            seq = blocks(torch.cat([prefix, x], dim=1))
            prefix, x = seq[:, :n_prefix], seq[:, n_prefix:]
        else:
            x = blocks(x)
        extractors = [self.extractor, *(self.extra_extractors or [])]
        for extractor in extractors:
            c = extractor(c, layout["ext_ref"], x, layout["ext_shapes"], layout["ext_starts"], layout["spm_grids"])
        return x, prefix, c


def interaction_groups(depth: int, skip_blocks: Sequence[int] | None = None) -> list[range]:
    """The four groups of consecutive ViT blocks, each ending at a skip block.

    Args:
        depth: number of ViT blocks.
        skip_blocks: the last block (0-based) of each group; the last must be ``depth - 1``. Default: the
            quarters (``scripts.model.encoders.skip_block_indices``).

    Raises:
        ValueError: invalid skip blocks, or blocks left after the last group.
    """
    ends = skip_block_indices(depth, skip_blocks)
    if ends[-1] != depth - 1:
        raise ValueError(f"skip_blocks {ends}: the adapter's last interaction must end at the last block "
                         f"({depth - 1})")
    starts = [0, *(e + 1 for e in ends[:-1])]
    return [range(s, e + 1) for s, e in zip(starts, ends)]


def init_adapter_weights(module: nn.Module) -> None:
    """ViT-Adapter initialisation of linear, norm and convolution layers."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class AdapterEncoder(nn.Module):
    """A timm ViT (or SAM) with CellVTA's adapter: image -> pyramid ``f1..f4`` and tissue logits.

    Args:
        vit: a timm ``VisionTransformer`` built with ``dynamic_img_size=True`` and no classifier, or a
            ``VisionTransformerSAM`` (its neck is not used and is removed).
        num_tissue_classes: width of the tissue head (0 for none): on the class token (or the mean patch
            token) after the ViT's final norm; for SAM (no class token, no final norm) on the mean of ``f4``.
        conv_inplane: SPM stem width.
        n_points, deform_num_heads, deform_ratio, cffn_ratio, init_values, extractor_drop_path:
            interaction hyper-parameters (CellVTA: 4, 8, 0.5, 0.25, 1e-5, 0.4).
        extra_extractors: extractors added to the last interaction (CellVTA: 2).
        cls_through_blocks: prefix tokens pass through the ViT blocks (fixes the constant tissue
            head); ``False`` reproduces the official model, as released weights need.
        official_init: reproduce the official initialisation, in which timm's linear init
            overwrites the Deformable-DETR init of the attention layers.
        skip_blocks: the last block of each interaction's group (``interaction_groups``).
    """

    def __init__(self, vit: nn.Module, num_tissue_classes: int = 0, conv_inplane: int = 64, n_points: int = 4,
                 deform_num_heads: int = 8, deform_ratio: float = 0.5, cffn_ratio: float = 0.25,
                 init_values: float = 1e-5, extractor_drop_path: float = 0.4, extra_extractors: int = 2,
                 cls_through_blocks: bool = True, official_init: bool = False,
                 skip_blocks: Sequence[int] | None = None):
        super().__init__()
        self.vit = vit
        self.sam = is_sam(vit)
        if self.sam:
            vit.neck = nn.Identity()
        dim = vit.embed_dim
        self.embed_dim = dim
        self.patch_size = vit.patch_embed.patch_size[0]
        self.cls_through_blocks = cls_through_blocks
        self.groups = interaction_groups(len(vit.blocks), skip_blocks)
        self.skip_blocks = [g.stop - 1 for g in self.groups]
        self.feature_strides = (2, 4, 8, 16)
        self.feature_channels = (dim,) * 4
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.spm = SpatialPriorModule(conv_inplane, dim)
        self.interactions = nn.ModuleList(
            InteractionBlock(dim, deform_num_heads, n_points, deform_ratio, cffn_ratio, init_values,
                             extractor_drop_path, extra_extractors if i == len(self.groups) - 1 else 0)
            for i in range(len(self.groups))
        )
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.BatchNorm2d(dim) for _ in range(4))
        self.head = nn.Linear(dim, num_tissue_classes) if num_tissue_classes else None
        self.reset_adapter_parameters(official_init)

    def reset_adapter_parameters(self, official_init: bool = False) -> None:
        """ViT-Adapter init, then the Deformable-DETR init of every MSDA layer (kept unless ``official_init``)."""
        for part in (self.spm, self.interactions, self.up, self.norm1, self.norm2, self.norm3, self.norm4):
            part.apply(init_adapter_weights)
        for module in self.interactions.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)
        if official_init:
            for module in self.interactions.modules():
                if isinstance(module, nn.Linear):
                    trunc_normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias)
        if self.head is not None:
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def layout(self, h: int, w: int, device: torch.device) -> dict:
        """Reference points (float32, whatever the network's precision) and level layouts for an ``h x w`` input."""
        spm_grids = [(h // 4, w // 4), (h // 8, w // 8), (h // 16, w // 16)]
        vit_grid = [(h // 16, w // 16)]
        inj_shapes, inj_starts = level_layout(spm_grids, device)
        ext_shapes, ext_starts = level_layout(vit_grid, device)
        return {
            "spm_grids": spm_grids,
            "inj_ref": reference_points(vit_grid, device, torch.float32),
            "inj_shapes": inj_shapes,
            "inj_starts": inj_starts,
            "ext_ref": reference_points(spm_grids, device, torch.float32),
            "ext_shapes": ext_shapes,
            "ext_starts": ext_starts,
        }

    def pretrained_parameters(self) -> Iterator[nn.Parameter]:
        """The ViT's parameters but its final norm (which feeds only the tissue head)."""
        return (p for n, p in self.vit.named_parameters() if not n.startswith("norm."))

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, H, W)`` -> patch tokens ``(B, HW/256, D)`` and prefix tokens ``(B, Np, D)``."""
        return embed_tokens(self.vit, resize_to_grid(x, self.patch_size))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """``(B, 3, H, W)``, H and W multiples of 16 -> ``[f1..f4]`` (B, D, H/2..H/16, ...) and tissue logits (B, T)."""
        b, _, h, w = x.shape
        if h % GRID_STRIDE or w % GRID_STRIDE:
            raise ValueError(f"input size {h}x{w} must be a multiple of {GRID_STRIDE}")
        layout = self.layout(h, w, x.device)
        c1, c2, c3, c4 = self.spm(x)
        c = torch.cat([m.permute(0, 2, 3, 1).flatten(1, 2) + self.level_embed[i]
                       for i, m in enumerate((c2, c3, c4))], 1)
        tokens, prefix = self.embed(x)
        vit_outs = []
        grid = (h // GRID_STRIDE, w // GRID_STRIDE)
        for interaction, group in zip(self.interactions, self.groups):
            blocks = partial(run_blocks, self.vit, self.vit.blocks[group.start:group.stop], grid=grid)
            tokens, prefix, c = interaction(tokens, prefix, c, blocks, layout, self.cls_through_blocks)
            vit_outs.append(tokens_to_map(tokens, h // 16, w // 16))
        grids = layout["spm_grids"]
        maps = [tokens_to_map(part, gh, gw) for part, (gh, gw) in zip(c.split([gh * gw for gh, gw in grids], 1), grids)]
        pyramid = [self.up(maps[0]) + c1, *maps]
        norms = (self.norm1, self.norm2, self.norm3, self.norm4)
        features = [
            norm(level + F.interpolate(out, size=level.shape[-2:], mode="bilinear", align_corners=False))
            for norm, level, out in zip(norms, pyramid, vit_outs)
        ]
        tissue = None
        if self.head is not None and self.sam:
            tissue = self.head(features[3].mean((2, 3)))
        elif self.head is not None:
            seq = self.vit.norm(torch.cat([prefix, tokens], 1))
            pooled = seq[:, 0] if self.vit.cls_token is not None else seq[:, prefix.shape[1]:].mean(1)
            tissue = self.head(pooled)
        return features, tissue
