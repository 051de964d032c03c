"""The journal's file format: a magic header, then records, each
``u32 length | u32 crc32(payload) | payload`` (little-endian; the payload is
compact JSON).  Pure functions over bytes, so a torn or damaged tail can be
tested at every offset without a file.

A crash mid-append leaves a record cut short; a bad disk or a stray write a
record whose checksum fails.  Either way the reader keeps every record before
it and stops there: what follows a damaged record cannot be trusted to follow
from the state before it.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Final

MAGIC: Final = b"HVCJRNL1"
_HEAD = struct.Struct("<II")
#: A record longer than this is damage, never a write of ours (a memshare delta
#: is a few dozen bytes; a full handler snapshot stays far below it).
MAX_RECORD: Final = 1 << 30


def frame(record: dict[str, Any]) -> bytes:
    payload = json.dumps(record, separators=(",", ":")).encode()
    return _HEAD.pack(len(payload), zlib.crc32(payload)) + payload


@dataclass(frozen=True, slots=True)
class Scan:
    """What a journal file holds: its good records, where they end, and why the
    scan stopped early (None when the file ends exactly after a record)."""

    records: list[dict[str, Any]]
    end: int
    problem: str | None


def scan(data: bytes) -> Scan:
    if not data.startswith(MAGIC):
        if MAGIC.startswith(data):
            return Scan([], 0, "the header is cut short" if data else None)
        return Scan([], 0, "not a journal (bad header)")
    records: list[dict[str, Any]] = []
    pos = len(MAGIC)
    while pos < len(data):
        if len(data) - pos < _HEAD.size:
            return Scan(records, pos, f"a record header at byte {pos} is cut short")
        length, crc = _HEAD.unpack_from(data, pos)
        start = pos + _HEAD.size
        if length > MAX_RECORD:
            return Scan(records, pos, f"the record at byte {pos} claims {length} bytes")
        payload = data[start:start + length]
        if len(payload) < length:
            return Scan(records, pos, f"the record at byte {pos} is cut short ({len(payload)} of {length} bytes)")
        if zlib.crc32(payload) != crc:
            return Scan(records, pos, f"the record at byte {pos} fails its checksum")
        try:
            record = json.loads(payload)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            return Scan(records, pos, f"the record at byte {pos} is not a JSON object")
        records.append(record)
        pos = start + length
    return Scan(records, pos, None)


__all__ = ["MAGIC", "MAX_RECORD", "Scan", "frame", "scan"]
