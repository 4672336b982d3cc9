"""DeepLabV3 for semantic segmentation: a timm ``features_only`` backbone + the ASPP head.

Written here (not torchvision's) so that any timm backbone works, dilated by timm itself
(``output_stride`` 8 or 16), and so that the graph is plain torch.fx-traceable modules: every
ReLU of the head is an activation site, the upsampling is ``F.interpolate`` with a static size
(the lowering runs it on shares as a public linear map). Chen et al. 2017, "Rethinking Atrous
Convolution": ASPP = 1x1 conv, three 3x3 atrous convs, image pooling; concat, 1x1 projection.

MODEL forms: the built-in ``deeplabv3_mobilenetv2`` and ``deeplabv3:BACKBONE`` /
``deeplabv3-os8:BACKBONE`` for any timm backbone (see :func:`parse_deeplab_spec`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelNotFoundError
from .registry import register_model

__all__ = ["ASPP", "DeepLabV3", "deeplabv3", "parse_deeplab_spec", "deeplab_spec_name", "DEEPLAB_DEFAULTS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ATROUS_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
CAMVID_CLASSES = 11
CAMVID_SIZE = (3, 180, 240)  # CamVid at 240x180 (W x H)
# defaults of deeplabv3:BACKBONE, those of the built-in: CamVid at 240x180, ImageNet statistics
DEEPLAB_DEFAULTS = {"input_size": CAMVID_SIZE, "num_classes": CAMVID_CLASSES, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def _conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))  # fmt: skip


class ASPPPooling(nn.Module):
    """Image-level features: global average pool -> 1x1 conv -> BN -> ReLU -> upsample back."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = _conv_bn_relu(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.proj(self.pool(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: five parallel branches, concatenated and projected."""

    def __init__(self, cin: int, rates: tuple[int, int, int], cout: int = 256, dropout: float = 0.1):
        super().__init__()
        branches = [_conv_bn_relu(cin, cout)] + [_conv_bn_relu(cin, cout, 3, r) for r in rates]
        self.branches = nn.ModuleList([*branches, ASPPPooling(cin, cout)])
        self.project = nn.Sequential(*_conv_bn_relu(5 * cout, cout), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLabV3(nn.Module):
    """backbone (last feature map) -> ASPP (with dropout) -> 1x1 classifier -> bilinear to the input size."""

    def __init__(self, backbone: nn.Module, channels: int, num_classes: int, output_stride: int = 16,
                 head_channels: int = 256):  # fmt: skip
        super().__init__()
        if output_stride not in ATROUS_RATES:
            raise ModelNotFoundError(f"DeepLabV3 output stride must be 8 or 16, got {output_stride}")
        self.backbone = backbone
        self.aspp = ASPP(channels, ATROUS_RATES[output_stride], head_channels)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)[-1]
        logits = self.classifier(self.aspp(features))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def deeplabv3(backbone: str = "mobilenetv2_100", num_classes: int = CAMVID_CLASSES, output_stride: int = 16,
              pretrained_backbone: bool = False, head_channels: int = 256) -> DeepLabV3:  # fmt: skip
    """DeepLabV3 on timm's ``backbone`` (``features_only``, last stage, dilated to ``output_stride``).

    ``pretrained_backbone`` loads timm's ImageNet weights for the backbone (timm's download and
    cache, through the same offline-aware path as ``timm:NAME --pretrained``); the head is random.
    """
    from ..compat import import_timm

    timm = import_timm()
    if not timm.is_model(backbone):
        from .registry import close_matches

        hint = close_matches(backbone, timm.list_models())
        more = f"; did you mean {', '.join(hint)}?" if hint else ""
        raise ModelNotFoundError(f"unknown timm backbone {backbone!r} for DeepLabV3{more}")
    if output_stride not in ATROUS_RATES:
        raise ModelNotFoundError(f"DeepLabV3 output stride must be 8 or 16, got {output_stride}")
    kwargs = dict(features_only=True, out_indices=(-1,), output_stride=output_stride)
    if pretrained_backbone:
        from .timm_weights import timm_pretrained

        body = timm_pretrained(timm, backbone, kwargs)
    else:
        try:
            body = timm.create_model(backbone, pretrained=False, **kwargs)
        except (TypeError, RuntimeError, ValueError, AssertionError) as e:
            raise ModelNotFoundError(f"timm model {backbone!r} cannot serve as a DeepLabV3 backbone "
                                     f"(features_only, output_stride={output_stride}): {e}") from None  # fmt: skip
    channels = body.feature_info.channels()[-1]
    return DeepLabV3(body, channels, num_classes, output_stride, head_channels)


@register_model(
    "deeplabv3_mobilenetv2",
    input_size=CAMVID_SIZE,
    num_classes=CAMVID_CLASSES,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    description="DeepLabV3 (ASPP) on timm mobilenetv2_100, output stride 16, CamVid 11 classes at 240x180",
)
def deeplabv3_mobilenetv2(num_classes: int = CAMVID_CLASSES, pretrained_backbone: bool = False) -> nn.Module:
    return deeplabv3("mobilenetv2_100", num_classes, 16, pretrained_backbone)


_PREFIXES = {"deeplabv3": 16, "deeplabv3-os16": 16, "deeplabv3-os8": 8}


def parse_deeplab_spec(model: str) -> tuple[str, int] | None:
    """``deeplabv3:BACKBONE`` (OS 16) / ``deeplabv3-os8:BACKBONE`` -> (backbone, output stride); else None."""
    prefix, sep, backbone = model.partition(":")
    if not sep or prefix not in _PREFIXES:
        return None
    if not backbone:
        raise ModelNotFoundError(f"{model}: name a timm backbone, e.g. {prefix}:resnet18")
    return backbone.removeprefix("timm:"), _PREFIXES[prefix]


def deeplab_spec_name(backbone: str, output_stride: int) -> str:
    """The MODEL string that rebuilds a ``deeplabv3:`` model (stored in plans via ModelSpec.display)."""
    return f"deeplabv3:{backbone}" if output_stride == 16 else f"deeplabv3-os{output_stride}:{backbone}"
