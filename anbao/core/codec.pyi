from typing import Any

C_CONSTANTS: dict[str, int]
C_OPS: dict[str, int]
C_STATUSES: dict[str, int]

class FramingError(Exception):
    status: int
    frames: list[tuple[int, int, tuple[Any, ...] | BadRequest]]
    def __init__(self, status: int, message: str, frames: list[Any] | None = ...) -> None: ...

class BadRequest(Exception):
    status: int
    def __init__(self, status: int, message: str) -> None: ...

class Framer:
    max_frame_bytes: int
    broken: bool
    def __init__(self, max_frame_bytes: int = ...) -> None: ...

class FrameDecoder(Framer):
    def feed(self, data: bytes) -> list[tuple[int, int, tuple[Any, ...] | BadRequest]]: ...

class ResponseSplitter(Framer):
    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]: ...

def encode_error(opcode: int, rid: int, status: int, worker: int, message: str) -> bytes: ...
def encode_grab(rid: int, status: int, worker: int, amount_cents: int, seq: int, remaining_count: int) -> bytes: ...
def encode_ok(opcode: int, rid: int, worker: int, layout: str, values: tuple[Any, ...]) -> bytes: ...
def encode_list(
    opcode: int,
    rid: int,
    worker: int,
    head_layout: str,
    head: tuple[Any, ...],
    row_layout: str,
    rows: list[tuple[Any, ...]],
) -> bytes: ...
def encode_raw(opcode: int, rid: int, status: int, worker: int, body: bytes) -> bytes: ...
def encode_grab_request(rid: int, packet_id: int, user_id: int) -> bytes: ...
def with_request_id(frame: bytes, rid: int) -> bytes: ...
