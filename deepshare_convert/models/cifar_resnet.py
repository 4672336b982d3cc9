"""CIFAR ResNets (He et al. 2016) with the "option A" shortcut.

Parameter names match the public ``pytorch_resnet_cifar10`` weights (Idelbayev),
so ``../shared/models/resnet20-12fca82f.th`` loads with ``strict=True``.  The
shortcut is a module with a real ``forward`` (not a lambda) so it traces and
prints well.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation those weights were trained with
IMAGENET_STD = (0.229, 0.224, 0.225)


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample by 2, zero-pad the new channels on both sides."""

    def __init__(self, pad_channels: int):
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad_channels
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))


class BasicBlockA(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.relu2 = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ShortcutA(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        for i, planes in enumerate((16, 32, 64)):
            layers = []
            for b in range(blocks_per_stage):
                stride = 2 if (i > 0 and b == 0) else 1
                layers.append(BasicBlockA(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.pool(x), 1))


def _make(depth: int):
    n = (depth - 2) // 6

    @register_model(
        f"resnet{depth}",
        input_size=(3, 32, 32),
        num_classes=10,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        description=f"CIFAR ResNet-{depth}, option-A shortcut (pytorch_resnet_cifar10 weights)",
    )
    def factory(num_classes: int = 10) -> nn.Module:
        return CifarResNet(n, num_classes)

    factory.__name__ = f"resnet{depth}"
    return factory


resnet20 = _make(20)
resnet32 = _make(32)
resnet44 = _make(44)
resnet56 = _make(56)
