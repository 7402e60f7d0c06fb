"""PyTorch's TF32 setting for convolutions, read and set in one place.

PyTorch has two APIs for it.  The legacy flag ``torch.backends.cudnn.allow_tf32`` and the newer
per-backend/per-op ``fp32_precision`` strings (``torch.backends.cudnn.conv.fp32_precision``, which
inherits from ``torch.backends.cudnn.fp32_precision`` and then ``torch.backends.fp32_precision``
when it is ``"none"``).  Once a user sets the new API, *reading* the legacy flag raises ("cuDNN
conv and cuDNN RNN have different TF32 flags"), so lkconv never reads it when the new API exists.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["conv_tf32_enabled", "tf32"]


def _precision_chain():
    cudnn = torch.backends.cudnn
    return (
        getattr(getattr(cudnn, "conv", None), "fp32_precision", None),
        getattr(cudnn, "fp32_precision", None),
        getattr(torch.backends, "fp32_precision", None),
    )


def _has_new_api() -> bool:
    return _precision_chain()[0] is not None


def conv_tf32_enabled() -> bool:
    """Whether PyTorch currently lets fp32 convolutions use TF32 (the rule lkconv's fp32 kernels
    follow).  Never raises, whichever API the user set it with."""
    if _has_new_api():
        for prec in _precision_chain():
            if prec in ("tf32", "ieee"):
                return prec == "tf32"
        return False  # every level "none": IEEE
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return False


def _legacy_readable() -> bool:
    """Whether the legacy getters still work (PyTorch makes them raise once the new API was used)."""
    try:
        torch.backends.cudnn.allow_tf32  # noqa: B018
        torch.backends.cuda.matmul.allow_tf32  # noqa: B018
        return True
    except RuntimeError:
        return False


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 on or off for convolutions and matmuls inside the block; the previous settings are
    restored afterwards, also after an error.  Uses the API the process is already on: the legacy
    flags while they are readable (setting the new API would make the user's later reads of the
    legacy flags raise), the new ``fp32_precision`` strings once the user has switched to them."""
    if (not _legacy_readable() and _has_new_api()
            and getattr(torch.backends.cuda.matmul, "fp32_precision", None) is not None):
        conv, mm = torch.backends.cudnn.conv, torch.backends.cuda.matmul
        old = (conv.fp32_precision, mm.fp32_precision)
        conv.fp32_precision = mm.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, mm.fp32_precision = old
        return
    a, b = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = a, b
