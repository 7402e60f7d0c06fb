"""lkconv build script.

Pure-Python install by default; two optional extensions when torch is importable at build time:
the CUDA extension ``lkconv._C`` (csrc/, needs a CUDA toolkit and a CUDA build of torch) and the CPU
module ``lkconv._cpu_fast`` (csrc/cpu_fastpath.cpp: the remembered delegated CPU call in C++, any torch
build, a C++ compiler; ~30 s).  Without them lkconv runs the same, in Python.

* ``LKCONV_BUILD_CUDA`` unset: build the extension if possible, else install pure Python and say why.
  Note: a plain ``pip install -e .`` uses build isolation, where torch is not importable, so it always
  installs pure Python.  Build the extension with ``pip install --no-build-isolation -e .`` or
  ``python setup.py build_ext --inplace`` (what .ci/build_cuda.sh does).
* ``LKCONV_BUILD_CUDA=0``: never build it.   ``LKCONV_BUILD_CUDA=1``: build it or fail loudly.
* ``LKCONV_BUILD_CPU`` unset: build ``lkconv._cpu_fast`` if torch is importable; ``0``: never; ``1``: or fail.
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


def _mode(var):
    mode = os.environ.get(var, "").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return "off"
    if mode in ("1", "true", "yes", "on"):
        return "on"
    if mode in ("", "auto"):
        return "auto"
    raise SystemExit(f"lkconv setup: {var} must be 0 or 1, got {mode!r}")


def _cpu_extension():
    """The CPU module lkconv._cpu_fast, or raise RuntimeError(why not)."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"torch is not importable at build time ({e}); with pip use --no-build-isolation")
    from torch.utils import cpp_extension

    return cpp_extension.CppExtension(name="lkconv._cpu_fast", sources=["csrc/cpu_fastpath.cpp"],
                                      extra_compile_args={"cxx": _build_env().cxx_flags()})


def _extensions():
    exts, cmdclass = [], {}
    cuda = _mode("LKCONV_BUILD_CUDA")
    if cuda == "off":
        _log("LKCONV_BUILD_CUDA=0: no CUDA extension")
    else:
        try:
            exts, cmdclass = _cuda_extension()
        except RuntimeError as e:
            if cuda == "on":
                raise SystemExit(f"lkconv setup: LKCONV_BUILD_CUDA=1 but the CUDA extension cannot be built: {e}")
            _log(f"no CUDA extension: {e}")
    cpu = _mode("LKCONV_BUILD_CPU")
    if cpu != "off":  # after the CUDA one: that one sets CUDA_HOME before torch.utils.cpp_extension is imported
        try:
            exts.append(_cpu_extension())
            from torch.utils import cpp_extension

            cmdclass = cmdclass or {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
        except RuntimeError as e:
            if cpu == "on":
                raise SystemExit(f"lkconv setup: LKCONV_BUILD_CPU=1 but lkconv._cpu_fast cannot be built: {e}")
            _log(f"no lkconv._cpu_fast (delegated CPU calls are remembered in Python): {e}")
    if not exts:
        _log("installing pure Python")
    return exts, cmdclass


ext_modules, cmdclass = _extensions()
if ext_modules:
    _log(f"building {', '.join(e.name for e in ext_modules)}; `python -m lkconv info` reports them afterwards")
setup(ext_modules=ext_modules, cmdclass=cmdclass, license="MIT")  # see pyproject.toml: dynamic
