"""Measured max errors of every transform and block (original structure vs re-parameterized),
in fp64 and fp32, on CPU.  ``python -m lkconv.reparam.error_table`` prints the table in docs/reparam.md.

Each row: max |y_reparam - y_original| where both are computed in the given dtype, from the same
random parameters (random BN statistics) and input; ``scale`` is max |y_original| (fp64).
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import transforms as T
from .blocks import (ACBlock, DilatedReparamBlock, DiverseBranchBlock, DyRepBlock, ReparamLargeKernelConv,
                     RepVGGBlock, ResRepBlock, RMBlock)
from .utils import randomize_bn


def _bn(c, dt, g):
    return randomize_bn(nn.BatchNorm2d(c), g).to(dt).eval()


def _transform_cases() -> Dict[str, Callable[[torch.dtype], Tuple[torch.Tensor, torch.Tensor]]]:
    def rnd(*s, dt):
        return torch.randn(*s, generator=_GEN).to(dt)

    def fuse(dt):
        w, x, bn = rnd(8, 4, 3, 3, dt=dt), rnd(2, 8, 16, 16, dt=dt)[:, :4], _bn(8, dt, _GEN)
        k, b = T.fuse_conv_bn(w, None, bn)
        return bn(F.conv2d(x, w, None, 1, 1)), F.conv2d(x, k, b, 1, 1)

    def add(dt):
        x = rnd(2, 4, 16, 16, dt=dt)
        ks, bs = [rnd(6, 4, 3, 3, dt=dt) for _ in range(3)], [rnd(6, dt=dt) for _ in range(3)]
        k, b = T.add_branches(ks, bs)
        return sum(F.conv2d(x, kk, bb, 1, 1) for kk, bb in zip(ks, bs)), F.conv2d(x, k, b, 1, 1)

    def m1kxk(dt):
        x, k1, k2 = rnd(2, 6, 16, 16, dt=dt), rnd(6, 3, 1, 1, dt=dt), rnd(6, 3, 5, 5, dt=dt)
        bn1 = _bn(6, dt, _GEN)
        s, t = T.bn_scale_shift(bn1)
        mid = bn1(F.conv2d(x, k1, None, 1, 0, 1, 2))
        full = t.view(1, -1, 1, 1).expand(2, -1, 20, 20).clone()
        full[:, :, 2:-2, 2:-2] = mid
        k1f, b1f = T.fuse_conv_bn(k1, None, bn1)
        k, b = T.merge_1x1_kxk(k1f, b1f, k2, None, groups=2)
        return F.conv2d(full, k2, None, 1, 0, 1, 2), F.conv2d(x, k, b, 1, 2, 1, 2)

    def concat(dt):
        x, k1, k2 = rnd(2, 4, 16, 16, dt=dt), rnd(3, 4, 3, 3, dt=dt), rnd(5, 4, 3, 3, dt=dt)
        k, b = T.concat_branches([k1, k2])
        return torch.cat([F.conv2d(x, k1, None, 1, 1), F.conv2d(x, k2, None, 1, 1)], 1), F.conv2d(x, k, b, 1, 1)

    def avg(dt):
        x = rnd(2, 6, 16, 16, dt=dt)
        return F.avg_pool2d(x, 3, 2, 1), F.conv2d(x, T.avgpool_kernel(6, 3, 2, dtype=dt), None, 2, 1, 1, 2)

    def pad(dt):
        x, k = rnd(2, 4, 16, 16, dt=dt), rnd(4, 1, 5, 3, dt=dt)
        return F.conv2d(x, k, None, 1, (2, 1), 1, 4), F.conv2d(x, T.pad_kernel(k, (13, 13)), None, 1, 6, 1, 4)

    def ident(dt):
        x = rnd(2, 6, 16, 16, dt=dt)
        return x, F.conv2d(x, T.identity_kernel(6, 3, 3, dtype=dt), None, 1, 1, 1, 3)

    def dil(dt):
        x, k = rnd(2, 4, 16, 16, dt=dt), rnd(4, 1, 3, 3, dt=dt)
        return F.conv2d(x, k, None, 1, 5, 5, 4), F.conv2d(x, T.dilated_to_dense(k, 5), None, 1, 5, 1, 4)

    def comp(dt):
        x, w, q = rnd(2, 4, 16, 16, dt=dt), rnd(8, 2, 3, 3, dt=dt), rnd(6, 8, 1, 1, dt=dt)
        bn = _bn(8, dt, _GEN)
        k, b = T.fuse_conv_bn(w, None, bn)
        kf, bf = T.fuse_compactor(k, b, q, groups=2)
        return F.conv2d(bn(F.conv2d(x, w, None, 1, 1, 1, 2)), q), F.conv2d(x, kf, bf, 1, 1)

    def rm(dt):
        x = rnd(2, 4, 16, 16, dt=dt).relu()
        k1, b1, k2, b2 = rnd(4, 4, 3, 3, dt=dt), rnd(4, dt=dt), rnd(4, 4, 3, 3, dt=dt), rnd(4, dt=dt)
        (a, ab), (c, cb) = T.resblock_to_plain(k1, b1, k2, b2)
        ref = F.relu(F.conv2d(F.relu(F.conv2d(x, k1, b1, 1, 1)), k2, b2, 1, 1) + x)
        return ref, F.relu(F.conv2d(F.relu(F.conv2d(x, a, ab, 1, 1)), c, cb, 1, 1))

    def branches(dt):
        from .model import merge_parallel_branches

        x = rnd(2, 4, 24, 24, dt=dt)
        convs = [nn.Conv2d(4, 4, (31, 5), 1, (15, 2), groups=4, bias=False),
                 nn.Conv2d(4, 4, (5, 31), 1, (2, 15), groups=4, bias=False),
                 nn.Conv2d(4, 4, 5, 1, 2, groups=4, bias=False)]
        brs = []
        for c in convs:
            with torch.no_grad():
                c.weight.copy_(rnd(*c.weight.shape, dt=torch.float64) * 0.2)
            brs.append((c.to(dt), randomize_bn(nn.SyncBatchNorm(4), _GEN).to(dt).eval()))
        conv, _ = merge_parallel_branches(brs)
        return sum(bn(c(x)) for c, bn in brs), F.conv2d(x, conv.weight, conv.bias, 1, 15, 1, 4)

    return {
        "fuse_conv_bn (I)": fuse, "add_branches (II)": add, "merge_1x1_kxk + BN-and-pad (III, groups 2)": m1kxk,
        "concat_branches (IV)": concat, "avgpool_kernel (V, stride 2, groups 2)": avg,
        "pad_kernel (VI, 5x3 -> 13x13)": pad, "identity_kernel (3x3, groups 3)": ident,
        "dilated_to_dense (3x3, r=5)": dil, "fuse_compactor (conv g2 + BN + 1x1)": comp,
        "resblock_to_plain (RMNet)": rm,
        "merge_parallel_branches (SLaK 31x5 + 5x31 + 5x5, SyncBN)": branches,
    }


def _block_cases() -> Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...], bool]]:
    return {
        "ReparamLargeKernelConv (dw C=16, K=31 + 5)": (lambda: ReparamLargeKernelConv(16, 16, 31, 1, 16, 5),
                                                        (2, 16, 24, 24), False),
        "ACBlock (8->8, K=3)": (lambda: ACBlock(8, 8, 3), (2, 8, 16, 16), False),
        "RepVGGBlock (8->8)": (lambda: RepVGGBlock(8, 8), (2, 8, 16, 16), False),
        "DiverseBranchBlock (8->8, K=3, g=2)": (lambda: DiverseBranchBlock(8, 8, 3, groups=2), (2, 8, 16, 16), False),
        "DilatedReparamBlock (C=16, K=13)": (lambda: DilatedReparamBlock(16, 13), (2, 16, 24, 24), False),
        "ResRepBlock (8->8, conv+BN+compactor)": (lambda: ResRepBlock(8, 8, 3, 1, 1), (2, 8, 16, 16), False),
        "RMBlock (8->8; x >= 0)": (lambda: RMBlock(8, 8), (2, 8, 16, 16), True),
        "RMBlock (8->16, stride 2; x >= 0)": (lambda: RMBlock(8, 16, 2), (2, 8, 16, 16), True),
        "DyRepBlock (8->8, all branches)": (
            lambda: DyRepBlock(8, 8, 3, branches=("1x1", "1x1_kxk", "1x1_avg", "identity")), (2, 8, 16, 16), False),
    }


_GEN = torch.Generator().manual_seed(0)


def measure() -> List[Tuple[str, float, float, float]]:
    """[(name, err_fp64, err_fp32, scale)]"""
    rows = []
    for i, (name, fn) in enumerate(_transform_cases().items()):
        errs = {}
        for dt in (torch.float64, torch.float32):
            _GEN.manual_seed(100 + i)  # same parameters and input in both dtypes
            with torch.no_grad():
                ref, out = fn(dt)
            errs[dt] = (out - ref).abs().max().item()
            if dt == torch.float64:
                scale = ref.abs().max().item()
        rows.append((name, errs[torch.float64], errs[torch.float32], scale))
    for name, (make, shape, nonneg) in _block_cases().items():
        torch.manual_seed(0)
        base = randomize_bn(make(), _GEN.manual_seed(1)).eval()
        with torch.no_grad():
            for m in base.modules():  # non-trivial compactor / zero-init weights
                if isinstance(m, nn.Conv2d) and m.weight.shape[2:] == (1, 1):
                    m.weight.add_(torch.randn(m.weight.shape, generator=_GEN) * 0.3)
        x64 = torch.randn(*shape, generator=_GEN, dtype=torch.float64)
        if nonneg:
            x64 = x64.relu()
        errs = {}
        for dt in (torch.float64, torch.float32):
            blk = copy.deepcopy(base).to(dt).eval()
            x = x64.to(dt)
            with torch.no_grad():
                ref = blk(x)
                out = blk.reparameterize()(x)
            errs[dt] = (out - ref).abs().max().item()
            if dt == torch.float64:
                scale = ref.abs().max().item()
        rows.append((name, errs[torch.float64], errs[torch.float32], scale))
    return rows


def main() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = measure()
    print("| transform / block | max err fp64 | max err fp32 | max abs output |")
    print("|---|---|---|---|")
    for name, e64, e32, s in rows:
        print(f"| {name} | {e64:.1e} | {e32:.1e} | {s:.1f} |")


if __name__ == "__main__":
    main()
