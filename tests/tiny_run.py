"""The tiny end-to-end run the pipeline tests share: a 6-case phantom and a config whose
stages take seconds (a small CNN, 2 folds, 1-2 epochs, a coarse threshold grid)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ensemblecam.config import SynthConfig
from ensemblecam.synth import synth_dataset

TINY: dict[str, Any] = {
    "prepare": {"layout": "brats", "workers": 1},
    "split": {"scheme": "kfold", "folds": 2, "val_fraction": 0.25, "seed": 0},
    "train": {
        "model_args": {"width": 8},
        "epochs": 2,
        "batch_size": 16,
        "optimizer": "adam",
        "lr": 3e-3,
        "accelerator": "cpu",
        "monitor": "val_loss",
    },
    "cam": {"methods": ["gradcam", "layercam"], "batch_size": 64, "accelerator": "cpu"},
    "search": {"operators": ["and", "or", "min", "max"], "grid": "0:0.8:0.2"},
    "unet": {
        "epochs": 1,
        "channels": [4, 8],
        "strides": [2],
        "num_res_units": 0,
        "batch_size": 32,
        "accelerator": "cpu",
    },
    # final self_trained: the tests know which exports exist (auto: test_final_choice)
    "run": {
        "models": ["simplecnn"],
        "unet": True,
        "pseudo_unet": True,
        "report": True,
        "final": "self_trained",
        "rounds": 1,  # seconds; test_second_self_training_round adds the default's second
    },
}


def tiny_sections(**sections: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of :data:`TINY` with each section updated by ``sections``."""
    data = json.loads(json.dumps(TINY))
    for sec, values in sections.items():
        data[sec].update(values)
    return data


def tiny_phantom(root: Path) -> Path:
    """The 6-case 48x48x12 BraTS-layout phantom the pipeline tests run on."""
    synth_dataset(SynthConfig(out=root, n_cases=6, shape=(48, 48, 12), seed=3, workers=1))
    return root
