"""Locating the CUDA tools and the compile cache."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from typing import Dict, Optional

__all__ = ["find_tool", "cache_dir", "cache_get", "cache_put", "cache_cubin_path", "digest", "repo_root", "csrc_dir"]


def repo_root() -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return root if os.path.isdir(os.path.join(root, "lkconv")) else None


def csrc_dir() -> Optional[str]:
    """csrc/ of the checkout, or None (an installed package has no CUDA sources)."""
    root = repo_root()
    d = os.path.join(root, "csrc") if root else None
    return d if d and os.path.isfile(os.path.join(d, "build_env.py")) else None


def _triton_bin() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    d = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return d if os.path.isdir(d) else None


def _cuda_roots():
    roots = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            roots.append(os.environ[var])
    roots += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return roots


def find_tool(name: str) -> Optional[str]:
    """Path of ``nvcc``, ``ptxas``, ``cuobjdump`` or ``nvdisasm``: the CUDA toolkit first (nvcc's own
    ptxas), then PATH, then the copies bundled with triton (cuobjdump/nvdisasm/ptxas)."""
    for root in _cuda_roots():
        p = os.path.join(root, "bin", name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    p = shutil.which(name)
    if p:
        return p
    tb = _triton_bin()
    if tb and name != "nvcc":
        p = os.path.join(tb, name)
        if os.path.isfile(p):
            return p
    return None


def cache_dir() -> str:
    d = os.environ.get("LKCONV_STATIC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lkconv", "static")
    os.makedirs(d, exist_ok=True)
    return d


def digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def cache_get(key: str) -> Optional[Dict]:
    p = os.path.join(cache_dir(), key + ".json")
    if os.environ.get("LKCONV_STATIC_NOCACHE"):
        return None
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cache_cubin_path(key: str) -> str:
    return os.path.join(cache_dir(), key + ".cubin")


def cache_put(key: str, value: Dict, cubin: Optional[bytes] = None) -> None:
    d = cache_dir()
    if cubin is not None:
        with open(os.path.join(d, key + ".cubin"), "wb") as f:
            f.write(cubin)
    tmp = os.path.join(d, f".{key}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, os.path.join(d, key + ".json"))
