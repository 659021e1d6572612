"""The server's Cython wire codec (codec). The grab's own core (share
splitting and the per-packet state its owner decides grabs on) is
anbao/_fastpath.pyx, which cimports the codec.

Each module has a .pxd that declares what the others cimport, and a .pyi
for editors and mypy. None of them imports anything of the server.
"""
