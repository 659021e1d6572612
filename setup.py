"""Builds the Cython core (anbao/core/*.pyx); everything else is in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

CORE = ("codec", "shares", "packets")

setup(
    ext_modules=cythonize(
        [Extension(f"anbao.core.{name}", [f"anbao/core/{name}.pyx"], extra_compile_args=["-O2"]) for name in CORE],
        compiler_directives={"language_level": "3"},
    ),
)
