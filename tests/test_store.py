"""The store's bounds, on a fake clock: no broker, no I/O."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from worker.config import Limits
from worker.errors import TooLarge
from worker.protocol import (
    Append,
    Delete,
    Fields,
    Get,
    Items,
    Loaded,
    StateDelete,
    StateGetAll,
    StateLoad,
    StateSave,
    Turns,
)
from worker.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**limits: Any) -> tuple[Store, Clock]:
    clock = Clock()
    return Store(Limits(**limits), clock=clock, wall=lambda: 1.7e9 + clock.now), clock


def turns(store: Store, convo: str, last: int | None = None) -> list[dict[str, Any]]:
    result = store.get(Get(convo, last))
    return [msgpack.unpackb(t) for t in result.turns]


def add(store: Store, convo: str, content: str = "x", role: str = "user", **kw: Any) -> Fields:
    return store.append(Append(convo, role, content, **kw))


def reasons(store: Store) -> list[tuple[str, str, int, int]]:
    return [(e.convo, e.reason, e.count, e.keys) for e in store.take_evictions()]


def test_append_numbers_turns_and_counts_them() -> None:
    """seq numbers turns from 1; count is how many are stored."""
    s, _ = make()
    assert add(s, "c").fields == {"seq": 1, "count": 1}
    assert add(s, "c").fields == {"seq": 2, "count": 2}
    assert add(s, "d").fields == {"seq": 1, "count": 1}


def test_max_turns_drops_the_oldest_without_an_eviction() -> None:
    """Past --max-turns the oldest turn goes; trimming is not an eviction."""
    s, _ = make(max_turns=3)
    for i in range(5):
        add(s, "c", f"m{i}")
    assert [t["content"] for t in turns(s, "c")] == ["m2", "m3", "m4"]
    assert [t["seq"] for t in turns(s, "c")] == [3, 4, 5]
    assert add(s, "c").fields == {"seq": 6, "count": 3}
    assert reasons(s) == []
    assert (s.turns, s.bytes) == (3, 6 + 6 + 5)


def test_get_last_and_unknown() -> None:
    """get returns the last N, oldest first; [] for an unknown conversation (not created)."""
    s, _ = make()
    for i in range(4):
        add(s, "c", f"m{i}")
    assert [t["content"] for t in turns(s, "c", 2)] == ["m2", "m3"]
    assert [t["content"] for t in turns(s, "c", 10)] == ["m0", "m1", "m2", "m3"]
    assert turns(s, "nobody") == []
    assert "nobody" not in s


def test_turns_carry_role_and_timestamp() -> None:
    s, clock = make()
    add(s, "c", "hello", role="assistant")
    assert turns(s, "c") == [
        {"role": "assistant", "content": "hello", "ts": 1.7e9 + clock.now, "seq": 1}
    ]


def test_ttl_slides_on_append_and_get() -> None:
    """The TTL runs from the last append or get."""
    s, clock = make(ttl=10)
    add(s, "c")
    clock.now += 8
    assert len(turns(s, "c")) == 1
    clock.now += 8
    add(s, "c")
    clock.now += 9.9
    assert s.expire() is False
    assert reasons(s) == []
    assert len(turns(s, "c")) == 2


def test_expiry_is_proactive_and_reported_once() -> None:
    """The sweep expires conversations nobody touches, one event each."""
    s, clock = make(ttl=10)
    add(s, "a")
    add(s, "a")
    clock.now += 5
    add(s, "b")
    clock.now += 6
    s.expire()
    assert reasons(s) == [("a", "ttl", 2, 0)]
    clock.now += 10
    s.expire()
    s.expire()
    assert reasons(s) == [("b", "ttl", 1, 0)]
    assert (s.conversations, s.turns, s.bytes) == (0, 0, 0)


def test_expired_conversation_is_never_visible_again() -> None:
    """An append after expiry starts a fresh conversation at seq 1, with the ttl event first."""
    s, clock = make(ttl=10)
    add(s, "c", "old")
    clock.now += 11
    assert add(s, "c", "new").fields == {"seq": 1, "count": 1}
    assert reasons(s) == [("c", "ttl", 1, 0)]
    assert [t["content"] for t in turns(s, "c")] == ["new"]


def test_get_on_expired_is_empty() -> None:
    s, clock = make(ttl=10)
    add(s, "c")
    clock.now += 10
    assert turns(s, "c") == []
    assert reasons(s) == [("c", "ttl", 1, 0)]


def test_ttl_zero_disables_expiry() -> None:
    s, clock = make(ttl=0)
    add(s, "c")
    clock.now += 1e9
    assert s.expire() is False
    assert len(turns(s, "c")) == 1


def test_mass_expiry_is_chunked() -> None:
    """A sweep step expires a bounded number and says whether more is due."""
    s, clock = make(ttl=1, max_conversations=10_000)
    for i in range(5000):
        add(s, f"c{i}")
    clock.now += 2
    assert s.expire(limit=2000) is True
    assert s.conversations == 3000
    assert s.expire(limit=2000) is True
    assert s.expire(limit=2000) is False
    assert s.conversations == 0
    assert len(s.take_evictions()) == 5000


def test_lru_evicts_the_least_recently_used() -> None:
    """Creating one more than --max-conversations evicts the LRU one; a get is a use."""
    s, _ = make(max_conversations=3)
    for name in "abc":
        add(s, name)
    turns(s, "a")
    add(s, "d")
    assert reasons(s) == [("b", "lru", 1, 0)]
    assert sorted(name for name, _ in s.items()) == ["a", "c", "d"]


def test_lru_report_says_ttl_when_the_victim_had_expired() -> None:
    s, clock = make(max_conversations=1, ttl=5)
    add(s, "a")
    clock.now += 6
    add(s, "b")
    assert reasons(s) == [("a", "ttl", 1, 0)]


def test_memory_budget_evicts_lru_with_reason_memory() -> None:
    """Past --max-bytes, least recently used conversations go (reason memory)."""
    s, _ = make(max_bytes=100)
    add(s, "a", "x" * 40, role="r")  # 41 bytes
    add(s, "b", "x" * 40, role="r")  # 82
    add(s, "c", "x" * 40, role="r")  # 123 -> a goes
    assert reasons(s) == [("a", "memory", 1, 0)]
    assert s.bytes == 82


def test_budget_counts_utf8_bytes() -> None:
    s, _ = make()
    add(s, "c", "é" * 10, role="ü")
    assert s.bytes == 22


def test_turn_larger_than_the_budget_is_refused() -> None:
    """A turn that could never fit is too_large, and nothing is evicted for it."""
    s, _ = make(max_bytes=50)
    add(s, "a", "x" * 10)
    with pytest.raises(TooLarge):
        add(s, "b", "x" * 50)
    assert reasons(s) == []
    assert "b" not in s


def test_one_conversation_over_the_budget_trims_its_own_oldest_turns() -> None:
    """The conversation being written is never evicted for its own append."""
    s, _ = make(max_bytes=100, max_turns=10)
    for i in range(5):
        add(s, "c", f"{i}" * 39, role="r")
    assert [t["content"][0] for t in turns(s, "c")] == ["3", "4"]
    assert s.bytes == 80
    assert reasons(s) == []


def test_delete_reports_one_eviction() -> None:
    s, _ = make()
    add(s, "c")
    add(s, "c")
    assert s.delete(Delete("c")).fields == {"deleted": 2}
    assert s.delete(Delete("c")).fields == {"deleted": 0}
    assert reasons(s) == [("c", "deleted", 2, 0)]
    assert add(s, "c").fields["seq"] == 1


def test_append_with_id_is_applied_once() -> None:
    """A repeated id gets the original reply and stores nothing more."""
    s, _ = make()
    first = add(s, "c", "a", id="m1")
    add(s, "c", "b", id="m2")
    assert add(s, "c", "a", id="m1").fields == first.fields == {"seq": 1, "count": 1}
    assert [t["content"] for t in turns(s, "c")] == ["a", "b"]


# --- state -------------------------------------------------------------------------------


def save(s: Store, convo: str, key: str, value: Any, ns: str = "n", **kw: Any) -> Any:
    return s.state_save(StateSave(convo, ns, key, msgpack.packb(value), **kw))


def load(s: Store, convo: str, key: str, ns: str = "n") -> Any:
    loaded = s.state_load(StateLoad(convo, ns, key))
    assert isinstance(loaded, Loaded)
    return None if loaded.value is None else msgpack.unpackb(loaded.value)


def test_state_round_trip_and_namespaces() -> None:
    s, _ = make()
    save(s, "c", "k", {"a": [1, None]})
    save(s, "c", "k", "other", ns="m")
    assert load(s, "c", "k") == {"a": [1, None]}
    assert load(s, "c", "k", ns="m") == "other"
    assert load(s, "c", "nope") is None
    all_n = s.state_get_all(StateGetAll("c", "n"))
    assert isinstance(all_n, Items)
    assert {k: msgpack.unpackb(v) for k, v in all_n.items.items()} == {"k": {"a": [1, None]}}
    assert s.state_delete(StateDelete("c", "n", "k")).fields == {"deleted": True}
    assert s.state_delete(StateDelete("c", "n", "k")).fields == {"deleted": False}
    assert s.keys == 1


def test_state_counts_toward_the_budget_and_goes_with_the_conversation() -> None:
    s, _ = make()
    save(s, "c", "key", "v")  # 3 + 2
    add(s, "c", "x")
    assert s.bytes == 5 + 5
    s.delete(Delete("c"))
    assert reasons(s) == [("c", "deleted", 1, 1)]
    assert (s.bytes, s.keys) == (0, 0)


def test_key_ttl_expires_without_event() -> None:
    s, clock = make(ttl=0)
    save(s, "c", "k", 1, ttl=5)
    save(s, "c", "forever", 2)
    clock.now += 5
    assert load(s, "c", "k") is None
    save(s, "c", "k2", 1, ttl=1)
    clock.now += 1
    s.expire()
    assert reasons(s) == []
    assert s.keys == 1
    result = s.state_get_all(StateGetAll("c", "n"))
    assert isinstance(result, Items)
    assert list(result.items) == ["forever"]


def test_max_keys_refuses_new_keys_but_not_updates() -> None:
    s, clock = make(max_keys=2)
    save(s, "c", "a", 1)
    save(s, "c", "b", 1, ttl=1)
    with pytest.raises(TooLarge):
        save(s, "c", "z", 1)
    save(s, "c", "a", 2)
    clock.now += 1
    save(s, "c", "z", 1)  # b expired, so z fits
    assert s.keys == 2


def test_state_touches_the_conversation() -> None:
    s, clock = make(ttl=10, max_conversations=2)
    add(s, "a")
    add(s, "b")
    clock.now += 8
    load(s, "a", "k")
    clock.now += 8
    s.expire()
    assert reasons(s) == [("b", "ttl", 1, 0)]


def test_execute_returns_errors_as_values() -> None:
    s, _ = make(max_bytes=300)
    result = s.execute(Append("c", "r", "x" * 400))
    assert isinstance(result, TooLarge)
    assert isinstance(s.execute(Get("c")), Turns)
