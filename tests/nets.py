"""Tiny random networks shared by the CAM tests."""

from __future__ import annotations

import torch
from monai.networks.nets import resnet10
from torch import nn


def small_resnet(widen_factor: float = 0.25, spatial_dims: int = 2) -> nn.Module:
    """MONAI ResNet-10, 1 input channel, 2 classes, seeded (torch.manual_seed(0)), eval mode."""
    torch.manual_seed(0)
    return resnet10(
        spatial_dims=spatial_dims, n_input_channels=1, num_classes=2, widen_factor=widen_factor
    ).eval()
