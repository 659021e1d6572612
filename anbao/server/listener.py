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
