"""Compile the GPU kernels without a GPU and collect the static facts of every kernel.

* CUDA: each ``csrc/*.cu`` of ``build_env.SOURCES`` -> one cubin per arch, with the project's own
  flags (``csrc/build_env.py`` is imported, never copied) plus ``-Xptxas -v``.
* Triton: ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc,
  32))`` with the specialisation the runtime applies to a launch (ints equal to 1 are constexpr,
  multiples of 16 and 16-byte-aligned pointers carry ``tt.divisibility=16``), then the bundled ptxas
  is re-run with ``-v`` on the generated PTX for the spill counts.

Results are cached by a digest of the sources, flags, tool versions and specialisation
(:func:`.tools.cache_dir`), so a second run (and CI) only re-analyses what changed.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

from . import sass
from .kernels import describe_symbol
from .tools import cache_cubin_path, cache_get, cache_put, csrc_dir, digest, find_tool

__all__ = ["load_build_env", "compile_cuda", "compile_triton", "cuda_unavailable_reason", "tool_versions",
           "facts_from_cubin"]


def load_build_env():
    """csrc/build_env.py as a module (the single home of the CUDA flags), or None without csrc/."""
    d = csrc_dir()
    if d is None:
        return None
    spec = importlib.util.spec_from_file_location("lkconv_csrc_build_env", os.path.join(d, "build_env.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cuda_unavailable_reason() -> Optional[str]:
    if csrc_dir() is None:
        return "csrc/ not found (not a source checkout): the CUDA kernels cannot be compiled; Triton only"
    for tool in ("nvcc", "cuobjdump"):
        if find_tool(tool) is None:
            return f"{tool} not found (install the CUDA toolkit or set CUDA_HOME)"
    return None


def _version(tool: Optional[str]) -> str:
    if tool is None:
        return "missing"
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    m = re.findall(r"release [\d.]+, V[\d.]+|V\d+\.\d+\.\d+", out)
    return m[-1] if m else out.strip().splitlines()[-1] if out.strip() else "unknown"


_VERSIONS: Dict[str, str] = {}


def tool_versions() -> Dict[str, str]:
    if not _VERSIONS:
        for t in ("nvcc", "ptxas", "cuobjdump"):
            _VERSIONS[t] = _version(find_tool(t))
        try:
            import triton
            _VERSIONS["triton"] = triton.__version__
            from triton.backends.nvidia.compiler import get_ptxas
            _VERSIONS["triton_ptxas"] = _version(get_ptxas(90).path)
        except Exception:  # noqa: BLE001 - triton absent or changed: reported, not fatal
            _VERSIONS["triton"] = "missing"
        try:
            import torch
            _VERSIONS["torch"] = torch.__version__
        except ImportError:
            _VERSIONS["torch"] = "missing"
    return dict(_VERSIONS)


def facts_from_cubin(cubin_path: str, ptxas_log: str) -> Dict[str, Dict]:
    """Per kernel symbol: resources (cuobjdump + ptxas -v) and the SASS analysis (loops, mixes)."""
    usage = sass.resource_usage(cubin_path)
    logs = sass.parse_ptxas_log(ptxas_log)
    funcs = sass.parse_sass(sass.disassemble(cubin_path))
    out = {}
    for name, instrs in funcs.items():
        u = usage.get(name, {})
        lg = logs.get(name, {})
        a = sass.analyse_function(instrs)
        out[name] = dict(symbol=name, regs=lg.get("regs", u.get("REG")), spill_stores=lg.get("spill_stores"),
                         spill_loads=lg.get("spill_loads"), stack=lg.get("stack", u.get("STACK")),
                         local=u.get("LOCAL"), static_smem=u.get("SHARED"), barriers=lg.get("barriers"),
                         sass=a, hot=sass.hot_loop(a))
    return out


def _reanalysed(key: str, hit: Optional[Dict], update) -> Optional[Dict]:
    """A cache entry analysed by this version of sass.py; an older one is re-analysed from its cached
    cubin and ptxas log (no recompile); None when it cannot be (then the caller compiles)."""
    if hit is None or hit.get("analysis") == sass.ANALYSIS_VERSION:
        return hit
    cub = cache_cubin_path(key)
    if "log" not in hit or not os.path.isfile(cub):
        return None
    hit = update(hit, facts_from_cubin(cub, hit["log"]))
    hit["analysis"] = sass.ANALYSIS_VERSION
    cache_put(key, hit)
    return hit


# ------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------
def _cuda_includes() -> List[str]:
    incs = []
    try:
        from torch.utils.cpp_extension import include_paths
        try:
            incs += include_paths("cuda")
        except TypeError:  # older signature include_paths(cuda: bool)
            incs += include_paths(True)
    except ImportError:
        pass
    be = load_build_env()
    if be is not None and hasattr(be, "nvidia_pip_includes"):
        incs += be.nvidia_pip_includes()
    return incs


def compile_cuda(arch: int, progress=None, extra_flags: Optional[List[str]] = None,
                 sources: Optional[List[str]] = None) -> Dict[str, Dict]:
    """Facts of every kernel in csrc/*.cu for ``sm_<arch>``: ``{symbol: facts}``.  Raises RuntimeError
    with the reason when csrc/ or the tools are missing."""
    why = cuda_unavailable_reason()
    if why:
        raise RuntimeError(why)
    be = load_build_env()
    d = csrc_dir()
    nvcc = find_tool("nvcc")
    flags = list(be.nvcc_flags()) + ["-std=c++17"] + list(extra_flags or [])
    headers = sorted(glob.glob(os.path.join(d, "*.h")) + glob.glob(os.path.join(d, "*.cuh")))
    srcs = sources or [p for p in be.source_paths() if p.endswith(".cu")]
    htext = b"".join(open(h, "rb").read() for h in headers)
    out: Dict[str, Dict] = {}
    for src in srcs:
        key = digest("cuda", open(src, "rb").read(), htext, flags, arch, tool_versions().get("nvcc"),
                     tool_versions().get("torch"))  # torch: the c10 headers the .cu files include
        hit = _reanalysed(key, cache_get(key), lambda h, fr: dict(h, kernels=fr))
        if progress:
            progress(f"cuda  sm_{arch}  {os.path.basename(src)}" + ("  (cached)" if hit else "  (nvcc)"))
        if hit is None:
            with tempfile.TemporaryDirectory() as tmp:
                cub = os.path.join(tmp, "k.cubin")
                cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", *flags, "-Xptxas", "-v", "-I", d,
                       *sum((["-I", i] for i in _cuda_includes()), []), src, "-o", cub]
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                if r.returncode != 0:
                    raise RuntimeError(f"nvcc failed for {os.path.basename(src)} sm_{arch}:\n{r.stderr[-4000:]}")
                facts = facts_from_cubin(cub, r.stderr)
                cubin = open(cub, "rb").read()
            hit = dict(source=os.path.basename(src), arch=arch, kernels=facts, log=r.stderr,
                       analysis=sass.ANALYSIS_VERSION)
            cache_put(key, hit, cubin)
        for name, f in hit["kernels"].items():
            f = dict(f, source=hit["source"], arch=arch, backend="cuda", dynamic_smem=None)
            f.update(describe_symbol(name))
            out[name] = f
    return out


# ------------------------------------------------------------------------------------------------
# Triton
# ------------------------------------------------------------------------------------------------
def compile_triton(spec: Dict, arch: int) -> Dict:
    """Facts of one Triton kernel specialisation (:func:`.kernels.triton_specs` builds ``spec``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lkconv.backends.triton import kernels as K

    from lkconv.backends.triton import batchrows as KB

    mod = K if hasattr(K, spec["kernel"]) else KB  # the batch-as-rows kernels live in their own module
    fn = getattr(mod, spec["kernel"])
    ksrc = open(K.__file__, "rb").read() + (open(KB.__file__, "rb").read() if mod is KB else b"")
    key = digest("triton", ksrc, spec, arch, tool_versions().get("triton"))
    def refresh(h, fr):
        keep = {k: h["facts"][k] for k in ("dynamic_smem", "num_warps", "num_stages", "ptx_vector_loads")}
        return dict(h, facts=dict(fr.get(h["facts"]["symbol"]) or next(iter(fr.values())), **keep))

    hit = _reanalysed(key, cache_get(key), refresh)
    if hit is not None:
        return dict(hit, cached=True)
    names = list(fn.arg_names)
    constexprs = {(names.index(k),): v for k, v in spec["constexprs"].items()}
    sig = {}
    for n in names:
        if n in spec["constexprs"]:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = "*" + (spec.get("ptr_dtypes", {}).get(n)
                            or (spec["ws_dtype"] if n == "ws_ptr" else spec["dtype"]))
        else:
            sig[n] = spec["int_types"].get(n, "i32")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec["divisible"]}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    import contextlib
    import io

    buf = io.StringIO()
    knobs = getattr(triton, "knobs", None)
    dump = getattr(getattr(knobs, "nvidia", None), "dump_ptxas_log", None)
    if dump is not None:  # triton prints the log of its own ptxas -v run: capture it (no second ptxas run)
        knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
    finally:
        if dump is not None:
            knobs.nvidia.dump_ptxas_log = dump
    cubin = k.asm["cubin"]
    log = buf.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        cpath = os.path.join(tmp, "k.cubin")
        with open(cpath, "wb") as f:
            f.write(cubin)
        if "spill stores" not in log:  # older triton: re-run its ptxas with -v on the generated PTX
            from triton.backends.nvidia.compiler import get_ptxas
            ppath = os.path.join(tmp, "k.ptx")
            with open(ppath, "w") as f:
                f.write(k.asm["ptx"])
            gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
            r = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                                f"--gpu-name={gpu_name}", ppath, "-o", os.path.join(tmp, "v.o")],
                               capture_output=True, text=True, timeout=600)
            log = r.stderr + r.stdout
        facts = facts_from_cubin(cpath, log)
    ptx = k.asm["ptx"]
    name = k.metadata.name if hasattr(k.metadata, "name") else next(iter(facts))
    f = facts.get(name) or next(iter(facts.values()))
    f = dict(f, dynamic_smem=int(k.metadata.shared), num_warps=spec["num_warps"], num_stages=spec["num_stages"],
             ptx_vector_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]", ptx)))
    hit = dict(spec=spec, arch=arch, facts=f, log=log, analysis=sass.ANALYSIS_VERSION)
    cache_put(key, hit, cubin)
    return dict(hit, cached=False)


if __name__ == "__main__":  # pragma: no cover - debugging aid
    print(compile_cuda(int(sys.argv[1]) if len(sys.argv) > 1 else 90, progress=print).keys())
