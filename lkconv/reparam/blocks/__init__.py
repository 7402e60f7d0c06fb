"""Re-parameterizable blocks."""
from .common import BNAndPad, ConvBN, ReparamModule, conv_from_kernel, make_conv
from .replk import ReparamLargeKernelConv

__all__ = ["BNAndPad", "ConvBN", "ReparamModule", "conv_from_kernel", "make_conv", "ReparamLargeKernelConv"]
