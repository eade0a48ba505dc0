"""The stored-turn layout: one Python home, and the Redis script's copy agrees byte for byte."""

from __future__ import annotations

import uuid

import msgpack
import pytest

from worker.backends.redis import RedisBackend
from worker.protocol import Append
from worker.store import Limits
from worker.turns import (
    REDIS_SIZE_BYTES,
    ROLE_CODES,
    content_size,
    encode_turn,
    estimate_tokens,
    expand_turns,
    pack_turn,
    redis_entry,
    redis_tokens,
    redis_turn,
    repack_turn,
    turn_end,
    turn_head,
    turn_marks,
    turn_size,
)

TEXTS = [("user", "hi"), ("assistant", "é" * 40), ("r" * 32, "x" * 70_000), ("me", "x" * 200)]


@pytest.mark.parametrize(("role", "content"), TEXTS)
@pytest.mark.parametrize("seq", [1, 200, 70_000, 2**33])
def test_boundaries_and_sizes_are_read_off_the_encoding(role: str, content: str, seq: int) -> None:
    """turn_end finds each of back-to-back turns, and turn_size their role and content bytes."""
    turn = pack_turn(role, content, 1.5, seq, seq // 3)
    both = turn + turn
    assert turn_end(both, 0) == len(turn)
    assert turn_end(both, len(turn)) == len(both)
    assert turn_size(turn) == content_size(role, content)


@pytest.mark.parametrize(("role", "content"), TEXTS)
@pytest.mark.parametrize("seq", [1, 200, 70_000, 2**33])
def test_packed_turns_expand_to_what_a_get_returns(role: str, content: str, seq: int) -> None:
    """Packed turns back to back expand to the maps encode_turn makes, and repack to the same."""
    tokens = estimate_tokens(content)
    packed = pack_turn(role, content, 1700000000.25, seq, tokens)
    turn = encode_turn(role, content, 1700000000.25, seq, tokens)
    assert expand_turns(packed + packed) == (turn + turn, 2 * tokens)
    assert repack_turn(packed) == packed
    saved = 27 + (len(msgpack.packb(role)) - 1 if role in ROLE_CODES else 0)
    assert len(turn) - len(packed) == saved


@pytest.mark.parametrize(("role", "content"), TEXTS)
def test_turns_stored_before_tokens_load_with_the_estimate(role: str, content: str) -> None:
    """A turn SQLite kept as a map, or as a four-field array, repacks with estimated tokens."""
    packed = pack_turn(role, content, 1.5, 9, estimate_tokens(content))
    as_map = msgpack.packb({"role": role, "content": content, "ts": 1.5, "seq": 9})
    code = ROLE_CODES.index(role) if role in ROLE_CODES else role
    as_array = msgpack.packb([code, content, 1.5, 9])
    assert repack_turn(as_map) == packed
    assert repack_turn(as_array) == packed


@pytest.mark.parametrize("tokens", [0, 1, 127, 128, 65_536, 1_000_000])
def test_marks_read_seq_and_tokens(tokens: int) -> None:
    """turn_marks finds each turn's start, seq and tokens."""
    a = pack_turn("user", "hi", 1.5, 3, tokens)
    b = pack_turn("xx", "é" * 300, 1.5, 70_000, 5)
    assert turn_marks(a + b) == [(0, 3, tokens), (len(a), 70_000, 5)]


@pytest.mark.parametrize(("role", "content"), TEXTS)
def test_a_redis_turn_reads_as_the_same_turn(role: str, content: str) -> None:
    """A Redis entry without its size is the turn a get returns, with a uint32 seq."""
    entry = redis_entry(123, turn_head(role, content, 2.5, 70_000), 7)
    turn = entry[REDIS_SIZE_BYTES:]
    assert msgpack.unpackb(turn) == msgpack.unpackb(encode_turn(role, content, 2.5, 7, 70_000))
    assert redis_tokens(entry) == 70_000
    assert redis_turn(entry) == turn
    assert int.from_bytes(entry[:REDIS_SIZE_BYTES], "big") == 123


async def test_the_lua_script_stores_the_python_layout(redis_url: str) -> None:
    """What redis.lua stores for an append is, byte for byte, redis_entry of turn_head."""
    limits = Limits(ttl=0)
    backend = RedisBackend(
        redis_url, limits, prefix=f"t{uuid.uuid4().hex[:10]}", wall=lambda: 1700000000.25
    )
    await backend.open()
    try:
        for role, content in TEXTS:
            await backend.execute([Append("c", role, content)])
        stored = await backend._redis.lrange(f"{backend.key}t:c", 0, -1)
    finally:
        await backend.close()
    expected = [
        redis_entry(
            content_size(role, content) + limits.turn_cost,
            turn_head(role, content, 1700000000.25, estimate_tokens(content)),
            seq,
        )
        for seq, (role, content) in enumerate(TEXTS, 1)
    ]
    assert stored == expected
