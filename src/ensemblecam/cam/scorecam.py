"""Score-CAM weights with batched masked forward passes.

Convention (same as torchcam 0.5's ``ScoreCAM``, so results agree with it):

- masks: ``M_k = minmax(A^k)`` per channel at the target layer's resolution, THEN
  (bi/tri)linear upsampling to the input size (min-max precedes upsampling); a constant
  ``A^k`` gives ``M_k = 0``;
- score: ``score_k = S(x * M_k)``, the target class's LOGIT (not its probability) on the
  masked input (torchcam subtracts the unmasked logit first; that constant cancels in the
  softmax);
- ``w = softmax_k(score_k)``; map ``relu(sum_k w_k A^k)`` with the raw activations.

Speed without approximation: masked inputs of all images and channels of a batch are
forwarded together in chunks under ``torch.inference_mode``; channels with identical
masks within an image share one forward pass, and every zero mask (constant channel)
shares one pass of an all-zero input (``x * 0``), so skipping them leaves the result
unchanged. ``top_k`` is an explicit approximation: only the k channels with the highest
activation energy ``sum_ij (A^k_ij)^2`` enter the softmax; the others get weight 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ensemblecam.cam.methods import interp_mode, spatial_dims


@dataclass
class ScoreStats:
    """How many masked forward passes Score-CAM ran vs. the naive count (B * K)."""

    passes: int = 0
    naive: int = 0


def channel_masks(acts: Tensor) -> Tensor:
    """Per-channel min-max of (B, K, *S) activations; constant channels give zeros."""
    flat = acts.flatten(2)
    lo = flat.amin(-1, keepdim=True)
    rng = flat.amax(-1, keepdim=True) - lo
    const = rng == 0
    out = (flat - lo) / torch.where(const, torch.ones_like(rng), rng)
    return torch.where(const, torch.zeros_like(out), out).reshape(acts.shape)


@torch.inference_mode()
def scorecam_weights(
    forward: Callable[[Tensor], Tensor],
    x: Tensor,
    acts: Tensor,
    target: Tensor,
    batch_size: int = 256,
    top_k: int | None = None,
    stats: ScoreStats | None = None,
) -> Tensor:
    """Score-CAM channel weights (B, K) for inputs ``x`` (B, C, *size) and activations ``acts``.

    ``forward`` maps a batch of inputs to logits; ``target`` (B,) holds each image's class.
    """
    b, k = acts.shape[:2]
    size = tuple(x.shape[2:])
    mode = interp_mode(len(size))
    masks = channel_masks(acts.float())  # (B, K, *S)
    flat = masks.flatten(2)
    keep = torch.ones(b, k, dtype=torch.bool, device=acts.device)
    if top_k is not None and top_k < k:
        energy = acts.float().pow(2).sum(dim=spatial_dims(acts))
        keep = torch.zeros_like(keep)
        keep.scatter_(1, energy.topk(top_k, dim=1).indices, True)
    zero = (flat == 0).all(-1)
    scores = torch.full((b, k), float("-inf"), device=acts.device)

    # every zero mask gives the input x * 0 = 0: one pass serves all images
    if bool((zero & keep).any()):
        logits0 = forward(torch.zeros_like(x[:1]))[0]
        s0 = logits0[target]
        scores = torch.where(zero & keep, s0[:, None].expand(b, k), scores)
        if stats is not None:
            stats.passes += 1

    # unique non-zero masks per image
    owners: list[Tensor] = []
    uniq_masks: list[Tensor] = []
    scatter: list[tuple[int, Tensor, Tensor]] = []  # (image, channel ids, row in uniq list)
    offset = 0
    for i in range(b):
        ch = torch.nonzero(keep[i] & ~zero[i]).flatten()
        if ch.numel() == 0:
            continue
        uniq, inverse = torch.unique(flat[i, ch], dim=0, return_inverse=True)
        uniq_masks.append(uniq)
        owners.append(torch.full((uniq.shape[0],), i, dtype=torch.long, device=acts.device))
        scatter.append((i, ch, inverse + offset))
        offset += uniq.shape[0]
    if stats is not None:
        stats.passes += offset
        stats.naive += b * k
    if offset:
        all_masks = torch.cat(uniq_masks).reshape(offset, 1, *acts.shape[2:])
        owner = torch.cat(owners)
        out = torch.empty(offset, device=acts.device)
        step = -(-offset // -(-offset // batch_size))  # equal chunks of at most batch_size
        for start in range(0, offset, step):
            sl = slice(start, min(start + step, offset))
            up = F.interpolate(all_masks[sl], size=size, mode=mode, align_corners=False)
            logits = forward(x[owner[sl]] * up.to(x.dtype))
            out[sl] = logits.float().gather(1, target[owner[sl]][:, None]).squeeze(1)
        for i, ch, rows in scatter:
            scores[i, ch] = out[rows]
    return torch.softmax(scores, dim=1)
