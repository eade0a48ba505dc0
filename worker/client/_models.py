"""What the client's calls return: typed dicts and small frozen values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict


class Turn(TypedDict):
    role: str
    content: str
    ts: float
    seq: int


class Eviction(TypedDict):
    convo: str
    reason: str
    count: int
    keys: int
    ts: float


@dataclass(frozen=True, slots=True)
class Appended:
    """An append's reply: the turn's `seq` and how many turns the conversation holds."""

    seq: int
    count: int
