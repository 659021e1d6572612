"""Builds the Cython extensions; everything else is in pyproject.toml.

anbao/_fastpath.pyx is the grab's hot core (share splitting, the per-packet
state and its batches); anbao/core/codec.pyx the server's wire codec, which
_fastpath cimports."""

from Cython.Build import cythonize
from setuptools import Extension, setup

EXTENSIONS = {"anbao.core.codec": "anbao/core/codec.pyx", "anbao._fastpath": "anbao/_fastpath.pyx"}

setup(
    ext_modules=cythonize(
        [Extension(name, [source], extra_compile_args=["-O2"]) for name, source in EXTENSIONS.items()],
        compiler_directives={"language_level": "3"},
    ),
)
