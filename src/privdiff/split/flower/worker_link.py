"""The ClientApp's side of the resident worker link: frames on a Unix socket, stdlib only, so that
the ClientApp shim that forwards messages to the worker starts without torch.

Framing: 8-byte little-endian length, then the bytes; a request is two frames (the run's split
config as JSON, then the server message), a reply one frame (b"OK" + message or b"ER" + one-line
error).
"""

from __future__ import annotations

import socket
import struct

_MAX_FRAME = 256 << 20


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack("<Q", len(payload)) + payload)


def read_frame(sock: socket.socket) -> bytes:
    head = _read_exactly(sock, 8)
    (size,) = struct.unpack("<Q", head)
    if size > _MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is too large")
    return _read_exactly(sock, size)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError("worker connection closed")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def call_worker(path: str, split_config_json: str, request: bytes, timeout: float = 600.0) -> bytes:
    """Sends one server message to the worker at `path`; returns its reply bytes.

    Raises:
        RuntimeError: the worker answered with an error.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        send_frame(sock, split_config_json.encode())
        send_frame(sock, request)
        answer = read_frame(sock)
    if answer[:2] != b"OK":
        raise RuntimeError(answer[2:].decode(errors="replace"))
    return answer[2:]


__all__ = ["call_worker", "read_frame", "send_frame"]
