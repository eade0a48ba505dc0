"""MqttStore, LangGraph's BaseStore on the worker: the same random sequences of puts, gets,
deletes, searches and namespace listings on MqttStore (against a real broker and worker) and
on LangGraph's own InMemoryStore give the same answers; TTLs on the worker's clock; and a
real StateGraph that remembers a preference across two threads."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypedDict

import pytest

pytest.importorskip("langgraph")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.store.base import BaseStore, Item
from langgraph.store.memory import InMemoryStore

from tests import test_stores
from tests.conftest import unique
from worker.client import BlockingMemoryClient, LocalMemory, open_blocking_memory
from worker.client.langgraph import ITEMS, MqttStore

store_url = test_stores.store_url
BIG = 10**6

# few namespaces, so that sequences put several items in one and list them back; labels
# that must be encoded (/ % # and non-ASCII) and ones that sort differently as ids
namespaces = st.sampled_from(
    [("users",), ("users", "a"), ("users", "ü%2F"), ("a",), ("a-b", "c/d"), ("a", "#", "users")]
)
keys = st.sampled_from(["k1", "k2", "é"])
values = st.fixed_dictionaries(
    {"n": st.integers(-3, 3)},
    optional={
        "s": st.sampled_from(["x", "y"]),
        "d": st.fixed_dictionaries({"x": st.integers(0, 1)}),
    },
)
filters = st.one_of(
    st.none(),
    st.fixed_dictionaries({"n": st.integers(-3, 3)}),
    st.fixed_dictionaries(
        {
            "n": st.dictionaries(
                st.sampled_from(["$gt", "$gte", "$lt", "$lte", "$ne", "$eq"]),
                st.integers(-3, 3),
                min_size=1,
                max_size=2,
            )
        }
    ),
    st.fixed_dictionaries({"s": st.sampled_from(["x", "y"])}),
    st.fixed_dictionaries({"d": st.fixed_dictionaries({"x": st.integers(0, 1)})}),
)
prefixes = st.lists(st.sampled_from(["users", "a", "a-b", "*", "c/d"]), max_size=2).map(tuple)
puts = st.tuples(st.just("put"), namespaces, keys, values)
offsets = st.sampled_from([0, 0, 0, 1, 2])
ops = st.one_of(
    puts,
    puts,
    puts,
    st.tuples(st.just("delete"), namespaces, keys),
    st.tuples(st.just("get"), namespaces, keys),
    st.tuples(
        st.just("search"),
        prefixes.filter(lambda p: "*" not in p),
        filters,
        st.integers(1, 4),
        st.integers(0, 3),
    ),
    st.tuples(
        st.just("list"),
        prefixes,
        prefixes,
        st.one_of(st.none(), st.integers(1, 3)),
        st.integers(1, 4),
        st.integers(0, 3),
    ),
)


def shape(items: list[Any]) -> list[tuple[tuple[str, ...], str, dict[str, Any]]]:
    return [(i.namespace, i.key, i.value) for i in items]


@dataclass
class Pair:
    """The store under test and LangGraph's reference, driven alike."""

    mine: BaseStore
    ref: InMemoryStore

    def holding(self) -> set[tuple[str, ...]]:
        """The reference's namespaces that hold items."""
        return {i.namespace for i in self.ref.search((), limit=BIG)}

    def step(self, op: tuple[Any, ...]) -> None:
        kind, *args = op
        if kind == "put":
            self.mine.put(*args)
            self.ref.put(*args)
        elif kind == "delete":
            self.mine.delete(*args)
            self.ref.delete(*args)
        elif kind == "get":
            self.get(*args)
        elif kind == "search":
            self.search(*args)
        else:
            self.list_namespaces(*args)

    def get(self, namespace: tuple[str, ...], key: str) -> None:
        got, want = self.mine.get(namespace, key), self.ref.get(namespace, key)
        assert (got and got.value) == (want and want.value)
        if got is not None:
            assert got.created_at <= got.updated_at

    def search(
        self, prefix: tuple[str, ...], where: dict[str, Any] | None, limit: int, offset: int
    ) -> None:
        got = self.mine.search(prefix, filter=where, limit=limit, offset=offset)
        # which items match is the reference's; the order is ours: namespace, then key
        every = sorted(shape(self.ref.search(prefix, filter=where, limit=BIG)))
        assert shape(got) == every[offset : offset + limit]

    def list_namespaces(
        self,
        prefix: tuple[str, ...],
        suffix: tuple[str, ...],
        depth: int | None,
        limit: int,
        offset: int,
    ) -> None:
        got = self.mine.list_namespaces(
            prefix=prefix or None,
            suffix=suffix or None,
            max_depth=depth,
            limit=limit,
            offset=offset,
        )
        # InMemoryStore also lists namespaces left empty (or only ever read); MqttStore,
        # as LangGraph's Postgres store, those that hold items
        held = self.holding()
        every = [
            ns
            for ns in self.ref.list_namespaces(
                prefix=prefix or None, suffix=suffix or None, limit=BIG
            )
            if ns in held
        ]
        if depth is not None:
            every = sorted({ns[:depth] for ns in every})
        assert got == every[offset : offset + limit]


@pytest.fixture(scope="module")
def shared(store_url: str) -> Iterator[BlockingMemoryClient]:
    with open_blocking_memory(store_url) as client:
        yield client


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(ops, min_size=5, max_size=40))
def test_mqtt_store_answers_as_langgraphs_in_memory_store(
    shared: BlockingMemoryClient, steps: list[tuple[Any, ...]]
) -> None:
    """Every get, search and namespace listing answers as InMemoryStore's (TTL aside)."""
    pair = Pair(MqttStore(client=shared, prefix=unique("lg")), InMemoryStore())
    for step in steps:
        pair.step(step)


def test_a_search_with_a_query_answers_as_a_store_without_an_index(
    shared: BlockingMemoryClient,
) -> None:
    """LangGraph's InMemoryStore without an embeddings index leaves query= aside: items
    filtered and paged as without it, unscored. MqttStore refused it, and memory tools that
    pass a query (a search tool) failed on it."""
    store, ref = MqttStore(client=shared, prefix=unique("lg")), InMemoryStore()
    for s in (store, ref):
        for n in range(4):
            s.put(("docs",), f"k{n}", {"lang": "python" if n % 2 else "c", "n": n})
    ours = store.search(("docs",), query="python", filter={"lang": "python"}, limit=5)
    theirs = ref.search(("docs",), query="python", filter={"lang": "python"}, limit=5)
    assert [(i.key, i.value, i.score) for i in ours] == [(i.key, i.value, i.score) for i in theirs]
    assert [i.key for i in ours] == ["k1", "k3"]


def test_items_keep_created_at_and_update_updated_at(shared: BlockingMemoryClient) -> None:
    """created_at is the first put's time; updated_at the last put's."""
    store = MqttStore(client=shared, prefix=unique("lg"))
    store.put(("u",), "k", {"n": 1})
    first = store.get(("u",), "k")
    store.put(("u",), "k", {"n": 2})
    second = store.get(("u",), "k")
    assert first is not None
    assert second is not None
    assert second.created_at == first.created_at
    assert second.updated_at >= first.updated_at
    assert second.value == {"n": 2}


# --- TTL, on the worker's own store with a clock the test moves -------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def timed() -> Iterator[tuple[Clock, BlockingMemoryClient]]:
    clock = Clock()
    with BlockingMemoryClient(_memory=LocalMemory(clock=clock)) as client:
        yield clock, client


def test_item_ttl_is_minutes_on_the_workers_clock(
    timed: tuple[Clock, BlockingMemoryClient],
) -> None:
    """An item put with ttl=1 (minute) is gone 60 s after its last refresh, not before."""
    clock, client = timed
    store = MqttStore(client=client)
    store.put(("u",), "short", {"n": 1}, ttl=1)
    store.put(("u",), "kept", {"n": 2})
    clock.now += 59
    assert store.get(("u",), "short", refresh_ttl=False) is not None
    clock.now += 1
    assert store.get(("u",), "short") is None
    assert store.get(("u",), "kept") is not None
    assert store.list_namespaces() == [("u",)]


def test_reads_refresh_the_ttl_unless_told_not_to(
    timed: tuple[Clock, BlockingMemoryClient],
) -> None:
    """refresh_on_read (the default) starts an item's TTL again on get and search."""
    clock, client = timed
    store = MqttStore(client=client, ttl={"default_ttl": 1, "refresh_on_read": True})
    store.put(("u",), "a", {"n": 1})  # default_ttl: 1 minute
    store.put(("u",), "b", {"n": 2}, ttl=None)
    for _ in range(3):
        clock.now += 50
        assert store.get(("u",), "a") is not None  # refreshed
    clock.now += 50
    assert [i.key for i in store.search(("u",))] == ["a", "b"]  # refreshed by the search
    clock.now += 50
    assert store.get(("u",), "a", refresh_ttl=False) is not None
    clock.now += 10
    assert store.get(("u",), "a") is None


def test_no_refresh_on_read_when_configured_so(
    timed: tuple[Clock, BlockingMemoryClient],
) -> None:
    """With refresh_on_read False a read leaves the TTL running."""
    clock, client = timed
    store = MqttStore(client=client, ttl={"refresh_on_read": False})
    store.put(("u",), "a", {"n": 1}, ttl=1)
    clock.now += 50
    assert store.get(("u",), "a") is not None
    clock.now += 10
    assert store.get(("u",), "a") is None


# --- a real graph ---------------------------------------------------------------------------


class State(TypedDict):
    said: str
    answer: str


@dataclass
class Context:
    user: str


def remember(state: State, runtime: Runtime[Context]) -> dict[str, str]:
    """Store 'call me X' as the user's preference; greet with it when there is one."""
    store = runtime.store
    assert store is not None
    namespace = ("users", runtime.context.user)
    if state["said"].startswith("call me "):
        store.put(namespace, "name", {"name": state["said"].removeprefix("call me ")})
        return {"answer": "noted"}
    saved = store.get(namespace, "name")
    return {"answer": f"hello {saved.value['name'] if saved else 'stranger'}"}


async def test_a_graph_remembers_a_preference_across_threads(store_url: str) -> None:
    """A StateGraph compiled with store=MqttStore: told in one thread, remembered in another."""
    builder = StateGraph(State, context_schema=Context)
    builder.add_node("remember", remember)
    builder.add_edge(START, "remember")
    builder.add_edge("remember", END)
    store = MqttStore(url=store_url, prefix=unique("lg"))
    graph = builder.compile(checkpointer=InMemorySaver(), store=store)
    try:
        alice = Context(user="alice")

        def run(thread: str, said: str, who: Context) -> Any:
            config: Any = {"configurable": {"thread_id": thread}}
            return graph.invoke({"said": said, "answer": ""}, config, context=who)["answer"]

        assert await asyncio.to_thread(run, "t1", "call me Ali", alice) == "noted"
        assert await asyncio.to_thread(run, "t2", "hi", alice) == "hello Ali"
        assert await asyncio.to_thread(run, "t3", "hi", Context(user="bob")) == "hello stranger"
        config: Any = {"configurable": {"thread_id": "t4"}}
        reply = await graph.ainvoke({"said": "hi", "answer": ""}, config, context=alice)
        assert reply["answer"] == "hello Ali"
        item = store.get(("users", "alice"), "name")
        assert isinstance(item, Item)
        assert item.value == {"name": "Ali"}
    finally:
        store.close()


def test_a_namespace_too_long_says_so() -> None:
    """A namespace whose conversation id would be over 128 bytes is refused naming the
    namespace (it said only that a conversation id was too long)."""
    store = MqttStore("memory://")
    try:
        with pytest.raises(ValueError, match=r"namespace \('/////.*too long.*at most 128"):
            store.put(("/" * 50,), "k", {"v": 1})
    finally:
        store.close()


def test_a_value_that_is_not_a_dict_says_so() -> None:
    """LangGraph's values are dicts: another value is a TypeError saying so, and nothing of
    its batch is written (it was dict()'s "dictionary update sequence element #0 ...")."""
    store = MqttStore("memory://")
    try:
        with pytest.raises(TypeError, match=r"MqttStore values are dicts .* not str"):
            store.put(("users",), "k", "notadict")  # type: ignore[arg-type]
        assert store.get(("users",), "k") is None
    finally:
        store.close()


class _WriteBetween(LocalMemory):
    """The store, with another client's write landing right after the next read's answer
    (a load or get_all): between a read and its TTL refresh."""

    then: Callable[[], Awaitable[Any]] | None = None

    async def _after_read(self, value: Any) -> Any:
        then, self.then = self.then, None
        if then is not None:
            await then()
        return value

    async def load(self, *args: Any, **kwargs: Any) -> Any:
        return await self._after_read(await super().load(*args, **kwargs))

    async def get_all(self, *args: Any, **kwargs: Any) -> Any:
        return await self._after_read(await super().get_all(*args, **kwargs))


def test_a_refreshing_read_undoes_no_write_that_came_between() -> None:
    """A get or search that refreshes an item's TTL started it again by saving the value it
    had read: a delete or put of another client that landed in between was undone for good
    (a new user's trial: a deleted item came back 39 times in 40). A put in between keeps
    its own TTL, or none (a review: it got the TTL of the item read)."""
    clock = Clock()
    memory = _WriteBetween(clock=clock)
    with BlockingMemoryClient(_memory=memory) as client:
        store = MqttStore(client=client)
        convo = store.convo_of(("u",))
        store.put(("u",), "gone", {"n": 1}, ttl=10)
        memory.then = lambda: memory.delete(convo, ITEMS, "gone")
        read = store.get(("u",), "gone")  # refreshes
        assert read is not None
        assert read.value == {"n": 1}  # as it was when read
        assert store.get(("u",), "gone", refresh_ttl=False) is None

        store.put(("u",), "new", {"n": 1}, ttl=10)
        newer = {"v": {"n": 2}, "c": 0.0, "u": 0.0, "t": 10}  # another client's put
        memory.then = lambda: memory.save(convo, ITEMS, "new", newer, 600)
        assert [i.value for i in store.search(("u",))] == [{"n": 1}]  # refreshes
        item = store.get(("u",), "new", refresh_ttl=False)
        assert item is not None
        assert item.value == {"n": 2}

        for key, ttl, lives in (("kept", None, 30 * 60.0), ("longer", 20, 15 * 60.0)):
            store.put(("u",), key, {"n": 1}, ttl=10)
            put = {"v": {"n": 2}, "c": 0.0, "u": 0.0, "t": ttl}
            seconds = ttl * 60.0 if ttl else None
            memory.then = lambda k=key, p=put, s=seconds: memory.save(convo, ITEMS, k, p, s)
            assert store.get(("u",), key) is not None  # refreshes
            clock.now += lives  # past the TTL of the item read (10 minutes)
            later = store.get(("u",), key, refresh_ttl=False)
            assert later is not None, key
            assert later.value == {"n": 2}


@pytest.mark.parametrize(
    ("prefix", "words"),
    [
        ("my.app", "has a '.', which separates namespace labels"),
        ("a/b", "conversation id has a wildcard, slash"),
        ("", "1-128 UTF-8 bytes"),
        ("_x", "starting with _ or $ are reserved"),
    ],
)
def test_a_prefix_that_cannot_begin_its_ids_alone_is_refused(prefix: str, words: str) -> None:
    """A prefix with a '.' read as a namespace label (prefix "my.app": search(("users",))
    found nothing, list_namespaces() said ("app", "users", "alice")); one with a '/' failed
    only at the first put, its error not naming the prefix (a new user's trial)."""
    with (
        BlockingMemoryClient(_memory=LocalMemory()) as client,
        pytest.raises(ValueError, match=re.escape(words)),
    ):
        MqttStore(client=client, prefix=prefix)
