"""The stored-turn byte layout, in one place (pure; no I/O).

A turn is stored as the msgpack map a get returns, encoded once when stored so that a get
only concatenates: map header, "role", role, "content", content, "ts", float64, "seq", uint.
The memory store (and SQLite) keep turns back to back and read sizes and boundaries off the
encoding. Redis keeps each turn as one list entry: a uint32 size (role + content bytes plus
the turn overhead, for the budget), then the turn with its seq as a uint32, since the script
appends it once it knows it. worker/backends/redis.lua keeps its own copy of that entry
layout; tests/test_turns.py checks that the two agree byte for byte.
"""

from __future__ import annotations

from typing import Final

import msgpack

_packb = msgpack.packb
_HEAD_KEYS: Final = (_packb("role"), _packb("content"), _packb("ts"), _packb("seq"))
_UINT_WIDTH: Final = {0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9}
# Bytes before the turn in a Redis list entry (its size, a uint32).
REDIS_SIZE_BYTES: Final = 4


def encode_turn(role: str, content: str, ts: float, seq: int) -> bytes:
    """A stored turn, encoded once when stored so that a get only concatenates."""
    return _packb({"role": role, "content": content, "ts": float(ts), "seq": seq})


def content_size(role: str, content: str) -> int:
    """What a turn counts toward the byte budget before its overhead: role plus content."""
    return len(role.encode()) + len(content.encode())


def _str_at(data: bytes, at: int) -> tuple[int, int]:
    """(length, header size) of the msgpack str that starts at `at`."""
    head = data[at]
    if 0xA0 <= head <= 0xBF:
        return head & 0x1F, 1
    width = {0xD9: 1, 0xDA: 2, 0xDB: 4}[head]
    return int.from_bytes(data[at + 1 : at + 1 + width], "big"), 1 + width


def turn_size(turn: bytes) -> int:
    """Role plus content bytes of a turn made by `encode_turn`, read off its str headers
    (the budget needs it each time a turn is dropped; decoding would cost three times as
    much). Layout: map header, "role" (5 bytes), role, "content" (8 bytes), content, ..."""
    role, head = _str_at(turn, 6)
    content, _ = _str_at(turn, 6 + head + role + 8)
    return role + content


def turn_end(turns: bytes, at: int) -> int:
    """Where the turn made by `encode_turn` that starts at `at` ends: the store keeps turns
    back to back and finds their boundaries this way instead of keeping their lengths.
    Layout: map header, "role", role, "content", content, "ts" (3), float64 (9), "seq" (4),
    uint."""
    role, head = _str_at(turns, at + 6)
    at += 6 + head + role + 8
    content, head = _str_at(turns, at)
    at += head + content + 16
    first = turns[at]
    return at + (1 if first < 0x80 else _UINT_WIDTH[first])


def turn_head(role: str, content: str, ts: float) -> bytes:
    """A turn encoded up to its seq, which the Redis script appends as a uint32."""
    r, co, t, s = _HEAD_KEYS
    return b"".join((b"\x84", r, _packb(role), co, _packb(content), t, _packb(ts), s, b"\xce"))


def redis_entry(size: int, head: bytes, seq: int) -> bytes:
    """The Redis list entry of a turn: what redis.lua builds from `turn_head` and its seq."""
    return size.to_bytes(REDIS_SIZE_BYTES, "big") + head + seq.to_bytes(4, "big")
