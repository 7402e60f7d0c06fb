"""Models built on lkconv: RepLKNet-31B/31L/XL (+ a tiny config) and UniRepLKNet's dilated
re-parameterized large-kernel block.  See docs/models.md."""
from .replknet import (  # noqa: F401
    MODEL_CONFIGS,
    CheckpointMismatchError,
    ConvFFN,
    DropPath,
    RepLKBlock,
    RepLKNet,
    RepLKNetStage,
    create_model,
    load_original_checkpoint,
    replknet_31b,
    replknet_31l,
    replknet_tiny,
    replknet_xl,
    set_model_backend,
    to_nn_conv2d,
)
from .unireplknet import DilatedReparamBlock, UniRepLKNetBlock  # noqa: F401

__all__ = [
    "RepLKNet", "RepLKNetStage", "RepLKBlock", "ConvFFN", "DropPath",
    "replknet_31b", "replknet_31l", "replknet_xl", "replknet_tiny", "create_model", "MODEL_CONFIGS",
    "load_original_checkpoint", "CheckpointMismatchError", "set_model_backend", "to_nn_conv2d",
    "DilatedReparamBlock", "UniRepLKNetBlock",
]
