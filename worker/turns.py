"""The stored-turn byte layouts, in one place (pure; no I/O).

What a get returns for each turn is the msgpack map `encode_turn` makes: map header,
"role", role, "content", content, "ts", float64, "seq", uint, "tokens", uint. The memory
store (and SQLite, which persists through it) keeps each turn as the msgpack array
`pack_turn` makes, [role, content, ts, seq, tokens], a common role as a one-byte index: the
same values without the five keys, 27 bytes less per turn (31 for "user"), expanded into
maps when they are read (`expand_turns`, by slicing, never decoding); SQLite files written
before turns were packed hold the maps, and before turns had tokens the four-field arrays,
which `repack_turn` packs on loading. The store keeps packed turns back to back and reads
sizes, boundaries, seqs and tokens off the encoding (`turn_size`, `turn_end`,
`turn_marks`). Redis keeps each turn as one list entry: a uint32 size (role + content bytes
plus the turn overhead, for the budget), then the map a get returns with its tokens and seq
as uint32s, tokens before seq, since the script appends the seq once it knows it: both sit at
fixed offsets from the entry's end. worker/backends/redis.lua keeps its own copy of that
entry layout; tests/test_turns.py checks that the two agree byte for byte.
"""

from __future__ import annotations

from typing import Final

import msgpack

_packb = msgpack.packb
_HEAD_KEYS: Final = (
    _packb("role"),
    _packb("content"),
    _packb("ts"),
    _packb("seq"),
    _packb("tokens"),
)
_UINT_WIDTH: Final = {0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9}
_MAP_ROLE: Final = b"\x85" + _HEAD_KEYS[0]
_CONTENT, _TS, _SEQ, _TOKENS = _HEAD_KEYS[1:]
_PACKED: Final = 0x95  # the array header of a packed turn; 0x94 before turns had tokens
TURN_PARTS: Final = 8  # slices per turn in what expand_parts returns
# The largest token count a turn or summary may carry (the contract's limit).
MAX_TOKENS: Final = 1_000_000
# Roles a packed turn names by their index (a one-byte msgpack int) instead of their string.
ROLE_CODES: Final = ("user", "assistant", "system", "tool")
_ROLE_INDEX: Final = {role: i for i, role in enumerate(ROLE_CODES)}
# What a get's map holds before the content, for each of ROLE_CODES.
_HEADS: Final = tuple(_MAP_ROLE + _packb(role) + _CONTENT for role in ROLE_CODES)
_ROLE_BYTES: Final = tuple(len(role.encode()) for role in ROLE_CODES)
# Bytes before the turn in a Redis list entry (its size, a uint32).
REDIS_SIZE_BYTES: Final = 4
# Where a Redis entry's tokens (uint32) start, counted from its end: tokens, "seq", 0xCE, seq.
REDIS_TOKENS_FROM_END: Final = 4 + len(_SEQ) + 1 + 4


def tokens_of(content_bytes: int) -> int:
    """The contract's estimate when a device does not say: ceil(UTF-8 bytes / 4)."""
    return (content_bytes + 3) // 4


def estimate_tokens(content: str) -> int:
    """`tokens_of` the content's UTF-8 bytes."""
    return tokens_of(len(content.encode("utf-8", "surrogatepass")))


def encode_turn(role: str, content: str, ts: float, seq: int, tokens: int) -> bytes:
    """A turn as a get returns it: the msgpack map of its five fields."""
    return _packb({"role": role, "content": content, "ts": float(ts), "seq": seq, "tokens": tokens})


def pack_turn(role: str, content: str, ts: float, seq: int, tokens: int) -> bytes:
    """A turn as the memory store keeps it: the msgpack array [role, content, ts, seq,
    tokens], with a role of ROLE_CODES as its index."""
    return _packb((_ROLE_INDEX.get(role, role), content, float(ts), seq, tokens))


def summary_size(text: str, turn_cost: int) -> int:
    """What a summary counts toward the byte budget: its text plus a turn's overhead."""
    return len(text.encode()) + turn_cost


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


def _uint_at(data: bytes, at: int) -> tuple[int, int]:
    """(value, where it ends) of the msgpack uint that starts at `at`."""
    first = data[at]
    if first < 0x80:
        return first, at + 1
    width = _UINT_WIDTH[first]
    return int.from_bytes(data[at + 1 : at + width], "big"), at + width


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
    Layout: array header, role (str or index), content, float64, uint, uint."""
    role, at = _content_at(turn, 0)
    content, _ = _str_at(turn, at)
    return role + content


def _seq_at(turns: bytes, at: int) -> int:
    """Where the seq of the packed turn that starts at `at` starts."""
    _, at = _content_at(turns, at)
    content, head = _str_at(turns, at)
    return at + head + content + 9


def turn_end(turns: bytes, at: int) -> int:
    """Where the turn made by `pack_turn` that starts at `at` ends: the store keeps turns
    back to back and finds their boundaries this way instead of keeping their lengths."""
    _, at = _uint_at(turns, _seq_at(turns, at))
    return _uint_at(turns, at)[1]


def turn_span(turns: bytes, at: int) -> tuple[int, int]:
    """(where it ends, its tokens) of the packed turn that starts at `at`, in one walk."""
    _, at = _uint_at(turns, _seq_at(turns, at))
    tokens, end = _uint_at(turns, at)
    return end, tokens


def turn_marks(turns: bytes) -> list[tuple[int, int, int]]:
    """(start, seq, tokens) of each of packed turns back to back, oldest first."""
    out, at, end = [], 0, len(turns)
    while at < end:
        seq, after = _uint_at(turns, _seq_at(turns, at))
        tokens, nxt = _uint_at(turns, after)
        out.append((at, seq, tokens))
        at = nxt
    return out


def expand_turns(turns: bytes, each: list[int] | None = None) -> tuple[bytes, int]:
    """Packed turns back to back, as the maps a get returns back to back, and their tokens in
    all: the five keys put back between slices of the packed values (no decoding, no
    re-encoding of the content). With `each`, each turn's tokens are appended to it."""
    out, parts = expand_parts(turns, each)
    return b"".join(out), parts


def expand_parts(turns: bytes, each: list[int] | None = None) -> tuple[list[bytes], int]:
    """What `expand_turns` joins: TURN_PARTS slices per turn, in order, and the tokens."""
    out: list[bytes] = []
    add = out.extend
    total = 0
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
        tokens_at = seq_at + 1 if first < 0x80 else seq_at + _UINT_WIDTH[first]
        first = turns[tokens_at]
        if first < 0x80:
            at, tokens = tokens_at + 1, first
        else:
            at = tokens_at + _UINT_WIDTH[first]
            tokens = int.from_bytes(turns[tokens_at + 1 : at], "big")
        total += tokens
        if each is not None:
            each.append(tokens)
        add(
            (
                head,
                turns[content_at:ts_at],
                _TS,
                turns[ts_at:seq_at],
                _SEQ,
                turns[seq_at:tokens_at],
                _TOKENS,
                turns[tokens_at:at],
            )
        )
    return out, total


def repack_turn(turn: bytes) -> bytes:
    """A turn as SQLite persisted it, packed as the store keeps it: files written before turns
    were packed hold the maps `encode_turn` makes (without tokens), files written before turns
    had tokens the four-field arrays; later ones hold the packed turn itself."""
    if turn[0] == _PACKED:
        return turn
    fields = msgpack.unpackb(turn)
    if isinstance(fields, dict):
        role, content, ts, seq = fields["role"], fields["content"], fields["ts"], fields["seq"]
    else:
        role, content, ts, seq = fields
        role = ROLE_CODES[role] if isinstance(role, int) else role
    return pack_turn(role, content, ts, seq, estimate_tokens(content))


def turn_head(role: str, content: str, ts: float, tokens: int) -> bytes:
    """A turn encoded up to its seq, which the Redis script appends as a uint32."""
    r, co, t, s, to = _HEAD_KEYS
    return b"".join(
        (
            b"\x85",
            r,
            _packb(role),
            co,
            _packb(content),
            t,
            _packb(ts),
            to,
            b"\xce",
            tokens.to_bytes(4, "big"),
            s,
            b"\xce",
        )
    )


def redis_tokens(entry: bytes) -> int:
    """The tokens of a Redis list entry, read at their fixed place from its end."""
    if entry[REDIS_SIZE_BYTES] != 0x85:
        return _legacy_tokens(entry)
    at = len(entry) - REDIS_TOKENS_FROM_END
    return int.from_bytes(entry[at : at + 4], "big")


def redis_turn(entry: bytes) -> bytes:
    """The turn a get returns from a Redis list entry: the entry without its size. An entry
    stored before turns had tokens gets them, estimated."""
    if entry[REDIS_SIZE_BYTES] == 0x85:
        return entry[REDIS_SIZE_BYTES:]
    fields = msgpack.unpackb(entry[REDIS_SIZE_BYTES:])
    fields["tokens"] = _legacy_tokens(entry)
    return _packb(fields)


def _legacy_tokens(entry: bytes) -> int:
    """The tokens of a Redis entry stored before turns had them: the estimate redis.lua makes
    from the entry's length (the 30 bytes of its map's keys and numbers taken off)."""
    return max(0, (len(entry) - 30 + 3) // 4)


def redis_entry(size: int, head: bytes, seq: int) -> bytes:
    """The Redis list entry of a turn: what redis.lua builds from `turn_head` and its seq."""
    return size.to_bytes(REDIS_SIZE_BYTES, "big") + head + seq.to_bytes(4, "big")
