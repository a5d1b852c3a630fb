"""Pseudo-labels (ensemblecam.refine) and the ignore-masked loss (ensemblecam.training.losses)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ensemblecam.errors import InputError
from ensemblecam.refine import (
    IGNORE,
    RefineOptions,
    crf_probs,
    filter_components,
    ignore_lesion_border,
    pseudo_label,
    pseudo_labels,
    relative_scores,
    seed_labels,
    top_region,
)
from ensemblecam.training.losses import masked_dice_ce, mil_loss

REFINERS = ("none", "random_walker", "crf")


def blob_case(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (1, *S), maps (2, *S), truth (*S)): a bright cube lesion and two CAMs that
    peak on it but are too wide (like upsampled coarse CAMs)."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape)
    centre = np.array(shape) // 2
    half = max(1, min(shape) // 5)
    truth = np.all(np.abs(grid - centre.reshape((-1,) + (1,) * len(shape))) <= half, axis=0)
    image = (truth * 1.0 + 0.05 * rng.standard_normal(shape))[None].astype(np.float32)
    d2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    wide = np.exp(-d2 / (2 * (2.0 * half) ** 2)).astype(np.float32)
    maps = np.stack([wide, np.sqrt(wide)])
    return image, maps, truth


# --------------------------------------------------------------------------- scores


def test_relative_scores_hand_values():
    m = np.array([[0.0, 0.25, 0.5, 0.75, 1.0]], np.float32)
    assert relative_scores(m, [0.5]).tolist() == [[-1.0, -0.5, 0.0, 0.5, 1.0]]
    # t = 0: every positive value is lesion, r = m; m = 0 is -1
    assert relative_scores(np.array([[0.0, 0.5]]), [0.0]).tolist() == [[-1.0, 0.5]]


def test_seed_labels_agreement_and_margins():
    maps = np.array([[[0.9, 0.9, 0.1, 0.6]], [[0.9, 0.1, 0.1, 0.45]]], np.float32)  # (2, 1, 4)
    s = seed_labels(maps, [0.5, 0.5], 1)
    assert s.tolist() == [[1, IGNORE, 0, IGNORE]]
    s1 = seed_labels(maps, [0.5, 0.5], 1, agreement=1)
    assert s1.tolist() == [[1, 1, 0, 1]]
    # margins: r = [0.8, 0.8, -0.8, 0.2] and [0.8, -0.8, -0.8, -0.1]
    s2 = seed_labels(maps, [0.5, 0.5], 1, fg_margin=0.5, bg_margin=0.5, agreement=1)
    assert s2.tolist() == [[1, 1, 0, IGNORE]]
    assert (seed_labels(maps, [0.5, 0.5], 0) == 0).all()


def test_top_region_is_the_component_of_the_peak():
    score = np.array([[0.9, 0.0, 0.85], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    assert top_region(score, 0.8).tolist() == [
        [True, False, False],
        [True, False, False],
        [False, False, False],
    ]
    assert top_region(np.zeros((2, 2)), 0.8).all()


def test_filter_components_by_seed_and_size():
    lab = np.array([[1, 1, 0, 1], [1, 1, 0, 0], [0, 0, 0, 1]], np.uint8)
    seeds = np.full(lab.shape, IGNORE, np.uint8)
    seeds[0, 0] = 1
    out = filter_components(lab, seeds)
    assert out.tolist() == [[1, 1, 0, IGNORE], [1, 1, 0, 0], [0, 0, 0, IGNORE]]
    out = filter_components(lab, None, min_component=0.5)  # sizes 4, 1, 1: the 1s go
    assert out.tolist() == [[1, 1, 0, IGNORE], [1, 1, 0, 0], [0, 0, 0, IGNORE]]
    assert filter_components(lab, None, 0.0).tolist() == lab.tolist()


# --------------------------------------------------------------------------- chain


@pytest.mark.parametrize("refiner", REFINERS)
def test_lesion_free_slices_are_all_background(refiner):
    image, maps, _ = blob_case((12, 12))
    images = np.stack([image, image])
    stacked = np.stack([maps, maps], axis=1)  # (K, N, H, W)
    out = pseudo_labels(
        images, stacked, [0.2, 0.2], np.array([0, 1]), RefineOptions(refiner=refiner)
    )
    assert out.dtype == np.uint8 and out.shape == (2, 12, 12)
    assert (out[0] == 0).all()  # the maps say lesion, the slice label says none
    assert (out[1] == 1).any()


@pytest.mark.parametrize("refiner", REFINERS)
@pytest.mark.parametrize("shape", [(10, 10), (6, 6, 6)])
def test_lesion_slices_never_empty(refiner, shape):
    image, maps, _ = blob_case(shape)
    for m in (np.zeros_like(maps), maps * 0.1, np.ones_like(maps)):  # nothing above t
        out = pseudo_label(
            image,
            m,
            [0.5, 0.99 if m.max() == 1 else 0.5],
            1,
            RefineOptions(refiner=refiner, min_component=1.0),
        )
        assert (out == 1).any()
        assert set(np.unique(out).tolist()) <= {0, 1, IGNORE}


@pytest.mark.parametrize("refiner", ("random_walker", "crf"))
@pytest.mark.parametrize("shape", [(16, 16), (10, 10, 10)])
def test_refiners_run_in_2d_and_3d_and_snap_to_the_lesion(refiner, shape):
    image, maps, truth = blob_case(shape)
    thr = [0.5, 0.5]
    # the seeds are the CAMs' confident core (margin 0.8 above the thresholds)
    seeds = pseudo_label(image, maps, thr, 1, RefineOptions(refiner="none", fg_margin=0.8))
    out = pseudo_label(image, maps, thr, 1, RefineOptions(refiner=refiner, fg_margin=0.8))
    assert out.shape == shape

    def dice(lab):
        p = lab == 1
        return 2 * np.sum(p & truth) / (p.sum() + truth.sum())

    assert dice(out) > dice(seeds)  # the CAMs are too wide; the image edges fix that
    assert dice(out) > 0.9


def test_random_walker_recovers_a_clear_lesion_exactly():
    image, maps, truth = blob_case((16, 16))
    out = pseudo_label(
        image, maps, [0.5, 0.5], 1, RefineOptions(refiner="random_walker", fg_margin=0.8)
    )
    assert ((out == 1) == truth).all()


def _walker_whole_image(image, seeds, beta):
    """scikit-image's walker on the whole standardised image (no box), P(lesion)."""
    from skimage.segmentation import random_walker

    rw = np.zeros(seeds.shape, np.int32)
    rw[seeds == 0], rw[seeds == 1] = 1, 2
    data = (image - image.mean(axis=tuple(range(1, image.ndim)), keepdims=True)) / image.std(
        axis=tuple(range(1, image.ndim)), keepdims=True
    )
    prob = random_walker(data, rw, beta=beta, mode="cg_j", tol=1e-6, channel_axis=0,
                         return_full_prob=True)[1]  # fmt: skip
    return np.clip(prob, 0, 1)


@pytest.mark.parametrize("shape", [(40, 48), (14, 16, 12)])
def test_random_walker_box_equals_the_whole_image(shape):
    """The walker solved on the unknown pixels' box (grown by 1, beta rescaled by the box's
    std) gives the whole image's probabilities: the system only couples axis neighbours."""
    from ensemblecam.refine import random_walker_probs

    rng = np.random.default_rng(1)
    image, _, truth = blob_case(shape)
    ramp = np.indices(shape).sum(axis=0) / sum(shape) + 0.02 * rng.standard_normal(shape)
    image = np.concatenate([image, ramp[None].astype(np.float32)])  # a second channel
    seeds = np.zeros(shape, np.uint8)
    core = np.zeros(shape, bool)
    core[tuple(slice(n // 2 - 1, n // 2 + 1) for n in shape)] = True
    seeds[core & truth] = 1
    ring = np.zeros(shape, bool)
    ring[tuple(slice(n // 2 - n // 3, n // 2 + n // 3) for n in shape)] = True
    seeds[ring & ~core] = IGNORE  # unknown: a box well inside the image
    got = random_walker_probs(image, seeds, 130.0)
    want = _walker_whole_image(image, seeds, 130.0)
    assert got is not None and got.shape == shape
    assert np.abs(got - want).max() < 2e-3
    assert (got[seeds == 1] == 1).all() and (got[seeds == 0] == 0).all()


def test_random_walker_box_with_one_seed_class():
    """Unknown pixels that border only background seeds are background (the walker's
    answer), and a flat box falls back to the whole image (the std scaling needs it)."""
    from ensemblecam.refine import random_walker_probs

    image, _, _ = blob_case((24, 24))
    seeds = np.zeros((24, 24), np.uint8)
    seeds[2:4, 2:4] = 1  # lesion seeds in a corner
    seeds[15:19, 15:19] = IGNORE  # unknown pixels far from them
    got = random_walker_probs(image, seeds, 130.0)
    assert got is not None and (got[15:19, 15:19] == 0).all() and got[2:4, 2:4].min() == 1
    flat = np.zeros((1, 24, 24), np.float32)
    flat[0, :12] = 1.0  # the unknown box below lies in the flat half
    seeds = np.zeros((24, 24), np.uint8)
    seeds[20:] = 1
    seeds[14:20, 4:20] = IGNORE  # its box (rows 13-20) borders both classes, all flat
    got = random_walker_probs(flat, seeds, 130.0)
    want = _walker_whole_image(flat, seeds, 130.0)
    assert 0.1 < got[16, 10] < 0.9 and np.abs(got - want).max() < 2e-3


def test_crf_skips_fully_seeded_images(monkeypatch):
    """With every pixel seeded (margin 0, one member: no uncertain pixel) the seeds are the
    answer of any refiner, so the CRF is not run and the labels equal refiner none's."""
    import ensemblecam.refine as refine

    image, maps, _ = blob_case((16, 16))
    none = pseudo_label(image, maps[:1], [0.5], 1, RefineOptions(refiner="none"))

    def no_crf(*args, **kwargs):
        raise AssertionError("the CRF ran on a fully seeded image")

    monkeypatch.setattr(refine, "crf_probs_batch", no_crf)
    crf = pseudo_label(image, maps[:1], [0.5], 1, RefineOptions(refiner="crf"))
    assert (crf == none).all() and (none == 1).any() and not (none == IGNORE).any()


def test_band_makes_ignore_pixels():
    """A refiner's lesion probability within ``band`` of 0.5 is ignore; seeds keep their
    class whatever the probability."""
    from ensemblecam.refine import _from_prob

    prob = np.array([[0.9, 0.6, 0.5, 0.4, 0.25, 0.1, 0.5]], np.float32)
    seeds = np.array([[IGNORE] * 5 + [1, 0]], np.uint8)
    got = _from_prob(prob, seeds, 0.2)
    np.testing.assert_array_equal(got, [[1, IGNORE, IGNORE, IGNORE, 0, 1, 0]])
    np.testing.assert_array_equal(_from_prob(prob, seeds, 0.0), [[1, 1, IGNORE, 0, 0, 1, 0]])


@pytest.mark.parametrize("refiner", REFINERS)
def test_uncertain_background_becomes_ignore(refiner):
    """Step 6 by hand: one member at threshold 0.5, ``uncertain_bg`` 0.8, so background
    stays only where the map is <= 0.1 (r = (m - 0.5) / 0.5 <= -0.8), whatever the refiner
    made of the rest; lesion is untouched, and a lesion-free image stays all background."""
    m = np.array([[0.05, 0.1, 0.3, 0.45, 0.9, 0.95]] * 3, np.float32)
    image = (m > 0.5).astype(np.float32)[None]
    opt = RefineOptions(refiner=refiner, uncertain_bg=0.8)
    got = pseudo_label(image, m[None], [0.5], 1, opt)
    plain = pseudo_label(image, m[None], [0.5], 1, RefineOptions(refiner=refiner))
    # the seeds say background for 0.05-0.45, lesion for 0.9 and 0.95; every refiner keeps
    # that on this image (the CRF and the random walker see no unseeded pixel)
    np.testing.assert_array_equal(plain, [[0, 0, 0, 0, 1, 1]] * 3)
    np.testing.assert_array_equal(got, [[0, 0, IGNORE, IGNORE, 1, 1]] * 3)
    assert (pseudo_label(image, m[None], [0.5], 0, opt) == 0).all()
    # two members: background needs both below -0.8
    two = np.stack([m, np.full_like(m, 0.02)])
    got2 = pseudo_label(image, two, [0.5, 0.5], 1, RefineOptions(refiner="none", agreement=1,
                                                                  uncertain_bg=0.8))  # fmt: skip
    np.testing.assert_array_equal(got2, [[0, 0, IGNORE, IGNORE, 1, 1]] * 3)


def test_later_rounds_add_their_refine_options():
    from ensemblecam.config import RefineConfig

    cfg = RefineConfig(
        options={"band": 0.1, "uncertain_bg": 0.5}, round_options={"uncertain_bg": 0.8}
    )
    assert cfg.for_round(1) is cfg
    assert cfg.for_round(2).options == {"band": 0.1, "uncertain_bg": 0.8}
    assert cfg.for_round(3).options == cfg.for_round(2).options
    off = RefineConfig()  # the default: no option of its own in later rounds
    assert off.for_round(2) is off


def test_ignore_lesion_border_hand_computed():
    """The lesion pixels within ``width`` 4-connected steps of a non-lesion pixel or the
    slice edge become ignore; background and ignore pixels stay as they are."""
    lab = np.array(
        [[1, 1, 0, 0, 0, 0],
         [1, 1, 1, 0, 0, 0],
         [0, 1, 1, 1, 1, 0],
         [0, 1, 1, 1, 1, 0],
         [0, 1, 1, 1, 1, IGNORE],
         [0, 0, 0, 0, 0, 0]], np.uint8,
    )  # fmt: skip
    # kept as lesion: the pixels whose four neighbours are all lesion, (1, 1), (2, 2),
    # (3, 2) and (3, 3); (0, 0) and (1, 0) touch the slice edge
    want = np.where(lab == 1, IGNORE, lab)
    for y, x in [(1, 1), (2, 2), (3, 2), (3, 3)]:
        want[y, x] = 1
    got = ignore_lesion_border(lab, 1)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.uint8 and lab[0, 0] == 1  # a copy
    # a stack of slices: each slice eroded on its own (no step across slices)
    stack = np.stack([lab, np.ones_like(lab)])
    got = ignore_lesion_border(stack, 1)
    np.testing.assert_array_equal(got[0], want)
    ring = np.ones((6, 6), bool)
    ring[1:-1, 1:-1] = False  # the slice edge counts as outside the lesion
    np.testing.assert_array_equal(got[1], np.where(ring, IGNORE, 1))
    all_ignored = np.where(lab == 1, IGNORE, lab)
    np.testing.assert_array_equal(ignore_lesion_border(stack, 2)[0], all_ignored)
    np.testing.assert_array_equal(ignore_lesion_border(stack, 0), stack)


def _crf_brute_force(image, prob, iterations, s, c, wb, wg, uf):
    """Dense loop over every pixel pair within the window (|d_i| <= ceil(2 s))."""
    p = np.clip(prob, 1e-4, 1 - 1e-4).astype(np.float64)
    f = image.astype(np.float64)
    f = (f - f.mean(axis=(1, 2), keepdims=True)) / f.std(axis=(1, 2), keepdims=True)
    u = np.log(np.stack([1 - p, p]))
    q = np.exp(u) / np.exp(u).sum(0)
    r = math.ceil(2 * s)
    h, w = p.shape
    for _ in range(iterations):
        msg = np.zeros_like(q)
        for i in range(h):
            for j in range(w):
                for a in range(max(0, i - r), min(h, i + r + 1)):
                    for b in range(max(0, j - r), min(w, j + r + 1)):
                        if (a, b) == (i, j):
                            continue
                        g = math.exp(-((a - i) ** 2 + (b - j) ** 2) / (2 * s * s))
                        df = np.sum((f[:, i, j] - f[:, a, b]) ** 2)
                        k = wb * g * math.exp(-df / (2 * c * c)) + wg * g
                        msg[:, i, j] += k * q[:, a, b]
        z = u + uf * msg
        q = np.exp(z - z.max(0)) / np.exp(z - z.max(0)).sum(0)
    return q[1]


def test_crf_torch_equals_brute_force():
    rng = np.random.default_rng(1)
    image = rng.random((2, 6, 7)).astype(np.float32)
    prob = rng.random((6, 7)).astype(np.float32)
    got = crf_probs(image, prob, 2, 1.0, 0.7, 1.5, 0.5, 2.0, backend="torch")
    want = _crf_brute_force(image, prob, 2, 1.0, 0.7, 1.5, 0.5, 2.0)
    np.testing.assert_allclose(got, want, atol=1e-5)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("opts", [
    {"refiner": "grabcut"}, {"band": 0.5}, {"fg_margin": 1.0}, {"agreement": 0},
    {"rw_beta": 0.0}, {"crf_spatial_sigma": float("nan")}, {"crf_iterations": 0},
    {"crf_backend": "cuda"}, {"min_component": 2.0}, {"top_fraction": 0.0},
    {"smooth_sigma": -1.0}, {"colour": 1}, {"uncertain_bg": 1.0},
])  # fmt: skip
def test_bad_options_give_one_error_line(opts):
    with pytest.raises(InputError) as err:
        RefineOptions.from_dict(opts)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("refine")
    assert next(iter(opts)) in msg


def test_bad_inputs_give_one_error_line():
    image, maps, _ = blob_case((8, 8))
    cases = [
        lambda: pseudo_label(image, maps, [0.5], 1),  # 2 members, 1 threshold
        lambda: pseudo_label(image, maps, [0.5, 1.0], 1),  # threshold out of range
        lambda: pseudo_label(image[:, :4], maps, [0.5, 0.5], 1),  # shapes differ
        lambda: pseudo_label(image, maps, [0.5, 0.5], 2),  # not a binary label
        lambda: pseudo_label(image, maps, [0.5, 0.5], 1, RefineOptions(agreement=3)),
    ]
    for call in cases:
        with pytest.raises(InputError) as err:
            call()
        assert "\n" not in str(err.value)


def test_crf_monai_backend_needs_its_extension():
    from monai.utils import optional_import

    _, has_ext = optional_import("monai._C")
    image, maps, _ = blob_case((8, 8))
    if has_ext:
        assert crf_probs(image, maps[0], backend="monai").shape == (8, 8)
    else:
        with pytest.raises(InputError, match=r"monai\._C"):
            crf_probs(image, maps[0], backend="monai")


# --------------------------------------------------------------------------- loss


def test_masked_loss_hand_computed():
    # pixels: target 1 (p1 = 3/4), target 0 (p1 = 1/2), ignored (anything)
    logits = torch.tensor([[[[0.0, 0.0, 5.0]], [[math.log(3), 0.0, -2.0]]]])  # (1, 2, 1, 3)
    target = torch.tensor([[[1, 0, 255]]])
    ce = (-math.log(3 / 4) - math.log(1 / 2)) / 2
    e = 1e-5
    dice_bg = 1 - (2 * 0.5 + e) / (0.75 + 1 + e)
    dice_fg = 1 - (2 * 0.75 + e) / (1.25 + 1 + e)
    want = (dice_bg + dice_fg) / 2 + ce
    got = masked_dice_ce(logits, target)
    assert float(got) == pytest.approx(want, abs=1e-6)
    # equals MONAI's DiceCELoss on the non-ignored pixels alone
    from monai.losses import DiceCELoss

    ref = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)(
        logits[..., :2], target[..., :2].unsqueeze(1)
    )
    assert float(got) == pytest.approx(float(ref), abs=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_ignored_pixels_change_neither_loss_nor_gradient(k):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, k, 5, 4, generator=gen)
    target = torch.randint(0, 2, (2, 5, 4), generator=gen)
    target[0, :2] = 255
    target[1, 3, 1:] = 255
    ignored = (target == 255).unsqueeze(1).expand_as(logits)
    other = logits.clone()
    other[ignored] = torch.randn(int(ignored.sum()), generator=gen) * 10
    results = []
    for z in (logits, other):
        z = z.clone().requires_grad_(True)
        loss = masked_dice_ce(z, target)
        loss.backward()
        results.append((loss.detach(), z.grad))
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2)
    assert torch.allclose(g1, g2, atol=0, rtol=0)
    assert (g1[ignored] == 0).all() and (g1[~ignored] != 0).any()


def test_all_ignored_batch_gives_zero_loss_and_bad_targets_raise():
    logits = torch.randn(1, 2, 3, 3, requires_grad=True)
    loss = masked_dice_ce(logits, torch.full((1, 3, 3), 255))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert (logits.grad == 0).all()
    with pytest.raises(InputError):
        masked_dice_ce(logits, torch.full((1, 3, 3), 2))
    with pytest.raises(InputError):
        masked_dice_ce(logits, torch.zeros(1, 3, 4))


def test_mil_loss_hand_computed():
    # two 1x4 images (lesion logit d = z1 - z0): a lesion-free one and a lesion one
    d = torch.tensor([[[0.0, 1.0, -1.0, 2.0]], [[3.0, -2.0, 1.0, 0.0]]])  # (2, 1, 4)
    logits = torch.stack([torch.zeros_like(d), d], dim=1)  # (2, 2, 1, 4)
    labels = torch.tensor([0, 1])

    def bce(x, y):  # binary cross-entropy with logits
        return math.log1p(math.exp(-x)) if y == 1 else math.log1p(math.exp(x))

    neg = sum(bce(v, 0) for v in (0.0, 1.0, -1.0, 2.0)) / 4
    pos = bce((3.0 + 1.0) / 2, 1)  # top_fraction 0.5: k = 2 largest of 4
    assert float(mil_loss(logits, labels, 0.5)) == pytest.approx((neg + pos) / 2, abs=1e-6)
    # bottom_fraction 0.25: the smallest logit (-2) of the lesion image is background
    pos_b = pos + bce(-2.0, 0)
    assert float(mil_loss(logits, labels, 0.5, 0.25)) == pytest.approx((neg + pos_b) / 2, abs=1e-6)
    # negative_top: the lesion-free image's top-k mean ((2 + 1) / 2) is pushed to 0 as well
    neg_t = neg + bce((2.0 + 1.0) / 2, 0)
    assert float(mil_loss(logits, labels, 0.5, 0.0, True)) == pytest.approx(
        (neg_t + pos) / 2, abs=1e-6
    )
    # one output channel: d is the channel itself
    assert float(mil_loss(d.unsqueeze(1), labels, 0.5)) == pytest.approx((neg + pos) / 2, abs=1e-6)
    with pytest.raises(InputError):
        mil_loss(logits, labels, 0.0)
    with pytest.raises(InputError):
        mil_loss(logits, torch.tensor([0, 1, 1]), 0.5)
