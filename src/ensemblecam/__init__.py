"""ensemblecam: lesion masks from image-level labels by ensembling thresholded CAMs.

The Python API (names load lazily, so ``import ensemblecam`` stays light)::

    from ensemblecam import build_model, compute_cams
    model = build_model("resnet18", in_channels=1).eval()
    maps = compute_cams(model, images, methods=["gradcam", "gradcampp"])

CAMs: :class:`CamEngine`, :func:`compute_cams`. Ensembles: :func:`search` (every operator
x threshold combination, exactly), :func:`apply_config`. Metrics: :func:`dataset_metrics`,
:func:`confusion`, :func:`case_metrics`, :func:`lesion_wise`. Stages: :func:`synth_dataset`,
:func:`prepare_store`, :func:`make_splits`, :func:`train_classifier`, :func:`run_pipeline`,
:func:`predict`. Configuration: :class:`Config` and its sections, :func:`load_config`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ensemblecam.errors import InputError

__version__ = "0.1.0"

#: public name -> module that defines it
_API = {
    "CamEngine": "ensemblecam.cam",
    "compute_cams": "ensemblecam.cam",
    "METHODS": "ensemblecam.cam",
    "build_model": "ensemblecam.models",
    "load_checkpoint": "ensemblecam.models",
    "search": "ensemblecam.ensemble.search",
    "apply_config": "ensemblecam.ensemble.operators",
    "confusion": "ensemblecam.metrics",
    "dataset_metrics": "ensemblecam.metrics",
    "case_metrics": "ensemblecam.metrics",
    "lesion_wise": "ensemblecam.metrics",
    "synth_dataset": "ensemblecam.synth",
    "prepare_store": "ensemblecam.stages.prepare",
    "make_splits": "ensemblecam.io.split",
    "train_classifier": "ensemblecam.stages.train",
    "run_pipeline": "ensemblecam.pipeline",
    "predict": "ensemblecam.pipeline",
    "Config": "ensemblecam.config",
    "load_config": "ensemblecam.config",
}

__all__ = ["InputError", "__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ensemblecam' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
