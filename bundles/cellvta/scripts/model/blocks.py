"""Convolution blocks shared by the decoder and the encoders' skip paths."""

from __future__ import annotations

import torch
from torch import nn


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
