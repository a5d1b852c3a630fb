"""The U-Nets' calibrated decision threshold (:mod:`ensemblecam.stages.threshold`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ensemblecam.config import Config
from ensemblecam.stages.threshold import (
    FALLBACK_THRESHOLD,
    choose_segmenter_threshold,
    threshold_counts,
)


def test_threshold_counts_and_choice_hand_computed() -> None:
    probs = np.array([[0.2, 0.6], [0.9, 0.4]])
    truth = np.array([[0, 1], [1, 1]], bool)
    grid = [0.3, 0.5, 0.7]
    counts = threshold_counts(probs, truth, grid)
    # t 0.3: all three lesion pixels called; 0.5: 0.4 missed; 0.7: only 0.9 called
    np.testing.assert_array_equal(counts, [[3, 0, 0], [2, 0, 1], [1, 0, 2]])
    got = choose_segmenter_threshold(counts, grid)
    assert got["threshold"] == 0.3
    assert [r["lesion_dice"] for r in got["table"]] == pytest.approx([1.0, 0.8, 0.5])
    # a tie goes to the threshold nearest 0.5 (the argmax)
    tie = threshold_counts(np.array([0.5]), np.array([True]), [0.3, 0.45, 0.6])
    assert choose_segmenter_threshold(tie, [0.3, 0.45, 0.6])["threshold"] == 0.45
    # no lesion pixel: nothing to calibrate with
    none = threshold_counts(probs, np.zeros_like(truth), grid)
    assert choose_segmenter_threshold(none, grid)["threshold"] == FALLBACK_THRESHOLD


@pytest.mark.parametrize("value", ["0:0.9:0.1", "0.5,1.0", "a:b"])
def test_bad_segmenter_grid_is_one_error_line(value: str, tmp_path: Path) -> None:
    from ensemblecam.errors import InputError
    from ensemblecam.pipeline.run import check_run_config
    from tiny_run import tiny_sections

    data = tiny_sections(run={"segmenter_grid": value})
    data["prepare"]["data"] = str(tmp_path)
    with pytest.raises(InputError, match=r"^config: run\.segmenter_grid ") as err:
        check_run_config(Config(**data))
    assert "\n" not in str(err.value)
