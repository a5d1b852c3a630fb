"""Class activation maps: every method from one pass (see :mod:`ensemblecam.cam.engine`)."""

from ensemblecam.cam.engine import (
    CamEngine,
    CamResult,
    compute_cams,
    find_target_layer,
    spatial_layers,
)
from ensemblecam.cam.methods import GRADIENT_METHODS, METHODS, minmax, postprocess, upsample
from ensemblecam.cam.scorecam import scorecam_weights

__all__ = [
    "GRADIENT_METHODS",
    "METHODS",
    "CamEngine",
    "CamResult",
    "compute_cams",
    "find_target_layer",
    "minmax",
    "postprocess",
    "scorecam_weights",
    "spatial_layers",
    "upsample",
]
