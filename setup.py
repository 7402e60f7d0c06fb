"""lkconv build script.

Pure-Python install by default; the CUDA extension ``lkconv._C`` (csrc/) is added when a CUDA
toolkit and a CUDA build of torch are importable at build time.

* ``LKCONV_BUILD_CUDA`` unset: build the extension if possible, else install pure Python and say why.
  Note: a plain ``pip install -e .`` uses build isolation, where torch is not importable, so it always
  installs pure Python.  Build the extension with ``pip install --no-build-isolation -e .`` or
  ``python setup.py build_ext --inplace`` (what .ci/build_cuda.sh does).
* ``LKCONV_BUILD_CUDA=0``: never build it.   ``LKCONV_BUILD_CUDA=1``: build it or fail loudly.
* ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0+PTX") and ``MAX_JOBS`` are honoured.
* ``CUDA_HOME`` is found from ``nvcc --dryrun`` when unset (nvcc may be a wrapper script), and the pip
  ``nvidia/cu*/include`` folder is added for the CUDA library headers torch includes.
"""
import importlib.util
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"lkconv setup: {msg}", file=sys.stderr, flush=True)


def _build_env():
    spec = importlib.util.spec_from_file_location("lkconv_build_env", os.path.join(HERE, "csrc", "build_env.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cuda_extension():
    """(ext_modules, cmdclass) for the CUDA build, or raise RuntimeError(why not)."""
    try:
        import torch
    except ImportError as e:
        raise RuntimeError(f"torch is not importable at build time ({e}); with pip use --no-build-isolation")
    if not torch.version.cuda:
        raise RuntimeError(f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)")
    env = _build_env()
    cuda_home = env.find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("no CUDA toolkit found (nvcc not on PATH and CUDA_HOME unset)")
    # set before torch.utils.cpp_extension is imported: it resolves (and logs) CUDA_HOME at import,
    # which would otherwise print its own guess next to ours
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", env.DEFAULT_ARCH_LIST)
    _log(f"building lkconv._C with CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, "
         f"MAX_JOBS={os.environ.get('MAX_JOBS', '(torch default)')}")
    sources = [os.path.relpath(p, HERE) for p in env.source_paths()]
    ext = cpp_extension.CUDAExtension(
        name="lkconv._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")] + env.nvidia_pip_includes(),
        define_macros=[("LKCONV_PYTHON_MODULE", "1")],
        extra_compile_args={"cxx": env.cxx_flags(), "nvcc": env.nvcc_flags()},
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


def _extensions():
    mode = os.environ.get("LKCONV_BUILD_CUDA", "").strip().lower()
    if mode in ("0", "false", "no", "off"):
        _log("LKCONV_BUILD_CUDA=0: installing pure Python (no CUDA extension)")
        return [], {}
    if mode not in ("", "1", "true", "yes", "on", "auto"):
        raise SystemExit(f"lkconv setup: LKCONV_BUILD_CUDA must be 0 or 1, got {mode!r}")
    try:
        return _cuda_extension()
    except RuntimeError as e:
        if mode in ("1", "true", "yes", "on"):
            raise SystemExit(f"lkconv setup: LKCONV_BUILD_CUDA=1 but the CUDA extension cannot be built: {e}")
        _log(f"installing pure Python without the CUDA extension: {e}")
        return [], {}


ext_modules, cmdclass = _extensions()
if ext_modules:
    _log("the CUDA extension lkconv._C is part of this build; `python -m lkconv info` reports it afterwards")
setup(ext_modules=ext_modules, cmdclass=cmdclass, license="MIT")  # see pyproject.toml: dynamic
