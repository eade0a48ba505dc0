"""What the client's calls return: typed dicts and small frozen values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict


class Turn(TypedDict):
    role: str
    content: str
    ts: float
    seq: int
    tokens: int


class Summary(TypedDict):
    """A conversation's summary: its text, the newest seq it covers, its tokens."""

    text: str
    upto: int
    tokens: int


class Eviction(TypedDict):
    convo: str
    reason: str
    count: int
    keys: int
    ts: float


class ConversationInfo(TypedDict):
    """One live conversation, as a listing returns it (docs/contract.md, Listing)."""

    convo: str
    turns: int
    keys: int
    last_used: float  # Unix seconds
    expires_at: float | None  # Unix seconds; None without a TTL
    upto: int  # its summary's upto, 0 without one
    tokens: int  # its stored turns' tokens and its summary's


@dataclass(frozen=True, slots=True)
class Appended:
    """An append's reply: the turn's `seq` and how many turns the conversation holds."""

    seq: int
    count: int


@dataclass(frozen=True, slots=True)
class Context:
    """What fits a model: the summary (None without one), the newest turns that fit with it,
    oldest first, and their tokens in all (the summary's included)."""

    summary: Summary | None
    turns: list[Turn]
    tokens: int


@dataclass(frozen=True, slots=True)
class Summarized:
    """A saved summary: the newest seq it covers and how many stored turns it replaced."""

    upto: int
    dropped: int
