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

import os
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from ..params import ConvParams

PASSES = ("forward", "grad_input", "grad_weight")


def output_memory_format(t: torch.Tensor) -> torch.memory_format:
    """The output-format rule of every pass, in one place: channels_last iff ``t`` (the pass's data
    tensor: ``x`` for forward, ``grad_out`` for grad_input) is channels_last-contiguous and not
    also NCHW-contiguous.  :mod:`lkconv.ops` applies it to every backend's result and to the fake
    kernels; the triton and cpu backends produce it directly.  csrc/dwconv_ops.cpp keeps a C++ copy
    (``out_format``); tests/test_ops_contract.py checks the two agree."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def poison_outputs() -> bool:
    """``LKCONV_POISON_OUTPUTS=1`` (read at every call): the GPU backends (cuda, triton) fill the
    buffers their kernels write with NaN first, so a tile a kernel fails to write shows as NaN in the
    comparison with the reference instead of passing by luck with stale memory.  For debug runs and
    first runs on a new GPU; off by default (it costs one extra pass over each output)."""
    return os.environ.get("LKCONV_POISON_OUTPUTS", "") == "1"


def new_output(shape, like: torch.Tensor, dtype: torch.dtype,
               memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """An uninitialised buffer for a kernel to write: ``torch.empty`` on ``like``'s device, NaN-filled
    when :func:`poison_outputs` is on."""
    t = torch.empty(shape, dtype=dtype, device=like.device, memory_format=memory_format)
    if poison_outputs():
        t.fill_(float("nan"))
    return t


def split_pad(p: ConvParams):
    """``(pre, pad)`` for PyTorch's convolutions, which pad symmetrically only: ``pre`` is None and
    ``pad`` the (rows, cols) padding when ``p.padding`` is symmetric; otherwise ``pre`` is the
    explicit ``F.pad`` 4-tuple (left, right, top, bottom) and ``pad`` is (0, 0)."""
    t, b, l, r = p.padding
    if t == b and l == r:
        return None, (t, l)
    return (l, r, t, b), (0, 0)


class Request(NamedTuple):
    """What :meth:`Backend.check` needs to know about one pass: no tensors, only their facts.

    ``device`` and ``dtype`` are those of the pass's data tensor (``x`` for forward and grad_weight,
    ``grad_out`` for grad_input); ``weight_dtype`` is the weight's dtype (None for grad_weight,
    which has no weight tensor); ``input_shape`` is the input's (N, C, H, W) and ``weight_shape``
    the weight's (C, 1, KH, KW) in every pass.  A NamedTuple so that torch.compile traces it.
    """

    pass_: str
    device: torch.device
    dtype: torch.dtype
    weight_dtype: Optional[torch.dtype]
    input_shape: Tuple[int, ...]
    weight_shape: Tuple[int, ...]
    params: ConvParams

    @classmethod
    def of(cls, pass_: str, x: torch.Tensor, weight: torch.Tensor, params: ConvParams) -> "Request":
        """The request for ``pass_`` of a call ``conv(x, weight)`` (grad_out has x's dtype/device)."""
        return cls(pass_, x.device, x.dtype, None if pass_ == "grad_weight" else weight.dtype,
                   tuple(x.shape), tuple(weight.shape), params)

    @property
    def output_shape(self) -> Tuple[int, int, int, int]:
        N, _, H, W = self.input_shape
        ho, wo = self.params.out_size(H, W, self.weight_shape[2], self.weight_shape[3])
        return (N, self.weight_shape[0], ho, wo)


def channel_multiplier_declined(req: "Request") -> Optional[str]:
    """The decline of a backend whose kernels compute one output per input channel (cuda, triton):
    a weight ``(m*C, 1, KH, KW)`` with ``m > 1`` (None when ``m == 1``)."""
    C, OC = req.input_shape[1], req.weight_shape[0]
    if OC == C:
        return None
    return (f"channel multiplier {OC // max(1, C)} (weight {tuple(req.weight_shape)} for {C} input channels) "
            "not supported: only m = 1; backend 'torch' computes it")


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

    # -- availability ---------------------------------------------------------------------------
    def unavailable_reason(self) -> Optional[str]:
        """None when usable in this process, else why not and how to get it.  Must be cheap after
        the first call and must never raise."""
        return None

    # -- support ----------------------------------------------------------------------------------
    def check(self, req: Request) -> Optional[str]:
        """None when this backend computes pass ``req.pass_`` of the described call exactly, else
        the reason it declines (e.g. "dtype float64 not supported on cuda").  Plain Python on
        device/dtype/shapes (torch.compile traces it): no imports, no locks, no tensors."""
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
