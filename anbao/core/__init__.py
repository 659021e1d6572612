"""The Cython core: the server's wire codec (codec), share splitting
(shares) and the per-packet state its owner decides grabs on (packets).

Each module has a .pxd that declares what the others cimport, and a .pyi
for editors and mypy. None of them imports anything of the server.
"""
