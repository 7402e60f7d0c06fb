"""lkconv: fast large-kernel depthwise convolution for PyTorch.

``lkconv.depthwise_conv2d(x, w, b, stride, padding, dilation)`` has exactly the semantics of
``F.conv2d(x, w, b, stride, padding, dilation, groups=x.shape[1])``.  Importing lkconv never
touches a GPU, never imports triton and never builds anything.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .backends import (  # noqa: E402
    BackendError,
    BackendUnavailableError,
    UnsupportedError,
    backend_status,
    get_default_backend,
    list_backends,
    set_backend,
    use_backend,
)
from .functional import depthwise_conv2d  # noqa: E402
from .params import ConvParams  # noqa: E402
from . import nn  # noqa: E402
from .nn import DepthWiseConv2dImplicitGEMM, LargeKernelConv2d, convert  # noqa: E402


def __getattr__(name):  # lazy: heavier sub-packages load on first use
    if name in ("reparam", "models"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    if name == "reparameterize":
        from .reparam import reparameterize

        return reparameterize
    raise AttributeError(f"module 'lkconv' has no attribute {name!r}")


__all__ = [
    "__version__",
    "depthwise_conv2d",
    "ConvParams",
    "DepthWiseConv2dImplicitGEMM",
    "LargeKernelConv2d",
    "convert",
    "reparameterize",
    "nn",
    "list_backends",
    "backend_status",
    "set_backend",
    "get_default_backend",
    "use_backend",
    "BackendError",
    "BackendUnavailableError",
    "UnsupportedError",
]
