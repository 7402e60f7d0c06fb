"""The environment block written into every benchmark result."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from typing import Dict, Optional

import torch

__all__ = ["environment", "git_commit", "device_slug", "format_env_markdown", "pkg_version"]


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
