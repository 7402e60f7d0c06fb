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


def _precision_objects():
    """(name, object) for every object of this PyTorch that carries an ``fp32_precision`` string,
    parents before children."""
    b = torch.backends
    cands = [("backends", b), ("cuda.matmul", getattr(getattr(b, "cuda", None), "matmul", None)),
             ("cudnn", getattr(b, "cudnn", None)), ("cudnn.conv", getattr(getattr(b, "cudnn", None), "conv", None)),
             ("cudnn.rnn", getattr(getattr(b, "cudnn", None), "rnn", None)), ("mkldnn", getattr(b, "mkldnn", None))]
    for op in ("matmul", "conv", "rnn"):
        cands.append((f"mkldnn.{op}", getattr(getattr(b, "mkldnn", None), op, None)))
    out = []
    for name, obj in cands:
        try:
            if obj is not None and isinstance(getattr(obj, "fp32_precision", None), str):
                out.append((name, obj))
        except Exception:  # an object whose getter raises is left alone
            pass
    return out


def _precision_snapshot() -> dict:
    """Every precision setting :func:`tf32` may touch, as strings: the ``fp32_precision`` of each
    backend/op and ``torch.get_float32_matmul_precision()``."""
    snap = {name: obj.fp32_precision for name, obj in _precision_objects()}
    try:  # raises once the legacy and new matmul APIs were mixed
        snap["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    except RuntimeError:
        snap["float32_matmul_precision"] = None
    return snap


def _float32_matmul_precision():
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


def _precision_restore(snap: dict) -> None:
    """Put back exactly the strings of :func:`_precision_snapshot` (only those that changed)."""
    want = snap.get("float32_matmul_precision")
    if want is not None and _float32_matmul_precision() != want:
        torch.set_float32_matmul_precision(want)
    for name, obj in _precision_objects():
        if name in snap and obj.fp32_precision != snap[name]:
            obj.fp32_precision = snap[name]


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 on or off for convolutions and matmuls inside the block; the previous settings are
    restored exactly afterwards (every ``fp32_precision`` string, the float32 matmul precision and,
    while they are readable, the legacy flags), also after an error.  Uses the API the process is
    already on: the legacy flags while they are readable (setting the new API would make the user's
    later reads of the legacy flags raise), the new ``fp32_precision`` strings once the user has
    switched to them."""
    snap = _precision_snapshot()
    if (not _legacy_readable() and _has_new_api()
            and getattr(torch.backends.cuda.matmul, "fp32_precision", None) is not None):
        conv, mm = torch.backends.cudnn.conv, torch.backends.cuda.matmul
        conv.fp32_precision = mm.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            _precision_restore(snap)
        return
    a, b = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        # the legacy setters keep PyTorch's legacy flags consistent (the legacy getters check them);
        # they also rewrite the precision strings (e.g. matmul 'none' -> 'ieee'): put those back
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = a, b
        _precision_restore(snap)
