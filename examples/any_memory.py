"""One program, two homes for its memory, chosen by one environment variable:

MEMORY_URL=memory://?max_turns=8 .venv/bin/python examples/any_memory.py      # in this process
MEMORY_URL=mqtt://pi.local/mem    .venv/bin/python examples/any_memory.py      # on the bus
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from worker.client import MemoryWorkerError, open_memory


async def main() -> None:
    async with open_memory(os.environ.get("MEMORY_URL", "memory://?max_turns=8")) as memory:
        await memory.forget("demo")
        await memory.save("demo", "prefs", "units", "metric")
        for text in ("hello", "how warm is it?"):
            await memory.append("demo", "user", text)
        turns = await memory.get("demo")
        print(
            json.dumps(
                {
                    "turns": [t["content"] for t in turns],
                    "units": await memory.load("demo", "prefs", "units"),
                }
            )
        )


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except MemoryWorkerError as exc:  # no broker, no worker, a refusal: one line, as memctl
        sys.exit(f"any_memory: {exc.message}")
