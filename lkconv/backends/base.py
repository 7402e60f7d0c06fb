"""The backend interface every lkconv backend implements.

A backend computes the three passes of the depthwise convolution on validated, normalised
arguments (see :mod:`lkconv.params`).  It never sees "auto", never validates user input again, and
*declines* what it does not support by returning a reason from :meth:`Backend.check` (the registry
turns that into :class:`UnsupportedError`, and ``auto`` routes around it).

Shapes: ``x`` (N, C, H, W); ``weight`` (m*C, 1, KH, KW) with the channel multiplier ``m >= 1``
(output channel ``c*m + j`` reads input channel ``c``); ``bias`` (m*C,) or None;
``grad_out`` (N, m*C, Ho, Wo).  A backend that computes only ``m == 1`` declines ``m > 1`` in
:meth:`Backend.check` (forward and grad_weight see ``x`` and ``weight``; for grad_input the
registry's resolution has already checked the forward).  Inputs may have any strides (NCHW, channels_last, slices).  The
results must have the dtype of ``x`` (forward, grad_input) or ``weight`` (grad_weight); their memory
format is normalised by :mod:`lkconv.ops` (channels_last in -> channels_last out).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..params import ConvParams

PASSES = ("forward", "grad_input", "grad_weight")


class BackendError(RuntimeError):
    """Base class of lkconv backend errors."""


class BackendUnavailableError(BackendError):
    """The requested backend cannot run here (not built, not installed, no device)."""


class UnsupportedError(BackendError, NotImplementedError):
    """The backend is available but does not support this particular case."""


class Backend:
    """Base class.  Subclasses set ``name`` and implement the three passes."""

    name: str = "?"
    #: one line for the README/`python -m lkconv info` table
    description: str = ""
    #: computes a channel multiplier m > 1 (weight (m*C, 1, KH, KW)); backends that do not also
    #: decline it in check()
    channel_multiplier: bool = True

    # -- availability ---------------------------------------------------------------------------
    def unavailable_reason(self) -> Optional[str]:
        """None when usable in this process, else why not and how to get it.  Must be cheap after
        the first call and must never raise."""
        return None

    # -- support ----------------------------------------------------------------------------------
    def check(self, x: torch.Tensor, weight: torch.Tensor, params: ConvParams, pass_: str) -> Optional[str]:
        """None when this backend computes ``pass_`` for these tensors exactly, else the reason it
        declines (e.g. "dtype float64 not supported on cuda").  ``x`` is the input (forward,
        grad_weight) — for grad_input the registry passes ``grad_out``'s device/dtype in ``x``."""
        return None

    # -- the three passes -------------------------------------------------------------------------
    def forward(self, x, weight, bias, params: ConvParams) -> torch.Tensor:
        raise NotImplementedError

    def grad_input(self, grad_out, weight, input_shape: Sequence[int], params: ConvParams) -> torch.Tensor:
        raise NotImplementedError

    def grad_weight(self, grad_out, x, weight_shape: Sequence[int], params: ConvParams) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<lkconv backend {self.name!r}>"
