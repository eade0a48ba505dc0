"""The stored-turn byte layouts, in one place (pure; no I/O).

What a get returns for each turn is the msgpack map `encode_turn` makes: map header,
"role", role, "content", content, "ts", float64, "seq", uint. The memory store (and SQLite,
which persists through it) keeps each turn as the msgpack array `pack_turn` makes, [role,
content, ts, seq], a common role as a one-byte index: the same values without the four
keys, 20 bytes less per turn (24 for "user"), expanded into maps when they are read
(`expand_turns`, by slicing, never decoding); SQLite files written before turns were packed
hold the maps, which `repack_turn` packs on loading. The store keeps packed turns back to
back and reads sizes and boundaries off the encoding (`turn_size`, `turn_end`). Redis keeps
each turn as one list entry: a uint32 size (role + content bytes plus the turn overhead, for
the budget), then the map a get returns with its seq as a uint32, since the script appends
it once it knows it. worker/backends/redis.lua keeps its own copy of that entry layout;
tests/test_turns.py checks that the two agree byte for byte.
"""

from __future__ import annotations

from typing import Final

import msgpack

_packb = msgpack.packb
_HEAD_KEYS: Final = (_packb("role"), _packb("content"), _packb("ts"), _packb("seq"))
_UINT_WIDTH: Final = {0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9}
_MAP_ROLE: Final = b"\x84" + _HEAD_KEYS[0]
_CONTENT, _TS, _SEQ = _HEAD_KEYS[1:]
# Roles a packed turn names by their index (a one-byte msgpack int) instead of their string.
ROLE_CODES: Final = ("user", "assistant", "system", "tool")
_ROLE_INDEX: Final = {role: i for i, role in enumerate(ROLE_CODES)}
# What a get's map holds before the content, for each of ROLE_CODES.
_HEADS: Final = tuple(_MAP_ROLE + _packb(role) + _CONTENT for role in ROLE_CODES)
_ROLE_BYTES: Final = tuple(len(role.encode()) for role in ROLE_CODES)
# Bytes before the turn in a Redis list entry (its size, a uint32).
REDIS_SIZE_BYTES: Final = 4


def encode_turn(role: str, content: str, ts: float, seq: int) -> bytes:
    """A turn as a get returns it: the msgpack map of its four fields."""
    return _packb({"role": role, "content": content, "ts": float(ts), "seq": seq})


def pack_turn(role: str, content: str, ts: float, seq: int) -> bytes:
    """A turn as the memory store keeps it: the msgpack array [role, content, ts, seq], with
    a role of ROLE_CODES as its index."""
    return _packb((_ROLE_INDEX.get(role, role), content, float(ts), seq))


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


def _content_at(turns: bytes, at: int) -> tuple[int, int]:
    """(role bytes, where the content starts) of the packed turn that starts at `at`."""
    code = turns[at + 1]
    if code < 0x80:
        return _ROLE_BYTES[code], at + 2
    role, head = _str_at(turns, at + 1)
    return role, at + 1 + head + role


def turn_size(turn: bytes) -> int:
    """Role plus content bytes of a turn made by `pack_turn`, read off its headers (the
    budget needs it each time a turn is dropped; decoding would cost three times as much).
    Layout: array header, role (str or index), content, float64, uint."""
    role, at = _content_at(turn, 0)
    content, _ = _str_at(turn, at)
    return role + content


def turn_end(turns: bytes, at: int) -> int:
    """Where the turn made by `pack_turn` that starts at `at` ends: the store keeps turns
    back to back and finds their boundaries this way instead of keeping their lengths."""
    _, at = _content_at(turns, at)
    content, head = _str_at(turns, at)
    at += head + content + 9
    first = turns[at]
    return at + (1 if first < 0x80 else _UINT_WIDTH[first])


def expand_turns(turns: bytes) -> bytes:
    """Packed turns back to back, as the maps a get returns back to back: the four keys put
    back between slices of the packed values (no decoding, no re-encoding of the content)."""
    out: list[bytes] = []
    add = out.extend
    at, end = 0, len(turns)
    while at < end:
        code = turns[at + 1]
        if code < 0x80:  # a role of ROLE_CODES
            content_at = at + 2
            head = _HEADS[code]
        else:
            role, width = _str_at(turns, at + 1)
            content_at = at + 1 + width + role
            head = _MAP_ROLE + turns[at + 1 : content_at] + _CONTENT
        if turns[content_at] == 0xD9:  # str8: the common size of a turn's content
            ts_at = content_at + 2 + turns[content_at + 1]
        else:
            content, width = _str_at(turns, content_at)
            ts_at = content_at + width + content
        seq_at = ts_at + 9
        first = turns[seq_at]
        at = seq_at + 1 if first < 0x80 else seq_at + _UINT_WIDTH[first]
        add((head, turns[content_at:ts_at], _TS, turns[ts_at:seq_at], _SEQ, turns[seq_at:at]))
    return b"".join(out)


def repack_turn(turn: bytes) -> bytes:
    """A turn as SQLite persisted it, packed as the store keeps it: files written before turns
    were packed hold the maps `encode_turn` makes; later ones hold the packed turn itself."""
    if turn[0] != _MAP_ROLE[0]:
        return turn
    fields = msgpack.unpackb(turn)
    return pack_turn(fields["role"], fields["content"], fields["ts"], fields["seq"])


def turn_head(role: str, content: str, ts: float) -> bytes:
    """A turn encoded up to its seq, which the Redis script appends as a uint32."""
    r, co, t, s = _HEAD_KEYS
    return b"".join((b"\x84", r, _packb(role), co, _packb(content), t, _packb(ts), s, b"\xce"))


def redis_entry(size: int, head: bytes, seq: int) -> bytes:
    """The Redis list entry of a turn: what redis.lua builds from `turn_head` and its seq."""
    return size.to_bytes(REDIS_SIZE_BYTES, "big") + head + seq.to_bytes(4, "big")
