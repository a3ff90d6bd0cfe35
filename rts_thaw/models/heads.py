"""Box and mask heads of the RoI stage, sized by config (light for CPU, detectron2 scale for GPU),
and the RPN's head."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.rpn import RPNHead


class Float32RPNHead(RPNHead):
    """torchvision's RPN head with float32 outputs under bfloat16 autocast. The RPN decodes its
    proposals in the deltas' dtype, so bfloat16 deltas would put every proposal on a 1-2 px grid
    at tile coordinates of 128-512. Same parameters (and checkpoint keys) as RPNHead."""

    def forward(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class BoxHead(nn.Module):
    """Pooled RoI features -> one feature vector per box (`num_conv` 3x3 convs, then `num_fc` fc layers)."""

    def __init__(self, in_channels: int, pool_size: int, num_conv: int = 0, conv_dim: int = 256,
                 num_fc: int = 2, fc_dim: int = 1024):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(num_conv):
            # Normalised convs, as detectron2's cascade heads; group norm works at any RoI batch size.
            groups = 32 if conv_dim % 32 == 0 else 1
            layers += [nn.Conv2d(channels, conv_dim, 3, padding=1, bias=False), nn.GroupNorm(groups, conv_dim),
                       nn.ReLU(inplace=True)]
            channels = conv_dim
        layers.append(nn.Flatten())
        width = channels * pool_size * pool_size
        for _ in range(num_fc):
            layers += [nn.Linear(width, fc_dim), nn.ReLU(inplace=True)]
            width = fc_dim
        self.layers = nn.Sequential(*layers)
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class BoxPredictor(nn.Module):
    """Class scores and one class-agnostic box delta per box (cascade stages share a box across classes).

    Both in float32 even under bfloat16 autocast: boxes decoded from bfloat16 deltas land on a
    grid of 1-2 px at tile coordinates of 128-512 (8 bits of mantissa)."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_dim, num_classes)
        self.bbox_pred = nn.Linear(in_dim, 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls_score(x).float(), self.bbox_pred(x).float()


class MaskHead(nn.Module):
    """Pooled RoI features -> per-class mask logits at twice the pooled size, in float32 even under
    bfloat16 autocast, so that the detector's masks (and its evaluation) are float32 like its boxes."""

    def __init__(self, in_channels: int, num_classes: int, num_conv: int = 4, conv_dim: int = 256):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(num_conv):
            layers += [nn.Conv2d(channels, conv_dim, 3, padding=1), nn.ReLU(inplace=True)]
            channels = conv_dim
        layers += [nn.ConvTranspose2d(channels, conv_dim, 2, stride=2), nn.ReLU(inplace=True),
                   nn.Conv2d(conv_dim, num_classes, 1)]
        self.layers = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # Small logits at the start keep the first mask losses near log(2) whatever the
        # feature scale (a from-scratch ResNet's features are several times MViTv2's).
        nn.init.normal_(self.layers[-1].weight, std=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).float()
