"""anbao: a red-packet service. A uvloop TCP server over a Cython hot path."""

__version__ = "0.1.0"
