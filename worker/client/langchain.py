"""LangChain chat history on memory-worker: `MqttChatMessageHistory`.

Needs the optional extra: `pip install memory-worker[langchain]`. The worker never imports
this module.

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

import json
from collections.abc import Sequence

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
)

from worker.client import BlockingMemoryClient, Context, Turn, open_blocking_memory

_ROLE_OF = {"human": "user", "ai": "assistant", "system": "system"}
_MESSAGE_OF: dict[str, type[BaseMessage]] = {
    "user": HumanMessage,
    "assistant": AIMessage,
    "system": SystemMessage,
}


def role_of(message: BaseMessage) -> str:
    """The worker's role for a LangChain message (a ChatMessage keeps its own role)."""
    if isinstance(message, ChatMessage):
        return message.role
    return _ROLE_OF.get(message.type, message.type)


def message_of(turn: Turn) -> BaseMessage:
    """The LangChain message for a stored turn."""
    kind = _MESSAGE_OF.get(turn["role"])
    if kind is None:
        return ChatMessage(role=turn["role"], content=turn["content"])
    return kind(content=turn["content"])


def _content(message: BaseMessage) -> str:
    content = message.content
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)


class MqttChatMessageHistory(BaseChatMessageHistory):
    """A session's chat history kept by memory-worker (or any `open_memory` URL).

    Args:
        session_id: the conversation id (the contract's rules apply).
        url: where the memory is, as for `open_blocking_memory`.
        client: an open BlockingMemoryClient to share (then `url` is not used and
            `close()` leaves it open); by default the history opens its own.
        max_tokens: `messages` holds the newest turns that fit this many tokens (all: None).
        summary: start `messages` with the conversation's summary as a SystemMessage.
    """

    def __init__(
        self,
        session_id: str,
        url: str = "mqtt://127.0.0.1:1883/mem",
        *,
        client: BlockingMemoryClient | None = None,
        max_tokens: int | None = None,
        summary: bool = True,
    ) -> None:
        self.session_id = session_id
        self.max_tokens = max_tokens
        self.summary = summary
        self._owned = client is None
        self.client = client if client is not None else open_blocking_memory(url)

    def close(self) -> None:
        """Close the connection the history opened for itself."""
        if self._owned:
            self.client.close()
            self._owned = False

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """The summary (as a SystemMessage) and the stored messages that fit, oldest first."""
        if not self.summary:
            return [message_of(t) for t in self.client.get(self.session_id, None, self.max_tokens)]
        return self._messages(self.client.context(self.session_id, self.max_tokens))

    @staticmethod
    def _messages(ctx: Context) -> list[BaseMessage]:
        head: list[BaseMessage] = []
        if ctx.summary is not None:
            head.append(SystemMessage(content=ctx.summary["text"]))
        return head + [message_of(t) for t in ctx.turns]

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append each message as a turn, in order."""
        for message in messages:
            self.client.append(self.session_id, role_of(message), _content(message))

    def clear(self) -> None:
        """Forget the session."""
        self.client.forget(self.session_id)

    async def aget_messages(self) -> list[BaseMessage]:
        """As `messages`, without blocking the caller's loop."""
        memory = self.client.memory
        if not self.summary:
            turns = await self.client.run(memory.get(self.session_id, None, self.max_tokens))
            return [message_of(t) for t in turns]
        return self._messages(
            await self.client.run(memory.context(self.session_id, self.max_tokens))
        )

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append each message as a turn, in order, without blocking the caller's loop."""
        for message in messages:
            memory = self.client.memory
            await self.client.run(
                memory.append(self.session_id, role_of(message), _content(message))
            )

    async def aclear(self) -> None:
        """Forget the session, without blocking the caller's loop."""
        await self.client.run(self.client.memory.forget(self.session_id))
