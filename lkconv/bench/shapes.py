"""Benchmark shapes and the named shape sets.

Every benchmark layer is a stride-1 depthwise convolution with symmetric padding ``(KH//2, KW//2)``
(RepLKNet's large-kernel layers: ``padding=K//2``, no bias -- a BatchNorm follows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

__all__ = ["Shape", "SHAPE_SETS", "shape_set", "parse_shape", "PASSES", "pass_count"]

#: the passes the benchmark times; "all" = forward + grad_input + grad_weight through autograd
PASSES = ("forward", "grad_input", "grad_weight", "all")


def pass_count(pass_: str) -> int:
    """How many convolution passes one timed call performs (for FLOP/byte accounting)."""
    return 3 if pass_ == "all" else 1


@dataclass(frozen=True)
class Shape:
    n: int
    c: int
    h: int
    w: int
    kh: int
    kw: int
    group: str = ""  # shape set / sub-series (plots draw one line per provider and group)

    @property
    def padding(self):
        return (self.kh // 2, self.kw // 2)

    @property
    def k(self) -> int:
        return self.kh if self.kh == self.kw else max(self.kh, self.kw)

    @property
    def out_hw(self):
        ph, pw = self.padding
        return self.h + 2 * ph - self.kh + 1, self.w + 2 * pw - self.kw + 1

    @property
    def label(self) -> str:
        k = f"{self.kh}" if self.kh == self.kw else f"{self.kh}x{self.kw}"
        return f"{self.n}x{self.c}x{self.h}x{self.w} K{k}"

    def flops(self, pass_: str) -> float:
        """2*N*C*Ho*Wo*KH*KW per pass (the FMA count of the direct definition, times 2)."""
        ho, wo = self.out_hw
        return 2.0 * self.n * self.c * ho * wo * self.kh * self.kw * pass_count(pass_)

    def bytes(self, pass_: str, elem: int) -> float:
        """Compulsory memory traffic (each tensor read or written once)."""
        ho, wo = self.out_hw
        x = self.n * self.c * self.h * self.w
        y = self.n * self.c * ho * wo
        wt = self.c * self.kh * self.kw
        per = {
            "forward": x + wt + y,       # read x, w; write y
            "grad_input": y + wt + x,    # read dy, w; write dx
            "grad_weight": y + x + wt,   # read dy, x; write dw
        }
        if pass_ == "all":
            return float(elem * sum(per.values()))
        return float(elem * per[pass_])


def _ksweep(ks: Optional[Sequence[int]] = None, n: int = 64, c: int = 384, rs=(16, 32, 64)) -> List[Shape]:
    ks = list(ks) if ks else list(range(3, 32, 2))
    return [Shape(n, c, r, r, k, k, group=f"R={r}") for r in rs for k in ks]


def _replknet31b(n: int = 64) -> List[Shape]:
    # RepLKNet-31B at 224x224: stages C/H/K = 128/56/31, 256/28/29, 512/14/27, 1024/7/13
    return [Shape(n, c, h, h, k, k, group="replknet31b") for c, h, k in
            ((128, 56, 31), (256, 28, 29), (512, 14, 27), (1024, 7, 13))]


def _cpu(ks: Optional[Sequence[int]] = None, n: int = 8, c: int = 128, hw: int = 56) -> List[Shape]:
    ks = list(ks) if ks else [3, 7, 13, 31]
    return [Shape(n, c, hw, hw, k, k, group=f"{c}x{hw}x{hw}") for k in ks]


def _tiny(ks: Optional[Sequence[int]] = None) -> List[Shape]:
    ks = list(ks) if ks else [3, 7]
    return [Shape(2, 8, 12, 12, k, k, group="tiny") for k in ks]


SHAPE_SETS: Dict[str, str] = {
    "cpu": "CPU default: N=8, C=128, 56x56, K in {3, 7, 13, 31} (RepLKNet stage-1-like)",
    "replknet31b": "RepLKNet-31B layers, B=64 at 224^2: C/H/K = 128/56/31, 256/28/29, 512/14/27, 1024/7/13",
    "ksweep": "kernel-size sweep K=3..31 (odd) at 64x384xRxR, R in {16, 32, 64} (RepLKNet Table 1 protocol)",
    "tiny": "2x8x12x12, K in {3, 7}: smoke test",
}


def shape_set(name: str, ks: Optional[Sequence[int]] = None, batch: Optional[int] = None) -> List[Shape]:
    """The shapes of a named set; ``ks`` overrides the kernel sizes of cpu/ksweep/tiny, ``batch`` N."""
    kw = {} if batch is None else {"n": batch}
    if name == "cpu":
        return _cpu(ks, **kw)
    if name == "replknet31b":
        shapes = _replknet31b(**kw)
        return [s for s in shapes if not ks or s.kh in ks]
    if name == "ksweep":
        return _ksweep(ks, **kw)
    if name == "tiny":
        shapes = _tiny(ks)
        return [Shape(batch, s.c, s.h, s.w, s.kh, s.kw, s.group) for s in shapes] if batch else shapes
    raise ValueError(f"unknown shape set {name!r} (argument: --set); choose one of {sorted(SHAPE_SETS)}")


def parse_shape(text: str) -> Shape:
    """``"N,C,H,W,K"`` or ``"N,C,H,W,KH,KW"`` (also accepts 'x' as separator)."""
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--shape must be N,C,H,W,K or N,C,H,W,KH,KW (integers), got {text!r}") from None
    if len(vals) == 5:
        n, c, h, w, k = vals
        kh = kw = k
    elif len(vals) == 6:
        n, c, h, w, kh, kw = vals
    else:
        raise ValueError(f"--shape must be N,C,H,W,K or N,C,H,W,KH,KW, got {text!r} ({len(vals)} numbers)")
    if min(n, c, h, w, kh, kw) < 1:
        raise ValueError(f"--shape values must all be >= 1, got {text!r}")
    return Shape(n, c, h, w, kh, kw, group="user")
