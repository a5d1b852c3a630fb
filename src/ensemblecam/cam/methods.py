"""CAM weights and post-processing as plain functions on tensors (N-D: 2-D and 3-D alike).

Notation: ``A`` activations at the target layer, shape
(B, K, *S); ``g = dS/dA`` gradients of the target-class logit S, same shape; sums run
over every spatial dimension of ``S``. Each ``*_weights`` function returns either
per-channel weights (B, K) or element-wise weights (B, K, *S); :func:`combine` turns
them into a map ``relu(sum_k w_k A^k)`` of shape (B, *S).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: Methods that need the gradient of the target score at the target layer.
GRADIENT_METHODS: tuple[str, ...] = (
    "gradcam",
    "gradcampp",
    "smoothgradcampp",
    "xgradcam",
    "layercam",
)
#: Every method name, in a fixed order.
METHODS: tuple[str, ...] = ("cam", *GRADIENT_METHODS, "scorecam")

#: A low-resolution map whose range is at most this fraction of its largest magnitude is
#: treated as constant (float rounding of a constant map must not be stretched to [0, 1]).
CONSTANT_RTOL = 1e-6


def spatial_dims(t: Tensor) -> tuple[int, ...]:
    """Spatial dimensions of a (B, K, *S) tensor: ``(2, ..., ndim - 1)``."""
    return tuple(range(2, t.ndim))


def _expand(w: Tensor, like: Tensor) -> Tensor:
    return w.reshape(*w.shape, *([1] * (like.ndim - w.ndim)))


def cam_weights(fc_weight: Tensor, target: Tensor) -> Tensor:
    """CAM: ``w_k = W[c, k]``, the final linear layer's row of each image's target class c.

    Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016.
    """
    return fc_weight[target]


def gradcam_weights(acts: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM: ``w_k = mean_ij g^k_ij``.

    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017.
    """
    return grads.mean(dim=spatial_dims(grads))


def gradcampp_weights(acts: Tensor, g2: Tensor, g3: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM++ from (averaged) ``g^2``, ``g^3`` and ``g``.

    ``alpha^k_ij = g2^k_ij / (2 g2^k_ij + (sum_ab A^k_ab) g3^k_ij)`` (0 where the
    denominator is 0), ``w_k = sum_ij alpha^k_ij relu(g^k_ij)``. With ``g2 = g^2`` and
    ``g3 = g^3`` of one pass this is Grad-CAM++; with their means over noisy inputs it is
    Smooth Grad-CAM++. The paper's ``exp(S)`` factor is a positive per-image scale that
    cancels under min-max normalisation and is omitted.

    Chattopadhay et al., "Grad-CAM++: Generalized Gradient-based Visual Explanations for
    Deep Convolutional Networks", WACV 2018; Omeiza et al., "Smooth Grad-CAM++: An Enhanced
    Inference Level Visualization Technique for Deep Convolutional Neural Network Models",
    arXiv:1908.01224, 2019.
    """
    dims = spatial_dims(acts)
    denom = 2.0 * g2 + acts.sum(dim=dims, keepdim=True) * g3
    nonzero = denom != 0
    alpha = torch.where(nonzero, g2 / torch.where(nonzero, denom, torch.ones_like(denom)), 0.0)
    return (alpha * torch.relu(g)).sum(dim=dims)


def xgradcam_weights(acts: Tensor, grads: Tensor) -> Tensor:
    """XGrad-CAM: ``w_k = sum_ij (A^k_ij / sum_ab A^k_ab) g^k_ij`` (0 where sum_ab A^k_ab = 0).

    Fu et al., "Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of
    CNNs", BMVC 2020.
    """
    dims = spatial_dims(acts)
    num = (acts * grads).sum(dim=dims)
    den = acts.sum(dim=dims)
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), 0.0)


def layercam_weights(acts: Tensor, grads: Tensor) -> Tensor:
    """LayerCAM: element-wise weights ``relu(g^k_ij)``; map ``relu(sum_k relu(g^k) * A^k)``.

    Jiang et al., "LayerCAM: Exploring Hierarchical Class Activation Maps for
    Localization", IEEE Transactions on Image Processing 30, 2021.
    """
    return torch.relu(grads)


def combine(acts: Tensor, weights: Tensor) -> Tensor:
    """``relu(sum_k w_k A^k)``: activations (B, K, *S), weights (B, K) or (B, K, *S) -> (B, *S)."""
    return torch.relu((_expand(weights, acts) * acts).sum(dim=1))


def is_constant(maps: Tensor, start_dim: int = 1) -> Tensor:
    """True per map (dims ``start_dim..`` reduced) whose values are all equal up to rounding.

    Constant means ``max - min <= CONSTANT_RTOL * max(|max|, |min|)``.
    """
    flat = maps.flatten(start_dim)
    hi, lo = flat.amax(-1), flat.amin(-1)
    return (hi - lo) <= CONSTANT_RTOL * torch.maximum(hi.abs(), lo.abs())


def minmax(maps: Tensor, start_dim: int = 1) -> Tensor:
    """Per-map min-max to [0, 1] over dims ``start_dim..``; a constant map gives zeros, never NaN.

    ``(m - min m) / (max m - min m)``, exact division (no epsilon).
    """
    flat = maps.flatten(start_dim)
    lo = flat.amin(-1)
    rng = flat.amax(-1) - lo
    const = is_constant(maps, start_dim)
    shape = (*rng.shape, *([1] * (maps.ndim - start_dim)))
    safe = torch.where(const, torch.ones_like(rng), rng).reshape(shape)
    out = (maps - lo.reshape(shape)) / safe
    return torch.where(const.reshape(shape), torch.zeros_like(out), out)


def interp_mode(n_spatial: int) -> str:
    """Interpolation mode for ``n_spatial`` spatial dims: linear / bilinear / trilinear."""
    modes = {1: "linear", 2: "bilinear", 3: "trilinear"}
    if n_spatial not in modes:
        raise ValueError(f"maps with {n_spatial} spatial dimensions are not supported")
    return modes[n_spatial]


def upsample(maps: Tensor, size: tuple[int, ...]) -> Tensor:
    """(B, *S) maps -> (B, *size), (bi/tri)linear interpolation with ``align_corners=False``."""
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    mode = interp_mode(len(size))
    return F.interpolate(maps.unsqueeze(1), size=size, mode=mode, align_corners=False).squeeze(1)


def postprocess(maps: Tensor, size: tuple[int, ...], normalise: bool = True) -> Tensor:
    """Target-layer maps (B, *S), already ReLU'd -> upsampled to ``size`` -> per-image min-max.

    A map that is constant at the target layer stays all zeros after normalisation.
    """
    up = upsample(maps, size)
    if not normalise:
        return up
    out = minmax(up)
    const = is_constant(maps)
    return torch.where(const.reshape(-1, *([1] * len(size))), torch.zeros_like(out), out)


def fuse(
    layer_maps: Sequence[Tensor], size: tuple[int, ...], views: int = 1, normalise: bool = True
) -> Tensor:
    """Maps of several target layers and/or flip views -> one map per image (B, *size).

    ``layer_maps[l]`` is layer l's ReLU'd map, shape (V B, *S_l): V = ``views`` stacked
    copies of the batch, view 0 the images, view 1 their mirror images (flipped along the
    last axis). Order of operations, per image:

    1. per layer l and view v: ``U_lv = upsample(A_lv, size)`` (:func:`upsample`), view 1
       flipped back along the last axis;
    2. per layer: ``M_l = mean_v U_lv``; normalised: ``M_l <- minmax(M_l)``, all zeros when
       every view's layer map is constant (as :func:`postprocess`);
    3. ``M = mean_l M_l``; normalised and more than one layer: ``M <- minmax(M)``, so the
       fused map spans [0, 1] like a single map.

    Raw maps (``normalise=False``): steps 1-3 without any min-max. One layer and one view
    is exactly :func:`postprocess`. Flip test-time augmentation of CAMs as used for
    weakly supervised segmentation by e.g. Ahn & Kwak, "Learning Pixel-level Semantic
    Affinity with Image-level Supervision", CVPR 2018; several layers' maps of one network
    combined as in Jiang et al., LayerCAM (IEEE TIP 30, 2021), here by their mean.
    """
    if not layer_maps or views not in (1, 2):
        raise ValueError("fuse: need at least one layer map and 1 or 2 views")
    if len(layer_maps) == 1 and views == 1:
        return postprocess(layer_maps[0], size, normalise)
    fused = []
    for maps in layer_maps:
        b = maps.shape[0] // views
        up = upsample(maps, size).reshape(views, b, *size)
        if views > 1:
            up = torch.cat([up[:1], up[1:].flip(-1)])
        m = up.mean(0)
        if normalise:
            const = is_constant(maps.reshape(views, b, -1), start_dim=2).all(0)
            m = torch.where(const.reshape(-1, *([1] * len(size))), 0.0, minmax(m))
        fused.append(m)
    out = torch.stack(fused).mean(0)
    return minmax(out) if normalise and len(fused) > 1 else out
