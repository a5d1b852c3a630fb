"""Segmentation networks: MONAI's 2-D U-Net for slices of any size, and its checkpoints.

A U-Net maps a (B, C, H, W) float batch to (B, K, H, W) logits; the predicted lesion is
the argmax of K = 2 softmax channels, or sigmoid > 0.5 of K = 1 channel
(:func:`logits_to_mask`). Checkpoints are the classifiers' format
(:func:`ensemblecam.models.save_checkpoint`) with ``info["model"] == "unet"`` and
``info["model_args"]`` the arguments of :func:`build_unet`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ensemblecam.errors import InputError
from ensemblecam.models.checkpoints import read_checkpoint

if TYPE_CHECKING:
    from ensemblecam.config import MilConfig, UNetConfig

#: ``info["model"]`` of a U-Net checkpoint
UNET = "unet"


class UNet2D(nn.Module):
    """MONAI 2-D U-Net; input zero-padded to a multiple of prod(strides), output cropped back."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int = 2,
        channels: tuple[int, ...] | list[int] = (16, 32, 64, 128),
        strides: tuple[int, ...] | list[int] = (2, 2, 2),
        num_res_units: int = 2,
        norm: str = "instance",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        from monai.networks.nets import UNet

        if len(strides) != len(channels) - 1:
            raise InputError(
                f"unet: {len(channels)} channel levels need {len(channels) - 1} strides, "
                f"got {len(strides)}"
            )
        self.multiple = int(np.prod(strides))
        self.net = UNet(
            spatial_dims=2, in_channels=in_channels, out_channels=num_classes,
            channels=tuple(channels), strides=tuple(strides), num_res_units=num_res_units,
            norm=norm, dropout=dropout,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        if ph or pw:
            x = nn.functional.pad(x, (0, pw, 0, ph))
        return self.net(x)[..., :h, :w]


def build_unet(in_channels: int, num_classes: int = 2, **kwargs: Any) -> nn.Module:
    """A fresh :class:`UNet2D` (same signature as a models.build_model builder)."""
    try:
        return UNet2D(in_channels, num_classes, **kwargs)
    except TypeError as exc:
        raise InputError(f"unet: bad model arguments {kwargs} ({exc})") from exc


def model_args(cfg: UNetConfig | MilConfig, in_channels: int) -> dict[str, Any]:
    """The keyword arguments of :func:`build_unet` for ``cfg`` (stored in checkpoints); a
    MIL localiser has 2 output channels (lesion logit d = z_1 - z_0), a denoising
    autoencoder (``objective: denoise``) one per input channel (the clean slice)."""
    outputs = getattr(cfg, "out_channels", 2)
    if getattr(cfg, "objective", "mil") == "denoise":
        outputs = in_channels
    return {
        "in_channels": in_channels, "num_classes": outputs,
        "channels": list(cfg.channels), "strides": list(cfg.strides),
        "num_res_units": cfg.num_res_units, "norm": cfg.norm, "dropout": cfg.dropout,
    }  # fmt: skip


def load_unet(checkpoint: str | Path, map_location: Any = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a U-Net checkpoint; (model in eval mode, info)."""
    checkpoint = Path(checkpoint)
    obj = read_checkpoint(checkpoint, map_location)
    info = obj["info"]
    if info.get("model") != UNET or not isinstance(info.get("model_args"), dict):
        raise InputError(f"{checkpoint}: not a U-Net checkpoint (model {info.get('model')!r})")
    model = build_unet(**info["model_args"])
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as exc:
        detail = " ".join(str(exc).strip().splitlines()[:2])[:300]
        raise InputError(f"{checkpoint}: weights do not fit the U-Net ({detail})") from exc
    return model.eval(), info


def logits_to_mask(logits: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) logits -> (B, H, W) bool lesion mask: argmax (K=2) or sigmoid > 0.5 (K=1)."""
    if logits.shape[1] == 1:
        return logits[:, 0] > 0  # sigmoid(z) > 0.5  <=>  z > 0
    return logits.argmax(dim=1) == 1
