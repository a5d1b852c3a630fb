"""Models: classifiers built by name (:mod:`.classifiers`), weights files and checkpoints
(:mod:`.checkpoints`), the segmentation U-Net (:mod:`.segmenters`).

Every classifier maps a (B, C, H, W) float batch to (B, num_classes) logits, class index
1 = lesion; a checkpoint holds tensors and plain data only (``weights_only=True``).
"""

from ensemblecam.models.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    WALL_CLOCK,
    load_checkpoint,
    load_pretrained,
    read_checkpoint,
    safe_torch_load,
    save_checkpoint,
    unwrap,
)
from ensemblecam.models.classifiers import (
    VGG19,
    SimpleCNN,
    available_models,
    build_model,
    cam_layer,
    first_conv,
    head_prefix,
    set_output_stride,
)
from ensemblecam.models.segmenters import UNet2D, build_unet, load_unet, logits_to_mask

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "VGG19",
    "WALL_CLOCK",
    "SimpleCNN",
    "UNet2D",
    "available_models",
    "build_model",
    "build_unet",
    "cam_layer",
    "first_conv",
    "head_prefix",
    "load_checkpoint",
    "load_pretrained",
    "load_unet",
    "logits_to_mask",
    "read_checkpoint",
    "safe_torch_load",
    "save_checkpoint",
    "set_output_stride",
    "unwrap",
]
