"""The partition socket protocol: how a partition in another process (an
external partition, or another VM's daemon) is reached.

One request per connection, so no state outlives a call.  A frame is a
little-endian u32 byte count followed by that many bytes of UTF-8 JSON, at
most :data:`MAX_FRAME`.  The requester sends one request frame and reads one
response frame, then closes:

- ``{"op": "direct", "sender": ID, "receiver": ID, "wide": bool, "args": [u64...]}``:
  a direct request (5 words, or 14 for REQ2) → ``{"status": 0, "regs": [u64...]}``
- ``{"op": "indirect", "sender": ID, "receiver": ID, "payload": "<hex>"}`` → ``{"status": 0}``
- ``{"op": "notify", "sender": ID, "receiver": ID, "bitmap": u64}`` → ``{"status": 0}``

A non-zero ``status`` is an FF-A error code (-1..-9) the guest gets back.
docs/handlers/ffa.md shows a complete external partition in a few lines.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .defs import Err

MAX_FRAME = 64 * 1024
OPS = ("direct", "indirect", "notify")
Request = dict[str, Any]


class PeerProtocolError(Exception):
    """The other side sent something that is not a frame of this protocol."""


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise PeerProtocolError(f"a {len(body)}-byte frame is over {MAX_FRAME}")
    return struct.pack("<I", len(body)) + body


async def _exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise PeerProtocolError("the connection closed inside a frame")
        buf += chunk
    return bytes(buf)


async def receive(stream: trio.abc.ReceiveStream) -> dict[str, Any]:
    (n,) = struct.unpack("<I", await _exactly(stream, 4))
    if n > MAX_FRAME:
        raise PeerProtocolError(f"a {n}-byte frame is over {MAX_FRAME}")
    try:
        message = json.loads(await _exactly(stream, n))
    except ValueError as err:
        raise PeerProtocolError(f"not JSON: {err}") from err
    if not isinstance(message, dict):
        raise PeerProtocolError("a frame must hold a JSON object")
    return message


def _u(value: Any, bits: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << bits


def check_request(req: dict[str, Any]) -> Request:
    """Validate a request's fields (a served partition trusts nothing it is sent)."""
    op = req.get("op")
    if op not in OPS or not _u(req.get("sender"), 16) or not _u(req.get("receiver"), 16):
        raise PeerProtocolError(f"bad request header {str(req)[:200]}")
    if op == "direct":
        args = req.get("args")
        if not isinstance(req.get("wide"), bool) or not isinstance(args, list) or len(args) not in (5, 14) \
                or not all(_u(a, 64) for a in args):
            raise PeerProtocolError("a direct request carries 5 or 14 u64 words")
    elif op == "indirect":
        payload = req.get("payload")
        if not isinstance(payload, str):
            raise PeerProtocolError("an indirect message carries a hex payload")
        try:
            bytes.fromhex(payload)
        except ValueError as err:
            raise PeerProtocolError("an indirect message carries a hex payload") from err
    elif not _u(req.get("bitmap"), 64):
        raise PeerProtocolError("a notification carries a u64 bitmap")
    return req


def status_of(resp: dict[str, Any]) -> Err | int:
    status = resp.get("status")
    if status == 0:
        return 0
    if isinstance(status, int) and status in {e.value for e in Err}:
        return Err(status)
    raise PeerProtocolError(f"bad status {status!r}")


async def exchange(path: str, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request and its response within ``timeout`` seconds; raises OSError,
    PeerProtocolError or trio.TooSlowError."""
    with trio.fail_after(timeout):
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(encode(request))
            return await receive(stream)


Serve = Callable[[Request], Awaitable[dict[str, Any]]]


async def serve_connection(stream: trio.SocketStream, answer: Serve, timeout: float) -> None:
    """Read one request, answer it, close; a malformed request is answered
    INVALID_PARAMETERS and a slow peer is dropped after ``timeout``."""
    async with stream:
        with trio.move_on_after(timeout):
            try:
                req = check_request(await receive(stream))
            except PeerProtocolError as err:
                await stream.send_all(encode({"status": int(Err.INVALID_PARAMETERS), "reason": str(err)}))
                return
            except trio.BrokenResourceError:
                return
            resp = await answer(req)
            try:
                await stream.send_all(encode(resp))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
