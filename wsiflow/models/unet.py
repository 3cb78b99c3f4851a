"""A small U-Net (Ronneberger et al. 2015) for nucleated-cell segmentation.

Configurable ``depth`` (number of 2× poolings) and ``width`` (channels of the first
level, doubled per level). Each level is two 3×3 conv → BatchNorm → ReLU blocks;
upsampling is bilinear followed by a 1×1 conv, so the model has no checkerboard
artefacts and few parameters. Outputs raw logits (no sigmoid) with ``out_ch``
channels at the input's height and width, for any input size: the input is padded
(reflect) to a multiple of ``2**depth`` internally and the logits cropped back.

Channel convention for segmenter bundles: channel 0 = "cell" (nucleus ∪ cytoplasm),
optional channel 1 = "nucleus" (used as watershed markers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class _Up(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(cin, cskip, 1, bias=False)
        self.conv = _DoubleConv(2 * cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = self.reduce(x)
        return self.conv(torch.cat([x, skip], dim=1))


class UNet(nn.Module):
    """U-Net returning logits of shape (N, out_ch, H, W) for input (N, in_ch, H, W)."""

    def __init__(self, in_ch: int = 3, out_ch: int = 1, depth: int = 4, width: int = 16) -> None:
        super().__init__()
        if depth < 1 or width < 1 or in_ch < 1 or out_ch < 1:
            raise ValueError("in_ch, out_ch, depth and width must be positive")
        self.in_ch, self.out_ch, self.depth, self.width = in_ch, out_ch, depth, width
        chans = [width * 2**i for i in range(depth + 1)]
        self.inc = _DoubleConv(in_ch, chans[0])
        self.downs = nn.ModuleList(_DoubleConv(chans[i], chans[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(_Up(chans[i + 1], chans[i], chans[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(chans[0], out_ch, 1)

    @property
    def multiple(self) -> int:
        return int(2**self.depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            # reflect needs pad < size; fall back to replicate for tiny inputs
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.head(y)[..., :h, :w]
