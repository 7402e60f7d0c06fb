"""``reparameterize(model)``: turn a training-form model into its deploy form; ``to_plain(model)``:
lkconv modules back to ``nn.Conv2d`` (for export to runtimes that do not know lkconv's ops).

Every change ``reparameterize`` makes to a block is checked: the block's eval output on a probe
input is computed before, the block is deployed (its own method, or a merge found from its
structure), and the change is kept only if the output is reproduced; otherwise the block is restored
and the reason recorded in the :class:`ReparamReport`.
"""
from __future__ import annotations

import copy
import inspect
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import LargeKernelConv2d
from ..nn.convert import convert as _convert
from . import transforms as T

__all__ = ["reparameterize", "to_plain", "fuse_conv_bn_modules", "ReparamReport", "DEPLOY_METHODS",
           "MODEL_DEPLOY_METHODS", "merge_parallel_branches"]

log = logging.getLogger("lkconv.reparam")

_ACTIVE: Set[int] = set()  # modules whose own deploy method is running (guards recursion)

#: block-level deploy methods of the re-parameterization code bases, tried in this order: lkconv and
#: timm (``reparameterize``), RepVGG/DBB/ACNet (``switch_to_deploy``), RepLKNet/SLaK (``merge_kernel``),
#: UniRepLKNet's dilated block (``merge_dilated_branches``), MobileOne-style ``fuse``/``reparam``
DEPLOY_METHODS: Tuple[str, ...] = ("reparameterize", "switch_to_deploy", "merge_kernel", "merge_dilated_branches",
                                   "fuse", "reparam")
#: model-level ones (they call the block-level method of every block: RepLKNet/SLaK, UniRepLKNet)
MODEL_DEPLOY_METHODS: Tuple[str, ...] = ("structural_reparam", "reparameterize_unireplknet")

#: relative tolerance of the check, per dtype: max|deployed - original| <= tol * max(1, max|original|)
CHECK_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}

#: spatial size of a synthesized probe input (rectangular, odd/even, so transposed or misaligned
#: kernels and stride-2 borders show)
PROBE_HW = (29, 32)


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------
@dataclass
class ReparamEntry:
    path: str  #: module path in the model ("" for the model itself)
    block: str  #: the module's class name
    action: str  #: "merged" (its own method), "structural" (merge found from its branches), "folded" (conv + BN), "left"
    detail: str = ""  #: the method used, the branches merged, or why the block was left


@dataclass
class ReparamReport:
    """What :func:`reparameterize` did: one entry per block merged, folded or left (with the reason)."""

    entries: List[ReparamEntry] = field(default_factory=list)

    def add(self, path, module, action, detail=""):
        self.entries.append(ReparamEntry(path, type(module).__name__, action, detail))

    def counts(self) -> Dict[str, Dict[str, int]]:
        """``{block type: {action: count}}``."""
        out: Dict[str, Counter] = {}
        for e in self.entries:
            out.setdefault(e.block, Counter())[e.action] += 1
        return {k: dict(v) for k, v in out.items()}

    def of(self, action: str) -> List[ReparamEntry]:
        return [e for e in self.entries if e.action == action]

    @property
    def merged(self) -> int:
        return len(self.of("merged")) + len(self.of("structural"))

    @property
    def folded(self) -> int:
        return len(self.of("folded"))

    @property
    def left(self) -> List[ReparamEntry]:
        return self.of("left")

    def summary(self) -> str:
        tot = Counter(e.action for e in self.entries)
        head = ("reparameterize: " + ", ".join(f"{tot[a]} {a}" for a in ("merged", "structural", "folded", "left"))
                + " (merged: own method; structural: found from the branches; folded: conv + BN)")
        lines = [head]
        for block, c in sorted(self.counts().items()):
            lines.append(f"  {block}: " + ", ".join(f"{n} {a}" for a, n in sorted(c.items())))
        for e in self.left:
            lines.append(f"  left {e.path or '<model>'} ({e.block}): {e.detail}")
        return "\n".join(lines)

    __str__ = summary


# ------------------------------------------------------------------------------------------------
# checking: probe input, snapshot/restore, output comparison
# ------------------------------------------------------------------------------------------------
def _first_conv(m: nn.Module) -> Optional[nn.Conv2d]:
    return next((c for c in m.modules() if isinstance(c, nn.Conv2d)), None)


def _float_dtype_device(m: nn.Module):
    for t in list(m.parameters()) + list(m.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


class _Prober:
    """Inputs to run a block on: captured from ``example_inputs`` (when given) or synthesized from the
    block's first conv: (2, in_channels, 29, 32) normal samples (``abs()`` for blocks that declare
    ``exact_for_nonnegative_input``, i.e. RMNet's)."""

    def __init__(self, model: nn.Module, example_inputs):
        self.captured: Dict[int, tuple] = {}
        self.gen = torch.Generator().manual_seed(0)
        if example_inputs is None:
            return
        args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        hooks = []

        def hook(mod, inputs):
            if id(mod) not in self.captured and inputs and all(isinstance(t, torch.Tensor) for t in inputs):
                self.captured[id(mod)] = tuple(t.detach().clone() for t in inputs)

        for mod in model.modules():
            hooks.append(mod.register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                model(*args)
        finally:
            for h in hooks:
                h.remove()

    def candidates(self, m: nn.Module) -> List[tuple]:
        """Probe inputs to try, in order: the captured one, else one per distinct ``in_channels`` of the
        block's convs (the first conv registered is not always the first applied)."""
        if id(m) in self.captured:
            return [self.captured[id(m)]]
        dtype, device = _float_dtype_device(m)
        nonneg = any(getattr(s, "exact_for_nonnegative_input", False) for s in m.modules())
        out, seen = [], set()
        for conv in m.modules():
            if isinstance(conv, nn.Conv2d) and conv.in_channels not in seen and len(seen) < 4:
                seen.add(conv.in_channels)
                x = torch.randn((2, conv.in_channels, *PROBE_HW), generator=self.gen, dtype=torch.float64)
                out.append(((x.abs() if nonneg else x).to(dtype=dtype, device=device),))
        return out

    def probe(self, m: nn.Module):
        """(inputs, outputs) of ``m`` on the first candidate input it runs on, or (None, reason)."""
        cands = self.candidates(m)
        if not cands:
            return None, "no probe input (no Conv2d inside; pass example_inputs=)"
        err = None
        for inputs in cands:
            try:
                ref = _run(m, inputs)
            except Exception as e:
                err = e
                continue
            if not ref:
                return None, "the block returns no tensor"
            return inputs, ref
        return None, (f"the block does not run on a probe input ({type(err).__name__}: {str(err)[:200]}); "
                      "pass example_inputs=")


def _tensors_of(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors_of(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors_of(o)]
    return []


def _run(m: nn.Module, inputs) -> List[torch.Tensor]:
    with torch.no_grad():
        return [t.detach().clone() for t in _tensors_of(m(*inputs))]


def _mismatch(ref: List[torch.Tensor], out: List[torch.Tensor]) -> Optional[str]:
    """None when ``out`` reproduces ``ref`` within :data:`CHECK_RTOL`, else why not."""
    if len(ref) != len(out):
        return f"the deployed block returns {len(out)} tensors, the original {len(ref)}"
    for r, o in zip(ref, out):
        if r.shape != o.shape:
            return f"output shape {tuple(o.shape)} != original {tuple(r.shape)}"
        if not r.is_floating_point():
            if not torch.equal(r, o):
                return "integer output differs"
            continue
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        err = (o.double() - r.double()).abs().max().item() if r.numel() else 0.0
        tol = CHECK_RTOL.get(r.dtype, 1e-4) * scale
        if not err <= tol:
            return f"deployed output differs: max|diff| = {err:.3e} > {tol:.3e}"
    return None


def _restore(m: nn.Module, snap: nn.Module) -> None:
    """Put ``m`` back into the state of its snapshot (``copy.deepcopy(m)`` taken before)."""
    m.__dict__.clear()
    m.__dict__.update(snap.__dict__)


@torch.no_grad()
def _signature(m: nn.Module):
    """Structure and a value fingerprint of ``m``: tells whether a deploy method changed anything."""
    return (tuple((n, type(s).__name__) for n, s in m.named_modules()),
            tuple((n, tuple(t.shape), float(t.detach().double().sum()) if t.is_floating_point() else 0.0)
                  for n, t in list(m.named_parameters()) + list(m.named_buffers())))


# ------------------------------------------------------------------------------------------------
# deploy methods
# ------------------------------------------------------------------------------------------------
def _callable_without_args(fn) -> bool:
    try:
        inspect.signature(fn).bind()
        return True
    except TypeError:
        return False
    except ValueError:  # no signature (builtins): try it
        return True


def _deploy_methods(m: nn.Module, model_level: bool) -> List[str]:
    names = DEPLOY_METHODS + (MODEL_DEPLOY_METHODS if model_level else ())
    out = []
    for name in names:
        fn = getattr(m, name, None)
        if callable(fn) and not isinstance(fn, nn.Module) and _callable_without_args(fn):
            out.append(name)
    return out


def _has_block_methods_below(m: nn.Module) -> bool:
    return any(_deploy_methods(s, False) for s in m.modules() if s is not m)


# ------------------------------------------------------------------------------------------------
# structural detection: parallel conv(+BN) branches whose outputs are summed
# ------------------------------------------------------------------------------------------------
def _is_plain_bn(m) -> bool:
    """A BatchNorm (any ``_BatchNorm``: BatchNorm2d, SyncBatchNorm, ...) whose forward is the standard
    one (not e.g. a BN fused with an activation) and that has running statistics."""
    if not isinstance(m, nn.modules.batchnorm._BatchNorm) or m.running_mean is None:
        return False
    fwd = type(m).forward
    return fwd is nn.modules.batchnorm._BatchNorm.forward or fwd is nn.SyncBatchNorm.forward


def _conv_geometry(c: nn.Conv2d):
    if not isinstance(c, nn.Conv2d) or c.padding_mode != "zeros" or c.transposed:
        return None
    pad = c.padding
    if isinstance(pad, str):
        if pad == "valid":
            pad = (0, 0)
        else:  # "same" (stride 1): symmetric only for odd effective kernels
            eff = [d * (k - 1) for d, k in zip(c.dilation, c.kernel_size)]
            if any(e % 2 for e in eff):
                return None
            pad = tuple(e // 2 for e in eff)
    return tuple(pad)


def _branch_units(m: nn.Module) -> Optional[List[Tuple[nn.Conv2d, Optional[nn.Module]]]]:
    """``m``'s children as parallel branches: a conv, a conv followed by its BN (consecutive
    children), or a child made of exactly a conv and a BN.  None if any child is something else."""
    if m._parameters and any(p is not None for p in m._parameters.values()):
        return None
    kids = list(m.children())
    out, i = [], 0
    while i < len(kids):
        c = kids[i]
        if isinstance(c, nn.Conv2d) and not _deploy_methods(c, False):
            bn = None
            if i + 1 < len(kids) and _is_plain_bn(kids[i + 1]) and kids[i + 1].num_features == c.out_channels:
                bn = kids[i + 1]
                i += 1
            out.append((c, bn))
        else:
            sub = list(c.children())
            if (len(sub) == 2 and isinstance(sub[0], nn.Conv2d) and _is_plain_bn(sub[1])
                    and sub[1].num_features == sub[0].out_channels and not c._parameters):
                out.append((sub[0], sub[1]))
            else:
                return None
        i += 1
    return out or None


@torch.no_grad()
def merge_parallel_branches(branches: Sequence[Tuple[nn.Conv2d, Optional[nn.Module]]]) -> Tuple[nn.Conv2d, str]:
    """One conv equal to the sum of parallel ``conv -> BN`` branches (BN optional, any eval-mode
    ``_BatchNorm``) of any kernel sizes and dilations (e.g. SLaK's 51x5 + 5x51 + 5x5).  The branches
    must share in/out channels, groups and stride; each kernel is made dense (dilation) and placed
    where its taps read the input: with padding ``p_i`` and ``P = max p_i``, at offset ``P - p_i``
    of the merged kernel.  Returns (conv, description); raises ValueError when they do not fit."""
    if not branches:
        raise ValueError("branches must not be empty")
    c0 = branches[0][0]
    geo = []
    for conv, bn in branches:
        pad = _conv_geometry(conv)
        if pad is None:
            raise ValueError(f"{conv}: padding mode/padding cannot be merged")
        if (conv.in_channels, conv.out_channels, conv.groups, tuple(conv.stride)) != (
                c0.in_channels, c0.out_channels, c0.groups, tuple(c0.stride)):
            raise ValueError("the branches differ in channels, groups or stride")
        k = conv.weight.detach()
        if bn is not None:
            k, b = T.fuse_conv_bn(k, conv.bias, bn)
        else:
            b = conv.bias.detach() if conv.bias is not None else torch.zeros_like(k[:, 0, 0, 0])
        k = T.dilated_to_dense(k, tuple(conv.dilation))
        geo.append((k, b, pad))
    P = tuple(max(g[2][d] for g in geo) for d in range(2))
    E = tuple(max(P[d] - g[2][d] + g[0].shape[2 + d] for g in geo) for d in range(2))
    ks, bs = [], []
    for k, b, pad in geo:
        top, left = P[0] - pad[0], P[1] - pad[1]
        ks.append(F.pad(k, [left, E[1] - k.shape[3] - left, top, E[0] - k.shape[2] - top]))
        bs.append(b)
    k, b = T.add_branches(ks, bs)
    from .blocks.common import conv_from_kernel

    like = next((c for c, _ in branches if isinstance(c, LargeKernelConv2d)), None)
    new = conv_from_kernel(k, b, tuple(c0.stride), P, 1, c0.groups, like=like)
    desc = " + ".join(f"{'x'.join(map(str, c.kernel_size))}{'/d' + str(c.dilation[0]) if max(c.dilation) > 1 else ''}"
                      f"{'+' + type(bn).__name__ if bn is not None else ''}" for c, bn in branches)
    return new, f"{desc} -> {E[0]}x{E[1]}"


# ------------------------------------------------------------------------------------------------
# the walk
# ------------------------------------------------------------------------------------------------
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class _Walker:
    """Pass 1 (:meth:`methods`, children first): deploy methods.  Pass 2 (:meth:`structure`, parents
    first, so a block is merged as a whole before its branches are looked at): structural merges of
    what is left.  Reasons are collected per module and reported at the end for the modules that are
    still in the model (a branch whose parent was merged is gone and not reported)."""

    def __init__(self, prober: _Prober, report: ReparamReport, lkconv_modules: bool):
        self.prober, self.report, self.lkconv_modules = prober, report, lkconv_modules
        self.why: Dict[int, Tuple[str, nn.Module, List[str]]] = {}
        self.done: Set[int] = set()

    def _note(self, m, path, reason):
        self.why.setdefault(id(m), (path, m, []))[2].append(reason)

    def methods(self, m: nn.Module, path: str) -> nn.Module:
        """Returns the module that takes ``m``'s place."""
        for name, child in list(m.named_children()):
            new = self.methods(child, f"{path}.{name}" if path else name)
            if new is not child:
                setattr(m, name, new)
        if type(m) in _CONTAINERS or id(m) in _ACTIVE:
            return m
        model_level = (any(callable(getattr(m, n, None)) for n in MODEL_DEPLOY_METHODS)
                       and not _has_block_methods_below(m))
        names = _deploy_methods(m, model_level)
        if not names:
            return m
        res = self._try_methods(m, path, names)
        if res is True:
            self.done.add(id(m))
            return m
        if isinstance(res, nn.Module):
            self.done.add(id(res))
            return res
        if res is not None:
            self._note(m, path, res)
        return m

    def structure(self, m: nn.Module, path: str) -> nn.Module:
        if id(m) not in self.done and type(m) not in _CONTAINERS and not isinstance(
                m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)):
            units = _branch_units(m)
            if units and (len(units) > 1 or units[0][1] is not None):
                res = self._try_structure(m, path, units)
                if isinstance(res, nn.Module):
                    return res
                self._note(m, path, res)
        for name, child in list(m.named_children()):
            new = self.structure(child, f"{path}.{name}" if path else name)
            if new is not child:
                setattr(m, name, new)
        return m

    def report_left(self, model: nn.Module) -> None:
        live = {id(s) for s in model.modules()}
        for key, (path, m, reasons) in self.why.items():
            if key in live:
                self.report.add(path, m, "left", "; ".join(reasons))

    def _restore(self, m, snap, pre):
        """Restore ``m`` from a copy of ``snap`` and move what is known about its submodules (``pre``:
        ``list(m.modules())`` when ``snap`` was taken, in the same order as ``snap.modules()``) to the
        restored copies."""
        fresh = copy.deepcopy(snap)
        new = [m] + list(fresh.modules())[1:]
        _restore(m, fresh)
        for old, nu in zip(pre, new):
            if old is nu:
                continue
            for table in (self.why, self.prober.captured):
                if id(old) in table:
                    table[id(nu)] = table.pop(id(old))
            if id(old) in self.done:
                self.done.discard(id(old))
                self.done.add(id(nu))

    def _try_methods(self, m, path, methods):
        """True (deployed in place), a module (its replacement), None (no change) or the reason."""
        inputs, ref = self.prober.probe(m)
        if inputs is None:
            return f"{methods[0]}() not called: {ref}"
        try:
            snap = copy.deepcopy(m)
            pre = list(m.modules())
        except Exception as e:
            return f"{methods[0]}() not called: the block cannot be copied to restore it ({type(e).__name__}: {e})"
        sig = _signature(m)
        reasons = []
        for name in methods:
            _ACTIVE.add(id(m))
            try:
                ret = getattr(m, name)()
            except Exception as e:
                self._restore(m, snap, pre)
                reasons.append(f"{name}() raised {type(e).__name__}: {e}")
                continue
            finally:
                _ACTIVE.discard(id(m))
            m.eval()
            target = ret if isinstance(ret, nn.Module) and ret is not m else m
            if target is not m:
                target.eval()
            try:
                bad = _mismatch(ref, _run(target, inputs))
            except Exception as e:
                bad = f"the deployed block fails on the probe input ({type(e).__name__}: {e})"
            if bad is None:
                if target is m and _signature(m) == sig:
                    return None  # nothing changed (already deployed, or a method that only returns values)
                if target is not m:
                    self._restore(m, snap, pre)
                if self.lkconv_modules:
                    target = _convert(target, min_kernel=5)
                self.report.add(path, m, "merged", f"{name}()")
                return True if target is m else target
            self._restore(m, snap, pre)
            reasons.append(f"{name}(): {bad}")
        return "; ".join(reasons)

    def _try_structure(self, m, path, units):
        try:
            new, desc = merge_parallel_branches(units)
        except Exception as e:
            return f"branches not mergeable: {e}"
        inputs, ref = self.prober.probe(m)
        if inputs is None:
            return f"structural check not possible: {ref}"
        try:
            bad = _mismatch(ref, _run(new.eval(), inputs))
        except Exception as e:
            bad = f"{type(e).__name__}: {e}"
        if bad is not None:
            return f"not a sum of its conv/BN branches ({desc}): {bad}"
        action = "structural" if len(units) > 1 else "folded"
        self.report.add(path, m, action, desc)
        return new


@torch.no_grad()
def _fused_conv(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> nn.Conv2d:
    k, b = T.fuse_conv_bn(conv.weight, conv.bias, bn)
    new = copy.deepcopy(conv)
    new.weight = nn.Parameter(k.detach().clone(), conv.weight.requires_grad)
    new.bias = nn.Parameter(b.detach().clone().to(k.dtype), conv.weight.requires_grad)
    return new


@torch.no_grad()
def fuse_conv_bn_modules(model: nn.Module, report: Optional[ReparamReport] = None) -> int:
    """In every ``nn.Sequential`` of ``model``, replace each (Conv2d, BatchNorm) pair of consecutive
    entries by (fused Conv2d with bias, Identity).  BatchNorm means any ``_BatchNorm`` with the
    standard forward (BatchNorm2d, SyncBatchNorm, ...; not one fused with an activation) that has
    running statistics and the conv's channels; indices and names stay valid.  Returns the number
    of fused pairs (and records them in ``report``)."""
    n = 0
    for path, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules.keys())
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and _is_plain_bn(bn) and bn.num_features == conv.out_channels:
                seq._modules[a] = _fused_conv(conv, bn)
                seq._modules[b] = nn.Identity()
                if report is not None:
                    report.entries.append(ReparamEntry(f"{path}.{a}" if path else a,
                                                       f"{type(conv).__name__}+{type(bn).__name__}", "folded",
                                                       "consecutive entries of an nn.Sequential"))
                n += 1
    return n


def reparameterize(model: nn.Module, inplace: bool = True, plain_conv: bool = False, *, example_inputs=None,
                   lkconv_modules: bool = True, return_report: bool = False):
    """Re-parameterize every block of ``model`` that can be, each change checked, then fold conv+BN.

    1. children before parents, every module with a deploy method of :data:`DEPLOY_METHODS`
       (``reparameterize``, ``switch_to_deploy``, ``merge_kernel``, ``merge_dilated_branches``,
       ``fuse``, ``reparam``; a module with none of them below it also :data:`MODEL_DEPLOY_METHODS`:
       ``structural_reparam``, ...) has it called; the change is kept only if the block's eval output
       on a probe input is reproduced (:data:`CHECK_RTOL`), otherwise the block is restored;
    2. a module that has no working method but whose children are parallel conv(+BN) branches (a
       conv, a conv and its BN, or a child made of exactly conv + BN), e.g. SLaK's decomposed 51x5 +
       5x51 + 5x5, is replaced by the single conv of the summed branches
       (:func:`merge_parallel_branches`), again only if its output is reproduced;
    3. consecutive (Conv2d, BatchNorm) entries of ``nn.Sequential`` containers are fused
       (:func:`fuse_conv_bn_modules`; SyncBatchNorm included);
    4. with ``lkconv_modules`` (default), depthwise convs of kernel >= 5 inside merged blocks become
       :class:`lkconv.nn.LargeKernelConv2d` (channel multiplier included), so the deployed large
       kernels run on lkconv;
    5. optionally (``plain_conv=True``) lkconv modules become ``nn.Conv2d`` (:func:`to_plain`) so
       ``torch.export``/ONNX graphs contain only aten convolutions.

    Args:
        model: any module.
        inplace: modify ``model`` (default) or a deep copy of it.
        plain_conv: see 5.
        example_inputs: a tensor or tuple the model can be called with; each block is then checked on
            its real input (captured by forward pre-hooks) instead of a synthesized one (normal samples
            of shape (2, in_channels of its first conv, 29, 32)).  Needed for blocks whose input is
            not conv-shaped.
        lkconv_modules: see 4.
        return_report: also return the :class:`ReparamReport`.
    Returns:
        the deploy model, in eval mode (and the report with ``return_report=True``; its summary is
        also logged at INFO level to the ``lkconv.reparam`` logger).  Outputs equal the training
        form's eval-mode outputs (RMBlock: for non-negative inputs, as RMNet requires).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"reparameterize: model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    report = ReparamReport()
    walker = _Walker(_Prober(model, example_inputs), report, lkconv_modules)
    model = walker.methods(model, "")
    model = walker.structure(model, "")
    model.eval()
    walker.report_left(model)
    fuse_conv_bn_modules(model, report)
    if plain_conv:
        model = to_plain(model)
    log.info("%s", report.summary())
    model = model.eval()
    return (model, report) if return_report else model


@torch.no_grad()
def _plain(conv: LargeKernelConv2d) -> nn.Conv2d:
    """An ``nn.Conv2d`` with ``conv``'s attributes, parameters, buffers and hooks (shared, not
    copied); only lkconv's ``backend`` attribute is dropped."""
    new = nn.Conv2d.__new__(nn.Conv2d)
    nn.Module.__init__(new)
    for k, v in conv.__dict__.items():
        if k not in ("_parameters", "_buffers", "_modules", "backend"):
            new.__dict__[k] = v
    new._parameters = dict(conv._parameters)
    new._buffers = dict(conv._buffers)
    new._modules = dict(conv._modules)
    return new


def to_plain(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Replace every :class:`lkconv.nn.LargeKernelConv2d` (and subclasses) by an ``nn.Conv2d`` sharing
    its parameters (same outputs, same state_dict keys): for export to ONNX or any runtime without
    lkconv's custom ops.  Returns the model (a bare LargeKernelConv2d returns its nn.Conv2d)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_plain: model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, LargeKernelConv2d):
        return _plain(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LargeKernelConv2d):
                setattr(parent, name, _plain(child))
    return model
