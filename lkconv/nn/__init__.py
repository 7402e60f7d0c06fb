"""lkconv modules."""
from .convert import convert, is_eligible
from .modules import DepthWiseConv2dImplicitGEMM, LargeKernelConv2d

__all__ = ["LargeKernelConv2d", "DepthWiseConv2dImplicitGEMM", "convert", "is_eligible"]
