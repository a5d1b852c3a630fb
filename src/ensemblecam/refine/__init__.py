"""Three-class pseudo-labels from CAM members, searched thresholds and slice labels.

Convention: a pseudo-label array is uint8 with ``1`` = confident lesion, ``0`` = confident
background and :data:`IGNORE` (255) = uncertain, left out of the segmenter's loss
(:func:`ensemblecam.training.losses.masked_dice_ce`). Every function works on one image of any
dimension (a 2-D slice or a 3-D volume): ``maps`` (K, *S) member maps in [0, 1],
``thresholds`` (K,) the searched member thresholds (a member is "lesion" where
``map > t``), ``image`` (C, *S) intensities, ``label`` the image-level label (1 lesion).

The chain (:func:`pseudo_label`):

1. ``label == 0`` -> all background (the weak label is certain about it). Otherwise the
   member maps are first smoothed by a Gaussian of ``smooth_sigma`` pixels if > 0 (the
   thresholds must then have been searched on maps smoothed the same way).
2. Relative scores ``r_k`` (:func:`relative_scores`): ``(m - t) / (1 - t)`` above the
   threshold, ``(m - t) / t`` below it, so ``r`` is in [-1, 1] and 0 at the searched
   threshold whatever its value. Seeds (:func:`seed_labels`): lesion where at least
   ``agreement`` members have ``r_k >= fg_margin``; background where every member has
   ``r_k <= -bg_margin``; the rest ignore.
3. Optional refinement on the image: ``"random_walker"`` (scikit-image's seeded random
   walker; its ``beta`` is scaled by the image's standard deviation, so no intensity
   constant is fitted) or ``"crf"`` (mean-field dense CRF with a Gaussian and a bilateral
   kernel on the per-channel standardised image; unaries from the seeds, ``crf_confidence``
   on seeds and 0.5 on ignore, or from the members' soft score :func:`soft_score`).
   Pixels whose refined lesion probability lies within ``band`` of 0.5 become ignore;
   seeds keep their class.
4. Component filtering (:func:`filter_components`): lesion components holding no lesion
   seed, or smaller than ``min_component`` x the largest one, become ignore.
5. A lesion-labelled image never ends empty: the fallback (:func:`top_region`) labels as
   lesion the connected region of the mean map >= ``top_fraction`` x its maximum that holds
   the maximum.
6. Optional (``uncertain_bg`` > 0): a background pixel stays background only where every
   member is confidently below its threshold, ``r_k <= -uncertain_bg``; the others become
   ignore. Meant for self-training rounds 2+ (``refine.round_options``): their one member
   is the previous round's U-Net, whose softmax is seldom confidently "background" where its
   own labels had left pixels out, so without it the next round learns those pixels as
   certain background.

The segmenter trained on these labels leaves their lesion border out of its loss
(:func:`ignore_lesion_border`, ``unet.boundary_ignore``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from scipy import ndimage

from ensemblecam.errors import InputError

#: pseudo-label value of uncertain pixels (uint8), left out of the loss
IGNORE = 255
REFINERS = ("none", "random_walker", "crf")
CRF_BACKENDS = ("auto", "torch", "monai")
CRF_UNARIES = ("seeds", "soft")


@dataclass(frozen=True)
class RefineOptions:
    """Options of :func:`pseudo_label` (module docstring); :meth:`check` validates them."""

    smooth_sigma: float = 0.0  # Gaussian smoothing of the member maps (pixels), 0 = none
    fg_margin: float = 0.0
    bg_margin: float = 0.0
    agreement: int | None = None  # members that must agree on lesion seeds; None = all
    refiner: str = "random_walker"
    band: float = 0.0
    rw_beta: float = 130.0
    crf_iterations: int = 10
    crf_spatial_sigma: float = 3.0
    crf_color_sigma: float = 0.5
    crf_bilateral_weight: float = 1.0
    crf_gaussian_weight: float = 0.0
    crf_update_factor: float = 3.0
    crf_backend: str = "auto"
    crf_unary: str = "seeds"  # "seeds": p = 1 - e / e / 0.5 on lesion / background / ignore
    crf_confidence: float = 0.9  # 1 - e of "seeds" unaries
    min_component: float = 0.0
    keep_seeded: bool = True
    top_fraction: float = 0.8
    uncertain_bg: float = 0.0  # step 6: background needs every r_k <= -uncertain_bg; 0 = off

    def check(self, n_members: int | None = None) -> RefineOptions:
        """Return ``self`` or raise :class:`InputError` naming the first bad option."""

        def bad(name: str, what: str) -> InputError:
            return InputError(f"refine.{name} {getattr(self, name)!r}: {what}")

        if not (math.isfinite(self.smooth_sigma) and self.smooth_sigma >= 0):
            raise bad("smooth_sigma", "expected a finite number of pixels >= 0")
        for name in ("fg_margin", "bg_margin"):
            if not -1.0 <= getattr(self, name) < 1.0:
                raise bad(name, "expected a relative margin in [-1, 1)")
        if self.agreement is not None and (
            self.agreement < 1 or (n_members is not None and self.agreement > n_members)
        ):
            raise bad("agreement", f"expected 1..{n_members or 'members'} or null (all)")
        if self.refiner not in REFINERS:
            raise bad("refiner", f"expected one of {', '.join(REFINERS)}")
        if not 0.0 <= self.band < 0.5:
            raise bad("band", "expected a probability margin in [0, 0.5)")
        positive = ("rw_beta", "crf_spatial_sigma", "crf_color_sigma")
        for name in positive:
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise bad(name, "expected a finite number > 0")
        for name in ("crf_bilateral_weight", "crf_gaussian_weight", "crf_update_factor"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise bad(name, "expected a finite number >= 0")
        if self.crf_iterations < 1:
            raise bad("crf_iterations", "expected an integer >= 1")
        if self.crf_unary not in CRF_UNARIES:
            raise bad("crf_unary", f"expected one of {', '.join(CRF_UNARIES)}")
        if not 0.5 < self.crf_confidence < 1.0:
            raise bad("crf_confidence", "expected a probability in (0.5, 1)")
        if self.crf_backend not in CRF_BACKENDS:
            raise bad("crf_backend", f"expected one of {', '.join(CRF_BACKENDS)}")
        if not 0.0 <= self.min_component <= 1.0:
            raise bad("min_component", "expected a fraction of the largest component in [0, 1]")
        if not 0.0 <= self.uncertain_bg < 1.0:
            raise bad("uncertain_bg", "expected a relative margin in [0, 1)")
        if not 0.0 < self.top_fraction <= 1.0:
            raise bad("top_fraction", "expected a fraction of the maximum in (0, 1]")
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RefineOptions:
        """Options from a mapping; an unknown key is an :class:`InputError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(
                f"refine: unknown option {unknown[0]!r} (known: {', '.join(sorted(known))})"
            )
        return cls(**values).check()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- scores


def _check_maps(maps: np.ndarray, thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(maps, dtype=np.float32)
    thr = np.asarray(thresholds, dtype=np.float32).reshape(-1)
    if maps.ndim < 2 or len(thr) != maps.shape[0]:
        raise InputError(
            f"refine: {maps.shape[0] if maps.ndim else 0} member maps but "
            f"{len(thr)} thresholds (maps must be (K, *spatial))"
        )
    if np.any((thr < 0) | (thr >= 1)) or not np.all(np.isfinite(thr)):
        raise InputError(f"refine: thresholds {thr.tolist()}: expected values in [0, 1)")
    return maps, thr


def relative_scores(maps: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """r_k = (m_k - t_k) / (1 - t_k) where m_k > t_k, else (m_k - t_k) / t_k (-1 if t_k = 0).

    In [-1, 1] for maps in [0, 1]; r > 0 exactly where the member says lesion (m > t).
    """
    m, t = _check_maps(maps, thresholds)
    t = t.reshape((-1,) + (1,) * (m.ndim - 1))
    above = (m - t) / (1.0 - t)
    below = np.where(t > 0, (m - t) / np.where(t > 0, t, 1.0), -1.0)
    return np.clip(np.where(m > t, above, below), -1.0, 1.0).astype(np.float32)


def soft_score(maps: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Soft lesion score q = (mean_k r_k + 1) / 2 in [0, 1]; 0.5 at the searched thresholds."""
    return ((relative_scores(maps, thresholds).mean(axis=0) + 1.0) / 2.0).astype(np.float32)


def top_region(score: np.ndarray, top_fraction: float = 0.8) -> np.ndarray:
    """Bool mask: the connected component of ``score >= top_fraction * max`` holding the
    maximum (full connectivity); a constant score gives the whole image."""
    score = np.asarray(score, dtype=np.float32)
    peak = np.unravel_index(int(np.argmax(score)), score.shape)
    hi = float(score[peak])
    cand = score >= top_fraction * hi if hi > 0 else np.ones(score.shape, bool)
    lab, _ = ndimage.label(cand, ndimage.generate_binary_structure(score.ndim, score.ndim))
    return lab == lab[peak]


def seed_labels(
    maps: np.ndarray,
    thresholds: Sequence[float],
    label: int,
    fg_margin: float = 0.0,
    bg_margin: float = 0.0,
    agreement: int | None = None,
) -> np.ndarray:
    """Three-class seeds (uint8 of shape S): 1 where >= ``agreement`` (None: all) members have
    r_k >= fg_margin; 0 where all have r_k <= -bg_margin; else IGNORE. ``label == 0`` gives
    all 0. No fallback here (see :func:`pseudo_label`)."""
    r = relative_scores(maps, thresholds)
    if int(label) == 0:
        return np.zeros(r.shape[1:], np.uint8)
    k = r.shape[0] if agreement is None else int(agreement)
    out = np.full(r.shape[1:], IGNORE, np.uint8)
    out[np.all(r <= -bg_margin, axis=0)] = 0
    out[np.sum(r >= fg_margin, axis=0) >= k] = 1
    return out


# --------------------------------------------------------------------------- refiners


def _standardise(image: np.ndarray) -> np.ndarray:
    """Per-channel (x - mean) / std over the image (std 0 -> 1)."""
    img = np.asarray(image, dtype=np.float32)
    axes = tuple(range(1, img.ndim))
    sd = img.std(axis=axes, keepdims=True)
    return (img - img.mean(axis=axes, keepdims=True)) / np.where(sd > 0, sd, 1.0)


def random_walker_probs(
    image: np.ndarray, seeds: np.ndarray, beta: float = 130.0
) -> np.ndarray | None:
    """Lesion probability (float32, shape S) of scikit-image's seeded random walker on the
    (C, *S) ``image`` (channels as features), seeds 1 lesion / 0 background / IGNORE
    unknown. None when one of the two seed classes is absent.

    The walker's system couples each unknown pixel only to its axis neighbours, so it is
    solved on the bounding box of the unknown pixels grown by one pixel (the seeds outside
    it are their own probability); scikit-image scales ``beta`` by the std of the data it
    is given, so ``beta`` is rescaled by std(box) / std(image) to keep the edge weights of
    the whole image."""
    from skimage.segmentation import random_walker

    fg, bg = seeds == 1, seeds == 0
    if not fg.any() or not bg.any():
        return None
    unknown = ~fg & ~bg
    prob = fg.astype(np.float32)
    if not unknown.any():
        return prob
    where = np.nonzero(unknown)
    box = tuple(slice(max(int(w.min()) - 1, 0), int(w.max()) + 2) for w in where)
    sub_fg, sub_bg = fg[box], bg[box]
    if not sub_fg.any() or not sub_bg.any():  # every unknown pixel borders one class only
        prob[box][unknown[box]] = float(sub_fg.any())
        return prob
    data = _standardise(image)
    sub = np.ascontiguousarray(data[(slice(None), *box)])
    scale = float(sub.std()) / max(float(data.std()), 1e-12)
    if scale < 1e-6:  # a flat box: scikit-image's std scaling needs the whole image
        box, sub, scale = tuple(slice(None) for _ in seeds.shape), data, 1.0
        sub_fg, sub_bg = fg, bg
    rw_labels = np.zeros(sub_fg.shape, np.int32)
    rw_labels[sub_bg], rw_labels[sub_fg] = 1, 2
    with warnings.catch_warnings():  # cg tolerance overshoots of ~1e-3 are clipped below
        warnings.filterwarnings("ignore", "The probability range is outside", UserWarning)
        rw = random_walker(
            sub, rw_labels, beta=beta * scale, mode="cg_j", tol=1e-3, channel_axis=0,
            return_full_prob=True,
        )  # fmt: skip
    prob[box] = np.clip(np.asarray(rw[1], dtype=np.float32), 0.0, 1.0)
    return prob


def crf_probs(
    image: np.ndarray,
    prob: np.ndarray,
    iterations: int = 5,
    spatial_sigma: float = 3.0,
    color_sigma: float = 1.0,
    bilateral_weight: float = 1.0,
    gaussian_weight: float = 1.0,
    update_factor: float = 3.0,
    backend: str = "auto",
) -> np.ndarray:
    """Mean-field CRF (2 labels, Potts) of the lesion probability ``prob`` (shape S).

    Q_0 = softmax(U), U = log([1 - p, p]); then ``iterations`` times
    Q = softmax(U + update_factor * (w_b K_b * Q + w_g K_g * Q)), with K_g(d) =
    exp(-|d|^2 / 2 s^2) and K_b(x, d) = K_g(d) exp(-|f(x) - f(x + d)|^2 / 2 c^2), f the
    per-channel standardised image (so ``color_sigma`` c is in standard deviations),
    s = ``spatial_sigma`` in pixels. Backend "monai" is MONAI's ``CRF`` block (the same
    update over all pixels by permutohedral filtering; needs MONAI's compiled extension);
    "torch" sums the kernels over the window |d_i| <= ceil(2 s) exactly in PyTorch; "auto"
    takes "monai" when its extension is importable, else "torch". Returns P(lesion).
    """
    return crf_probs_batch(
        np.asarray(image)[None], np.asarray(prob)[None], iterations, spatial_sigma,
        color_sigma, bilateral_weight, gaussian_weight, update_factor, backend,
    )[0]  # fmt: skip


def _monai_crf(backend: str) -> bool:
    """True to use MONAI's CRF block (its compiled extension is importable)."""
    if backend not in CRF_BACKENDS:
        raise InputError(
            f"refine.crf_backend {backend!r}: expected one of {', '.join(CRF_BACKENDS)}"
        )
    if backend == "torch":
        return False
    try:
        from monai.utils import optional_import

        _, has_ext = optional_import("monai._C")
    except ImportError:  # pragma: no cover - monai is a dependency
        has_ext = False
    if backend == "monai" and not has_ext:
        raise InputError(
            "refine.crf_backend 'monai': MONAI's compiled extension "
            "(monai._C) is not installed; use 'torch' or 'auto'"
        )
    return bool(has_ext)


def crf_probs_batch(
    images: np.ndarray,
    probs: np.ndarray,
    iterations: int = 5,
    spatial_sigma: float = 3.0,
    color_sigma: float = 1.0,
    bilateral_weight: float = 1.0,
    gaussian_weight: float = 1.0,
    update_factor: float = 3.0,
    backend: str = "auto",
) -> np.ndarray:
    """:func:`crf_probs` of B images at once: ``images`` (B, C, *S), ``probs`` (B, *S);
    each image has its own standardisation. Returns P(lesion) (B, *S) float32."""
    import torch

    p = np.clip(np.asarray(probs, dtype=np.float32), 1e-4, 1 - 1e-4)
    unary = torch.from_numpy(np.log(np.stack([1 - p, p], axis=1)))  # (B, 2, *S)
    feats = torch.from_numpy(np.stack([_standardise(im) for im in images]))  # (B, C, *S)
    if _monai_crf(backend):
        from monai.networks.blocks import CRF

        crf = CRF(
            iterations, bilateral_weight, gaussian_weight, spatial_sigma, color_sigma,
            spatial_sigma, update_factor,
        )  # fmt: skip
        with torch.no_grad():
            return crf(unary, feats)[:, 1].numpy().astype(np.float32)
    # denormal kernel weights (exp of a large colour distance) make CPU arithmetic ~10x
    # slower; flushing them to zero changes nothing measurable
    flushed = torch.set_flush_denormal(True)
    try:
        return _crf_torch(unary, feats, iterations, spatial_sigma, color_sigma,
                          bilateral_weight, gaussian_weight, update_factor)  # fmt: skip
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def _crf_torch(
    unary: Any, feats: Any, iterations: int, spatial_sigma: float, color_sigma: float,
    bilateral_weight: float, gaussian_weight: float, update_factor: float,
) -> np.ndarray:  # fmt: skip
    """The exact local-window mean field of :func:`crf_probs_batch` (backend "torch").

    With two labels, q_0 = 1 - q_1, so the message to label 0 is W - m_1 with
    W(x) = sum_d w_d(x) and m_1 = sum_d w_d(x) q_1(x + d), and the update is
    q_1 = sigmoid(U_1 - U_0 + update_factor (2 m_1 - W)): one channel is passed, not two.
    The kernel is symmetric, w_{-d}(x) = w_d(x - d), so half of the weights are shifted
    copies of the other half (bit-identical to computing them).
    """
    import torch

    nd = unary.ndim - 2
    radius = max(1, math.ceil(2 * spatial_sigma))
    size = feats.shape[2:]
    offsets = [
        d for idx in np.ndindex(*([2 * radius + 1] * nd)) if any(d := [i - radius for i in idx])
    ]
    with torch.no_grad():
        fpad = _pad(feats, radius)
        ones = _pad(torch.ones_like(feats[:, :1]), radius)
        weights: dict[tuple[int, ...], Any] = {}
        for d in offsets[len(offsets) // 2 :]:  # d > 0 (lexicographic): computed
            g = math.exp(-sum(v * v for v in d) / (2 * spatial_sigma**2))
            view = _window(fpad, d, radius, size)
            diff = ((feats - view) ** 2).sum(dim=1, keepdim=True)
            valid = _window(ones, d, radius, size)
            w = bilateral_weight * torch.exp(-diff / (2 * color_sigma**2)) + gaussian_weight
            weights[tuple(d)] = (g * valid) * w
            # the kernel is symmetric: w_{-d}(x) = w_d(x - d), zero where x - d is outside
            minus = [-v for v in d]
            weights[tuple(minus)] = _window(_pad(weights[tuple(d)], radius), minus, radius, size)
        kernels = [(d, weights[tuple(d)]) for d in offsets]
        total = torch.zeros_like(feats[:, :1])
        for _, w in kernels:
            total += w
        du = unary[:, 1:] - unary[:, :1]
        q = torch.sigmoid(du)
        for _ in range(iterations):
            qpad = _pad(q, radius)
            msg = torch.zeros_like(q)
            for d, w in kernels:
                msg.addcmul_(w, _window(qpad, d, radius, size))
            q = torch.sigmoid(du + update_factor * (2 * msg - total))
    return q[:, 0].numpy().astype(np.float32)


def _pad(x: Any, radius: int) -> Any:
    """Zero-pad the spatial dims (all but the first two) of a torch tensor by ``radius``."""
    import torch.nn.functional as F

    return F.pad(x, [radius] * (2 * (x.ndim - 2)))


def _window(xpad: Any, offset: Sequence[int], radius: int, size: Sequence[int]) -> Any:
    """View y of a padded tensor with y[..., i] = x[..., i + offset] (zero outside)."""
    sl = [slice(radius + o, radius + o + n) for o, n in zip(offset, size, strict=True)]
    return xpad[(Ellipsis, *sl)]


# --------------------------------------------------------------------------- filtering


def filter_components(
    labels: np.ndarray, seeds: np.ndarray | None = None, min_component: float = 0.0
) -> np.ndarray:
    """Lesion components (full connectivity) that hold no lesion seed (if ``seeds`` given)
    or are smaller than ``min_component`` x the largest component become IGNORE."""
    out = np.array(labels, dtype=np.uint8, copy=True)
    fg = out == 1
    if not fg.any():
        return out
    lab, n = ndimage.label(fg, ndimage.generate_binary_structure(fg.ndim, fg.ndim))
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    drop = sizes < min_component * sizes.max()
    if seeds is not None:
        seeded = np.bincount(lab.ravel(), weights=(seeds == 1).ravel(), minlength=n + 1)[1:]
        drop |= seeded == 0
    out[np.isin(lab, np.flatnonzero(drop) + 1)] = IGNORE
    return out


def ignore_lesion_border(labels: np.ndarray, width: int) -> np.ndarray:
    """Labels (..., H, W) in {0, 1, IGNORE} with the lesion's border left out: a copy in
    which every lesion pixel that ``width`` in-plane erosions with the 4-connected cross
    remove (one within ``width`` steps, up/down/left/right, of a non-lesion pixel or the
    slice edge) is IGNORE; width 0: unchanged.

    Why: a pseudo-label's border is where it is least certain (it comes from coarse maps
    and an intensity refiner), and it errs both ways; with the border left out the
    segmenter still learns the lesion's core and the background around it, and places the
    edge itself."""
    out = np.array(labels, dtype=np.uint8, copy=True)
    if width <= 0:
        return out
    fg = out == 1
    cross = ndimage.generate_binary_structure(2, 1).reshape((1,) * (fg.ndim - 2) + (3, 3))
    core = ndimage.binary_erosion(fg, cross, iterations=width)
    out[fg & ~core] = IGNORE
    return out


# --------------------------------------------------------------------------- chain


def _from_prob(prob: np.ndarray, seeds: np.ndarray, band: float) -> np.ndarray:
    out = np.full(prob.shape, IGNORE, np.uint8)
    out[prob > 0.5 + band] = 1
    out[prob < 0.5 - band] = 0
    out[seeds == 1] = 1
    out[seeds == 0] = 0
    return out


def _check_inputs(
    image: np.ndarray, maps: np.ndarray, thresholds: Sequence[float], label: int,
    options: RefineOptions | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, RefineOptions]:  # fmt: skip
    opt = (options or RefineOptions()).check(np.shape(maps)[0] if np.ndim(maps) else None)
    maps, thr = _check_maps(maps, thresholds)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != maps.ndim or image.shape[1:] != maps.shape[1:]:
        raise InputError(
            f"refine: image of shape {image.shape} does not fit maps of shape "
            f"{maps.shape} (expected (C, *spatial) and (K, *spatial))"
        )
    if int(label) not in (0, 1):
        raise InputError(f"refine: image-level label {label!r}: expected 0 or 1")
    return image, maps, thr, opt


def _seeds(
    maps: np.ndarray, thr: np.ndarray, opt: RefineOptions
) -> tuple[np.ndarray, np.ndarray | None]:
    """Steps 1-2 and the never-empty fallback of a lesion image: its seeds; and step 6's
    mask of pixels that may not be background (None: step 6 off)."""
    if opt.smooth_sigma > 0:
        maps = ndimage.gaussian_filter(maps, (0,) + (opt.smooth_sigma,) * (maps.ndim - 1))
    seeds = seed_labels(maps, thr, 1, opt.fg_margin, opt.bg_margin, opt.agreement)
    if not (seeds == 1).any():
        seeds[top_region(maps.mean(axis=0), opt.top_fraction)] = 1
    uncertain = None
    if opt.uncertain_bg > 0:
        uncertain = ~np.all(relative_scores(maps, thr) <= -opt.uncertain_bg, axis=0)
    return seeds, uncertain


def _crf_unary(
    maps: np.ndarray, thr: np.ndarray, seeds: np.ndarray, opt: RefineOptions
) -> np.ndarray:
    """The CRF's initial lesion probability: from the seeds or the soft member score."""
    if opt.crf_unary == "soft":
        return soft_score(maps, thr)
    unary = np.full(seeds.shape, 0.5, np.float32)
    unary[seeds == 1], unary[seeds == 0] = opt.crf_confidence, 1 - opt.crf_confidence
    return unary


def _finish(
    seeds: np.ndarray, prob: np.ndarray | None, opt: RefineOptions, uncertain: np.ndarray | None
) -> np.ndarray:
    """Steps 3 (after the refiner's probability ``prob``; None: the seeds) to 6."""
    out = seeds if prob is None else _from_prob(prob, seeds, opt.band)
    out = filter_components(out, seeds if opt.keep_seeded else None, opt.min_component)
    if not (out == 1).any():  # never empty: the seeds' lesion (itself never empty)
        out[seeds == 1] = 1
    if uncertain is not None:
        out[(out == 0) & uncertain] = IGNORE
    return out


def _crf_options(opt: RefineOptions) -> tuple[Any, ...]:
    return (
        opt.crf_iterations, opt.crf_spatial_sigma, opt.crf_color_sigma,
        opt.crf_bilateral_weight, opt.crf_gaussian_weight, opt.crf_update_factor,
        opt.crf_backend,
    )  # fmt: skip


def pseudo_label(
    image: np.ndarray,
    maps: np.ndarray,
    thresholds: Sequence[float],
    label: int,
    options: RefineOptions | None = None,
) -> np.ndarray:
    """Three-class pseudo-label (uint8, shape S: 0 / 1 / IGNORE) of one image (module
    docstring, steps 1-6). ``image`` (C, *S); ``maps`` (K, *S) in [0, 1]."""
    return pseudo_label_batch([image], [maps], [thresholds], [label], [options])[0]


def pseudo_label_batch(
    images: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    thresholds: Sequence[Sequence[float]],
    labels: Sequence[int],
    options: Sequence[RefineOptions | None],
    crf_batch: int = 32,
) -> list[np.ndarray]:
    """:func:`pseudo_label` of several images, each with its own maps (K_i, *S), thresholds
    and options; CRF refinement runs ``crf_batch`` images at a time (same options and
    shape in a batch), which is what makes it fast."""
    out: list[np.ndarray | None] = [None] * len(images)
    #: CRF work grouped by (CRF options, shape): (position, image, seeds, unary, options,
    #: step 6's mask)
    pending: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
    for n, args in enumerate(zip(images, maps, thresholds, labels, options, strict=True)):
        image, m, thr, opt = _check_inputs(*args)
        if int(args[3]) == 0:
            out[n] = np.zeros(m.shape[1:], np.uint8)
            continue
        seeds, uncertain = _seeds(m, thr, opt)
        if opt.refiner == "crf" and (seeds == IGNORE).any():
            key = (_crf_options(opt), image.shape)
            unary = _crf_unary(m, thr, seeds, opt)
            pending.setdefault(key, []).append((n, image, seeds, unary, opt, uncertain))
            continue
        # no refiner, or a CRF on an image whose every pixel is seeded: the seeds decide
        prob = None
        if opt.refiner == "random_walker":
            prob = random_walker_probs(image, seeds, opt.rw_beta)
        out[n] = _finish(seeds, prob, opt, uncertain)
    for (crf_opts, _), items in pending.items():
        for s in range(0, len(items), crf_batch):
            chunk = items[s : s + crf_batch]
            probs = crf_probs_batch(
                np.stack([c[1] for c in chunk]), np.stack([c[3] for c in chunk]), *crf_opts
            )
            for (n, _, seeds, _, opt, uncertain), prob in zip(chunk, probs, strict=True):
                out[n] = _finish(seeds, prob, opt, uncertain)
    return [o for o in out if o is not None]


def pseudo_labels(
    images: np.ndarray,
    maps: np.ndarray,
    thresholds: Sequence[float],
    labels: np.ndarray,
    options: RefineOptions | None = None,
) -> np.ndarray:
    """:func:`pseudo_label` of each of N images: ``images`` (N, C, *S), ``maps``
    (K, N, *S) or a sequence of K (N, *S) arrays, ``labels`` (N,); returns uint8 (N, *S)."""
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    if len(images) != n or any(len(m) != n for m in maps):
        raise InputError(
            f"refine: {len(images)} images, {[len(m) for m in maps]} maps per "
            f"member and {n} labels: expected the same count"
        )
    opt = (options or RefineOptions()).check(len(maps))
    per = [np.stack([np.asarray(mm[i], np.float32) for mm in maps]) for i in range(n)]
    out = pseudo_label_batch(
        list(images), per, [thresholds] * n, [int(v) for v in labels], [opt] * n
    )
    return np.stack(out) if out else np.zeros((0, *np.shape(images)[2:]), np.uint8)


def pseudo_label_quality(pseudo: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Scores of pseudo-labels against true masks: ``lesion_dice`` (IGNORE counted as
    background), ``precision``/``recall`` of the lesion class, ``labelled_accuracy`` over
    non-ignored pixels, ``ignored_fraction`` and ``ignored_lesion_fraction`` (of true
    lesion pixels left out). All accumulated over the whole array."""
    p = np.asarray(pseudo)
    t = np.asarray(truth).astype(bool)
    fg, known = p == 1, p != IGNORE
    tp = float(np.sum(fg & t))
    fp = float(np.sum(fg & ~t))
    fn = float(np.sum(~fg & t))
    n_known = float(known.sum())
    correct = float(np.sum(known & (fg == t)))
    return {
        "lesion_dice": 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "labelled_accuracy": correct / n_known if n_known else 1.0,
        "ignored_fraction": 1.0 - n_known / p.size if p.size else 0.0,
        "ignored_lesion_fraction": float(np.sum(~known & t)) / float(t.sum()) if t.any() else 0.0,
    }
