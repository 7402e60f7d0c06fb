"""Dy-Rep: a block whose DBB-style branches grow and get pruned during training, guided by a
gradient-based importance score, and that re-parameterizes exactly at any time."""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .. import transforms as T
from .common import BNAndPad, ConvBN, ReparamModule, deploy_merged

__all__ = ["DyRepBlock", "DYREP_BRANCHES"]

#: the branch kinds a DyRepBlock can hold ("kxk" is always present)
DYREP_BRANCHES = ("kxk", "1x1", "1x1_kxk", "1x1_avg", "identity")


class _Branch(nn.Module):
    def fuse(self):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def last_bn(self) -> nn.BatchNorm2d:  # pragma: no cover - abstract
        raise NotImplementedError


class _ConvBNBranch(_Branch):
    def __init__(self, cin, cout, k, K, stride, groups):
        super().__init__()
        self.K = K
        self.cb = ConvBN(cin, cout, k, stride, k // 2, 1, groups, large=(k == K))

    def forward(self, x):
        return self.cb(x)

    def fuse(self):
        k, b = self.cb.fuse()
        return T.pad_kernel(k, self.K), b

    @property
    def last_bn(self):
        return self.cb.bn


class _SeqBranch(_Branch):
    """1x1 -> BNAndPad -> (KxK conv | avg pool) -> BN."""

    def __init__(self, cin, cout, K, stride, groups, avg: bool):
        super().__init__()
        mid = cout if avg else cin
        self.avg_kind = avg
        self.K, self.groups, self.cout = K, groups, cout
        self.conv1 = nn.Conv2d(cin, mid, 1, 1, 0, groups=groups, bias=False)
        self.bn1 = BNAndPad(K // 2, mid)
        self.second = nn.AvgPool2d(K, stride, 0) if avg else nn.Conv2d(mid, cout, K, stride, 0, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn2(self.second(self.bn1(self.conv1(x))))

    def fuse(self):
        k1, b1 = T.fuse_conv_bn(self.conv1.weight, None, self.bn1.bn)
        if self.avg_kind:
            w2 = T.avgpool_kernel(self.cout, self.K, self.groups, dtype=k1.dtype, device=k1.device)
        else:
            w2 = self.second.weight
        k2, b2 = T.fuse_conv_bn(w2, None, self.bn2)
        return T.merge_1x1_kxk(k1, b1, k2, b2, self.groups)

    @property
    def last_bn(self):
        return self.bn2


class _IdentityBranch(_Branch):
    def __init__(self, channels, K, groups):
        super().__init__()
        self.K, self.groups = K, groups
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bn(x)

    def fuse(self):
        w = self.bn.running_mean
        ik = T.identity_kernel(w.shape[0], self.K, self.groups, dtype=w.dtype, device=w.device)
        return T.fuse_conv_bn(ik, None, self.bn)

    @property
    def last_bn(self):
        return self.bn


class DyRepBlock(ReparamModule):
    """A KxK conv+BN with dynamically grown/pruned parallel branches (Dy-Rep).

    - ``branches`` (``nn.ModuleDict``): "kxk" always; any of "1x1", "1x1_kxk", "1x1_avg", "identity"
      (identity needs in == out and stride 1).
    - :meth:`grow` adds a branch whose last BN has weight = bias = 0, so the block's function is
      unchanged at the moment of growth (train and eval mode); training then moves it.
    - :meth:`record_importance` (call after ``loss.backward()``) accumulates each branch's
      gradient-based importance ``sum |theta * dL/dtheta|`` over its parameters (first-order Taylor
      estimate of the loss change when the branch is removed); :meth:`importance` averages it.
    - :meth:`prune` removes a branch and folds its exact (eval-mode) equivalent kernel into the
      "kxk" branch, so eval-mode outputs are unchanged; :meth:`step` prunes the branches whose
      importance is below a threshold and grows the requested ones.
    - :meth:`reparameterize` fuses all present branches into ``reparam`` (KxK conv with bias) — exact
      at any point of this process.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride=1, groups: int = 1,
                 branches: Iterable[str] = ("kxk",)):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.groups, self.padding = stride, groups, kernel_size // 2
        self.deployed = False
        self.branches = nn.ModuleDict()
        self._scores: Dict[str, float] = {}
        self._counts: Dict[str, int] = {}
        self._add("kxk")
        for name in branches:
            if name != "kxk":
                self._add(name)

    def _make(self, name: str) -> _Branch:
        cin, cout, K, s, g = self.in_channels, self.out_channels, self.kernel_size, self.stride, self.groups
        if name == "kxk":
            return _ConvBNBranch(cin, cout, K, K, s, g)
        if name == "1x1":
            return _ConvBNBranch(cin, cout, 1, K, s, g)
        if name == "1x1_kxk":
            return _SeqBranch(cin, cout, K, s, g, avg=False)
        if name == "1x1_avg":
            return _SeqBranch(cin, cout, K, s, g, avg=True)
        if name == "identity":
            if cin != cout or s != 1:
                raise ValueError("the identity branch needs in_channels == out_channels and stride 1")
            return _IdentityBranch(cin, K, g)
        raise ValueError(f"unknown branch {name!r}; choose from {DYREP_BRANCHES}")

    def _add(self, name: str) -> _Branch:
        if name in self.branches:
            raise ValueError(f"branch {name!r} is already present")
        ref = next(iter(self.parameters()), None)
        br = self._make(name)
        if ref is not None:
            br = br.to(device=ref.device, dtype=ref.dtype)
        br.train(self.training)
        self.branches[name] = br
        self._scores[name], self._counts[name] = 0.0, 0
        return br

    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.reparam(x)
        out = None
        for br in self.branches.values():
            y = br(x)
            out = y if out is None else out + y
        return out

    # ---------------------------------------------------------------- dynamic structure
    @torch.no_grad()
    def grow(self, name: str) -> None:
        """Add branch ``name`` with a zeroed last BN (function unchanged)."""
        self._check_not_deployed()
        bn = self._add(name).last_bn
        bn.weight.zero_()
        bn.bias.zero_()

    @torch.no_grad()
    def prune(self, name: str) -> None:
        """Remove branch ``name``, folding its eval-mode equivalent kernel into "kxk" (eval outputs unchanged)."""
        self._check_not_deployed()
        if name == "kxk":
            raise ValueError("the kxk branch cannot be pruned")
        if name not in self.branches:
            raise ValueError(f"branch {name!r} is not present (present: {list(self.branches)})")
        k, b = self.branches[name].fuse()
        main = self.branches["kxk"].cb
        scale, _ = T.bn_scale_shift(main.bn)
        if bool((scale == 0).any()):
            raise ValueError("cannot fold into the kxk branch: its BN has a zero scale")
        main.conv.weight.add_(k / scale.view(-1, 1, 1, 1))
        main.bn.bias.add_(b)
        del self.branches[name]
        self._scores.pop(name)
        self._counts.pop(name)

    @torch.no_grad()
    def record_importance(self) -> None:
        """Accumulate ``sum |theta * grad|`` per branch (call after backward)."""
        for name, br in self.branches.items():
            s = 0.0
            for p in br.parameters():
                if p.grad is not None:
                    s += float((p * p.grad).abs().sum())
            self._scores[name] += s
            self._counts[name] += 1

    def importance(self) -> Dict[str, float]:
        return {n: (self._scores[n] / self._counts[n] if self._counts[n] else 0.0) for n in self.branches}

    def step(self, prune_below: Optional[float] = None, grow: Sequence[str] = ()) -> Dict[str, list]:
        """Prune branches (not "kxk") whose mean importance is < ``prune_below``, then grow ``grow``;
        resets the scores.  Returns {"pruned": [...], "grown": [...]}."""
        self._check_not_deployed()
        imp = self.importance()
        pruned = []
        if prune_below is not None:
            for n, v in imp.items():
                if n != "kxk" and self._counts[n] and v < prune_below:
                    self.prune(n)
                    pruned.append(n)
        grown = []
        for n in grow:
            if n not in self.branches:
                self.grow(n)
                grown.append(n)
        for n in self.branches:
            self._scores[n], self._counts[n] = 0.0, 0
        return {"pruned": pruned, "grown": grown}

    def _check_not_deployed(self):
        if self.deployed:
            raise RuntimeError("DyRepBlock is re-parameterized; its branches are gone")

    # ---------------------------------------------------------------- re-parameterization
    @torch.no_grad()
    def get_equivalent_kernel_bias(self):
        if self.deployed:
            return self.reparam.weight.detach().clone(), self.reparam.bias.detach().clone()
        ks, bs = zip(*(br.fuse() for br in self.branches.values()))
        return T.add_branches(ks, bs)

    @torch.no_grad()
    def reparameterize(self) -> "DyRepBlock":
        return deploy_merged(self, "reparam", "branches.kxk.cb.conv", ("branches",))
