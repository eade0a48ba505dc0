"""The pure core: bounded conversation memory with no I/O.

Bounds: turns per conversation, sliding TTL on a monotonic clock, an LRU cap on the
number of conversations, and a byte budget over stored role, content and state plus the
measured memory overhead of each conversation, turn and key (Limits.*_cost). Every
conversation lives in one OrderedDict kept in order of last use; since every conversation
has the same TTL, that order is also the order of their deadlines, so both LRU eviction and
expiry take from the front in O(1). A sorted index of their ids serves listing: a page
costs O(log n + limit), whatever the number of conversations.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice, pairwise, takewhile
from operator import attrgetter
from typing import Any, Final

from sortedcontainers import SortedKeyList

from worker import constants as c
from worker.errors import BadRequest, Conflict, TooLarge, WorkerError
from worker.protocol import (
    Append,
    Delete,
    Event,
    Eviction,
    Fields,
    Get,
    Items,
    ListConvos,
    Loaded,
    Request,
    Result,
    StateDelete,
    StateGetAll,
    StateLoad,
    StateNamespaces,
    StateSave,
    Summary,
    Trimmed,
    Turns,
    convo_info,
    list_page,
    trimmed_parts,
)
from worker.turns import (
    TURN_PARTS,
    expand_parts,
    expand_turns,
    pack_turn,
    repack_turn,
    summary_size,
    tokens_of,
    turn_end,
    turn_marks,
    turn_size,
    turn_span,
)

NO_DEADLINE: Final = float("inf")
# Graves kept, per --max-conversations: deletes leave conversations' ids without a live
# conversation, so as many as there are live ones lost ids that a replay needed (a chaos
# trial). Each counts in --max-bytes, which bounds their memory.
GRAVES_PER_CONVERSATION: Final = 2


@dataclass(frozen=True, slots=True)
class Limits:
    """The store's bounds: the pure core needs only these."""

    max_turns: int = c.DEFAULT_MAX_TURNS
    ttl: float = c.DEFAULT_TTL
    max_conversations: int = c.DEFAULT_MAX_CONVERSATIONS
    max_bytes: int = c.DEFAULT_MAX_BYTES
    max_keys: int = c.DEFAULT_MAX_KEYS
    # Request ids remembered per conversation for at-most-once appends and saves. It is
    # --max-inflight: the broker never has more unacknowledged requests out to us than our
    # Receive Maximum, so no more than that many can come again after a crash.
    max_ids: int = c.DEFAULT_MAX_INFLIGHT
    # What --max-bytes counts per conversation, turn and key besides their bytes (measured
    # overheads, see constants.py; tests set their own).
    convo_cost: int = c.CONVO_COST
    id_byte_cost: int = c.ID_BYTE_COST
    turn_cost: int = c.TURN_COST
    key_cost: int = c.KEY_COST
    id_cost: int = c.ID_COST  # each remembered request id
    # Announce each turn that leaves a window uncovered by a summary (--trimmed-events).
    trimmed_events: bool = False


def base_cost(limits: Limits, name: str) -> int:
    """What a conversation costs the budget before its turns and keys."""
    return limits.convo_cost + limits.id_byte_cost * len(name.encode())


class Convo:
    """One conversation.

    Its turns are msgpack-encoded once, when stored, and kept back to back in one bytes
    object (`turns`), packed as arrays without their keys (`pack_turn`): a get is one slice,
    expanded into the maps it returns, and a turn costs its packed encoding and nothing else
    (boundaries are read off the encoding, `turn_end`, rather than kept).
    """

    __slots__ = (
        "born",
        "count",
        "deadline",
        "ids",
        "name",
        "nbytes",
        "nkeys",
        "sbytes",
        "seq",
        "state",
        "summary",
        "tokens",
        "turns",
        "used",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.turns = b""
        self.count = 0
        self.tokens = 0  # the turns' (a listing's entry would walk them all otherwise)
        self.seq = 0
        self.used = 0.0  # monotonic time of the last use
        self.nbytes = 0  # its base cost, turns, state and summary
        self.sbytes = 0  # state and summary: what dropping turns cannot free
        self.nkeys = 0
        self.deadline = NO_DEADLINE
        # ns -> key -> (msgpack value, monotonic deadline or NO_DEADLINE)
        self.state: dict[str, dict[str, tuple[bytes, float]]] | None = None
        self.ids: dict[Any, dict[str, Any]] | None = None
        self.summary: tuple[str, int, int] | None = None  # (text, upto, tokens)
        self.born = 0  # Unix ms when it was started: tells a conversation from a later one

    def _skip(self, n: int) -> int:
        """Offset of the turn after the n oldest."""
        at, turns = 0, self.turns
        for _ in range(n):
            at = turn_end(turns, at)
        return at

    def add_turn(self, turn: bytes, tokens: int, drop: int) -> list[bytes]:
        """Append `turn` (of `tokens`) after dropping the `drop` oldest; returns those."""
        dropped, cut, turns = [], 0, self.turns
        for _ in range(drop):
            end, gone = turn_span(turns, cut)
            dropped.append(turns[cut:end])
            tokens -= gone
            cut = end
        self.turns = turns[cut:] + turn
        self.count += 1 - drop
        self.tokens += tokens
        return dropped

    def drop_oldest(self) -> bytes:
        end, tokens = turn_span(self.turns, 0)
        turn, self.turns = self.turns[:end], self.turns[end:]
        self.count -= 1
        self.tokens -= tokens
        return turn

    def drop_upto(self, upto: int) -> list[bytes]:
        """Drop the turns with seq <= upto (the oldest: seqs only grow); returns them."""
        turns = self.turns
        marks = [(at, tokens) for at, seq, tokens in turn_marks(turns) if seq <= upto]
        bounds = [at for at, _ in marks]
        bounds.append(turn_end(turns, bounds[-1]) if bounds else 0)
        self.turns = turns[bounds[-1] :]
        self.count -= len(marks)
        self.tokens -= sum(tokens for _, tokens in marks)
        return [turns[a:b] for a, b in pairwise(bounds)]

    def last(
        self, n: int | None, max_tokens: int | None = None, with_summary: bool = True
    ) -> Turns:
        """The newest `n` turns (all: None) that fit `max_tokens` with the summary."""
        summary = self.summary if with_summary else None
        extra = summary[2] if summary is not None else 0
        if n is None or n >= self.count:
            count, turns = self.count, self.turns
        else:
            count, turns = n, self.turns[self._skip(self.count - n) :]
        if max_tokens is None:
            data, total = expand_turns(turns)
            return Turns(count, data, total + extra, summary)
        each: list[int] = []
        parts, total = expand_parts(turns, each)
        if total + extra > max_tokens:  # walk back from the newest turn while they fit
            budget, count, total = max_tokens - extra, 0, 0
            for tokens in reversed(each):
                if tokens > budget:
                    break
                budget -= tokens
                count, total = count + 1, total + tokens
            parts = parts[len(parts) - count * TURN_PARTS :] if count else []
        return Turns(count, b"".join(parts), total + extra, summary)

    def turn_list(self) -> list[bytes]:
        """The packed turns, one by one (what SQLite persists)."""
        out, at, turns = [], 0, self.turns
        for _ in range(self.count):
            end = turn_end(turns, at)
            out.append(turns[at:end])
            at = end
        return out


class Grave:
    """What stays of a conversation deleted by a request, or evicted, while its ids matter:
    the ids it remembered (and the delete's own). A broker restored from its last autosave
    delivers again what was in flight then, answered since: a delete, and writes of before
    and after it or before an eviction. The conversation started again takes these ids
    back, so none is applied twice."""

    __slots__ = ("dug", "ids", "nbytes")

    def __init__(self, ids: dict[Any, dict[str, Any]], dug: float, nbytes: int) -> None:
        self.ids = ids
        # Monotonic time of the delete, or of the evicted conversation's last use: it lasts
        # --ttl from then, and is evicted as a conversation last used then.
        self.dug = dug
        self.nbytes = nbytes


class Store:
    """Conversations and their state inside hard bounds.

    Args:
        limits: the bounds to keep.
        clock: monotonic seconds, for TTL.
        wall: Unix seconds, for the timestamps on turns and events.

    Each operation that evicts appends to `evictions`, which the caller drains. When
    `dirty` is a set (durable backends enable it), every conversation an operation changed
    is added to it, each state key saved or dropped to `keys_dirty` (and each conversation
    that went to `keys_cleared`: all its keys went with it), every one whose grave was dug,
    changed or dropped to `graves_dirty`, and every one it used is moved to the end of
    `touched`.
    """

    def __init__(
        self,
        limits: Limits,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.limits = limits
        self._clock = clock
        self._wall = wall
        self._convos: OrderedDict[str, Convo] = OrderedDict()
        # The conversations in id order, for listing: a page reads them without a lookup by
        # id each (at 1,000,000 those lookups were a third of a page, all cache misses).
        self._index: SortedKeyList[Convo, str] = SortedKeyList(key=attrgetter("name"))
        # Deleted conversations' ids, oldest first, and evicted ones' (`_fallen`), by their
        # last use: each kept in order by the way it comes (a delete is now; an eviction
        # takes the least recently used), the oldest grave is the older of the two firsts.
        # In --max-bytes, GRAVES_PER_CONVERSATION per --max-conversations at most, for --ttl;
        # when the budget is short, a grave older than the least recently used conversation
        # goes first (in a full store graves that always went first would not last).
        self._graves: OrderedDict[str, Grave] = OrderedDict()
        self._fallen: OrderedDict[str, Grave] = OrderedDict()
        self.graves_dirty: set[str] = set()
        self._key_heap: list[tuple[float, str, str, str]] = []
        self.events: list[Event] = []  # evictions, and trimmed turns with trimmed_events
        self.dirty: set[str] | None = None
        # The state keys written or dropped since, as (conversation, ns, key), and the
        # conversations that went with all their keys: a durable backend writes those keys
        # alone (an append need not rewrite megabytes of state).
        self.keys_dirty: set[tuple[str, str, str]] = set()
        self.keys_cleared: set[str] = set()
        self.touched: dict[str, None] = {}  # in order of use, most recent last
        self.turns = 0
        self.bytes = 0
        self.keys = 0
        self._last_born = 0

    # --- reading the bounds -------------------------------------------------------------

    @property
    def conversations(self) -> int:
        return len(self._convos)

    def __contains__(self, convo: str) -> bool:
        return convo in self._convos

    def items(self) -> Iterable[tuple[str, Convo]]:
        """Conversations from least to most recently used."""
        return self._convos.items()

    def get_convo(self, convo: str) -> Convo | None:
        return self._convos.get(convo)

    def get_grave(self, convo: str) -> Grave | None:
        return self._graves.get(convo) or self._fallen.get(convo)

    def take_events(self) -> list[Event]:
        out, self.events = self.events, []
        return out

    # --- the operations -----------------------------------------------------------------

    def execute(self, req: Request) -> Result:
        """Apply one request; a refusal comes back as a WorkerError value, never raised."""
        try:
            match req:
                case Append():
                    return self.append(req)
                case Get():
                    return self.get(req)
                case Delete():
                    return self.delete(req)
                case Summary():
                    return self.summary(req)
                case StateSave():
                    return self.state_save(req)
                case StateLoad():
                    return self.state_load(req)
                case StateGetAll():
                    return self.state_get_all(req)
                case StateDelete():
                    return self.state_delete(req)
                case StateNamespaces():
                    return self.state_namespaces(req)
                case ListConvos():
                    return self.list_convos(req)
        except WorkerError as exc:
            return exc
        raise BadRequest(f"unknown request {type(req).__name__}")  # pragma: no cover

    def append(self, req: Append) -> Fields:
        now = self._clock()
        name = req.convo
        cv = self._live(name, now)
        key = (c.OP_APPEND, req.id)
        if (repeat := self._repeated(name, cv, now, key)) is not None:
            return repeat
        lim = self.limits
        content = len(req.content.encode())
        size = len(req.role.encode()) + content + lim.turn_cost
        if size + self._base(name) + (cv.sbytes if cv else 0) > lim.max_bytes:
            raise TooLarge(
                f"the turn ({size} bytes with its overhead) does not fit in --max-bytes "
                f"{lim.max_bytes}"
            )
        if cv is None:
            cv = self._create(name, now)
        cv.seq += 1
        tokens = tokens_of(content) if req.tokens is None else req.tokens
        turn = pack_turn(req.role, req.content, self._wall(), cv.seq, tokens)
        over = max(0, cv.count + 1 - lim.max_turns)
        dropped = cv.add_turn(turn, tokens, over)
        for old in dropped:
            size -= turn_size(old) + lim.turn_cost
        self.turns += 1 - over
        cv.nbytes += size
        self.bytes += size
        if cv.nbytes > lim.max_bytes or (dropped and lim.trimmed_events):
            self._trim_own(name, cv, 1, dropped)
        return self._done(name, cv, now, key, {"seq": cv.seq, "count": cv.count})

    def get(self, req: Get) -> Turns:
        now = self._clock()
        cv = self._live(req.convo, now)
        if cv is None:
            return Turns(0, b"")
        self._touch(req.convo, cv, now)
        return cv.last(req.last, req.max_tokens, req.summary)

    def summary(self, req: Summary) -> Fields:
        now = self._clock()
        name = req.convo
        cv = self._live(name, now)
        key = (c.OP_SUMMARY, req.id)
        if (repeat := self._repeated(name, cv, now, key)) is not None:
            return repeat
        if cv is None:
            raise Conflict("the conversation is not live", 0, 0)
        current = cv.summary[1] if cv.summary else 0
        if req.born is not None and req.born != cv.born:
            why = f"the conversation was started again (born {cv.born}, not {req.born})"
            raise Conflict(why, current, cv.seq, cv.born)
        if req.base != current:
            why = f"the summary's upto is {current}, not base {req.base}"
            raise Conflict(why, current, cv.seq, cv.born)
        if not req.base < req.upto <= cv.seq:
            why = (
                f"'upto' must be between {req.base + 1} and {cv.seq} (after the summary's "
                f"upto, up to the newest turn), not {req.upto}"
                if req.base < cv.seq
                else f"nothing to summarize: the summary covers every turn (upto {cv.seq})"
            )
            raise Conflict(why, current, cv.seq, cv.born)
        lim = self.limits
        size = summary_size(req.text, lim.turn_cost)
        old = self._summary_size(cv)
        # Without --trimmed-events the newest turn stays, as an append's own does: trimmed
        # for the summary's room it was lost, unannounced (a review). With them it is
        # announced and folded (kept, a summary that cannot fit beside it was refused for
        # ever, and memory-summarizer asked its model again and again: a second review).
        newest = 0
        if not lim.trimmed_events and req.upto < cv.seq and cv.count:
            at, seq, _ = turn_marks(cv.turns)[-1]
            newest = turn_size(cv.turns[at:]) + lim.turn_cost if seq > req.upto else 0
        if size + self._base(name) + cv.sbytes - old + newest > lim.max_bytes:
            beside = f" beside the newest turn, which it does not cover ({newest} bytes)"
            raise TooLarge(
                f"the summary ({size} bytes with its overhead) does not fit in --max-bytes "
                f"{lim.max_bytes}" + (beside if newest else "")
            )
        covered = cv.drop_upto(req.upto)
        freed = sum(turn_size(t) + lim.turn_cost for t in covered)
        self.turns -= len(covered)
        cv.summary = (req.text, req.upto, req.token_count)
        cv.sbytes += size - old
        cv.nbytes += size - old - freed
        self.bytes += size - old - freed
        self._trim_own(name, cv, 1 if newest else 0, [])
        return self._done(name, cv, now, key, {"upto": req.upto, "dropped": len(covered)})

    def delete(self, req: Delete) -> Fields:
        now = self._clock()
        name = req.convo
        cv = self._live(name, now)
        key = (c.OP_DELETE, req.id)
        if (repeat := self._repeated(name, cv, now, key)) is not None:
            return repeat
        fields = {"deleted": cv.count if cv else 0}
        ids = cv.ids if cv else None
        if cv is not None:
            self._evict(name, cv, c.REASON_DELETED)
        if ids or req.id is not None:
            self._bury(name, ids or {}, key, fields, now)
        return Fields(fields)

    def state_save(self, req: StateSave) -> Fields:
        now = self._clock()
        name = req.convo
        cv = self._live(name, now)
        key = (c.OP_STATE_SAVE, req.id)
        if (repeat := self._repeated(name, cv, now, key)) is not None:
            return repeat
        old = self._live_key(name, cv, req.ns, req.key, now) if cv else None
        lim = self.limits
        if old is None and cv is not None and cv.nkeys >= lim.max_keys:
            self._purge_expired_keys(cv, now, name)
            if cv.nkeys >= lim.max_keys:
                raise TooLarge(f"the conversation has --max-keys {lim.max_keys} live keys")
        delta = self._key_size(req.key, req.value) - (self._key_size(req.key, old[0]) if old else 0)
        before = cv.nbytes - self._ids_size(cv) if cv else self._base(name)  # ids give way
        if before + delta > lim.max_bytes:
            raise TooLarge(f"the value does not fit in --max-bytes {lim.max_bytes}")
        if cv is None:
            cv = self._create(name, now)
        if cv.state is None:
            cv.state = {}
        deadline = now + req.ttl if req.ttl is not None else NO_DEADLINE
        cv.state.setdefault(req.ns, {})[req.key] = (req.value, deadline)
        self._key_changed(name, req.ns, req.key)
        if old is None:
            cv.nkeys += 1
            self.keys += 1
        cv.nbytes += delta
        cv.sbytes += delta
        self.bytes += delta
        if req.ttl is not None:
            self._push_key_deadline(deadline, name, req.ns, req.key)
        return self._done(name, cv, now, key, {})

    def state_load(self, req: StateLoad) -> Loaded:
        now = self._clock()
        cv = self._live(req.convo, now)
        if cv is None:
            return Loaded(None)
        entry = self._live_key(req.convo, cv, req.ns, req.key, now)
        if (
            entry is not None
            and req.ttl is not None
            and entry[1] != NO_DEADLINE  # saved without a TTL: it keeps none
            and cv.state is not None
        ):
            deadline = now + req.ttl
            cv.state[req.ns][req.key] = (entry[0], deadline)
            self._key_changed(req.convo, req.ns, req.key)
            self._push_key_deadline(deadline, req.convo, req.ns, req.key)
        self._touch(req.convo, cv, now)
        return Loaded(entry[0] if entry else None)

    def state_get_all(self, req: StateGetAll) -> Items:
        now = self._clock()
        cv = self._live(req.convo, now)
        if cv is None:
            return Items({})
        self._touch(req.convo, cv, now)
        keys = cv.state.get(req.ns) if cv.state else None
        if not keys:
            return Items({})
        if any(deadline <= now for _, deadline in keys.values()):
            self._purge_expired_keys(cv, now, req.convo)
        return Items({key: value for key, (value, _) in keys.items()})

    def state_delete(self, req: StateDelete) -> Fields:
        now = self._clock()
        name = req.convo
        cv = self._live(name, now)
        key = (c.OP_STATE_DELETE, req.id)
        if (repeat := self._repeated(name, cv, now, key)) is not None:
            return repeat
        if cv is None:
            if req.id is not None:  # a save after it must not be undone by it again
                self._bury(name, {}, key, {"deleted": False}, now)
            return Fields({"deleted": False})
        found = self._live_key(name, cv, req.ns, req.key, now) is not None
        if found:
            self._drop_key(cv, req.ns, req.key)
            self._changed(name)
        if req.id is not None:
            return self._done(name, cv, now, key, {"deleted": found})
        self._touch(name, cv, now)
        return Fields({"deleted": found})

    def state_namespaces(self, req: StateNamespaces) -> Fields:
        now = self._clock()
        cv = self._convos.get(req.convo)
        names: list[str] = []
        if cv is not None and cv.deadline > now and cv.state:
            names = sorted(
                ns for ns, keys in cv.state.items() if any(d > now for _, d in keys.values())
            )
        return Fields({"namespaces": names})

    def list_convos(self, req: ListConvos) -> Fields:
        """A page of live conversations in id order; see ListConvos. It scans at most
        `limit` ids, skipping those expired but not yet swept (so a page may be short)."""
        now, to_wall = self._clock(), self._wall() - self._clock()
        prefix, ttl = req.prefix, self.limits.ttl
        if req.after >= prefix:
            found = self._index.irange_key(req.after, inclusive=(not req.after, True))
        else:
            found = self._index.irange_key(prefix)
        if prefix:
            found = takewhile(lambda cv: cv.name.startswith(prefix), found)
        page = list(islice(found, req.limit + 1))
        scanned: list[tuple[str, dict[str, Any] | None]] = []
        for cv in page[: req.limit]:
            name = cv.name
            if cv.deadline <= now:
                scanned.append((name, None))
                continue
            summary = cv.summary
            upto, tokens = (summary[1], summary[2] + cv.tokens) if summary else (0, cv.tokens)
            info = convo_info(name, cv.count, cv.nkeys, cv.used + to_wall, ttl, upto, tokens)
            scanned.append((name, info))
        return list_page(scanned, len(page) > req.limit)

    # --- expiry -------------------------------------------------------------------------

    def next_deadline(self) -> float:
        """The earliest monotonic time at which something expires (inf: nothing will)."""
        first = NO_DEADLINE
        if self.limits.ttl and self._convos:
            first = next(iter(self._convos.values())).deadline
        if self.limits.ttl and (oldest := self._oldest_grave()) is not None:
            first = min(first, oldest[1].dug + self.limits.ttl)
        if self._key_heap:
            first = min(first, self._key_heap[0][0])
        return first

    def expire(self, limit: int = c.SWEEP_CHUNK) -> bool:
        """Expire what is due, at most `limit` conversations and keys; True if more is due."""
        now = self._clock()
        done = 0
        if self.limits.ttl:
            convos = self._convos
            while convos and done < limit:
                name, cv = next(iter(convos.items()))
                if cv.deadline > now:
                    break
                self._evict(name, cv, c.REASON_TTL)
                done += 1
            while (
                done < limit
                and (oldest := self._oldest_grave()) is not None
                and not self._lasts(oldest[1], now)
            ):
                self._drop_grave(oldest[0])
                done += 1
        heap = self._key_heap
        while heap and heap[0][0] <= now and done < limit:
            deadline, name, ns, key = heapq.heappop(heap)
            owner = self._convos.get(name)
            entry = owner.state.get(ns, {}).get(key) if owner is not None and owner.state else None
            if owner is not None and entry is not None and entry[1] == deadline:
                self._drop_key(owner, ns, key)
                self._changed(name)
            done += 1
        return done >= limit

    # --- restoring (durable backends) ---------------------------------------------------

    def restore(
        self,
        name: str,
        *,
        turns: list[bytes],
        seq: int,
        state: dict[str, dict[str, tuple[bytes, float]]],
        used: float,
        ids: dict[Any, dict[str, Any]],
        summary: tuple[str, int, int] | None = None,
        born: int = 0,
    ) -> None:
        """Put back a conversation read from storage (`turns` as `turn_list` gave them, `used`
        the monotonic time of its last use); call in order of last use. Turns past a lower
        --max-turns leave the window here, announced as an append's would be."""
        cv = Convo(name)
        keep = self.limits.max_turns
        kept = [repack_turn(t) for t in turns[-keep:]]
        dropped = [repack_turn(t) for t in turns[:-keep]] if len(turns) > keep else []
        cv.turns, cv.seq, cv.used = b"".join(kept), seq, used
        cv.tokens = sum(tokens for _, _, tokens in turn_marks(cv.turns))
        if self.limits.ttl:
            cv.deadline = used + self.limits.ttl
        cv.count = len(kept)
        while len(ids) > self.limits.max_ids:  # kept under a higher --max-inflight
            del ids[next(iter(ids))]
        cv.ids = ids or None
        cv.summary, cv.born = summary, born
        self._last_born = max(self._last_born, born)
        if dropped:
            self._changed(name)  # kept as trimmed: not back with the next start's limits
            if self.limits.trimmed_events:
                self._announce_trimmed(name, cv, dropped)
        cv.sbytes = self._summary_size(cv)
        cv.nbytes = self._base(name) + sum(turn_size(t) + self.limits.turn_cost for t in kept)
        for ns, keys in state.items():
            for key, (value, key_deadline) in keys.items():
                if cv.state is None:
                    cv.state = {}
                cv.state.setdefault(ns, {})[key] = (value, key_deadline)
                ks = self._key_size(key, value)
                cv.sbytes += ks
                cv.nkeys += 1
                if key_deadline != NO_DEADLINE:
                    self._push_key_deadline(key_deadline, name, ns, key)
        cv.nbytes += cv.sbytes + self._ids_size(cv)
        self._convos[name] = cv
        self._index.add(cv)
        self.turns += cv.count
        self.bytes += cv.nbytes
        self.keys += cv.nkeys
        self._shed_ids(cv)  # stored when ids cost nothing: not evicted for them

    def restore_grave(self, name: str, ids: dict[Any, dict[str, Any]], dug: float) -> None:
        """Put back a grave read from storage (`dug` monotonic); call in order of age."""
        lim = self.limits
        while len(ids) > lim.max_ids:
            del ids[next(iter(ids))]
        grave = self._graves[name] = Grave(ids, dug, self._grave_cost(name, ids))
        self.bytes += grave.nbytes

    def enforce_bounds(self) -> None:
        """Evict what a restore put over --max-conversations or --max-bytes (LRU first)."""
        self._keep_graves(self._most_graves)
        convos = self._convos
        while len(convos) > self.limits.max_conversations:
            name, cv = next(iter(convos.items()))
            self._evict(name, cv, c.REASON_LRU)
        self._fit_budget()

    # --- internals ----------------------------------------------------------------------

    def _base(self, name: str) -> int:
        """What a conversation costs the budget before its turns and keys."""
        return base_cost(self.limits, name)

    def _summary_size(self, cv: Convo) -> int:
        return 0 if cv.summary is None else summary_size(cv.summary[0], self.limits.turn_cost)

    def _trim_own(self, name: str, cv: Convo, keep: int, dropped: list[bytes]) -> None:
        """Drop the oldest turns while the conversation alone is over --max-bytes (keeping
        `keep`), and announce them with the `dropped` ones when --trimmed-events is on."""
        lim = self.limits
        self._shed_ids(cv)  # a cache: before the conversation's turns
        while cv.nbytes > lim.max_bytes and cv.count > keep:
            turn = cv.drop_oldest()
            dropped_size = turn_size(turn) + lim.turn_cost
            cv.nbytes -= dropped_size
            self.bytes -= dropped_size
            self.turns -= 1
            dropped.append(turn)
        if dropped and lim.trimmed_events:
            self._announce_trimmed(name, cv, dropped)

    def _announce_trimmed(self, name: str, cv: Convo, dropped: list[bytes]) -> None:
        upto = cv.summary[1] if cv.summary else 0
        for part in trimmed_parts(dropped):
            data, _ = expand_turns(b"".join(part))
            self.events.append(Trimmed(name, len(part), data, upto, self._wall(), cv.born))

    def _key_size(self, key: str, value: bytes) -> int:
        return len(key.encode()) + len(value) + self.limits.key_cost

    def _changed(self, name: str) -> None:
        if self.dirty is not None:
            self.dirty.add(name)

    def _key_changed(self, name: str, ns: str, key: str) -> None:
        if self.dirty is not None:
            self.dirty.add(name)
            self.keys_dirty.add((name, ns, key))

    def _live(self, name: str, now: float) -> Convo | None:
        cv = self._convos.get(name)
        if cv is not None and cv.deadline <= now:
            self._evict(name, cv, c.REASON_TTL)
            return None
        return cv

    def _touch(self, name: str, cv: Convo, now: float) -> None:
        self._convos.move_to_end(name)
        cv.used = now
        if self.limits.ttl:
            cv.deadline = now + self.limits.ttl
        if self.dirty is not None:  # the order of use matters for LRU with TTL off too
            self.touched.pop(name, None)
            self.touched[name] = None

    def _create(self, name: str, now: float) -> Convo:
        # Its own grave first: the room its start makes must not take it (one more grave).
        grave = self._drop_grave(name)
        convos = self._convos
        while len(convos) >= self.limits.max_conversations:
            oldest_name, oldest = next(iter(convos.items()))
            self._evict(
                oldest_name, oldest, c.REASON_TTL if oldest.deadline <= now else c.REASON_LRU
            )
        cv = Convo(name)
        cv.nbytes = self._base(name)
        cv.used = now
        # Unique, even for one started again within the same millisecond (or after the
        # clock stepped back): a summary of the old one must never apply to the new.
        cv.born = self._last_born = max(int(self._wall() * 1000), self._last_born + 1)
        self.bytes += cv.nbytes
        convos[name] = cv
        self._index.add(cv)
        if grave is not None and self._lasts(grave, now):
            cv.ids = grave.ids or None
            cost = self._ids_size(cv)
            cv.nbytes += cost
            self.bytes += cost
        return cv

    def _bury(
        self,
        name: str,
        ids: dict[Any, dict[str, Any]],
        key: tuple[str, Any],
        fields: dict[str, Any],
        now: float,
    ) -> None:
        """Keep a deleted conversation's ids and the delete's (adding to its grave, if it
        has one), unless the budget cannot hold even the grave alone."""
        lim = self.limits
        old = self._drop_grave(name)
        if old is not None and self._lasts(old, now):
            ids = {**old.ids, **ids}
        if key[1] is not None:
            ids[key] = fields
        while len(ids) > lim.max_ids:
            del ids[next(iter(ids))]
        while ids and self._grave_cost(name, ids) > lim.max_bytes:
            del ids[next(iter(ids))]
        if not ids:
            return
        self._keep_graves(self._most_graves - 1)
        grave = self._graves[name] = Grave(ids, now, self._grave_cost(name, ids))
        self.bytes += grave.nbytes
        self._grave_changed(name)
        self._fit_budget()

    def _fall(self, name: str, cv: Convo) -> None:
        """Keep an evicted conversation's ids (it had some) as a grave, while they last: a
        conversation evicted by --ttl has none left, one evicted for room (LRU, --max-bytes)
        keeps them for --ttl from its last use. The caller's budget loop sees it next: it
        costs no more than the conversation did, and is as old."""
        assert cv.ids is not None
        grave = Grave(cv.ids, cv.used, self._grave_cost(name, cv.ids))
        if not self._lasts(grave, self._clock()):
            return
        if len(self._graves) + len(self._fallen) >= self._most_graves:
            oldest = self._oldest_grave()
            if oldest is not None and grave.dug < oldest[1].dug:
                return  # older than every grave kept: it is the oldest, it goes
        self._keep_graves(self._most_graves - 1)
        self._fallen[name] = grave
        self.bytes += grave.nbytes
        self._grave_changed(name)

    def _oldest_grave(self) -> tuple[str, Grave] | None:
        first = next(iter(self._graves.items()), None)
        fallen = next(iter(self._fallen.items()), None)
        if first is None or (fallen is not None and fallen[1].dug < first[1].dug):
            return fallen
        return first

    @property
    def _most_graves(self) -> int:
        return GRAVES_PER_CONVERSATION * self.limits.max_conversations

    def _keep_graves(self, most: int) -> None:
        while len(self._graves) + len(self._fallen) > most:
            oldest = self._oldest_grave()
            assert oldest is not None
            self._drop_grave(oldest[0])

    def _drop_grave(self, name: str) -> Grave | None:
        grave = self._graves.pop(name, None) or self._fallen.pop(name, None)
        if grave is not None:
            self.bytes -= grave.nbytes
            self._grave_changed(name)
        return grave

    def _grave_cost(self, name: str, ids: dict[Any, dict[str, Any]]) -> int:
        """What a grave costs the budget: its conversation's id, as a conversation's does,
        and its ids."""
        return self._base(name) + len(ids) * self.limits.id_cost

    def _lasts(self, grave: Grave, now: float) -> bool:
        return not self.limits.ttl or grave.dug + self.limits.ttl > now

    def _grave_changed(self, name: str) -> None:
        if self.dirty is not None:
            self.graves_dirty.add(name)

    def _evict(self, name: str, cv: Convo, reason: str) -> None:
        del self._convos[name]
        self._index.remove(cv)
        self.turns -= cv.count
        self.bytes -= cv.nbytes
        self.keys -= cv.nkeys
        self.events.append(Eviction(name, reason, cv.count, cv.nkeys, self._wall()))
        self._changed(name)
        if self.dirty is not None and cv.nkeys:
            self.keys_cleared.add(name)
        if cv.ids and reason != c.REASON_DELETED:  # a delete's grave is its own (`_bury`)
            self._fall(name, cv)

    def _fit_budget(self) -> None:
        # The conversation just used is last in order and alone fits the budget (checked
        # before it grew), so this never evicts it.
        convos = self._convos
        while self.bytes > self.limits.max_bytes:
            grave = self._oldest_grave()
            if grave is not None and (
                not convos or grave[1].dug <= next(iter(convos.values())).used
            ):
                self._drop_grave(grave[0])
                continue
            name, cv = next(iter(convos.items()))
            self._evict(name, cv, c.REASON_MEMORY)

    def _done(
        self,
        name: str,
        cv: Convo,
        now: float,
        key: tuple[str, Any] | None,
        fields: dict[str, Any],
    ) -> Fields:
        """Finish a write (or answer its repeat, with key None): remember its (operation,
        id) when it has an id, touch the conversation, and keep the byte budget. An id is
        remembered per operation: the same id on another operation is another request."""
        if key is not None and key[1] is not None:
            self._remember(cv, key, fields)
        self._shed_ids(cv)  # a write without an id too: else the budget evicted its own
        self._touch(name, cv, now)
        self._changed(name)
        self._fit_budget()
        return Fields(fields)

    def _repeated(
        self, name: str, cv: Convo | None, now: float, key: tuple[str, Any]
    ) -> Fields | None:
        """The reply of a write this conversation (or its grave) remembers by (operation,
        id), or None."""
        if key[1] is None:
            return None
        if cv is None:
            grave = self.get_grave(name)
            if grave is not None and not self._lasts(grave, now):
                self._drop_grave(name)  # as Redis does: the counts agree before the sweep
                return None
            if grave is None or key not in grave.ids:
                return None
            return Fields(grave.ids[key])
        if not cv.ids or key not in cv.ids:
            return None
        return self._done(name, cv, now, None, cv.ids[key])

    def _remember(self, cv: Convo, key: tuple[str, Any], fields: dict[str, Any]) -> None:
        """Remember a write's (operation, id) and reply, in --max-bytes like the rest: the
        oldest ids are forgotten past --max-inflight, and while the conversation alone is
        over the budget (this one too: what it stores fits, checked before the write; a
        conversation that fills the budget alone keeps fewer ids, down to none)."""
        if cv.ids is None:
            cv.ids = {}
        cv.ids[key] = fields
        cost = self.limits.id_cost
        cv.nbytes += cost
        self.bytes += cost
        while len(cv.ids) > self.limits.max_ids:
            self._forget_id(cv)

    def _shed_ids(self, cv: Convo) -> None:
        """Forget the oldest ids while the conversation alone is over --max-bytes."""
        while cv.ids and cv.nbytes > self.limits.max_bytes:
            self._forget_id(cv)

    def _forget_id(self, cv: Convo) -> None:
        assert cv.ids is not None
        del cv.ids[next(iter(cv.ids))]
        cost = self.limits.id_cost
        cv.nbytes -= cost
        self.bytes -= cost

    def _ids_size(self, cv: Convo) -> int:
        return len(cv.ids) * self.limits.id_cost if cv.ids else 0

    def _live_key(
        self, name: str, cv: Convo, ns: str, key: str, now: float
    ) -> tuple[bytes, float] | None:
        entry = cv.state.get(ns, {}).get(key) if cv.state else None
        if entry is not None and entry[1] <= now:
            self._drop_key(cv, ns, key)
            self._changed(name)
            return None
        return entry

    def _drop_key(self, cv: Convo, ns: str, key: str) -> None:
        assert cv.state is not None
        self._key_changed(cv.name, ns, key)
        keys = cv.state[ns]
        value, _ = keys.pop(key)
        if not keys:
            del cv.state[ns]
        size = self._key_size(key, value)
        cv.nbytes -= size
        cv.sbytes -= size
        cv.nkeys -= 1
        self.bytes -= size
        self.keys -= 1

    def _purge_expired_keys(self, cv: Convo, now: float, name: str) -> None:
        if not cv.state:
            return
        for ns, keys in list(cv.state.items()):
            for key, (_, deadline) in list(keys.items()):
                if deadline <= now:
                    self._drop_key(cv, ns, key)
        self._changed(name)

    def _push_key_deadline(self, deadline: float, name: str, ns: str, key: str) -> None:
        heap = self._key_heap
        heapq.heappush(heap, (deadline, name, ns, key))
        if len(heap) > 2 * self.keys + 1024:
            # Saves that replace a key leave stale entries behind; rebuild from the live ones.
            live = [
                (d, n, s, k)
                for n, cv in self._convos.items()
                if cv.state
                for s, keys in cv.state.items()
                for k, (_, d) in keys.items()
                if d != NO_DEADLINE
            ]
            heapq.heapify(live)
            self._key_heap = live
