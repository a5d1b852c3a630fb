"""ensemblecam: lesion masks from image-level labels by ensembling thresholded CAMs."""

from ensemblecam.errors import InputError

__version__ = "0.1.0"
__all__ = ["InputError", "__version__"]
