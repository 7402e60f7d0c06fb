"""The environment block written into every benchmark result."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from typing import Dict, List, Optional

import torch

__all__ = ["environment", "git_commit", "device_slug", "format_env_markdown", "pkg_version", "extension_info",
           "format_extension_line", "fatbin_archs"]


def pkg_version(name: str) -> Optional[str]:
    """Installed version of a distribution without importing it (None when absent)."""
    try:
        from importlib import metadata

        return metadata.version(name)
    except Exception:
        return None


def git_commit() -> Optional[str]:
    """The git commit of the lkconv checkout (with "+dirty" when it has local changes), or None.
    A copy of the tree without ``.git`` (scripts/torch_matrix.sh makes one) passes its source commit
    in ``LKCONV_GIT_COMMIT``."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(root, ".git")):
        return os.environ.get("LKCONV_GIT_COMMIT") or None
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not rev:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except Exception:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver_version() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        v = out.stdout.strip().splitlines()
        return v[0].strip() if out.returncode == 0 and v else None
    except Exception:
        return None


def environment(device: str = "cpu") -> Dict[str, object]:
    """GPU, driver, CUDA, cuDNN, torch, triton, lkconv version + commit, date, CPU model/threads."""
    import lkconv

    env: Dict[str, object] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "lkconv": lkconv.__version__,
        "lkconv_commit": git_commit(),
        "torch": torch.__version__,
        "triton": pkg_version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "cuda_runtime": torch.version.cuda,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(idx)
        env.update({
            "gpu": torch.cuda.get_device_name(idx),
            "gpu_capability": f"sm_{props.major}{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_sms": props.multi_processor_count,
            "driver": _driver_version(),
            "cudnn": torch.backends.cudnn.version(),
        })
    else:
        env["gpu"] = None
    return env


def device_slug(env: Dict[str, object]) -> str:
    """A folder-name-safe device name: the GPU name, or "cpu-<model>"."""
    name = env.get("gpu") or f"cpu-{env.get('cpu', 'unknown')}"
    name = str(name).replace("NVIDIA ", "").replace("(R)", "").replace("(TM)", "")
    slug = "".join(ch if ch.isalnum() else "-" for ch in name.lower())
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug.strip("-")[:48] or "device"


def format_env_markdown(env: Dict[str, object]) -> str:
    lines = ["| key | value |", "|---|---|"]
    for k, v in env.items():
        lines.append(f"| {k} | {v if v is not None else '-'} |")
    return "\n".join(lines)


def fatbin_archs(path: str) -> Optional[List[str]]:
    """The GPU code embedded in a CUDA library: ``["sm_80", "sm_90", "PTX compute_90"]`` (SASS per
    architecture, then PTX), read from its ``.nv_fatbin`` ELF section; None when it cannot be read.
    Fatbin layout: a 16-byte header (magic 0xBA55ED50, version u16, header size u16, payload size
    u64) followed by entries (kind u16: 1 PTX, 2 ELF/SASS; version u16; header size u32; payload
    size u64; ...; the architecture as a u32 at byte 28)."""
    import struct

    try:
        with open(path, "rb") as f:
            b = f.read()
        if b[:4] != b"\x7fELF" or b[4] != 2:  # 64-bit ELF only
            return None
        shoff, = struct.unpack_from("<Q", b, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", b, 0x3A)
        secs = [struct.unpack_from("<IIQQQQ", b, shoff + i * shentsize) for i in range(shnum)]
        stroff = secs[shstrndx][4]

        def name(n):
            return b[stroff + n:b.index(b"\0", stroff + n)].decode(errors="replace")

        fat = [(s[4], s[5]) for s in secs if name(s[0]) == ".nv_fatbin"]
        if not fat:
            return None
        start, size = fat[0]
        sass, ptx = [], []
        pos = start
        while pos + 16 <= start + size:
            magic, _ver, hsize, fsize = struct.unpack_from("<IHHQ", b, pos)
            if magic != 0xBA55ED50:
                break
            q, end = pos + hsize, pos + hsize + fsize
            while q + 32 <= end:
                kind, _ev, ehsize, psize = struct.unpack_from("<HHIQ", b, q)
                arch, = struct.unpack_from("<I", b, q + 28)
                (ptx if kind == 1 else sass).append(arch)
                if ehsize == 0:
                    break
                q += ehsize + psize
            pos = end
            while pos < start + size and pos % 8:  # entries are 8-byte aligned
                pos += 1
        names = [f"sm_{a}" for a in sorted(set(sass))] + [f"PTX compute_{a}" for a in sorted(set(ptx))]
        return names or None
    except Exception:
        return None


def extension_info() -> Dict[str, object]:
    """Is the compiled extension ``lkconv._C`` present, does it load, for which GPU architectures?

    ``{"built": bool, "path": str|None, "loads": bool|None, "error": str|None, "archs": [..]|None}``;
    the architectures are read from the library itself (:func:`fatbin_archs`)."""
    import importlib
    import importlib.util

    info: Dict[str, object] = {"built": False, "path": None, "loads": None, "error": None, "archs": None}
    try:
        spec = importlib.util.find_spec("lkconv._C")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return info
    info.update(built=True, path=spec.origin, archs=fatbin_archs(spec.origin))
    try:
        importlib.import_module("lkconv._C")
        info["loads"] = True
    except Exception as e:  # an ABI mismatch, a CPU-only torch, missing CUDA libraries
        info["loads"] = False
        info["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return info


def format_extension_line(info: Dict[str, object]) -> str:
    if not info.get("built"):
        return ("not built (pure-Python install; the cuda backend needs it: "
                "pip install --no-build-isolation -e . with a CUDA toolkit, or .ci/build_cuda.sh)")
    archs = ", ".join(info["archs"]) if info.get("archs") else "GPU code not readable"
    state = "loads" if info.get("loads") else f"does NOT load ({info.get('error')})"
    return f"built for {archs}; {state}: {info['path']}"
