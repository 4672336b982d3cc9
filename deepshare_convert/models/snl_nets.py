"""The two backbones of the SNL / DeepShare experiments (paper Tables 1-3).

* ``resnet18_cifar``: ResNet-18 for small images -- 3x3 stem, no max-pool and, as
  in SNL's code, no ReLU after the stem: 491,520 ReLUs at 32x32, 1,966,080 at 64x64.
* ``wrn22_8``: pre-activation Wide-ResNet-22-8 (Zagoruyko & Komodakis), no ReLU
  after the final BN: 1,359,872 ReLUs at 32x32.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_model

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            layers = []
            for b in range(n):
                layers.append(BasicBlock(in_planes, planes, 2 if (i > 0 and b == 0) else 1))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))  # no ReLU after the stem (SNL's ResNet-18)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(torch.flatten(self.pool(x), 1))


@register_model(
    "resnet18_cifar",
    input_size=(3, 32, 32),
    num_classes=100,
    mean=CIFAR100_MEAN,
    std=CIFAR100_STD,
    description="SNL/DeepShare ResNet-18 for 32x32 / 64x64 inputs (no stem ReLU)",
)
def resnet18_cifar(num_classes: int = 100) -> nn.Module:
    return ResNetCifar((2, 2, 2, 2), num_classes)


class WideBasic(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv-BN-ReLU-conv (+ shortcut)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == planes and stride == 1
        self.shortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, planes, 1, stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        if self.shortcut is None:
            return x + out
        return self.shortcut(pre) + out


class WideResNet(nn.Module):
    def __init__(self, depth: int = 22, widen: int = 8, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("Wide-ResNet depth must be 6n+4")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        in_planes = widths[0]
        for i, planes in enumerate(widths[1:]):
            layers = []
            for b in range(n):
                layers.append(WideBasic(in_planes, planes, 2 if (i > 0 and b == 0) else 1))
                in_planes = planes
            setattr(self, f"block{i + 1}", nn.Sequential(*layers))
        self.bn = nn.BatchNorm2d(in_planes)  # no ReLU after it (SNL's WRN-22-8 count)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(self.bn(x)), 1))


@register_model(
    "wrn22_8",
    input_size=(3, 32, 32),
    num_classes=100,
    mean=CIFAR100_MEAN,
    std=CIFAR100_STD,
    description="pre-activation Wide-ResNet-22-8 of SNL (1,359,872 ReLUs)",
)
def wrn22_8(num_classes: int = 100) -> nn.Module:
    return WideResNet(22, 8, num_classes)
