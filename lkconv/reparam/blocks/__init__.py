"""Re-parameterizable blocks."""
from .acnet import ACBlock
from .common import BNAndPad, ConvBN, ReparamModule, conv_from_kernel, make_conv
from .dbb import DiverseBranchBlock, IdentityBasedConv1x1
from .dilated import DILATED_BRANCHES, DilatedReparamBlock
from .dyrep import DYREP_BRANCHES, DyRepBlock
from .replk import ReparamLargeKernelConv
from .repvgg import RepVGGBlock
from .resrep import ResRepBlock, shrink_input_channels
from .rmnet import RMBlock

__all__ = [
    "ACBlock", "BNAndPad", "ConvBN", "ReparamModule", "conv_from_kernel", "make_conv",
    "DiverseBranchBlock", "IdentityBasedConv1x1", "DILATED_BRANCHES", "DilatedReparamBlock",
    "DYREP_BRANCHES", "DyRepBlock", "ReparamLargeKernelConv", "RepVGGBlock", "ResRepBlock",
    "shrink_input_channels", "RMBlock",
]
