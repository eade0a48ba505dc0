"""A minimal voice-assistant loop: each utterance is stored, the history read back, the
answer stored. Utterances come from the command line (or stdin, one per line).

    .venv/bin/python examples/voice_assistant.py kiosk-7 "hi"

On the broker at MEMORY_URL (default: $MEMORY_WORKER_HOST, _PORT and _PREFIX, as memctl
reads them, or 127.0.0.1, 1883 and mem).
"""

from __future__ import annotations

import asyncio
import os
import sys

from worker.client import MemoryWorkerError, Turn, open_memory

# scripts/run --own-broker prints the MEMORY_WORKER_PORT to export.
DEFAULT_URL = "mqtt://{}:{}/{}".format(  # as memctl reads them
    os.environ.get("MEMORY_WORKER_HOST") or "127.0.0.1",
    os.environ.get("MEMORY_WORKER_PORT") or "1883",
    os.environ.get("MEMORY_WORKER_PREFIX") or "mem",
)


def answer(history: list[Turn]) -> str:
    """Stands in for the LLM: it sees the whole remembered history."""
    said = [t["content"] for t in history if t["role"] == "user"]
    return f"you said {said[-1]!r}; I remember {len(history)} turns"


async def main(convo: str, utterances: list[str]) -> None:
    async with open_memory(os.environ.get("MEMORY_URL", DEFAULT_URL)) as memory:
        for text in utterances:
            await memory.append(convo, "user", text)
            reply = answer(await memory.get(convo))
            await memory.append(convo, "assistant", reply)
            print(reply, flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: examples/voice_assistant.py CONVERSATION [UTTERANCE ...] (or on stdin)")
    lines = sys.argv[2:] or [line.strip() for line in sys.stdin]
    try:
        asyncio.run(main(sys.argv[1], [line for line in lines if line]))
    except MemoryWorkerError as exc:  # no broker, no worker, a refusal: one line, as memctl
        sys.exit(f"voice_assistant: {exc.message}")
