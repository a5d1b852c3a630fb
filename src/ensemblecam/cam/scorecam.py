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

Mixed precision (``coarse`` forward, e.g. a bfloat16 copy of the network): every masked
input is scored by the coarse network first; then, in rounds, the channels with the
largest influence on the map are re-scored by ``forward`` (float32) until the estimated
error of the normalised map is at most ``tol``. The estimate is first order in the score
errors ``d_k`` (coarse - float32) of the channels left coarse: with ``u = sum_k w_k A^k``,
``du/ds_k = w_k (A^k - u)``; the ``d_k`` observed on re-scored channels give their mean
(subtracted from the coarse scores: a shift common to all channels cancels in the
softmax) and standard deviation ``sigma``; the estimate is
``2 z sigma max_p sqrt(sum_k (w_k (A^k_p - u_p))^2) / max_p relu(u_p)`` with ``z = 4``
(the 2 covers the min-max). It is an estimate, not a bound: on trained ResNets the
measured errors were 5-20x below it; the re-scored channels always keep float32 scores.
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
    """Masked forward passes Score-CAM ran (``passes``: float32, ``coarse``: through the
    coarse network) vs. the naive count (B * K)."""

    passes: int = 0
    coarse: int = 0
    naive: int = 0


def channel_masks(acts: Tensor) -> Tensor:
    """Per-channel min-max of (B, K, *S) activations; constant channels give zeros."""
    flat = acts.flatten(2)
    lo = flat.amin(-1, keepdim=True)
    rng = flat.amax(-1, keepdim=True) - lo
    const = rng == 0
    out = (flat - lo) / torch.where(const, torch.ones_like(rng), rng)
    return torch.where(const, torch.zeros_like(out), out).reshape(acts.shape)


#: Standard deviations of the score error covered by the mixed-precision error estimate.
TOL_Z = 4.0
#: Channels per image re-scored in float32 to estimate the coarse scores' error.
FIRST_ROUND = 16


def _masked_logits(
    forward: Callable[[Tensor], Tensor],
    x: Tensor,
    masks: Tensor,
    owner: Tensor,
    target: Tensor,
    batch_size: int,
) -> Tensor:
    """Target logits of ``x[owner[r]] * upsample(masks[r])`` for each row r of ``masks``
    (R, 1, *S), in equal chunks of at most ``batch_size``."""
    n = masks.shape[0]
    out = torch.empty(n, device=x.device)
    if n == 0:
        return out
    size = tuple(x.shape[2:])
    mode = interp_mode(len(size))
    step = -(-n // -(-n // batch_size))  # equal chunks of at most batch_size
    for start in range(0, n, step):
        sl = slice(start, min(start + step, n))
        up = F.interpolate(masks[sl], size=size, mode=mode, align_corners=False)
        logits = forward(x[owner[sl]] * up.to(x.dtype))
        out[sl] = logits.float().gather(1, target[owner[sl]][:, None]).squeeze(1)
    return out


def score_error_sigma(errors: Tensor) -> Tensor:
    """Per-image standard deviation (B,) of the observed score errors (B, K; NaN = not
    observed), with Bessel's correction; infinite with fewer than two observations."""
    n = (~errors.isnan()).sum(1)
    var = torch.nanmean((errors - torch.nanmean(errors, 1, keepdim=True)) ** 2, 1)
    return torch.where(n > 1, torch.sqrt(var * n / (n - 1).clamp_min(1)), torch.inf)


def map_error_profile(scores: Tensor, loose: Tensor, acts: Tensor) -> tuple[Tensor, Tensor]:
    """Channels in order of influence and the map-error factor left after re-scoring them.

    With ``J_k = w_k (A^k - u)`` (``w = softmax(scores)``, ``u = sum_k w_k A^k``) over the
    ``loose`` channels (B, K), returns ``order`` (B, K), the loose channels first by
    ``max_p |J_k(p)|``, and ``left`` (B, K + 1): ``left[:, m] = 2 z max_p sqrt(sum_k
    J_k(p)^2) / max_p relu(u_p)`` over the loose channels after the first ``m`` of
    ``order``. The estimated map error is ``sigma * left``.
    """
    a = acts.float().flatten(2)
    w = torch.softmax(scores, dim=1)
    u = (w[..., None] * a).sum(1, keepdim=True)  # (B, 1, P)
    jac = torch.where(loose[..., None], w[..., None] * (a - u), 0.0)
    influence = torch.where(loose, jac.abs().amax(2), -1.0)
    order = influence.argsort(dim=1, descending=True)
    sq = jac.pow(2).gather(1, order[..., None].expand_as(jac))
    after = sq.flip(1).cumsum(1).flip(1)  # after[:, m] = sum over order[m:]
    after = torch.cat([after, torch.zeros_like(after[:, :1])], dim=1)
    top = u.squeeze(1).clamp_min(0).amax(1)
    scale = 2 * TOL_Z / torch.where(top > 0, top, 1.0)
    return order, after.amax(2).sqrt() * scale[:, None]


@torch.inference_mode()
def scorecam_weights(
    forward: Callable[[Tensor], Tensor],
    x: Tensor,
    acts: Tensor,
    target: Tensor,
    batch_size: int = 256,
    top_k: int | None = None,
    stats: ScoreStats | None = None,
    coarse: Callable[[Tensor], Tensor] | None = None,
    tol: float = 1e-3,
) -> Tensor:
    """Score-CAM channel weights (B, K) for inputs ``x`` (B, C, *size) and activations ``acts``.

    ``forward`` maps a batch of inputs to logits; ``target`` (B,) holds each image's class.
    ``coarse``: a faster, less precise forward that scores every masked input first;
    channels are then re-scored by ``forward`` until the estimated map error is <= ``tol``.

    ``w = softmax_k(S(x * M_k))`` with ``M_k = upsample(minmax(A^k))`` (module docstring).
    Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural
    Networks", CVPR Workshops 2020.
    """
    stats = stats if stats is not None else ScoreStats()
    b, k = acts.shape[:2]
    dev = acts.device
    masks = channel_masks(acts.float())  # (B, K, *S)
    flat = masks.flatten(2)
    keep = torch.ones(b, k, dtype=torch.bool, device=dev)
    if top_k is not None and top_k < k:
        energy = acts.float().pow(2).sum(dim=spatial_dims(acts))
        keep = torch.zeros_like(keep)
        keep.scatter_(1, energy.topk(top_k, dim=1).indices, True)
    zero = (flat == 0).all(-1)
    scores = torch.full((b, k), float("-inf"), device=dev)
    stats.naive += b * k

    # every zero mask gives the input x * 0 = 0: one pass serves all images
    if bool((zero & keep).any()):
        s0 = forward(torch.zeros_like(x[:1]))[0].float()[target]
        scores = torch.where(zero & keep, s0[:, None].expand(b, k), scores)
        stats.passes += 1

    # unique non-zero masks per image; row_of[i, c]: row of channel c's mask (-1: none)
    row_of = torch.full((b, k), -1, dtype=torch.long, device=dev)
    uniq_masks: list[Tensor] = []
    owners: list[Tensor] = []
    n_rows = 0
    for i in range(b):
        ch = torch.nonzero(keep[i] & ~zero[i]).flatten()
        if ch.numel():
            uniq, inverse = torch.unique(flat[i, ch], dim=0, return_inverse=True)
            row_of[i, ch] = inverse + n_rows
            n_rows += len(uniq)
            uniq_masks.append(uniq)
            owners.append(torch.full((uniq.shape[0],), i, dtype=torch.long, device=dev))
    if not uniq_masks:
        return torch.softmax(scores, dim=1)
    all_masks = torch.cat(uniq_masks).reshape(-1, 1, *acts.shape[2:])
    owner = torch.cat(owners)
    rows = torch.arange(len(owner), device=dev)
    has_row, row = row_of >= 0, row_of.clamp_min(0)

    def logits(sel: Tensor, fwd: Callable[[Tensor], Tensor]) -> Tensor:
        return _masked_logits(fwd, x, all_masks[sel], owner[sel], target, batch_size)

    if coarse is None:
        stats.passes += len(rows)
        return torch.softmax(torch.where(has_row, logits(rows, forward)[row], scores), dim=1)

    # mixed precision: coarse scores for all rows, float32 for the most influential ones
    stats.coarse += len(rows)
    rough = torch.where(has_row, logits(rows, coarse)[row], scores)
    if tol == float("inf"):
        return torch.softmax(rough, dim=1)
    exact = torch.full((len(rows),), float("nan"), device=dev)
    while True:
        fine = exact[row].isfinite() & has_row
        errors = torch.where(fine, rough - exact[row], torch.nan)
        bias = torch.nan_to_num(torch.nanmean(errors, 1, keepdim=True))
        current = torch.where(fine, exact[row], torch.where(has_row, rough - bias, scores))
        loose = has_row & ~fine
        order, left = map_error_profile(current, loose, acts)
        sigma = score_error_sigma(errors)
        # fewest channels (in order of influence) whose re-scoring meets tol; a first
        # round of FIRST_ROUND channels when too few errors are observed to know sigma
        ok = sigma.isfinite()[:, None] & (sigma[:, None] * left <= tol)
        ok[:, -1] = True
        count = torch.where(sigma.isfinite(), ok.int().argmax(1), FIRST_ROUND)
        count = torch.minimum(count, loose.sum(1))
        if not bool(count.any()):
            return torch.softmax(current, dim=1)
        pos = torch.arange(k, device=dev)[None]
        picked = order[pos < count[:, None]]
        owners_of = torch.arange(b, device=dev)[:, None].expand(b, k)[pos < count[:, None]]
        chosen = row_of[owners_of, picked].unique()
        stats.passes += len(chosen)
        exact[chosen] = logits(chosen, forward)
