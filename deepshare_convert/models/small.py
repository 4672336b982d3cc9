"""Small built-in networks: the digits CNN (demo, fast tests) and the XOR MLP (paper Sec. 5)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_model

DIGITS_MEAN = (0.5,)  # digits pixels are scaled to [0, 1] by the data module
DIGITS_STD = (0.5,)


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitsCNN(nn.Module):
    """A 4-conv CNN for 1x8x8 digits; two consecutive 32x8x8 activations give layer sharing."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn(1, w // 2),
            *_conv_bn(w // 2, w),
            *_conv_bn(w, w),
            nn.AvgPool2d(2),
            *_conv_bn(w, 2 * w),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register_model(
    "digits_cnn",
    input_size=(1, 8, 8),
    num_classes=10,
    mean=DIGITS_MEAN,
    std=DIGITS_STD,
    description="small CNN for scikit-learn's 8x8 digits (6,144 ReLUs)",
)
def digits_cnn(num_classes: int = 10) -> nn.Module:
    return DigitsCNN(num_classes)


class XorMLP(nn.Module):
    """2 -> 2 -> 1: the smallest network of the paper's XOR / checkerboard argument."""

    def __init__(self, hidden: int = 2, num_classes: int = 1):
        super().__init__()
        self.fc1 = nn.Linear(2, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@register_model(
    "xor_mlp",
    input_size=(2,),
    num_classes=1,
    description="2-2-1 MLP of the paper's XOR / 2x2 checkerboard (Sec. 5)",
)
def xor_mlp(num_classes: int = 1) -> nn.Module:
    return XorMLP(2, num_classes)
