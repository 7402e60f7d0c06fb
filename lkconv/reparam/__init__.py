"""Structural re-parameterization: pure (kernel, bias) transforms, re-parameterizable blocks and
``reparameterize(model)``.  See docs/reparam.md."""
from . import transforms
from .blocks import (
    DILATED_BRANCHES,
    DYREP_BRANCHES,
    ACBlock,
    BNAndPad,
    ConvBN,
    DilatedReparamBlock,
    DiverseBranchBlock,
    DyRepBlock,
    IdentityBasedConv1x1,
    ReparamLargeKernelConv,
    ReparamModule,
    RepVGGBlock,
    ResRepBlock,
    RMBlock,
    shrink_input_channels,
)
from .model import fuse_conv_bn_modules, reparameterize, to_plain
from .transforms import (
    add_branches,
    avgpool_kernel,
    bn_scale_shift,
    compactor_row_norms,
    concat_branches,
    dilated_to_dense,
    expand_groups,
    fuse_compactor,
    fuse_conv_bn,
    identity_kernel,
    merge_1x1_kxk,
    pad_kernel,
    resblock_to_plain,
)

__all__ = [
    "transforms",
    "BNAndPad",
    "ConvBN",
    "ReparamModule",
    "ReparamLargeKernelConv",
    "ACBlock",
    "RepVGGBlock",
    "DiverseBranchBlock",
    "IdentityBasedConv1x1",
    "DilatedReparamBlock",
    "DILATED_BRANCHES",
    "ResRepBlock",
    "shrink_input_channels",
    "RMBlock",
    "DyRepBlock",
    "DYREP_BRANCHES",
    "reparameterize",
    "to_plain",
    "fuse_conv_bn_modules",
    "add_branches",
    "avgpool_kernel",
    "bn_scale_shift",
    "compactor_row_norms",
    "concat_branches",
    "dilated_to_dense",
    "expand_groups",
    "fuse_compactor",
    "fuse_conv_bn",
    "identity_kernel",
    "merge_1x1_kxk",
    "pad_kernel",
    "resblock_to_plain",
]
from .utils import count_modules, count_parameters, randomize_bn  # noqa: E402

__all__ += ["count_modules", "count_parameters", "randomize_bn"]
