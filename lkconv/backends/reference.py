"""The reference backend: the oracle every test compares against.

It is written from the definition, independently of ``F.conv2d``:

    out[n, c*m + j', i, j] = b[c*m + j'] + sum_{kh, kw} w[c*m + j', 0, kh, kw] * xpad[n, c, i*sh + kh*dil_h, j*sw + kw*dil_w]

(``m`` the channel multiplier, ``j' < m``; ``m = 1`` is the plain depthwise convolution)

computed as a sum of KH*KW strided slices of the zero-padded input.  Both gradients come from the
same slices (grad_input scatters them back, grad_weight reduces them).  It runs on any device and in
any float dtype; tests call it in float64 on the CPU.  Slow for big kernels (KH*KW tensor ops), which
is fine for an oracle.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..params import ConvParams
from .base import Backend


def _slice(p: ConvParams, kh: int, kw: int, ho: int, wo: int):
    sh, sw = p.stride
    dil_h, dil_w = p.dilation
    r0, c0 = kh * dil_h, kw * dil_w
    return (
        slice(r0, r0 + sh * (ho - 1) + 1, sh),
        slice(c0, c0 + sw * (wo - 1) + 1, sw),
    )


def _pad(x: torch.Tensor, p: ConvParams) -> torch.Tensor:
    t, b, l, r = p.padding
    return F.pad(x, (l, r, t, b))


def reference_forward(x, weight, bias, p: ConvParams) -> torch.Tensor:
    N, C, H, W = x.shape
    O, KH, KW = weight.shape[0], weight.shape[2], weight.shape[3]
    m = O // C
    ho, wo = p.out_size(H, W, KH, KW)
    xp = _pad(x, p)
    out = torch.zeros((N, C, m, ho, wo), dtype=x.dtype, device=x.device)
    w = weight.reshape(C, m, KH, KW)
    for kh in range(KH):
        for kw in range(KW):
            rs, cs = _slice(p, kh, kw, ho, wo)
            out += xp[:, :, None, rs, cs] * w[:, :, kh, kw].view(1, C, m, 1, 1)
    out = out.reshape(N, O, ho, wo)
    if bias is not None:
        out += bias.view(1, O, 1, 1)
    return out


def reference_grad_input(grad_out, weight, input_shape: Sequence[int], p: ConvParams) -> torch.Tensor:
    N, C, H, W = input_shape
    O, KH, KW = weight.shape[0], weight.shape[2], weight.shape[3]
    m = O // C
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    t, b, l, r = p.padding
    gxp = torch.zeros((N, C, H + t + b, W + l + r), dtype=grad_out.dtype, device=grad_out.device)
    w = weight.reshape(C, m, KH, KW)
    go = grad_out.reshape(N, C, m, ho, wo)
    for kh in range(KH):
        for kw in range(KW):
            rs, cs = _slice(p, kh, kw, ho, wo)
            gxp[:, :, rs, cs] += (go * w[:, :, kh, kw].view(1, C, m, 1, 1)).sum(dim=2)
    return gxp[:, :, t : t + H, l : l + W].contiguous()


def reference_grad_weight(grad_out, x, weight_shape: Sequence[int], p: ConvParams) -> torch.Tensor:
    O, _, KH, KW = weight_shape
    N, C = x.shape[0], x.shape[1]
    m = O // C
    ho, wo = grad_out.shape[2], grad_out.shape[3]
    xp = _pad(x, p)
    go = grad_out.reshape(N, C, m, ho, wo)
    gw = torch.zeros((C, m, KH, KW), dtype=x.dtype, device=x.device)
    for kh in range(KH):
        for kw in range(KW):
            rs, cs = _slice(p, kh, kw, ho, wo)
            gw[:, :, kh, kw] = (xp[:, :, None, rs, cs] * go).sum(dim=(0, 3, 4))
    return gw.reshape(O, 1, KH, KW)


class ReferenceBackend(Backend):
    name = "reference"
    description = "sum of shifted slices from the definition; any device/dtype; the test oracle (slow)"

    # 16-bit inputs are computed in fp32 and cast once (accumulating KH*KW terms in fp16/bf16 would
    # fail the tolerance rule (docs/architecture.md) for large kernels)
    def forward(self, x, weight, bias, params):
        return reference_forward(_up(x), _up(weight), _up(bias), params).to(x.dtype)

    def grad_input(self, grad_out, weight, input_shape, params):
        return reference_grad_input(_up(grad_out), _up(weight), input_shape, params).to(grad_out.dtype)

    def grad_weight(self, grad_out, x, weight_shape, params):
        return reference_grad_weight(_up(grad_out), _up(x), weight_shape, params).to(x.dtype)


def _up(t):
    if t is not None and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t
