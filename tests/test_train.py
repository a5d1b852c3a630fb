"""Training stage: metrics, data loading, learning, resume, DDP and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn import metrics as skm
from typer.testing import CliRunner

from ensemblecam import models
from ensemblecam.cli import app
from ensemblecam.config import TrainConfig
from ensemblecam.errors import InputError
from ensemblecam.io.split import Fold, get_fold, write_splits
from ensemblecam.io.store import SliceStore
from ensemblecam.metrics.classification import auroc, classifier_metrics
from ensemblecam.stages import train
from ensemblecam.training.data import EpochBlur, EpochSampler, StoreDataset, batch_loader
from ensemblecam.training.records import read_metrics_csv
from store_factory import build_store

FAST = dict(model="simplecnn", model_args={"width": 8}, epochs=2, batch_size=8,
            optimizer="adam", lr=1e-3, accelerator="cpu")  # fmt: skip


def _cfg(store: Path, out: Path, **kw: Any) -> TrainConfig:
    return TrainConfig(store=store, out=out, **{**FAST, **kw})


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classifier_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    prob = np.round(np.clip(0.3 * y + rng.random(200) * 0.7, 0, 1), 1)  # many ties
    for thr in (0.3, 0.5, 0.8):
        got = classifier_metrics(y, prob, thr)
        pred = prob >= thr
        assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
        assert got["precision"] == pytest.approx(skm.precision_score(y, pred, zero_division=0))
        assert got["recall"] == pytest.approx(skm.recall_score(y, pred, zero_division=0))
        assert got["f1"] == pytest.approx(skm.f1_score(y, pred, zero_division=0))
        assert got["auroc"] == pytest.approx(skm.roc_auc_score(y, prob))
        assert got["confusion"] == skm.confusion_matrix(y, pred, labels=[0, 1]).tolist()


def test_classifier_metrics_edge_cases() -> None:
    m = classifier_metrics(np.array([0, 0, 1]), np.array([0.1, 0.2, 0.3]))
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)  # nothing predicted
    assert m["auroc"] == 1.0
    assert np.isnan(auroc(np.zeros(4), np.random.rand(4)))
    assert auroc(np.array([0, 1, 0, 1]), np.full(4, 0.5)) == 0.5


# --------------------------------------------------------------------------- data


def test_store_dataset_reads_the_store(tiny_store: Path) -> None:
    store = SliceStore.open(tiny_store)
    idx = np.array([40, 3, 17, 90, 5])
    ds = StoreDataset(store, idx)
    x, y = ds[2]
    assert x.dtype.is_floating_point and x.shape == (1, 32, 32)
    np.testing.assert_array_equal(x.numpy(), store.images[17].astype(np.float32))
    assert y == store.labels[17]
    bx, by = ds[[4, 0, 3]]  # unsorted store indices, batched read
    np.testing.assert_array_equal(bx.numpy(), store.images[[5, 40, 90]].astype(np.float32))
    np.testing.assert_array_equal(by.numpy(), store.labels[[5, 40, 90]])
    batches = list(batch_loader(ds, 2, EpochSampler(len(ds), 0), drop_last=True))
    assert [tuple(b[0].shape) for b in batches] == [(2, 1, 32, 32)] * 2
    got = np.concatenate([b[1].numpy() for b in batches])
    np.testing.assert_array_equal(got, ds.labels[list(EpochSampler(len(ds), 0))[:4]])
    blur = StoreDataset(store, idx, EpochBlur((1.0, 1.0), 1.0, seed=0))
    bx, _ = blur[0]
    assert bx.shape == (1, 32, 32) and not np.allclose(bx.numpy(), ds[0][0].numpy())
    with pytest.raises(InputError, match="out of range"):
        StoreDataset(store, [store.n_slices])


def test_epoch_sampler_is_deterministic_and_partitions() -> None:
    a = list(EpochSampler(10, seed=3))
    assert sorted(a) == list(range(10)) and a == list(EpochSampler(10, seed=3))
    s = EpochSampler(10, seed=3)
    s.set_epoch(1)
    assert list(s) != a
    ranks = [EpochSampler(10, 3, rank=r, world=3) for r in range(3)]
    got = [i for r in ranks for i in r]
    assert len(got) == 12 and set(got) == set(range(10))
    w = np.where(np.arange(10) < 2, 100.0, 1.0)  # weighted sampler favours 0, 1
    drawn = list(EpochSampler(10, 0, weights=w))
    assert sum(i < 2 for i in drawn) > 5


def test_presets_and_overrides() -> None:
    paper = train.resolve_recipe(TrainConfig())
    assert (paper["optimizer"], paper["lr"], paper["momentum"], paper["batch_size"],
            paper["epochs"], paper["augment"]) == ("sgd", 1e-3, 0.9, 32, 10, "none")  # fmt: skip
    thesis = train.resolve_recipe(TrainConfig(preset="thesis", augment="blur", epochs=3))
    keys = ("optimizer", "lr", "batch_size", "scheduler", "step_size", "gamma")
    assert tuple(thesis[k] for k in keys) == ("adam", 1e-2, 60, "step", 40, 0.1)
    assert (thesis["augment"], thesis["epochs"]) == ("blur", 3)


# --------------------------------------------------------------------------- training


def test_small_resnet_learns(tmp_path: Path) -> None:
    store = build_store(tmp_path / "store", n_cases=24, slices_per_case=8)
    cfg = TrainConfig(
        store=store, out=tmp_path / "run", model="resnet10", model_args={"widen_factor": 0.25},
        epochs=3, batch_size=8, optimizer="sgd", lr=1e-2, monitor="val_loss",
        accelerator="cpu",
    )  # fmt: skip
    out = train.train_classifier(cfg, progress=False)
    assert out == tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == [
        ".ensemblecam", "best.pt", "confusion_matrix.png", "learning_curve.png",
        "metrics.csv",
        "train.json",
    ]  # fmt: skip
    for png in ("learning_curve.png", "confusion_matrix.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    history = read_metrics_csv(out / "metrics.csv")
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]  # it is learning
    summary = json.loads((out / "train.json").read_text())
    assert summary["best_epoch"] == min(history, key=lambda r: r["val_loss"])["epoch"]

    # held-out cases (the fold's test part, never seen in training or selection)
    s = SliceStore.open(store)
    test_ds = StoreDataset(s, s.indices_for_cases(get_fold(store / "splits.json", 0).test))
    model, info = models.load_checkpoint(out / "best.pt")
    assert info["epoch"] == summary["best_epoch"] and info["channels"] == ["flair"]
    assert info["model_args"] == {"widen_factor": 0.25, "in_channels": 1, "num_classes": 2}
    assert info["size"] == [32, 32] and info["prepare"] == {"layout": "test-factory"}
    prob, y = train.predict(model, test_ds)
    m = classifier_metrics(y, prob)
    assert m["auroc"] > 0.8
    assert m["accuracy"] > max(y.mean(), 1 - y.mean()) + 0.1  # beats the majority class


def test_reproducible_and_resume_continues(tmp_path: Path, tiny_store: Path) -> None:
    cols = ["train_loss", "val_loss", "accuracy", "f1", "auroc", "tp", "fp"]
    full = train.train_classifier(_cfg(tiny_store, tmp_path / "a"), progress=False)
    again = train.train_classifier(_cfg(tiny_store, tmp_path / "b"), progress=False)
    ha = read_metrics_csv(full / "metrics.csv")
    hb = read_metrics_csv(again / "metrics.csv")
    assert [[r[c] for c in cols] for r in ha] == [[r[c] for c in cols] for r in hb]

    # "killed" after epoch 1: nothing under the final name, last.pt in the partial folder
    cfg = _cfg(tiny_store, tmp_path / "c")
    assert train.train_classifier(cfg, progress=False, stop_after_epoch=1) is None
    assert not (tmp_path / "c").exists()
    partial = tmp_path / ".c.partial"
    assert models.read_checkpoint(partial / "last.pt")["train_state"]["epoch"] == 1
    with pytest.raises(InputError, match=r"unfinished run exists.*--resume"):
        train.train_classifier(cfg, progress=False)
    resumed = train.train_classifier(cfg.model_copy(update={"resume": True}), progress=False)
    assert resumed is not None and not partial.exists()
    assert json.loads((resumed / "train.json").read_text())["resumed_from"] == 1
    hc = read_metrics_csv(resumed / "metrics.csv")
    assert [r["epoch"] for r in hc] == [1, 2]
    np.testing.assert_allclose([[r[c] for c in cols] for r in hc],
                               [[r[c] for c in cols] for r in ha], rtol=1e-6)  # fmt: skip

    # a finished run is refused without --force
    with pytest.raises(InputError, match="already holds a finished run; use --force"):
        train.train_classifier(cfg, progress=False)
    assert train.train_classifier(cfg.model_copy(update={"force": True}), progress=False)


def test_resume_refuses_another_run(tmp_path: Path, tiny_store: Path) -> None:
    cfg = _cfg(tiny_store, tmp_path / "r", epochs=3)
    train.train_classifier(cfg, progress=False, stop_after_epoch=1)
    with pytest.raises(InputError, match="cannot resume: it was started with seed=0, now 5"):
        train.train_classifier(cfg.model_copy(update={"resume": True, "seed": 5}))


def test_ddp_two_processes_on_cpu(tmp_path: Path, tiny_store: Path) -> None:
    out = tmp_path / "ddp"
    exe = shutil.which("ensemblecam")
    assert exe is not None, "the ensemblecam console script is not installed"
    cmd = [sys.executable, exe, "train", "--store", str(tiny_store),
           "--model", "simplecnn", "--model-args", '{"width": 8}', "--epochs", "1",
           "--batch-size", "8", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "MEMBER: 2/2" in res.stderr + res.stdout
    _, info = models.load_checkpoint(out / "best.pt")
    assert info["fold"] == "fold0"
    n_val = len(SliceStore.open(tiny_store).indices_for_cases(
        get_fold(tiny_store / "splits.json", 0).val))  # fmt: skip
    assert sum(map(sum, info["metrics"]["confusion"])) == n_val  # gathered, no duplicates


# --------------------------------------------------------------------------- bad input


def test_bad_inputs(tmp_path: Path, tiny_store: Path) -> None:
    def fails(match: str, store: Path = tiny_store, **kw: Any) -> None:
        with pytest.raises(InputError, match=match) as exc:
            train.plan_run(_cfg(store, tmp_path / "x", **kw))
        assert "\n" not in str(exc.value)

    fails("slice store not found", store=tmp_path / "nowhere")
    fails(r"unknown model 'resnet99'; known: resnet10, resnet18", model="resnet99")
    fails("no fold 7", fold=7)
    weights = tmp_path / "w.pt"
    import torch

    torch.save(models.build_model("simplecnn", 3, width=8).state_dict(), weights)
    two = build_store(tmp_path / "two", n_cases=6, channels=("t1", "t2"))
    fails("takes 3 input channels, the store has 2", two, weights=weights, model_args={"width": 8})
    torch.save(models.build_model("simplecnn", 1, width=4).state_dict(), weights)
    fails("weights file does not fit the model", weights=weights)

    neg = build_store(tmp_path / "neg", n_cases=6, positive_fraction=0.0)
    fails("fold0 train part has no lesion \\(label 1\\) slices", store=neg)
    pos = build_store(tmp_path / "pos", n_cases=6, positive_fraction=1.0)
    fails("fold0 train part has no lesion-free \\(label 0\\) slices", store=pos)

    names = SliceStore.open(tiny_store).case_names
    write_splits(tiny_store / "noval.json", [Fold("f", train=names[:8], test=names[8:])],
                 "list", 0, str(tiny_store))  # fmt: skip
    fails("f has no val slices \\(pass --val-part test", splits=tiny_store / "noval.json")
    train.plan_run(_cfg(tiny_store, tmp_path / "x", splits=tiny_store / "noval.json",
                        val_part="test"))  # fmt: skip


def test_cli_one_line_errors(tmp_path: Path, tiny_store: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--store", str(tiny_store), "--model", "nonet",
                              "--out", str(tmp_path / "o")])  # fmt: skip
    assert res.exit_code == 2
    assert "error: unknown model 'nonet'" in res.output
    res = runner.invoke(app, ["train", "--store", str(tiny_store), "--model-args", "[1]"])
    assert res.exit_code == 2 and "not a JSON object" in res.output


@pytest.mark.slow  # ~45 s on an AVX2 CPU; test_small_resnet_learns is the default run's check
def test_resnet_learns_on_brats_phantom(tmp_path: Path) -> None:
    """The built-in phantom is a real weak-supervision task: a small ResNet separates lesion
    from lesion-free slices of held-out cases after 6 epochs (confounder spots included).

    Margin measured over seeds 0-7 (phantom and training seed together): held-out AUROC
    0.853-0.978 with AVX-512 CPU kernels and 0.865-0.971 with AVX2 kernels
    (ONEDNN_MAX_CPU_ISA=AVX2); the bound 0.75 lies well below the worst. (The earlier
    3-epoch, 14-case version ranged 0.63-0.98 over seeds: too thin a margin.)"""
    from ensemblecam.config import PrepareConfig, SplitConfig, SynthConfig
    from ensemblecam.io.split import make_splits
    from ensemblecam.stages.prepare import prepare_store
    from ensemblecam.synth import synth_dataset

    data = synth_dataset(
        SynthConfig(out=tmp_path / "phantom", n_cases=20, shape=(64, 64, 24), seed=0, workers=2)
    )
    store = prepare_store(PrepareConfig(data=data, out=tmp_path / "store", workers=2))
    make_splits(SplitConfig(store=store, folds=3, val_fraction=0.2))
    cfg = TrainConfig(
        store=store, out=tmp_path / "run", model="resnet10", model_args={"widen_factor": 0.5},
        epochs=6, batch_size=16, optimizer="adam", lr=2e-3, monitor="val_loss",
        accelerator="cpu",
    )  # fmt: skip
    out = train.train_classifier(cfg, progress=False)
    s = SliceStore.open(store)
    test_ds = StoreDataset(s, s.indices_for_cases(get_fold(store / "splits.json", 0).test))
    model, _ = models.load_checkpoint(out / "best.pt")
    prob, y = train.predict(model, test_ds)
    assert 0 < y.mean() < 1
    assert classifier_metrics(y, prob)["auroc"] > 0.75


def test_learning_curve_limits_leave_an_epoch1_spike_off_scale() -> None:
    from ensemblecam.training.records import robust_limits

    # later epochs span [0.2, 0.6] (w 0.4); the val spike 17.5 is left off, the train
    # loss 0.7 of epoch 1 lies within one width and joins: [0.2, 0.7], padded by 5% of 0.5
    lo, hi = robust_limits([[0.7, 0.5, 0.3, 0.2], [17.5, 0.6, 0.4, 0.5]])
    assert (lo, hi) == pytest.approx((0.175, 0.725))
    # an ordinary decrease keeps epoch 1: [0.5, 1.0] padded by 0.025
    assert robust_limits([[1.0, 0.8, 0.6, 0.5]]) == pytest.approx((0.475, 1.025))
    assert robust_limits([[3.0]]) == pytest.approx((2.85, 3.15))  # flat: 5% of |3|
    # two epochs: both kept (no spike can be told apart): [0.6, 1.6] padded by 0.05
    assert robust_limits([[1.6, 0.6]]) == pytest.approx((0.55, 1.65))
    assert robust_limits([[float("nan")]]) is None


@pytest.mark.parametrize("workers", [0, 1])
def test_blur_augmented_run_resumes_bit_identically(
    tmp_path: Path, tiny_store: Path, workers: int
) -> None:
    """The blur draws of epoch e depend on (seed, epoch, worker) alone, so a run killed after
    epoch 1 and resumed makes the same epoch 2 as one that was never interrupted."""
    cols = ["train_loss", "val_loss", "accuracy", "auroc"]
    aug = {"augment": "blur", "blur_prob": 0.5, "workers": workers}
    full = train.train_classifier(_cfg(tiny_store, tmp_path / "a", **aug), progress=False)
    cfg = _cfg(tiny_store, tmp_path / "b", **aug)
    assert train.train_classifier(cfg, progress=False, stop_after_epoch=1) is None
    resumed = train.train_classifier(cfg.model_copy(update={"resume": True}), progress=False)
    assert resumed is not None
    ha = read_metrics_csv(full / "metrics.csv")
    hb = read_metrics_csv(resumed / "metrics.csv")
    assert [[r[c] for c in cols] for r in hb] == [[r[c] for c in cols] for r in ha]
