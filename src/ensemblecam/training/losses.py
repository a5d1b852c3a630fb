"""Segmentation losses with an ignore class (pseudo-labels of :mod:`ensemblecam.refine`).

``masked_dice_ce(logits, target)``: logits (B, K, *S) with K = 2 classes (softmax) or
K = 1 (sigmoid), target (B, *S) integer in {0, 1} or ``ignore_index`` (255). With the
valid mask v = (target != ignore_index):

- CE = sum_{i: v_i} -log p_i[y_i] / sum_i v_i (0 when no pixel is valid); for K = 1,
  binary cross-entropy with logits on the same pixels;
- Dice (MONAI ``MaskedDiceLoss``, batch=True, all classes, smooth 1e-5): per class c,
  1 - (2 sum v p_c g_c + 1e-5) / (sum v p_c + sum v g_c + 1e-5), mean over classes;
- loss = lambda_dice * Dice + lambda_ce * CE.

Predictions at ignored pixels change neither the loss nor its gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ensemblecam.errors import InputError

IGNORE_INDEX = 255


def masked_dice_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
) -> torch.Tensor:
    """Dice + cross-entropy over the non-ignored pixels only (module docstring)."""
    from monai.losses import MaskedDiceLoss

    if logits.ndim < 3 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise InputError(
            f"loss: logits {tuple(logits.shape)} and target {tuple(target.shape)}:"
            " expected (B, K, *S) and (B, *S)"
        )
    k = logits.shape[1]
    if k not in (1, 2):
        raise InputError(f"loss: {k} output channels: expected 1 (sigmoid) or 2 (softmax)")
    target = target.long()
    valid = target != ignore_index
    bad = valid & (target != 0) & (target != 1)
    if bool(bad.any()):
        raise InputError(
            f"loss: target values {torch.unique(target[bad]).tolist()}: expected "
            f"0, 1 or {ignore_index}"
        )
    y = torch.where(valid, target, torch.zeros_like(target))
    n_valid = valid.sum()
    if k == 2:
        ce_map = F.cross_entropy(logits, y, reduction="none")
    else:
        ce_map = F.binary_cross_entropy_with_logits(
            logits[:, 0], y.to(logits.dtype), reduction="none"
        )
    ce = (ce_map * valid).sum() / n_valid.clamp(min=1)
    # one-hot here (not inside MONAI) so that ignored pixels are zero in every class channel
    vmask = valid.unsqueeze(1).to(logits.dtype)
    if k == 2:
        onehot = F.one_hot(y, 2).movedim(-1, 1).to(logits.dtype)
    else:
        onehot = y.unsqueeze(1).to(logits.dtype)
    dice_fn = MaskedDiceLoss(softmax=k == 2, sigmoid=k == 1, batch=True)
    dice = dice_fn(logits, onehot, vmask)
    return lambda_dice * dice + lambda_ce * ce


class MaskedDiceCELoss(nn.Module):
    """Module form of :func:`masked_dice_ce` (``criterion(logits, target)``)."""

    def __init__(
        self, ignore_index: int = IGNORE_INDEX, lambda_dice: float = 1.0, lambda_ce: float = 1.0
    ) -> None:
        super().__init__()
        self.ignore_index, self.lambda_dice, self.lambda_ce = ignore_index, lambda_dice, lambda_ce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return masked_dice_ce(logits, target, self.ignore_index, self.lambda_dice, self.lambda_ce)


def mil_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    top_fraction: float = 0.01,
    bottom_fraction: float = 0.0,
    negative_top: bool = False,
) -> torch.Tensor:
    """Multiple-instance loss of pixel logits from image-level labels.

    ``logits`` (B, K, *S): K = 2 (lesion logit d = z_1 - z_0) or K = 1 (d = z_0);
    ``labels`` (B,) in {0, 1}. Per image, with n pixels and BCE(x, y) the binary
    cross-entropy with logits:

    - label 0: mean over all pixels of BCE(d, 0) (every pixel of a lesion-free image is
      background), plus, with ``negative_top``, BCE(t, 0) (the symmetric MIL term: a small
      lesion-like region, such as a kidney on a slice without tumour, otherwise costs only
      its share of the pixel mean, and the localiser may learn the organ, not the lesion);
    - label 1: BCE(t, 1) (some pixels are lesion), plus, if ``bottom_fraction`` > 0, the
      mean of BCE(d, 0) over the ceil(bottom_fraction n) smallest d (the lesion covers less
      than that share);

    where t is the mean of the k = ceil(top_fraction n) largest d.

    Returns the mean over images.
    """
    if logits.ndim < 3 or labels.shape != (logits.shape[0],):
        raise InputError(
            f"mil loss: logits {tuple(logits.shape)} and labels "
            f"{tuple(labels.shape)}: expected (B, K, *S) and (B,)"
        )
    if not 0.0 < top_fraction <= 1.0 or not 0.0 <= bottom_fraction < 1.0:
        raise InputError(
            f"mil loss: top_fraction {top_fraction} / bottom_fraction "
            f"{bottom_fraction}: expected (0, 1] / [0, 1)"
        )
    d = (logits[:, 1] - logits[:, 0]) if logits.shape[1] == 2 else logits[:, 0]
    d = d.reshape(len(d), -1)
    n = d.shape[1]
    y = labels.to(d.dtype)
    neg = F.binary_cross_entropy_with_logits(d, torch.zeros_like(d), reduction="none").mean(1)
    k = max(1, int(-(-top_fraction * n // 1)))
    top = d.topk(k, dim=1).values.mean(1)
    pos = F.binary_cross_entropy_with_logits(top, torch.ones_like(top), reduction="none")
    if negative_top:
        neg = neg + F.binary_cross_entropy_with_logits(top, torch.zeros_like(top), reduction="none")
    if bottom_fraction > 0:
        kb = max(1, int(-(-bottom_fraction * n // 1)))
        low = -(-d).topk(kb, dim=1).values
        pos = pos + F.binary_cross_entropy_with_logits(
            low, torch.zeros_like(low), reduction="none"
        ).mean(1)
    return torch.where(y > 0, pos, neg).mean()
