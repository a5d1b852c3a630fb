"""Score-CAM in mixed precision: coarse scores for every channel, float32 re-scoring of the
most influential ones until the estimated map error meets ``tol``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ensemblecam.cam import CamEngine
from ensemblecam.cam.scorecam import (
    FIRST_ROUND,
    TOL_Z,
    ScoreStats,
    map_error_profile,
    score_error_sigma,
    scorecam_weights,
)
from ensemblecam.errors import InputError
from nets import small_resnet


def test_error_profile_hand_computed() -> None:
    # w = softmax([ln 3, 0]) = [3/4, 1/4]; A0 = [2, 0], A1 = [0, 1] -> u = [3/2, 1/4]
    # J0 = 3/4 (A0 - u) = [3/8, -3/16]; only channel 0 loose:
    # left[0] = 2 z max_p |J0(p)| / max relu(u) = 2 z (3/8) / (3/2) = z / 2; left[1] = 0
    scores = torch.tensor([[math.log(3.0), 0.0]])
    acts = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    order, left = map_error_profile(scores, torch.tensor([[True, False]]), acts)
    assert order[0, 0] == 0
    assert torch.allclose(left, torch.tensor([[TOL_Z / 2, 0.0, 0.0]]))


def test_error_sigma_hand_computed() -> None:
    nan = float("nan")
    errors = torch.tensor([[1.0, 3.0, nan], [5.0, nan, nan]])
    sigma = score_error_sigma(errors)
    assert sigma[0] == pytest.approx(math.sqrt(2.0))  # Bessel: ((1-2)^2 + (3-2)^2) / 1
    assert math.isinf(float(sigma[1]))  # one observation says nothing of the spread


def _inputs() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    model = small_resnet(0.5)
    torch.manual_seed(3)
    x = torch.rand(2, 1, 32, 32)
    acts = {}
    h = model.layer4.register_forward_hook(lambda _m, _i, o: acts.__setitem__("a", o))
    with torch.no_grad():
        model(x)
    h.remove()
    return model, x, acts["a"], torch.tensor([1, 1])


def _map(w: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    m = torch.relu((w[..., None, None] * acts).sum(1)).flatten(1)
    lo, hi = m.amin(1, keepdim=True), m.amax(1, keepdim=True)
    return (m - lo) / (hi - lo)


def test_common_shift_cancels_after_first_round() -> None:
    model, x, acts, target = _inputs()
    full = ScoreStats()
    exact = scorecam_weights(model, x, acts, target, stats=full)
    stats = ScoreStats()
    shifted = scorecam_weights(
        model, x, acts, target, stats=stats, coarse=lambda t: model(t) + 0.3, tol=1e-6
    )
    # the observed errors are all 0.3: sigma = 0, the shift is subtracted, nothing more runs
    assert torch.allclose(shifted, exact, atol=1e-6)
    assert stats.passes == 1 + 2 * FIRST_ROUND
    assert stats.coarse == full.passes - 1  # every distinct non-constant mask, coarsely


def _noisy(model: nn.Module, scale: float):
    def coarse(t: torch.Tensor) -> torch.Tensor:  # an error that depends on the input
        return model(t) + scale * torch.sin(1e3 * t.flatten(1).sum(1, keepdim=True))

    return coarse


@pytest.mark.parametrize("tol", [0.0, 1e-3, float("inf")])
def test_tolerance_is_met(tol: float) -> None:
    model, x, acts, target = _inputs()
    exact = scorecam_weights(model, x, acts, target)
    stats = ScoreStats()
    w = scorecam_weights(model, x, acts, target, stats=stats, coarse=_noisy(model, 0.05), tol=tol)
    err = float((_map(w, acts) - _map(exact, acts)).abs().max())
    if tol == 0.0:  # everything re-scored: float32 result exactly
        assert torch.equal(w, exact)
        assert stats.passes == 1 + stats.coarse
    elif math.isinf(tol):  # coarse scores only
        assert stats.passes == 1 and err > 1e-3
    else:
        assert err <= tol
        assert 1 + 2 * FIRST_ROUND < stats.passes < stats.coarse


def test_engine_bf16_close_to_fp32() -> None:
    model = small_resnet(0.5)
    torch.manual_seed(4)
    x = torch.rand(1, 1, 32, 32)
    exact = CamEngine(model, ["scorecam"])(x).maps["scorecam"]
    eng = CamEngine(model, ["scorecam"], score_precision="bf16", score_tol=1e-3)
    mixed = eng(x).maps["scorecam"]
    assert eng.score_stats.coarse > 0
    assert float((mixed - exact).abs().max()) <= 1e-3
    rough = CamEngine(model, ["scorecam"], score_precision="bf16", score_tol=float("inf"))
    assert float((rough(x).maps["scorecam"] - exact).abs().max()) < 0.05


def test_engine_bf16_3d() -> None:
    net = small_resnet(spatial_dims=3)
    x = torch.rand(1, 1, 16, 16, 16)
    exact = CamEngine(net, ["scorecam"])(x).maps["scorecam"]
    mixed = CamEngine(net, ["scorecam"], score_precision="bf16", score_tol=1e-3)(x)
    assert mixed.maps["scorecam"].shape == (1, 16, 16, 16)
    assert float((mixed.maps["scorecam"] - exact).abs().max()) <= 1e-3


def test_bad_precision_options() -> None:
    model = small_resnet(0.5)
    with pytest.raises(InputError, match="score_precision 'fp16'"):
        CamEngine(model, ["scorecam"], score_precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="score_tol -1"):
        CamEngine(model, ["scorecam"], score_tol=-1.0)
