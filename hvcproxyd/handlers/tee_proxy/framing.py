"""The socket backend's framing: each frame is a 4-byte big-endian length and
that many bytes of UTF-8 JSON (one object).  Sans-IO, shared by the mediator's
client and the reference TEE, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import struct
from typing import Any

#: A frame carries at most a few buffers of 129 pages (base64: 4/3 of that).
MAX_FRAME = 8 << 20
_LEN = struct.Struct(">I")


class FrameError(Exception):
    """The peer broke the framing; the connection cannot be trusted any more."""


def encode(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise FrameError(f"a {len(body)}-byte frame is over the {MAX_FRAME}-byte limit")
    return _LEN.pack(len(body)) + body


class Decoder:
    """Feed bytes with ``feed``; ``frames()`` yields every complete object."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while len(self._buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self._buf)
            if n > MAX_FRAME:
                raise FrameError(f"peer announced a {n}-byte frame (limit {MAX_FRAME})")
            if len(self._buf) < _LEN.size + n:
                break
            body = bytes(self._buf[_LEN.size:_LEN.size + n])
            del self._buf[:_LEN.size + n]
            try:
                obj = json.loads(body)
            except (ValueError, RecursionError) as err:  # RecursionError: a frame nested thousands deep
                raise FrameError(f"frame is not JSON: {err}") from None
            if not isinstance(obj, dict):
                raise FrameError("frame is not a JSON object")
            out.append(obj)
        return out


__all__ = ["MAX_FRAME", "Decoder", "FrameError", "encode"]
