"""Backend registry and the ``auto`` policy.

Backends are registered by name with a zero-argument factory; nothing heavy (triton, the compiled
extension, a GPU) is touched until a backend is actually asked for.

``auto`` resolves, per call and *before* the op runs, to a concrete backend:

* CUDA tensors: per pass, the order of the routing table (:mod:`.routing`): the lkconv backends
  (``cuda``, ``triton``) expected to beat PyTorch for that pass, dtype and shape class, fastest
  first, then ``torch``; the result is one name, or a per-pass route
  (``"forward=cuda;grad_input=cuda;grad_weight=triton"``) that every op reads its own pass from
* CPU tensors:  ``cpu`` (direct / FFT, by measured threshold) -> ``torch``
* anything else (meta, ...): ``torch``

The first backend in the order that is available and supports the case wins.  The choice can be
overridden process-wide with :func:`set_backend`, for a block with :func:`use_backend` (a
``contextvars.ContextVar``: per thread and per asyncio task; it wins over :func:`set_backend`), or
per call with ``backend=``.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..params import ConvParams
from . import routing
from .base import (
    PASSES,
    Backend,
    BackendError,
    BackendUnavailableError,
    Request,
    UnsupportedError,
    output_memory_format,
    split_pad,
)

__all__ = [
    "Backend",
    "BackendError",
    "BackendUnavailableError",
    "UnsupportedError",
    "Request",
    "output_memory_format",
    "split_pad",
    "register_backend",
    "validate_backend_name",
    "require",
    "get_backend",
    "list_backends",
    "backend_status",
    "resolve_backend",
    "set_backend",
    "get_default_backend",
    "use_backend",
]

_FACTORIES: Dict[str, Callable[[], Backend]] = {}
_INSTANCES: Dict[str, Backend] = {}

#: the order ``auto`` tries backends in, per device type (CUDA tensors: the routing table, per pass)
AUTO_CHAIN: Dict[str, Tuple[str, ...]] = {
    "cpu": ("cpu", "torch"),
}
_FALLBACK_CHAIN = ("torch",)

_default_backend = "auto"


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Register (or replace) a backend factory under ``name``."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"lkconv: invalid backend name {name!r}")
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)


def list_backends() -> List[str]:
    """Names of all registered backends (available or not)."""
    return list(_FACTORIES)


def validate_backend_name(name, *, allow_none: bool = True, argument: str = "backend") -> None:
    """The one check of a backend name given by a user: ``None`` (the default backend; only where
    ``allow_none``), ``"auto"``, or a registered name.  Raises TypeError/ValueError naming
    ``argument``.  Used by the functional, the ops, the modules and the models."""
    if name is None and allow_none:
        return
    if not isinstance(name, str):
        raise TypeError(f"lkconv: {argument} must be a string, got {type(name).__name__}")
    if name != "auto" and name not in _FACTORIES:
        choices = ("None, " if allow_none else "") + f"'auto' or one of {list_backends()}"
        raise ValueError(f"lkconv: unknown backend {name!r} (argument: {argument}); choose {choices}")


def _instance(name: str) -> Backend:
    if name not in _FACTORIES:
        validate_backend_name(name, allow_none=False)
    # no lock here: this runs under torch.compile tracing; dict operations are atomic under the GIL
    # and constructing a backend twice in a race is harmless.
    inst = _INSTANCES.get(name)
    if inst is None:
        try:
            inst = _FACTORIES[name]()
        except Exception as e:  # a backend whose module cannot load is unavailable, not fatal
            inst = _BrokenBackend(name, f"failed to load ({type(e).__name__}: {e})")
        _INSTANCES[name] = inst
    return inst


class _BrokenBackend(Backend):
    def __init__(self, name: str, why: str):
        self.name = name
        self._why = why

    def unavailable_reason(self):
        return self._why


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo (2+ s) at
    ``import lkconv``: the public decorator only sets this marker on the function.  If dynamo is
    already loaded, use the public API.  tests/test_ops_contract.py proves the marker works
    (compile with fullgraph=True through ``auto``)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _unavailable_reason(name: str) -> str:
    """"" when backend ``name`` is usable, else why not.  Opaque to torch.compile (evaluated once at
    trace time): creating a backend may import triton or load the compiled extension."""
    return _instance(name).unavailable_reason() or ""


def get_backend(name: str) -> Backend:
    """The backend object ``name``; raises :class:`BackendUnavailableError` if it cannot run here."""
    if name not in _FACTORIES:
        validate_backend_name(name, allow_none=False)
    why = _unavailable_reason(name)
    if why:
        raise BackendUnavailableError(f"lkconv: backend {name!r} is not available: {why}")
    return _INSTANCES[name]


def require(name: str, *requests: Request) -> Backend:
    """The one resolution point of a concrete backend name: the backend object, after checking
    that ``name`` is registered, available here, and supports every pass described by
    ``requests``.  Raises ValueError (unknown name or "auto"), :class:`BackendUnavailableError`
    or :class:`UnsupportedError`.  The functional (explicit names) and every op go through here."""
    if name == "auto":
        raise ValueError("lkconv: the lkconv ops take a concrete backend; resolve 'auto' first "
                         "(lkconv.depthwise_conv2d does)")
    if len(requests) == 1:  # an op's own pass: a per-pass route names its backend
        name = routing.route_for(name, requests[0].pass_)
    inst = get_backend(name)
    for req in requests:
        why = inst.check(req)
        if why is not None:
            raise UnsupportedError(f"lkconv: backend {name!r} does not support this case ({req.pass_}): {why}")
    return inst


def backend_status() -> Dict[str, Optional[str]]:
    """``{name: None if available else reason}`` for every registered backend."""
    out = {}
    for name in list_backends():
        try:
            out[name] = _instance(name).unavailable_reason()
        except Exception as e:  # a broken factory must not break `info`
            out[name] = f"failed to initialise: {type(e).__name__}: {e}"
    return out


def set_backend(name: str) -> None:
    """Set the process-wide default backend (``"auto"`` restores the automatic choice).  An open
    :func:`use_backend` block of the calling thread still wins until it ends."""
    global _default_backend
    validate_backend_name(name, allow_none=False)
    _default_backend = name


#: the open ``use_backend`` blocks of this thread / task, innermost last: a tuple of (entry, name)
#: pairs.  Each block removes exactly its own entry when it ends, so blocks that end out of order
#: (generators, interleaved coroutines) never leave a stale override behind.
_OVERRIDES: "contextvars.ContextVar[tuple]" = contextvars.ContextVar("lkconv_backend_overrides", default=())


def get_default_backend() -> str:
    """The backend used when a call passes no ``backend=``: the innermost :func:`use_backend` block
    of this thread / task, else the process-wide :func:`set_backend` value (normally ``"auto"``)."""
    return _innermost_override() or _default_backend


@torch.compiler.assume_constant_result
def _innermost_override() -> Optional[str]:
    # opaque to torch.compile: dynamo in torch 2.11 cannot trace ContextVar.get (a compiled graph
    # keeps the override it was traced under, as it keeps the resolved backend)
    overrides = _OVERRIDES.get()
    return overrides[-1][1] if overrides else None


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: ``with lkconv.use_backend("cpu"): ...``.  The override holds for this thread
    (or asyncio task) only; other threads keep their own default."""
    validate_backend_name(name, allow_none=False)
    entry = object()
    _OVERRIDES.set(_OVERRIDES.get() + ((entry, name),))
    try:
        yield
    finally:
        _OVERRIDES.set(tuple(e for e in _OVERRIDES.get() if e[0] is not entry))


def resolve_backend(
    name: Optional[str], x: torch.Tensor, weight: torch.Tensor, params: ConvParams, passes=PASSES
) -> str:
    """Turn a requested backend name (or None / "auto") into a concrete backend that is available
    and supports every pass in ``passes`` for these tensors.  Explicit names that cannot serve the
    case raise (through :func:`require`); ``auto`` walks the chain of its device type."""
    if name is None:
        name = get_default_backend()
    validate_backend_name(name, allow_none=False)
    requests = [Request.of(p, x, weight, params) for p in passes]
    if name != "auto":
        require(name, *requests)
        return name
    if x.device.type == "cuda":
        return _route_cuda(x, weight, params)
    reasons = []
    for cand in AUTO_CHAIN.get(x.device.type, _FALLBACK_CHAIN):
        if cand not in _FACTORIES:
            continue
        why = _unavailable_reason(cand) or None
        if why is None:
            inst = _INSTANCES[cand]
            why = next((w for w in (inst.check(r) for r in requests) if w is not None), None)
        if why is None:
            return cand
        reasons.append(f"{cand}: {why}")
    raise UnsupportedError("lkconv: no backend can run this case; " + "; ".join(reasons))


def _first_that_serves(order, req: Request, reasons: List[str]) -> Optional[str]:
    for cand in order:
        if cand not in _FACTORIES:
            continue
        why = _unavailable_reason(cand) or None
        if why is None:
            why = _INSTANCES[cand].check(req)
        if why is None:
            return cand
        reasons.append(f"{cand}: {why}")
    return None


def _route_cuda(x: torch.Tensor, weight: torch.Tensor, params: ConvParams) -> str:
    """``auto`` on CUDA tensors: per pass, the first backend of the routing table's order
    (:mod:`lkconv.backends.routing`: the lkconv backends expected to beat PyTorch, fastest first,
    then ``torch``) that is available and supports the pass.  Every pass is routed (a backward or
    double backward may need any of them); one name when all agree, else a per-pass route."""
    per_pass, reasons = {}, []
    for pass_ in PASSES:
        req = Request.of(pass_, x, weight, params)
        order, _ = routing.route_order(req)
        pick = _first_that_serves(order, req, reasons)
        if pick is None:
            raise UnsupportedError("lkconv: no backend can run this case; " + "; ".join(reasons))
        per_pass[pass_] = pick
    return routing.join_route(per_pass)


def _register_builtin() -> None:
    from .reference import ReferenceBackend
    from .torch_native import TorchBackend

    register_backend("reference", ReferenceBackend)
    register_backend("torch", TorchBackend)

    def _cpu():
        from .cpu import CPUBackend

        return CPUBackend()

    def _triton():
        from .triton import TritonBackend

        return TritonBackend()

    def _cuda():
        from .cuda import CUDABackend

        return CUDABackend()

    register_backend("cpu", _cpu)
    register_backend("triton", _triton)
    register_backend("cuda", _cuda)


_register_builtin()
