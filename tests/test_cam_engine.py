"""CAM engine: hand-computed maps on a tiny linear net, torchcam agreement, invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ensemblecam.cam import CamEngine, compute_cams, find_target_layer, minmax, postprocess
from ensemblecam.cam.engine import spatial_layers
from ensemblecam.errors import InputError
from nets import small_resnet

# x_ij = 0..15 row-major on a 4x4 image
X = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
XN = np.arange(16, dtype=np.float64).reshape(4, 4)


class FlatHead(nn.Module):
    """conv1x1 (A0 = x, A1 = 15 - x) -> flatten -> linear with fixed weights V."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.fc = nn.Linear(32, 2, bias=False)
        with torch.no_grad():
            self.conv.weight[:] = torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1)
            self.conv.bias[:] = torch.tensor([0.0, 15.0])
            v = torch.zeros(2, 2, 4, 4)
            v[1, 0, :, :2] = 1.0  # class 1, channel 0: left half
            v[1, 1, :2, :] = -1.0  # class 1, channel 1: top half negative
            v[1, 1, 3, 3] = 1.0  # ... and one positive position
            v[0] = -v[1]
            self.fc.weight[:] = v.reshape(2, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


class GapHead(nn.Module):
    """conv1x1 (A0 = x, A1 = 15 - x) -> global average pool -> linear W = [[1, 0], [1, -0.5]]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight[:] = torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1)
            self.conv.bias[:] = torch.tensor([0.0, 15.0])
            self.fc.weight[:] = torch.tensor([[1.0, 0.0], [1.0, -0.5]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).flatten(1))


def _norm(m: np.ndarray) -> np.ndarray:
    m = np.maximum(m, 0)
    return (m - m.min()) / (m.max() - m.min())


def _maps(model: nn.Module, methods: list[str], x: torch.Tensor = X, **kw) -> dict:
    return {k: v[0].numpy() for k, v in compute_cams(model, x, methods, **kw).items()}


def test_hand_computed_gradient_methods() -> None:
    got = _maps(FlatHead(), ["gradcam", "gradcampp", "smoothgradcampp", "xgradcam", "layercam"])
    # Grad-CAM: g0 = 1 on the 8 left-half positions -> w0 = 8/16; g1 = -1 on 8 top positions,
    # +1 at (3,3) -> w1 = -7/16; relu(0.5 x - 7/16 (15 - x)) = relu(15 x - 105) / 16
    np.testing.assert_allclose(got["gradcam"], _norm((15 * XN - 105) / 16), atol=1e-6)
    # XGrad-CAM: sum A0 = sum A1 = 120; sum_left x = 52; sum_top (15 - x) = 92, A1(3,3) = 0
    # w0 = 52/120, w1 = -92/120 -> relu(1.2 x - 11.5)
    np.testing.assert_allclose(got["xgradcam"], _norm(1.2 * XN - 11.5), atol=1e-6)
    # LayerCAM: relu(g0) A0 + relu(g1) A1 = x on the left half + (15 - 15) at (3,3)
    left = np.zeros((4, 4))
    left[:, :2] = 1
    np.testing.assert_allclose(got["layercam"], _norm(XN * left), atol=1e-6)
    # Grad-CAM++: where g = 1: alpha = 1 / (2 + 120 * 1) = 1/122; where g = -1 relu(g) = 0;
    # w0 = 8/122, w1 = 1/122 -> (8 x + 15 - x) / 122, min-max -> x / 15
    np.testing.assert_allclose(got["gradcampp"], _norm((7 * XN + 15) / 122), atol=1e-6)
    np.testing.assert_allclose(got["gradcampp"], XN / 15, atol=1e-6)
    # the net is linear in x: noisy gradients equal the clean ones, so Smooth = Grad-CAM++
    np.testing.assert_allclose(got["smoothgradcampp"], XN / 15, atol=1e-6)


def test_hand_computed_cam_and_scorecam() -> None:
    got = _maps(GapHead(), ["cam", "gradcam"])
    # CAM: w = W[1] = [1, -0.5] -> relu(x - 0.5 (15 - x)) = relu(1.5 x - 7.5)
    np.testing.assert_allclose(got["cam"], _norm(1.5 * XN - 7.5), atol=1e-6)
    # Grad-CAM on GAP + linear: w = W[1] / 16, the same map after min-max
    np.testing.assert_allclose(got["gradcam"], got["cam"], atol=1e-6)

    sc = _maps(FlatHead(), ["scorecam"])["scorecam"]

    # masks: M0 = x/15, M1 = (15 - x)/15 (no upsampling: 4x4 layer on a 4x4 input)
    # score(z) = sum_left conv0(z) - sum_top conv1(z) + conv1(z)(3,3), conv0 = z, conv1 = 15 - z
    def score(z: np.ndarray) -> float:
        return z[:, :2].sum() - (15 - z[:2]).sum() + (15 - z[3, 3])

    s = np.array([score(XN * XN / 15), score(XN * (15 - XN) / 15)])
    w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    np.testing.assert_allclose(sc, _norm(w[0] * XN + w[1] * (15 - XN)), atol=1e-5)


@pytest.fixture(scope="module")
def resnet_and_batch() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    return small_resnet(), torch.rand(3, 1, 64, 64)


@pytest.mark.parametrize(
    ("name", "cls"),
    [("gradcam", "GradCAM"), ("xgradcam", "XGradCAM"), ("layercam", "LayerCAM")],
)
def test_agrees_with_torchcam_gradient(resnet_and_batch, name: str, cls: str) -> None:
    import torchcam.methods as tm

    model, x = resnet_and_batch
    ours = compute_cams(model, x, [name], layer="layer4")[name]
    with getattr(tm, cls)(model, "layer4") as ex:
        scores = model(x)
        ref = ex(class_idx=1, scores=scores, normalized=False)[0].detach()
    ref = postprocess(ref, tuple(x.shape[2:]))
    assert (ours - ref).abs().max() < 1e-4


def test_agrees_with_torchcam_scorecam(resnet_and_batch) -> None:
    from torchcam.methods import ScoreCAM

    model, x = resnet_and_batch
    x = x[:2]
    ours = compute_cams(model, x, ["scorecam"], layer="layer4")["scorecam"]
    with ScoreCAM(model, "layer4", batch_size=64, input_shape=(1, 64, 64)) as ex:
        with torch.no_grad():
            model(x)
        ref = ex(class_idx=1, normalized=False)[0]
    ref = postprocess(ref, tuple(x.shape[2:]))
    assert (ours - ref).abs().max() < 1e-4


def test_batch_equals_single_and_range(resnet_and_batch) -> None:
    model, x = resnet_and_batch
    methods = ["gradcam", "gradcampp", "smoothgradcampp", "xgradcam", "layercam", "cam"]
    eng = CamEngine(model, methods, smooth_n=3, score_batch=4)
    batch = eng(x, keys=[10, 11, 12]).maps
    for i in range(3):
        single = eng(x[i : i + 1], keys=[10 + i]).maps
        for m in methods:
            assert (batch[m][i] - single[m][0]).abs().max() < 1e-5, m
    for m in methods:
        assert batch[m].shape == (3, 64, 64)
        assert float(batch[m].min()) >= 0.0 and float(batch[m].max()) <= 1.0
        assert not torch.isnan(batch[m]).any()


def test_params_untouched_and_no_param_grads(resnet_and_batch) -> None:
    model, x = resnet_and_batch
    compute_cams(model, x[:1], ["gradcam", "gradcampp"])
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_constant_activation_gives_zeros_not_nan() -> None:
    model = GapHead()
    methods = ["cam", "gradcam", "gradcampp", "xgradcam", "layercam", "scorecam"]
    maps = compute_cams(model, torch.full((2, 1, 4, 4), 3.0), methods)
    for m in methods:
        assert not torch.isnan(maps[m]).any(), m
        assert float(maps[m].abs().max()) == 0.0, m
    m = minmax(torch.ones(2, 5, 5))
    assert float(m.abs().max()) == 0.0


def test_scorecam_skipping_equals_no_skipping() -> None:
    from ensemblecam.cam.scorecam import ScoreStats, scorecam_weights

    torch.manual_seed(0)
    model = small_resnet()
    x = torch.rand(2, 1, 32, 32)
    acts = torch.rand(2, 6, 4, 4)
    acts[0, 1] = 0.0  # constant channels
    acts[1, 2] = 2.5
    acts[0, 4] = acts[0, 3] * 4  # bit-identical mask after min-max as channel 3
    target = torch.tensor([1, 1])
    stats = ScoreStats()
    w = scorecam_weights(model, x, acts, target, batch_size=5, stats=stats)
    assert stats.passes == 1 + (12 - 3)  # one zero-input pass; 3 channels shared
    # reference without any skipping: one forward per (image, channel)
    from ensemblecam.cam.scorecam import channel_masks

    masks = torch.nn.functional.interpolate(
        channel_masks(acts).flatten(0, 1)[:, None], size=(32, 32), mode="bilinear"
    ).reshape(2, 6, 1, 32, 32)
    with torch.no_grad():
        s = torch.stack([model(x[i] * masks[i])[:, 1] for i in range(2)])
    assert torch.allclose(w, torch.softmax(s, 1), atol=1e-5)


def test_scorecam_top_k_keeps_highest_energy() -> None:
    model = small_resnet()
    torch.manual_seed(2)
    x = torch.rand(2, 1, 64, 64)
    eng_exact = CamEngine(model, ["scorecam"], accelerate=False)
    exact = eng_exact(x)
    k = 40
    approx = CamEngine(model, ["scorecam"], top_k=k, accelerate=False)(x)
    assert approx.maps["scorecam"].shape == exact.maps["scorecam"].shape
    assert approx.maps["scorecam"].max() <= 1.0
    full_k = CamEngine(model, ["scorecam"], top_k=10_000, accelerate=False)(x)
    assert torch.allclose(full_k.maps["scorecam"], exact.maps["scorecam"], atol=1e-6)


def test_accelerated_scorecam_matches_eager(resnet_and_batch) -> None:
    model, x = resnet_and_batch
    a = CamEngine(model, ["scorecam"], accelerate=True)(x[:1]).maps["scorecam"]
    b = CamEngine(model, ["scorecam"], accelerate=False)(x[:1]).maps["scorecam"]
    assert (a - b).abs().max() < 1e-3


def test_target_choices(resnet_and_batch) -> None:
    model, x = resnet_and_batch
    r0 = CamEngine(model, ["gradcam"], target=0)(x)
    r1 = CamEngine(model, ["gradcam"], target="lesion")(x)
    rp = CamEngine(model, ["gradcam"], target="predicted")(x)
    assert r0.target.tolist() == [0, 0, 0] and r1.target.tolist() == [1, 1, 1]
    assert rp.target.tolist() == r1.logits.argmax(1).tolist()
    assert torch.allclose(r1.probs, torch.softmax(r1.logits, 1)[:, 1])
    with pytest.raises(InputError, match="only 2 outputs"):
        CamEngine(model, ["gradcam"], target=5)(x)
    with pytest.raises(InputError, match="target"):
        CamEngine(model, ["gradcam"], target="tumour")


def test_raw_maps_not_normalised(resnet_and_batch) -> None:
    model, x = resnet_and_batch
    raw = compute_cams(model, x, ["gradcam"], raw=True)["gradcam"]
    norm = compute_cams(model, x, ["gradcam"])["gradcam"]
    assert float(raw.min()) >= 0.0
    assert torch.allclose(minmax(raw), norm, atol=1e-5)


def test_target_layer_auto_and_errors() -> None:
    model = small_resnet()
    assert find_target_layer(model, (1, 64, 64)) == "layer4"
    # at 16x16 layer4 is 1x1: the last layer with spatial extent > 1 is layer3
    assert find_target_layer(model, (1, 16, 16)) == "layer3"
    with pytest.raises(InputError, match=r"candidates: .*layer4"):
        find_target_layer(model, (1, 64, 64), "layer9")
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(InputError, match="no layer with spatial output"):
        find_target_layer(mlp, (1, 4, 4))
    assert "conv" in spatial_layers(GapHead(), (1, 4, 4))
    with pytest.raises(InputError, match="CAM method"):
        CamEngine(model, ["gradcam", "foo"])
    with pytest.raises(InputError, match="method cam needs"):
        compute_cams(model, torch.rand(1, 1, 64, 64), ["cam"], layer="layer3")


def test_three_d_network() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(4, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(6, 2),
    ).eval()
    x = torch.rand(2, 1, 8, 8, 8)
    methods = ["cam", "gradcam", "gradcampp", "smoothgradcampp", "xgradcam", "layercam", "scorecam"]
    eng = CamEngine(net, methods, smooth_n=2)
    res = eng(x)
    assert eng.layer == "3"
    for m in methods:
        assert res.maps[m].shape == (2, 8, 8, 8), m
        assert float(res.maps[m].min()) >= 0 and float(res.maps[m].max()) <= 1 + 1e-6
    # GAP + linear after the target layer: Grad-CAM weights are W[c] / n, the CAM map
    assert torch.allclose(res.maps["gradcam"], res.maps["cam"], atol=1e-5)
