"""A Hypothesis stateful test: the store against a plain reference model that scans."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from worker.errors import Conflict, TooLarge
from worker.protocol import Append, Delete, Eviction, Get, ListConvos, Summary, decode_cursor
from worker.store import Limits, Store

LIMITS = Limits(
    max_turns=3,
    ttl=10,
    max_conversations=3,
    max_bytes=60,
    convo_cost=5,
    id_byte_cost=2,
    turn_cost=2,
)
names = st.sampled_from("abcde")
texts = st.text(alphabet="xé", max_size=14)


@dataclass
class ModelConvo:
    turns: list[tuple[str, str, int]] = field(default_factory=list)
    tokens: dict[int, int] = field(default_factory=dict)  # seq -> tokens
    seq: int = 0
    order: int = 0
    deadline: float = 0.0
    base: int = 0
    summary: tuple[str, int, int] | None = None

    def summary_size(self) -> int:
        return len(self.summary[0].encode()) + LIMITS.turn_cost if self.summary else 0

    def size(self) -> int:
        return (
            self.base
            + self.summary_size()
            + sum(len(r.encode()) + len(c.encode()) + LIMITS.turn_cost for r, c, _ in self.turns)
        )


class Model:
    """The contract, written the obvious way: scan for the oldest, recount the bytes."""

    def __init__(self) -> None:
        self.convos: dict[str, ModelConvo] = {}
        self.evictions: list[tuple[str, str, int]] = []
        self.tick = itertools.count()

    def evict(self, name: str, reason: str) -> None:
        self.evictions.append((name, reason, len(self.convos.pop(name).turns)))

    def live(self, name: str, now: float) -> ModelConvo | None:
        cv = self.convos.get(name)
        if cv is not None and cv.deadline <= now:
            self.evict(name, "ttl")
            return None
        return cv

    def touch(self, cv: ModelConvo, now: float) -> None:
        cv.order = next(self.tick)
        cv.deadline = now + LIMITS.ttl

    def lru(self, but: str | None = None) -> str:
        return min((n for n in self.convos if n != but), key=lambda n: self.convos[n].order)

    def append(
        self, name: str, role: str, content: str, tokens: int, now: float
    ) -> tuple[int, int] | None:
        cv = self.live(name, now)
        base = LIMITS.convo_cost + LIMITS.id_byte_cost * len(name.encode())
        fixed = base + (cv.summary_size() if cv else 0)
        if fixed + len(role.encode()) + len(content.encode()) + LIMITS.turn_cost > LIMITS.max_bytes:
            return None
        if cv is None:
            while len(self.convos) >= LIMITS.max_conversations:
                victim = self.lru()
                expired = self.convos[victim].deadline <= now
                self.evict(victim, "ttl" if expired else "lru")
            cv = self.convos[name] = ModelConvo(base=base)
        cv.seq += 1
        cv.turns.append((role, content, cv.seq))
        cv.tokens[cv.seq] = tokens
        while len(cv.turns) > LIMITS.max_turns or (
            cv.size() > LIMITS.max_bytes and len(cv.turns) > 1
        ):
            cv.turns.pop(0)
        self.touch(cv, now)
        self.fit(name)
        return cv.seq, len(cv.turns)

    def fit(self, name: str) -> None:
        while sum(c.size() for c in self.convos.values()) > LIMITS.max_bytes:
            self.evict(self.lru(but=name), "memory")

    def summarize(self, name: str, text: str, upto: int, base: int, now: float) -> str:
        """ "ok", "conflict" or "too_large"."""
        cv = self.live(name, now)
        current = cv.summary[1] if cv and cv.summary else 0
        if cv is None or base != current or not base < upto <= cv.seq:
            return "conflict"
        if cv.base + len(text.encode()) + LIMITS.turn_cost > LIMITS.max_bytes:
            return "too_large"
        cv.turns = [t for t in cv.turns if t[2] > upto]
        cv.summary = (text, upto, (len(text.encode()) + 3) // 4)
        while cv.size() > LIMITS.max_bytes and cv.turns:
            cv.turns.pop(0)
        self.touch(cv, now)
        self.fit(name)
        return "ok"


class StoreMatchesModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 100.0
        self.store = Store(LIMITS, clock=lambda: self.now, wall=lambda: 0.0)
        self.model = Model()

    def check_evictions(self) -> None:
        got = [
            (e.convo, e.reason, e.count)
            for e in self.store.take_events()
            if isinstance(e, Eviction)
        ]
        assert got == self.model.evictions
        self.model.evictions = []

    @rule(
        name=names,
        role=st.sampled_from(["user", "é"]),
        content=texts,
        tokens=st.none() | st.integers(0, 9),
    )
    def append(self, name: str, role: str, content: str, tokens: int | None) -> None:
        counted = (len(content.encode()) + 3) // 4 if tokens is None else tokens
        expected = self.model.append(name, role, content, counted, self.now)
        try:
            got = self.store.append(Append(name, role, content, tokens=tokens)).fields
        except TooLarge:
            assert expected is None
        else:
            assert expected is not None
            assert (got["seq"], got["count"]) == expected
        self.check_evictions()

    @rule(
        name=names,
        last=st.none() | st.integers(1, 4),
        max_tokens=st.none() | st.integers(1, 12),
        summary=st.booleans(),
    )
    def get(self, name: str, last: int | None, max_tokens: int | None, summary: bool) -> None:
        cv = self.model.live(name, self.now)
        expected: list[tuple[str, str, int]] = []
        said = None
        if cv is not None:
            self.model.touch(cv, self.now)
            expected = cv.turns[-last:] if last else list(cv.turns)
            said = cv.summary if summary else None
            if max_tokens is not None:
                budget = max_tokens - (said[2] if said else 0)
                fit: list[tuple[str, str, int]] = []
                for turn in reversed(expected):
                    if cv.tokens[turn[2]] > budget:
                        break
                    budget -= cv.tokens[turn[2]]
                    fit.insert(0, turn)
                expected = fit
        got = self.store.get(Get(name, last, max_tokens, summary))
        assert [(t["role"], t["content"], t["seq"]) for t in got.decoded()] == expected
        assert got.summary == said
        assert cv is None or got.tokens == sum(cv.tokens[t[2]] for t in expected) + (
            said[2] if said else 0
        )
        self.check_evictions()

    @rule(
        name=names,
        text=st.text(alphabet="sé", max_size=30),
        upto=st.integers(1, 8),
        base=st.integers(0, 8),
    )
    def summarize(self, name: str, text: str, upto: int, base: int) -> None:
        expected = self.model.summarize(name, text, upto, base, self.now)
        result = self.store.execute(Summary(name, text, upto, base))
        assert {Conflict: "conflict", TooLarge: "too_large"}.get(type(result), "ok") == expected
        self.check_evictions()

    @rule(name=names)
    def delete(self, name: str) -> None:
        cv = self.model.live(name, self.now)
        if cv is not None:
            self.model.evict(name, "deleted")
        got = self.store.delete(Delete(name)).fields["deleted"]
        assert got == (len(cv.turns) if cv else 0)
        self.check_evictions()

    @rule(limit=st.integers(1, 4), prefix=st.sampled_from(["", "a", "c", "z"]))
    def list_all(self, limit: int, prefix: str) -> None:
        """A full listing: the live conversations in id order, each once, as they are; and
        it is not a use (the model is not touched, so later evictions still agree)."""
        live = {n: cv for n, cv in self.model.convos.items() if cv.deadline > self.now}
        expected = [
            (
                n,
                len(cv.turns),
                cv.summary[1] if cv.summary else 0,
                sum(cv.tokens[t[2]] for t in cv.turns) + (cv.summary[2] if cv.summary else 0),
            )
            for n, cv in sorted(live.items())
            if n.startswith(prefix)
        ]
        got, after = [], ""
        while True:
            fields = self.store.list_convos(ListConvos(limit, after, prefix)).fields
            assert len(fields["conversations"]) <= limit
            got += [
                (e["convo"], e["turns"], e["upto"], e["tokens"]) for e in fields["conversations"]
            ]
            if fields["cursor"] is None:
                break
            after = decode_cursor(fields["cursor"])
        assert got == expected
        self.check_evictions()

    @rule(dt=st.sampled_from([0.0, 1.0, 4.0, 9.5, 10.0, 30.0]))
    def wait_and_sweep(self, dt: float) -> None:
        self.now += dt
        for name in sorted(self.model.convos, key=lambda n: self.model.convos[n].order):
            if self.model.convos[name].deadline <= self.now:
                self.model.evict(name, "ttl")
        while self.store.expire(limit=1):
            pass
        self.check_evictions()

    @invariant()
    def bounds_hold(self) -> None:
        s = self.store
        assert s.conversations <= LIMITS.max_conversations
        assert s.bytes <= LIMITS.max_bytes
        assert s.bytes == sum(c.size() for c in self.model.convos.values())
        assert s.turns == sum(len(c.turns) for c in self.model.convos.values())
        assert sorted(n for n, _ in s.items()) == sorted(self.model.convos)


StoreMatchesModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_store_matches_model = StoreMatchesModel.TestCase
