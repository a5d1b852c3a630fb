"""Classifier gating of the self-trained U-Net's masks: the rule, its inputs, bad values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from ensemblecam.cli import app
from ensemblecam.config import load_config
from ensemblecam.errors import InputError
from ensemblecam.io.mapstore import write_map_set
from ensemblecam.stages.gate import (
    FALLBACK_THRESHOLD,
    choose_threshold,
    gate_masks,
    gate_record,
    map_set_probs,
)


def test_gate_empties_slices_below_the_threshold_only() -> None:
    masks = np.ones((4, 2, 3), np.uint8)
    masks[3, 0, 0] = 0
    probs = np.array([0.2, 0.5, 0.4999, 0.9])
    out = gate_masks(masks, probs, 0.5)
    assert out[0].sum() == 0 and out[2].sum() == 0  # P < 0.5: emptied
    np.testing.assert_array_equal(out[1], masks[1])  # P = 0.5 is "lesion": kept
    np.testing.assert_array_equal(out[3], masks[3])
    assert masks.sum() == 4 * 6 - 1  # the input is not changed
    # probability maps are gated the same way; threshold 0 gates nothing
    prob_maps = np.full((4, 2, 3), 0.7, np.float32)
    assert gate_masks(prob_maps, probs, 0.5).sum() == pytest.approx(2 * 6 * 0.7)
    np.testing.assert_array_equal(gate_masks(masks, probs, 0.0), masks)
    rec = gate_record(probs, 0.5, ["a", "b"])
    assert rec["n_gated"] == 2 and rec["n_slices"] == 4 and rec["classifiers"] == ["a", "b"]
    with pytest.raises(ValueError):
        gate_masks(masks, probs[:3], 0.5)


def test_calibrated_gate_maximises_the_slice_f1_by_hand() -> None:
    # 6 labelled slices (3 lesion) + 1 unlabelled (-1, left out); the U-Net calls 5
    detected = np.array([1, 1, 0, 1, 1, 0, 1], bool)
    probs = np.array([0.9, 0.2, 0.8, 0.6, 0.1, 0.3, 0.05])
    labels = np.array([1, 1, 1, 0, 0, 0, -1])
    res = choose_threshold(detected, probs, labels, [0.5, 0.15])
    # t=0: called {0, 1, 3, 4}: TP 2, FP 2, FN 1 -> F1 4/7
    # t=0.15: called {0, 1, 3}: TP 2, FP 1, FN 1 -> F1 4/6 (the best)
    # t=0.5: called {0, 3}: TP 1, FP 1, FN 2 -> F1 2/5
    assert [r["threshold"] for r in res["table"]] == [0.0, 0.15, 0.5]
    assert [r["f1"] for r in res["table"]] == pytest.approx([4 / 7, 4 / 6, 2 / 5])
    assert [(r["tp"], r["fp"], r["fn"]) for r in res["table"]] == [(2, 2, 1), (2, 1, 1), (1, 1, 2)]
    assert res["threshold"] == 0.15
    # a gate that only removes lesion slices is switched off (t = 0); ties: the lower t
    assert choose_threshold(detected, probs, labels, [0.95])["threshold"] == 0.0
    same = choose_threshold(detected[:3], np.array([0.9, 0.9, 0.9]), labels[:3], [0.3, 0.6])
    assert same["threshold"] == 0.0 and len({r["f1"] for r in same["table"]}) == 1
    # no lesion slice to calibrate with: the classifiers' decision threshold
    free = choose_threshold(detected, probs, np.zeros(7, int), [0.5])
    assert free["threshold"] == FALLBACK_THRESHOLD and "no lesion slice" in free["chosen_by"]


def test_gate_probability_is_the_mean_over_classifiers(tmp_path: Path) -> None:
    maps = np.zeros((3, 2, 2), np.float16)
    index = np.array([2, 5, 7])
    write_map_set(tmp_path / "a__gradcam", {}, index, maps, np.array([0.1, 0.6, 0.8]))
    write_map_set(tmp_path / "b__gradcam", {}, index, maps, np.array([0.3, 0.2, 0.4]))
    sets = [tmp_path / "a__gradcam", tmp_path / "b__gradcam"]
    # store indices in any order; value = (p_a + p_b) / 2
    np.testing.assert_allclose(map_set_probs(sets, np.array([7, 2])), [0.6, 0.2], atol=1e-7)
    with pytest.raises(InputError, match="no maps for 1 requested slices"):
        map_set_probs(sets, np.array([2, 3]))


def test_bad_gate_values_are_one_error_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    for run, key in (
        ({"gate": "maybe"}, r"run\.gate"),
        ({"gate_threshold": 1.5}, r"run\.gate_threshold"),
        ({"gate_threshold": ".nan"}, r"run\.gate_threshold"),
        ({"gate_threshold": "sometimes"}, r"'run\.gate_threshold': must be auto or a prob"),
    ):
        bad.write_text(yaml.safe_dump({"run": run}).replace("'.nan'", ".nan"))
        with pytest.raises(InputError, match=key):
            load_config(bad)
        result = CliRunner().invoke(app, ["run", str(bad)])
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert result.output.startswith("error:")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"run": {"out": str(tmp_path / "run")}}))
    result = CliRunner().invoke(app, ["run", str(good), "--gate", "maybe"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "run").exists()
