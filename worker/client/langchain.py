"""LangChain on memory-worker: chat history (`MqttChatMessageHistory`) and the byte store
(`MqttByteStore`).

Needs the optional extra: `pip install '.[langchain]'` from the clone (docs/client.md).
The worker never imports this module.

    history = MqttChatMessageHistory("kiosk-7", url="mqtt://pi.local/mem")
    history.add_user_message("hi")
    history.messages            # [HumanMessage("hi")]

The history is bounded as the worker bounds it (`--max-turns`, `--ttl`, ...). With
`max_tokens`, `messages` holds only the newest turns that fit that many tokens. When the
conversation has a summary (memory-summarizer keeps one of what the window dropped),
`messages` starts with a SystemMessage holding it, counted first against `max_tokens`;
`summary=False` leaves it out.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from worker import constants as c
from worker.client import BlockingMemoryClient, Context, Turn
from worker.client._adapters import OnClient, missing_extra
from worker.client._api import _refuse

try:
    from langchain_core.chat_history import BaseChatMessageHistory
    from langchain_core.messages import (
        AIMessage,
        BaseMessage,
        ChatMessage,
        FunctionMessage,
        HumanMessage,
        SystemMessage,
        ToolMessage,
        message_to_dict,
        messages_from_dict,
    )
    from langchain_core.stores import BaseStore
except ModuleNotFoundError as exc:
    raise missing_extra("langchain", exc) from None

# A streamed answer's chunks are of their own types ("AIMessageChunk", ...).
_ROLE_OF = {
    "human": "user",
    "ai": "assistant",
    "system": "system",
    "HumanMessageChunk": "user",
    "AIMessageChunk": "assistant",
    "SystemMessageChunk": "system",
}
_MESSAGE_OF: dict[str, type[BaseMessage]] = {
    "user": HumanMessage,
    "assistant": AIMessage,
    "system": SystemMessage,
}
_PLAIN = tuple(_MESSAGE_OF.values())


# The role of a turn that holds a whole message, as LangChain's own dict in JSON: one that a
# role and a string would lose (a tool call, a tool's answer and its tool_call_id, content
# made of parts), which the next model call needs.
WHOLE = c.WHOLE_MESSAGE_ROLE
# Model bookkeeping, left out of a whole message: large, and no model call needs it back.
_DROPPED = ("response_metadata", "usage_metadata")


def role_of(message: BaseMessage) -> str:
    """The worker's role for a LangChain message (a ChatMessage keeps its own role)."""
    if isinstance(message, ChatMessage):
        return message.role
    return _ROLE_OF.get(message.type, message.type)


def turn_of(message: BaseMessage) -> tuple[str, str]:
    """The role and content a message is stored as: the devices' roles (user, assistant,
    system) for plain text, else the whole message under the role `langchain`."""
    plain = isinstance(message.content, str) and (
        isinstance(message, ChatMessage)
        or (
            isinstance(message, _PLAIN)  # their chunks too (a streamed answer)
            and not getattr(message, "tool_calls", None)
            and not getattr(message, "invalid_tool_calls", None)
        )
    )
    if plain:
        return role_of(message), str(message.content)
    whole = message_to_dict(message)
    data = {
        k: v
        for k, v in whole["data"].items()
        if k == "content" or (k not in _DROPPED and v not in (None, [], {}))
    }
    return WHOLE, json.dumps({"type": whole["type"], "data": data}, ensure_ascii=False)


def _window(turns: Sequence[Turn]) -> list[BaseMessage]:
    """The messages of a window of turns, less the tool answers it starts with: their call
    fell out of the window (--max-turns, max_tokens), and a model refuses an answer to no
    call."""
    messages = [message_of(t) for t in turns]
    start = 0
    while start < len(messages) and isinstance(messages[start], ToolMessage | FunctionMessage):
        start += 1
    return messages[start:]


def message_of(turn: Turn) -> BaseMessage:
    """The LangChain message for a stored turn."""
    role, content = turn["role"], turn["content"]
    if role == WHOLE:
        try:
            return messages_from_dict([json.loads(content)])[0]
        except (ValueError, KeyError, TypeError):  # a device's turn under that role
            pass
    kind = _MESSAGE_OF.get(role)
    if kind is None:
        return ChatMessage(role=role, content=content)
    return kind(content=content)


class MqttChatMessageHistory(OnClient, BaseChatMessageHistory):
    """A session's chat history kept by memory-worker (or any `open_memory` URL).

    Args:
        session_id: the conversation id (the contract's rules apply).
        url: where the memory is, as for `open_blocking_memory`.
        client: an open BlockingMemoryClient to share (not with `url`; `close()` leaves it
            open); by default the history opens its own.
        max_tokens: `messages` holds the newest turns that fit this many tokens (all: None).
        summary: start `messages` with the conversation's summary (none when it is empty).
        summary_message_cls: the message it comes as (LangChain's summary memories' name):
            SystemMessage, or HumanMessage for a chat template that takes one system
            message, the prompt's own, first.
    """

    def __init__(
        self,
        session_id: str,
        url: str | None = None,
        *,
        client: BlockingMemoryClient | None = None,
        max_tokens: int | None = None,
        summary: bool = True,
        summary_message_cls: type[BaseMessage] = SystemMessage,
    ) -> None:
        super().__init__(url, client)
        self.session_id = session_id
        self.max_tokens = max_tokens
        self.summary = summary
        self.summary_message_cls = summary_message_cls

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """The summary (a `summary_message_cls`) and the stored messages that fit, oldest
        first."""
        if not self.summary:
            return _window(self.client.get(self.session_id, None, self.max_tokens))
        return self._messages(self.client.context(self.session_id, self.max_tokens))

    def _messages(self, ctx: Context) -> list[BaseMessage]:
        head: list[BaseMessage] = []
        if ctx.summary is not None and ctx.summary["text"]:
            head.append(self.summary_message_cls(content=ctx.summary["text"]))
        return head + _window(ctx.turns)

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append each message as a turn, in order."""
        for message in messages:
            self.client.append(self.session_id, *turn_of(message))

    def clear(self) -> None:
        """Forget the session."""
        self.client.forget(self.session_id)

    async def aget_messages(self) -> list[BaseMessage]:
        """As `messages`, without blocking the caller's loop."""
        memory = self.client.memory
        if not self.summary:
            turns = await self.client.run(memory.get(self.session_id, None, self.max_tokens))
            return _window(turns)
        return self._messages(
            await self.client.run(memory.context(self.session_id, self.max_tokens))
        )

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append each message as a turn, in order, without blocking the caller's loop."""
        for message in messages:
            memory = self.client.memory
            await self.client.run(memory.append(self.session_id, *turn_of(message)))

    async def aclear(self) -> None:
        """Forget the session, without blocking the caller's loop."""
        await self.client.run(self.client.memory.forget(self.session_id))


class MqttByteStore(OnClient, BaseStore[str, bytes]):
    """LangChain's byte store (`BaseStore[str, bytes]`) over one conversation's state
    namespace: each key a state key, each value stored as msgpack bin.

    Args:
        session_id: the conversation that holds the keys (the contract's rules apply).
        namespace: the state namespace (1-128 UTF-8 bytes).
        url, client: as for MqttChatMessageHistory.

    Keys are 1-128 UTF-8 bytes; the conversation's bounds apply (`--max-keys` keys, the
    byte budget, its TTL: a store unused for `--ttl` seconds is evicted with its keys).
    """

    def __init__(
        self,
        session_id: str,
        namespace: str,
        url: str | None = None,
        *,
        client: BlockingMemoryClient | None = None,
    ) -> None:
        super().__init__(url, client)
        self.session_id = session_id
        self.namespace = namespace

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """Each key's value, or None."""
        return [self.client.load(self.session_id, self.namespace, key) for key in keys]

    def mset(self, key_value_pairs: Sequence[tuple[str, bytes]]) -> None:
        """Set each key to its value."""
        for key, value in self._checked(key_value_pairs):
            self.client.save(self.session_id, self.namespace, key, value)

    def mdelete(self, keys: Sequence[str]) -> None:
        """Delete each key (a missing one is no error)."""
        for key in keys:
            self.client.delete(self.session_id, self.namespace, key)

    def yield_keys(self, *, prefix: str | None = None) -> Iterator[str]:
        """The live keys (those starting with `prefix`)."""
        for key in self.client.get_all(self.session_id, self.namespace):
            if prefix is None or key.startswith(prefix):
                yield key

    async def amget(self, keys: Sequence[str]) -> list[bytes | None]:
        """Each key's value, or None, asked at once."""
        memory, sid, ns = self.client.memory, self.session_id, self.namespace
        return await self.client.run(_gather(*(memory.load(sid, ns, key) for key in keys)))

    async def amset(self, key_value_pairs: Sequence[tuple[str, bytes]]) -> None:
        """Set each key to its value, at once."""
        memory, sid, ns = self.client.memory, self.session_id, self.namespace
        pairs = self._checked(key_value_pairs)
        await self.client.run(_gather(*(memory.save(sid, ns, key, value) for key, value in pairs)))

    def _checked(self, key_value_pairs: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """The pairs to save, a bad key or a value that is not bytes refused before any is
        sent (they stored the pairs before them). A value over the worker's
        --max-payload-bytes is the worker's to refuse: the client does not know its limit."""
        pairs = []
        for key, value in key_value_pairs:
            if not isinstance(value, bytes | bytearray | memoryview):
                raise TypeError(
                    f"MqttByteStore stores bytes: the value of {key!r} is a "
                    f"{type(value).__name__} (encode it, or use the client's save())"
                )
            data = bytes(value)
            _refuse(
                self.session_id, c.OP_STATE_SAVE, {"ns": self.namespace, "key": key, "value": data}
            )
            pairs.append((key, data))
        return pairs

    async def amdelete(self, keys: Sequence[str]) -> None:
        """Delete each key, at once."""
        memory, sid, ns = self.client.memory, self.session_id, self.namespace
        await self.client.run(_gather(*(memory.delete(sid, ns, key) for key in keys)))

    async def ayield_keys(self, *, prefix: str | None = None) -> AsyncIterator[str]:
        """The live keys (those starting with `prefix`)."""
        items = await self.client.run(self.client.memory.get_all(self.session_id, self.namespace))
        for key in items:
            if prefix is None or key.startswith(prefix):
                yield key


async def _gather(*calls: Any) -> list[Any]:
    return list(await asyncio.gather(*calls))
