"""LangGraph's long-term memory on memory-worker: `MqttStore`, a `langgraph.store.base.BaseStore`.

Needs the optional extra: `pip install '.[langgraph]'` from the clone (docs/client.md).
The worker never imports this module.

    store = MqttStore(url="mqtt://pi.local/mem")
    store.put(("users", "alice"), "prefs", {"lang": "en"})
    store.get(("users", "alice"), "prefs").value      # {"lang": "en"}

How LangGraph's names map onto the worker's (docs/client.md):

- a namespace tuple is a conversation, `<prefix>.<label>.<label>...` (each label with `%`,
  `/`, `+`, `#` and control characters percent-encoded; LangGraph forbids `.` in labels);
  the whole id is at most 128 UTF-8 bytes;
- an item is a state key of that conversation, in its state namespace `items`; the key is
  the item's key (1-128 UTF-8 bytes); the value saved is `{v: value, c: created_at,
  u: updated_at, t: ttl in minutes or nil}`, so a value is a dict of msgpack values (tuples
  come back as lists).

Searches and namespace listings page through the worker's listing of conversations under
the prefix, then read each namespace's items: their cost grows with the namespaces they
match. Results come in namespace order (tuples compared as LangGraph does), then key order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import unquote

from worker.client import BlockingMemoryClient, Memory
from worker.client._adapters import OnClient, missing_extra
from worker.constants import MAX_LIST_LIMIT, MAX_NAME_BYTES
from worker.errors import BadTopic
from worker.protocol import _BAD_CONVO_CHARS, validate_convo

try:
    from langgraph.store.base import (
        BaseStore,
        GetOp,
        Item,
        ListNamespacesOp,
        Op,
        PutOp,
        Result,
        SearchItem,
        SearchOp,
        TTLConfig,
        validate_op_namespace,
    )

    # The filter operators and namespace matching exactly as LangGraph's reference store has
    # them (private names of a pinned release: the differential test would show a drift).
    from langgraph.store.memory import _compare_values, _does_match
except ModuleNotFoundError as exc:
    raise missing_extra("langgraph", exc) from None

ITEMS = "items"  # the state namespace that holds a LangGraph namespace's items
DEFAULT_PREFIX = "lg"
_MINUTE = 60.0
_REFRESHES = 3  # passes of a refresh that puts in between keep changing
_I = TypeVar("_I", bound=Item)


def _label(text: str) -> str:
    return "".join(
        "".join(f"%{b:02X}" for b in ch.encode()) if ch == "%" or _BAD_CONVO_CHARS.match(ch) else ch
        for ch in text
    )


class MqttStore(OnClient, BaseStore):
    """LangGraph's `BaseStore` on the worker (see the module docstring for the mapping).

    Args:
        url, client: as for MqttChatMessageHistory (an open BlockingMemoryClient to share).
        prefix: the first part of every conversation id this store uses ("lg"; no `.`,
            which separates the namespace's labels after it).
        ttl: LangGraph's TTLConfig: `default_ttl` (minutes) for puts that name none, and
            `refresh_on_read` (default True) for gets and searches that do not say.

    Item TTLs are the worker's key TTLs, on the worker's clock; the conversation that holds a
    namespace is bounded like any other (`--ttl`, `--max-keys`, the byte budget, LRU), so run
    the worker with `--ttl 0` or a long one for long-term memory.
    """

    supports_ttl = True

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        ttl: TTLConfig | None = None,
        client: BlockingMemoryClient | None = None,
    ) -> None:
        _check_prefix(prefix)
        super().__init__(url, client)
        self.prefix = prefix
        self.ttl_config = ttl

    # --- names --------------------------------------------------------------------------

    def convo_of(self, namespace: tuple[str, ...]) -> str:
        """The conversation id that holds `namespace` (ValueError when it would be longer
        than a conversation id may be)."""
        convo = ".".join((self.prefix, *(_label(label) for label in namespace)))
        if len(convo.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise ValueError(
                f"namespace {namespace!r} is too long: it is held as the conversation id "
                f"{convo[:40]!r}..., {len(convo.encode('utf-8', 'surrogatepass'))} UTF-8 "
                f"bytes (at most {MAX_NAME_BYTES}, with the prefix {self.prefix!r} and "
                "'/', '+', '#', '%' and control characters taking 3 bytes each)"
            )
        return convo

    def namespace_of(self, convo: str) -> tuple[str, ...]:
        """The namespace a conversation id of this store holds."""
        return tuple(unquote(label) for label in convo.split(".")[1:])

    # --- operations ---------------------------------------------------------------------

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """Run the operations in order (reads see the store before the batch's puts)."""
        return self.client.call(self._batch(self.client.memory, list(ops)))

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        """As batch, without blocking the caller's loop."""
        return await self.client.run(self._batch(self.client.memory, list(ops)))

    async def _batch(self, memory: Memory, ops: list[Op]) -> list[Result]:
        # As LangGraph's InMemoryStore: reads first, then the puts, the last one per item.
        results: list[Result] = []
        puts: dict[tuple[tuple[str, ...], str], PutOp] = {}
        for op in ops:
            validate_op_namespace(op)
            if isinstance(op, GetOp):
                results.append(await self._get(memory, op))
            elif isinstance(op, SearchOp):
                results.append(await self._search(memory, op))
            elif isinstance(op, ListNamespacesOp):
                results.append(await self._list_namespaces(memory, op))
            elif isinstance(op, PutOp):
                if op.value is not None and not isinstance(op.value, Mapping):
                    raise TypeError(
                        f"MqttStore values are dicts (LangGraph's Item.value), not "
                        f"{type(op.value).__name__}: put(namespace, key, {{'value': ...}})"
                    )
                puts[(op.namespace, op.key)] = op
                results.append(None)
            else:
                raise ValueError(f"unknown operation {type(op).__name__}")
        for op in puts.values():
            await self._put(memory, op)
        return results

    async def _get(self, memory: Memory, op: GetOp) -> Item | None:
        convo = self.convo_of(op.namespace)
        saved = await memory.load(convo, ITEMS, op.key)
        if saved is None:
            return None
        if op.refresh_ttl:
            await self._refresh(memory, convo, op.key, saved)
        return _item(Item, op.namespace, op.key, saved)

    async def _put(self, memory: Memory, op: PutOp) -> None:
        convo = self.convo_of(op.namespace)
        if op.value is None:
            await memory.delete(convo, ITEMS, op.key)
            return
        old = await memory.load(convo, ITEMS, op.key)
        now = time.time()
        saved = {"v": dict(op.value), "c": old["c"] if old else now, "u": now, "t": op.ttl}
        await memory.save(convo, ITEMS, op.key, saved, op.ttl * _MINUTE if op.ttl else None)

    async def _refresh(self, memory: Memory, convo: str, key: str, saved: Any) -> None:
        """Start an item's TTL again, as LangGraph's refresh_on_read means it: its expiry
        alone (saving what was read undid a put or delete that came in between). A put in
        between without a TTL keeps none (the worker starts only a TTL a key has); one with
        another TTL is given its own at the next pass."""
        ttl = saved["t"]
        for _ in range(_REFRESHES):
            if not ttl:
                return
            now = await memory.load(convo, ITEMS, key, ttl=ttl * _MINUTE)
            if not isinstance(now, dict) or now.get("t") == ttl:
                return
            ttl = now.get("t")

    async def _search(self, memory: Memory, op: SearchOp) -> list[SearchItem]:
        # op.query is left aside, as InMemoryStore does without an embeddings index: the
        # items come back filtered and paged, unscored (memory tools pass one).
        found: list[tuple[tuple[str, ...], str, Any]] = []
        spaces = await self._namespaces(memory, op.namespace_prefix)
        contents = await asyncio.gather(*(memory.get_all(convo, ITEMS) for _, convo in spaces))
        for (namespace, _), items in zip(spaces, contents, strict=True):
            for key in sorted(items):
                saved = items[key]
                if all(_compare_values(saved["v"].get(k), v) for k, v in (op.filter or {}).items()):
                    found.append((namespace, key, saved))
        page = found[op.offset : op.offset + op.limit]
        if op.refresh_ttl:
            await asyncio.gather(
                *(self._refresh(memory, self.convo_of(ns), key, saved) for ns, key, saved in page)
            )
        return [_item(SearchItem, namespace, key, saved) for namespace, key, saved in page]

    async def _list_namespaces(self, memory: Memory, op: ListNamespacesOp) -> list[Any]:
        conditions = op.match_conditions or ()
        start: tuple[str, ...] = ()
        for condition in conditions:
            if condition.match_type == "prefix":
                labels = list(condition.path)
                start = tuple(labels[: labels.index("*")] if "*" in labels else labels)
        names = [
            namespace
            for namespace, _ in await self._namespaces(memory, start)
            if all(_does_match(condition, namespace) for condition in conditions)
        ]
        if op.max_depth is not None:
            names = sorted({namespace[: op.max_depth] for namespace in names})
        return names[op.offset : op.offset + op.limit]

    async def _namespaces(
        self, memory: Memory, prefix: tuple[str, ...]
    ) -> list[tuple[tuple[str, ...], str]]:
        """(namespace, conversation) of every namespace under `prefix` holding items, in
        namespace order."""
        head = self.convo_of(prefix) if prefix else f"{self.prefix}."
        found = []
        async for info in memory.conversations(head, page_size=MAX_LIST_LIMIT):
            namespace = self.namespace_of(info["convo"])
            if info["keys"] and namespace[: len(prefix)] == prefix and namespace:
                found.append((namespace, info["convo"]))
        return sorted(found)


def _check_prefix(prefix: str) -> None:
    """Raise ValueError unless `prefix` can begin this store's conversation ids, and no other
    store's: a `.` in it reads as a namespace label's start ("my.app" was the namespace
    ("app", ...) of "my", and its searches found nothing)."""
    try:
        validate_convo(prefix)
    except BadTopic as exc:
        raise ValueError(f"prefix {prefix!r}: {exc.message} (it begins conversation ids)") from None
    if "." in prefix:
        raise ValueError(f"prefix {prefix!r}: has a '.', which separates namespace labels")


def _item(kind: type[_I], namespace: tuple[str, ...], key: str, saved: Any) -> _I:
    return kind(
        namespace=namespace,
        key=key,
        value=saved["v"],
        created_at=datetime.fromtimestamp(saved["c"], UTC),
        updated_at=datetime.fromtimestamp(saved["u"], UTC),
    )
