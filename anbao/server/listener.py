"""The public listening sockets: one per worker, in one SO_REUSEPORT group,
steered by a classic BPF program on the client's source port.

The supervisor creates all of them, in worker order, before any worker
starts, and keeps every one open for its whole life. The kernel numbers a
reuseport group's sockets in the order they join it and renumbers when one
closes; because a dead worker's socket stays open in the supervisor (and is
inherited by its replacement), socket i is always worker i's, across any
number of worker restarts.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct

SO_ATTACH_REUSEPORT_CBPF = 51
SKF_NET_OFF = -0x100000
# Classic BPF opcodes.
BPF_LD_H_ABS = 0x28  # A = half-word at k
BPF_ALU_RSH_K = 0x74  # A >>= k
BPF_ALU_MOD_K = 0x94  # A %= k
BPF_RET_A = 0x16  # return A
IPV4_HEADER_BYTES = 20  # connections come from loopback/LAN SYNs without IP options


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


def steering_program(worker_count: int) -> list[tuple[int, int, int, int]]:
    """socket index = (TCP source port >> 1) % worker_count.

    The program reads the port through the network-header offset: the TCP
    header starts right after a 20-byte IPv4 header, and its first half-word
    is the source port. The shift is there because Linux gives connect()'s
    ephemeral ports one parity (even first): with a plain modulo, every
    client that lets the kernel choose its port would land on the same
    worker. The SDK chooses its ports to match (anbao_client.routing)."""
    return [
        (BPF_LD_H_ABS, 0, 0, (SKF_NET_OFF + IPV4_HEADER_BYTES) & 0xFFFFFFFF),
        (BPF_ALU_RSH_K, 0, 0, 1),
        (BPF_ALU_MOD_K, 0, 0, worker_count),
        (BPF_RET_A, 0, 0, 0),
    ]


def steered_worker(source_port: int, worker_count: int) -> int:
    """What steering_program computes, for tests and documentation."""
    return (source_port >> 1) % worker_count


def attach_steering(sock: socket.socket, worker_count: int) -> None:
    prog = steering_program(worker_count)
    filters = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
    fprog = struct.pack("HL", len(prog), ctypes.addressof(filters))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


class PortTaken(RuntimeError):
    """Another process listens on the port a server was asked to serve."""


def refuse_if_served(host: str, port: int) -> None:
    """Raises PortTaken, naming the process, when something already listens
    on (host, port). SO_REUSEPORT lets every socket of one user join a
    port's group: a second `anbao serve` would bind beside the first without
    an error, print that it serves, and never get a connection the first's
    steering program does not hand it. A socket without SO_REUSEPORT cannot
    bind there, so this probe fails exactly when someone listens."""
    if port == 0:
        return  # a fresh port of the kernel's choosing
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
        probe.bind((host, port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise PortTaken(f"{host}:{port} is already served by {_listener_of(port)}") from None
    finally:
        probe.close()


def _listener_of(port: int) -> str:
    """Who listens on port, as far as this user may see: 'pid N (command line)'."""
    import psutil

    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return f"pid {c.pid} ({' '.join(psutil.Process(c.pid).cmdline())})"
    except psutil.Error:
        pass
    return "another process"


def open_listeners(host: str, port: int, worker_count: int, backlog: int = 4096) -> list[socket.socket]:
    """worker_count sockets on one (host, port), joined to the group in order."""
    assert worker_count >= 1
    socks = []
    for _ in range(worker_count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        port = s.getsockname()[1]  # port 0 picks one; the rest join it
        s.listen(backlog)
        s.setblocking(False)
        socks.append(s)
    if worker_count > 1:
        attach_steering(socks[0], worker_count)
    return socks
