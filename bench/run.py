"""`scripts/bench`: throughput and latency of the worker against echo responders on one
broker, in one run, as ratios; store costs; memory per turn; mass expiry.

Every figure is measured here, now, on this machine; nothing is compared with numbers
taken elsewhere. Results go to stdout as a table and to bench-results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt

from tests.processes import REPO, Mosquitto, RedisClusterServers, RedisServer, redis_server
from worker.protocol import Append, Get, ListConvos, decode_cursor
from worker.store import Limits, Store

BUILD = REPO / "bench" / "build"
NODE_PEER = REPO / "bench" / "node"
NODE = "Node.js (MQTT.js, msgpack, Map)"
CLIENT_THREADS = 8  # the blocking client's threads, and the async client's window beside it
PY = sys.executable


def build_c() -> tuple[Path, Path]:
    BUILD.mkdir(exist_ok=True)
    out = []
    for name in ("loadgen", "echo"):
        src, exe = REPO / "bench" / f"{name}.c", BUILD / name
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            subprocess.run(["gcc", "-O2", "-o", str(exe), str(src), "-lmosquitto"], check=True)
        out.append(exe)
    return out[0], out[1]


def wait_line(proc: subprocess.Popen[str], needle: str, timeout: float = 15) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{proc.args!r} exited before saying {needle!r}")
        if needle in line:
            return
    raise TimeoutError(f"{proc.args!r} did not say {needle!r}")


@contextlib.contextmanager
def responder(cmd: list[str], ready: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
    )
    try:
        wait_line(proc, ready)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def worker_cmd(b: Mosquitto, *extra: str) -> list[str]:
    """A worker with a fresh client id whose session ends with it.

    With the default 24 h session expiry, every stopped worker of the bench left a session
    behind on the bench's broker, subscribed to `mem/#` at QoS 1: Mosquitto queued a copy of
    every later request and event for each (up to max_queued_messages), and its autosave,
    on its one thread, then took 0.3-0.6 s to write them all, stalling every client. That
    was the full bench's worst request during the expiry wave, not the worker.
    """
    return [
        str(Path(PY).parent / "memory-worker"),
        "--port",
        str(b.port),
        "--client-id",
        f"bench-{uuid.uuid4().hex[:8]}",
        "--session-expiry",
        "0",
        "--max-conversations",
        "100000",
        *extra,
    ]


def load(
    loadgen: Path,
    b: Mosquitto,
    qos: int,
    window: int,
    warmup: float,
    seconds: float,
    convos: int,
    *,
    get_pct: int = 50,
    max_tokens: int | None = None,
    last: int | None = None,
) -> dict[str, Any]:
    env = dict(os.environ)
    if max_tokens:
        env["LOADGEN_MAX_TOKENS"] = str(max_tokens)
    if last:
        env["LOADGEN_LAST"] = str(last)
    out = subprocess.run(
        [
            str(loadgen),
            b.host,
            str(b.port),
            "mem",
            str(qos),
            str(window),
            str(warmup),
            str(seconds),
            str(convos),
            str(get_pct),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=warmup + seconds + 30,
        env=env,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def node_missing() -> str | None:
    """Why the Node.js peer (bench/node) cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "node is not installed (Debian: apt-get install nodejs npm)"
    if not (NODE_PEER / "node_modules" / "mqtt").is_dir():
        return "bench/node/node_modules is missing (scripts/bench runs npm ci there)"
    return None


def throughput(
    args: argparse.Namespace, b: Mosquitto, loadgen: Path, echo_c: Path, tmp: Path
) -> dict[str, Any]:
    """Every responder under the same load, rounds in alternating order; each run also
    measures the responder's own CPU time per request it served."""
    responders: dict[str, tuple[list[str], str]] = {
        "worker (memory)": (worker_cmd(b), "serving"),
        "echo, same transport as the worker": (
            [PY, "-m", "bench.echo", b.host, str(b.port), "mem", "direct"],
            "ready",
        ),
        "echo, idiomatic aiomqtt": (
            [PY, "-m", "bench.echo", b.host, str(b.port), "mem", "idiomatic"],
            "ready",
        ),
        "echo, C (libmosquitto)": ([str(echo_c), b.host, str(b.port), "mem"], "ready"),
    }
    missing = node_missing()
    if missing:
        print(f"  {NODE}: skipped, {missing}", file=sys.stderr)
    else:
        responders[NODE] = (
            ["node", str(NODE_PEER / "peer.js"), b.host, str(b.port), "mem"],
            "ready",
        )
    sqlite = f"sqlite:///{tmp}/bench.db"
    responders["worker (sqlite)"] = (worker_cmd(b, "--backend", sqlite), "serving")
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {n: {0: [], 1: []} for n in responders}
    names = list(responders)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            cmd, ready = responders[name]
            if name.startswith("worker"):
                cmd = [*cmd[:4], f"bench-{uuid.uuid4().hex[:8]}", *cmd[5:]]  # a fresh client id
            with responder(cmd, ready) as proc:
                for qos in (0, 1):
                    cpu = proc_cpu_seconds(proc.pid)
                    res = load(
                        loadgen, b, qos, args.window, args.warmup, args.seconds, args.conversations
                    )
                    res["responder_cpu_s"] = proc_cpu_seconds(proc.pid) - cpu
                    res["cpu_us"] = res["responder_cpu_s"] / res["sent"] * 1e6
                    runs[name][qos].append(res)
                    print(
                        f"  round {r + 1} {name:38} qos {qos}: {res['rps']:8.0f} req/s "
                        f"p99 {res['p99_ms']:.2f} ms, {res['cpu_us']:5.1f} µs CPU/request "
                        f"(load generator CPU {res['cpu_s'] / res['wall_s']:.0%})",
                        file=sys.stderr,
                    )
    summary: dict[str, Any] = {}
    for name in names:
        summary[name] = {
            f"qos{q}": {
                k: median_of(runs[name][q], k)
                for k in ("rps", "p50_ms", "p99_ms", "p999_ms", "cpu_s", "wall_s", "cpu_us")
            }
            for q in (0, 1)
        }
    return {"runs": runs, "median": summary, "skipped": {NODE: missing} if missing else {}}


def latency_window_1(args: argparse.Namespace, b: Mosquitto, loadgen: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cmds = {
        "worker (memory)": (worker_cmd(b), "serving"),
        "echo, same transport as the worker": (
            [PY, "-m", "bench.echo", b.host, str(b.port), "mem", "direct"],
            "ready",
        ),
    }
    for name, (cmd, ready) in cmds.items():
        with responder(cmd, ready):
            res = [
                load(loadgen, b, 1, 1, args.warmup, args.seconds, args.conversations)
                for _ in range(args.rounds)
            ]
        out[name] = {k: median_of(res, k) for k in ("rps", "p50_ms", "p99_ms", "p999_ms")}
    return out


async def _client_appends(
    b: Mosquitto, window: int, warmup: float, seconds: float
) -> tuple[float, float, float, int]:
    """`window` tasks appending through one MemoryClient: (req/s, p50 ms) after a warm-up,
    this process's CPU per append (us, warm-up included: a figure that other load on the
    machine disturbs less than the timings), and how many appends that was."""
    from worker.client import MemoryClient

    lat: list[float] = []
    sent = 0
    cpu = time.process_time()
    async with MemoryClient(b.host, b.port, "mem", timeout=30) as m:
        start = time.monotonic() + warmup
        end = start + seconds

        async def lane(i: int) -> None:
            nonlocal sent
            n = 0
            while (now := time.monotonic()) < end:
                t0 = time.perf_counter()
                await m.append(f"client-{i}-{n % 8}", "user", "x" * 120)
                if now >= start:
                    lat.append((time.perf_counter() - t0) * 1000)
                n += 1
            sent += n

        await asyncio.gather(*(lane(i) for i in range(window)))
    cpu_us = (time.process_time() - cpu) / sent * 1e6
    return len(lat) / seconds, statistics.median(lat), cpu_us, sent


def _blocking_appends(b: Mosquitto, threads: int, warmup: float, seconds: float) -> float:
    """`threads` threads appending through one BlockingMemoryClient: req/s after a warm-up."""
    from worker.client import BlockingMemoryClient

    done = [0] * threads
    with BlockingMemoryClient(b.host, b.port, "mem", timeout=30) as m:
        start = time.monotonic() + warmup
        end = start + seconds

        def lane(i: int) -> None:
            n = 0
            while (now := time.monotonic()) < end:
                m.append(f"blocking-{i}-{n % 8}", "user", "x" * 120)
                if now >= start:
                    done[i] += 1
                n += 1

        lanes = [threading.Thread(target=lane, args=(i,)) for i in range(threads)]
        for t in lanes:
            t.start()
        for t in lanes:
            t.join()
    return sum(done) / seconds


def client_costs(args: argparse.Namespace, b: Mosquitto, loadgen: Path) -> dict[str, Any]:
    """The Python client against the C load generator on the same worker, appends only:
    round trip at window 1, throughput at windows 8 and 64, the worker's CPU per request
    while it serves the client, and the blocking client from 8 threads (at window 8). They
    take turns, round by round, so that other load on the machine falls on all alike."""
    out: dict[str, Any] = {}
    with responder(worker_cmd(b), "serving") as worker:
        for window in (1, 8, 64):
            raw, ours, worker_us, blocking = [], [], [], []
            for _ in range(args.rounds):
                raw.append(load(loadgen, b, 1, window, args.warmup, args.seconds, 100, get_pct=0))
                cpu = proc_cpu_seconds(worker.pid)
                ours.append(asyncio.run(_client_appends(b, window, args.warmup, args.seconds)))
                worker_us.append((proc_cpu_seconds(worker.pid) - cpu) / ours[-1][3] * 1e6)
                if window == CLIENT_THREADS:
                    blocking.append(_blocking_appends(b, window, args.warmup, args.seconds))
            out[str(window)] = {
                "raw_rps": median_of(raw, "rps"),
                "raw_p50_ms": median_of(raw, "p50_ms"),
                "client_rps": float(statistics.median(r[0] for r in ours)),
                "client_p50_ms": float(statistics.median(r[1] for r in ours)),
                "client_cpu_us": float(statistics.median(r[2] for r in ours)),
                "worker_cpu_us": float(statistics.median(worker_us)),
            }
            if blocking:
                out[str(window)]["blocking_rps"] = float(statistics.median(blocking))
    return out


def _client_lines(result: dict[str, Any]) -> list[str]:
    c = result.get("client")
    if not c:
        return []
    one, many = c["1"], c["64"]
    lines = [
        f"Python client, QoS 1 append round trip at window 1: p50 {one['client_p50_ms']:.3f} ms "
        f"vs raw MQTT {one['raw_p50_ms']:.3f} ms ({one['client_p50_ms'] / one['raw_p50_ms']:.2f}x;"
        f" client CPU {one['client_cpu_us']:.0f} us per append; target within 1.5x)",
        f"Python client, 64 concurrent appends through one client: {many['client_rps']:,.0f} "
        f"req/s vs load generator at window 64 {many['raw_rps']:,.0f} req/s "
        f"({many['client_rps'] / many['raw_rps']:.0%}; target at least 50%)",
    ]
    if "worker_cpu_us" in many:
        lines.append(
            f"Python client CPU per append at window 64: {many['client_cpu_us']:.1f} us vs the "
            f"worker's {many['worker_cpu_us']:.1f} us per request it serves "
            f"({many['client_cpu_us'] / many['worker_cpu_us']:.2f}x; target at most 2x)"
        )
    threads = c.get(str(CLIENT_THREADS), {})
    if "blocking_rps" in threads:
        lines.append(
            f"Blocking client from {CLIENT_THREADS} threads: {threads['blocking_rps']:,.0f} req/s "
            f"vs the async client at window 64 {many['client_rps']:,.0f} req/s "
            f"({threads['blocking_rps'] / many['client_rps']:.0%}; target at least 50%), at "
            f"window {CLIENT_THREADS} {threads['client_rps']:,.0f} req/s "
            f"({threads['blocking_rps'] / threads['client_rps']:.0%})"
        )
    return lines


def store_costs() -> dict[str, Any]:
    """Append and get cost at 500, 10,000 and 100,000 conversations, with LRU evictions."""
    content = "x" * 120
    out: dict[str, Any] = {}
    for n in (500, 10_000, 100_000):
        # A budget that never binds: this measures LRU by count alone.
        s = Store(Limits(max_conversations=n, max_turns=8, max_bytes=1 << 40))
        for i in range(n):
            s.append(Append(f"conversation-{i}", "user", content))
        k = 100_000
        appends = [Append(f"new-{i}", "user", content) for i in range(k)]
        gets = [Get(f"new-{k - 1 - (i % 400)}") for i in range(k)]
        evicted = 0
        t0 = time.perf_counter()
        for at in range(0, k, 64):  # batches, drained of their evictions as the service does
            for a in appends[at : at + 64]:
                s.append(a)
            evicted += len(s.take_events())
        t1 = time.perf_counter()
        for g in gets:
            s.get(g)
        t2 = time.perf_counter()
        assert evicted == k  # every append evicted one
        out[str(n)] = {"append_us": (t1 - t0) / k * 1e6, "get_us": (t2 - t1) / k * 1e6}
    return out


def listing_pages(
    sizes: tuple[int, ...] = (1_000, 1_000_000), pages: int = 2_000
) -> dict[str, Any]:
    """The pure store's cost of one listing page of 100 at 1,000 and at 1,000,000
    conversations (pages from random places, the cursor being an id; the median, and the mean,
    which takes in the garbage collector's passes over a bigger heap), and of a full listing."""
    import random

    out: dict[str, Any] = {}
    rng = random.Random(22)
    for n in sizes:
        s = Store(Limits(max_conversations=n, max_turns=8, max_bytes=1 << 40, ttl=0))
        for i in range(n):
            s.append(Append(f"conversation-{i}", "user", "x"))
        took = []
        for _ in range(pages):
            request = ListConvos(100, f"conversation-{rng.randrange(n)}")
            t0 = time.perf_counter()
            s.list_convos(request)
            took.append(time.perf_counter() - t0)
        t0, after, listed = time.perf_counter(), "", 0
        while True:
            fields = s.list_convos(ListConvos(1000, after)).fields
            listed += len(fields["conversations"])
            if fields["cursor"] is None:
                break
            after = decode_cursor(fields["cursor"])
        assert listed == n
        out[str(n)] = {
            "page_us": statistics.median(took) * 1e6,
            "page_mean_us": statistics.fmean(took) * 1e6,
            "full_listing_s": time.perf_counter() - t0,
        }
        del s
        gc.collect()
    return out


async def _list_everything(port: int, page: int, stop: asyncio.Event) -> tuple[int, float]:
    """Page through every conversation of the worker until done or `stop`: (listed, seconds)."""
    from worker.client import MemoryClient

    listed, t0 = 0, time.monotonic()
    async with MemoryClient("127.0.0.1", port, "mem", timeout=30) as m:
        async for _ in m.conversations(page_size=page):
            listed += 1
            if stop.is_set():
                break
    return listed, time.monotonic() - t0


def listing_load(args: argparse.Namespace, b: Mosquitto, loadgen: Path) -> dict[str, Any]:
    """A worker holding N conversations: a device's QoS 1 round trips (window 1) alone, then
    while a client pages through all of them (pages of 100), on the same worker."""
    n = args.list_conversations
    cmd = worker_cmd(b, "--ttl", "0", "--max-bytes", str(2**32))
    cmd[cmd.index("--max-conversations") + 1] = str(2 * n)
    with responder(cmd, "serving") as proc:
        t0 = time.monotonic()
        fill(b, "one-turn", n)
        filled_s = time.monotonic() - t0
        rss = proc_rss(proc.pid)
        seconds = args.list_probe_seconds
        alone = load(loadgen, b, 1, 1, 0.5, seconds, 50)

        async def during() -> tuple[dict[str, Any], int, float]:
            stop = asyncio.Event()
            lister = asyncio.create_task(_list_everything(b.port, 100, stop))
            probe = await asyncio.to_thread(load, loadgen, b, 1, 1, 0.5, seconds, 50)
            running = not lister.done()
            stop.set()
            listed, took = await lister
            assert running, "the listing ended before the probe: raise --list-conversations"
            return probe, listed, took

        probed, listed, took = asyncio.run(during())
    return {
        "conversations": n,
        "fill_seconds": filled_s,
        "worker_rss": rss,
        "alone": {k: alone[k] for k in ("p50_ms", "p99_ms", "max_ms", "replies")},
        "listing": {k: probed[k] for k in ("p50_ms", "p99_ms", "max_ms", "replies")},
        "listed_during_probe": listed,
        "listed_per_s": listed / took,
    }


def _listing_lines(result: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    pages = result.get("listing_pages")
    if pages:
        small, big = pages["1000"], pages["1000000"]
        lines += [
            f"listing, store alone: a page of 100 at 1,000 conversations {small['page_us']:.1f} "
            f"µs, at 1,000,000 {big['page_us']:.1f} µs ({big['page_us'] / small['page_us']:.2f}x;"
            f" target within 2x; medians; means {small['page_mean_us']:.1f} and "
            f"{big['page_mean_us']:.1f} µs); a full listing of 1,000,000 in pages of 1,000: "
            f"{big['full_listing_s']:.1f} s"
        ]
    ll = result.get("listing_load")
    if ll:
        a, w = ll["alone"], ll["listing"]
        lines += [
            f"listing through the worker at {ll['conversations']:,} conversations: a device's "
            f"QoS 1 p99 {a['p99_ms']:.2f} ms alone, {w['p99_ms']:.2f} ms while a client pages "
            f"through all of them ({w['p99_ms'] / a['p99_ms']:.2f}x; target within 2x; p50 "
            f"{a['p50_ms']:.2f} -> {w['p50_ms']:.2f} ms, max {a['max_ms']:.2f} -> "
            f"{w['max_ms']:.2f} ms); {ll['listed_per_s']:,.0f} conversations listed per second"
        ]
    return lines


def memory_per_turn() -> dict[str, Any]:
    n, turns = 20_000, 8
    gc.collect()
    tracemalloc.start()
    s = Store(Limits(max_conversations=n, max_turns=turns))
    before = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        for _ in range(turns):
            s.append(Append(f"conversation-{i}", "user", "x" * 120))
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return {
        "conversations": n,
        "turns": n * turns,
        "turn_bytes": 4 + 120,
        "bytes_per_turn": used / (n * turns),
    }


async def _count_events(b: Mosquitto, total: int, started: asyncio.Event) -> tuple[float, float]:
    async with aiomqtt.Client(b.host, b.port) as client:
        await client.subscribe("mem/+/evicted", qos=0)
        started.set()
        first = last = 0.0
        seen = 0
        async for _ in client.messages:
            seen += 1
            last = time.monotonic()
            if seen == 1:
                first = last
            if seen >= total:
                return first, last
    return first, last


async def broker_backlog(b: Mosquitto) -> dict[str, int | None]:
    """Sessions of disconnected clients the broker keeps, and the messages it stores (its
    retained $SYS figures): what its autosave has to write. A figure not seen within 12 s
    is None (Mosquitto 2.0 republishes some only when they change, and they can expire)."""
    topics = {
        "$SYS/broker/clients/disconnected": "stopped_sessions",
        "$SYS/broker/store/messages/count": "stored_messages",
    }
    out: dict[str, int | None] = dict.fromkeys(topics.values())
    async with aiomqtt.Client(b.host, b.port) as client:
        for topic in topics:
            await client.subscribe(topic)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(12):  # $SYS is published every 10 s
                async for message in client.messages:
                    if isinstance(message.payload, bytes):
                        out[topics[str(message.topic)]] = int(message.payload)
                    if None not in out.values():
                        break
    return out


def mass_expiry(args: argparse.Namespace, b: Mosquitto, loadgen: Path) -> dict[str, Any]:
    """Fill N conversations as fast as the worker takes them, with a TTL just past the fill:
    they then expire as a wave as fast as they were made, while a device probes latency."""
    backlog = asyncio.run(broker_backlog(b))
    n = args.expire_conversations
    fill_seconds = n / 5_000
    ttl = fill_seconds + 1
    # A budget that never binds: every conversation leaves by TTL, none for memory.
    with responder(worker_cmd(b, "--ttl", str(ttl), "--max-bytes", str(2**30)), "serving"):

        async def run() -> dict[str, Any]:
            started = asyncio.Event()
            counter = asyncio.create_task(_count_events(b, n, started))
            await started.wait()
            res = await asyncio.to_thread(load, loadgen, b, 0, 256, 0, fill_seconds, n, get_pct=0)
            filled = min(res["replies"], n)
            probe = asyncio.to_thread(load, loadgen, b, 1, 1, 0, fill_seconds + 3, 50)
            probed = await probe
            counter.cancel()
            return {
                "conversations": filled,
                "wave_seconds": fill_seconds,
                "probe_p50_ms": probed["p50_ms"],
                "probe_p99_ms": probed["p99_ms"],
                "probe_max_ms": probed["max_ms"],
                "probe_requests": probed["replies"],
                "broker_before": backlog,
            }

        return asyncio.run(run())


def expiry_at_once(n: int = 100_000) -> dict[str, Any]:
    """The pure store expiring N conversations that all fell due at the same moment: total
    time, and the longest single sweep step (the longest any request can wait for one)."""
    now = [0.0]
    s = Store(Limits(max_conversations=n, ttl=10, max_bytes=1 << 40), clock=lambda: now[0])
    for i in range(n):
        s.append(Append(f"conversation-{i}", "user", "x" * 120))
    now[0] = 100.0
    steps = []
    t0 = time.perf_counter()
    more = True
    while more:
        t = time.perf_counter()
        more = s.expire()
        s.take_events()
        steps.append(time.perf_counter() - t)
    return {
        "conversations": n,
        "seconds": time.perf_counter() - t0,
        "longest_step_ms": max(steps) * 1000,
        "steps": len(steps),
    }


def scale_out(args: argparse.Namespace, b: Mosquitto, loadgen: Path, tmp: Path) -> dict[str, Any]:
    """Throughput of 1, 2 and 3 workers in one share group on one Redis."""
    if redis_server() is None:
        return {"skipped": "redis-server is not installed"}
    (tmp / "redis").mkdir()
    server = RedisServer(tmp / "redis").start()
    out: dict[str, Any] = {}
    try:
        for n in (1, 2, 3):
            group = f"g{uuid.uuid4().hex[:6]}"
            cmds = [
                worker_cmd(b, "--backend", server.url, "--shared-group", group) for _ in range(n)
            ]
            with contextlib.ExitStack() as stack:
                for cmd in cmds:
                    stack.enter_context(responder(cmd, "serving"))
                runs = {
                    q: [
                        load(
                            loadgen,
                            b,
                            q,
                            args.window,
                            args.warmup,
                            args.seconds,
                            args.conversations,
                        )
                        for _ in range(max(1, args.rounds - 2))
                    ]
                    for q in (0, 1)
                }
            out[str(n)] = {
                f"qos{q}": {k: median_of(r, k) for k in ("rps", "p50_ms", "p99_ms")}
                for q, r in runs.items()
            }
            print(
                f"  {n} worker(s) on redis: {out[str(n)]['qos0']['rps']:.0f} / "
                f"{out[str(n)]['qos1']['rps']:.0f} req/s",
                file=sys.stderr,
            )
    finally:
        server.stop()
    return out


def cluster_vs_redis(
    args: argparse.Namespace, b: Mosquitto, loadgen: Path, tmp: Path
) -> dict[str, Any]:
    """One worker on one Redis vs on a three-master Redis Cluster (16 shards): QoS 1."""
    if redis_server() is None:
        return {"skipped": "redis-server is not installed"}
    (tmp / "cluster-single").mkdir()
    single = RedisServer(tmp / "cluster-single").start()
    cluster = RedisClusterServers(tmp / "cluster").start()
    out: dict[str, Any] = {}
    try:
        for name, url in (("redis", single.url), ("cluster", cluster.url)):
            with responder(worker_cmd(b, "--backend", url), "serving"):
                runs = [
                    load(loadgen, b, 1, args.window, args.warmup, args.seconds, args.conversations)
                    for _ in range(args.rounds)
                ]
            out[name] = {k: median_of(runs, k) for k in ("rps", "p50_ms", "p99_ms")}
            print(
                f"  1 worker on {name}: {out[name]['rps']:.0f} req/s at QoS 1, "
                f"p99 {out[name]['p99_ms']:.2f} ms",
                file=sys.stderr,
            )
    finally:
        single.stop()
        cluster.stop()
    return out


# --- frugality: memory against the budget, idle cost, eviction cost (issue 11) -----------

SHAPES = ("one-turn", "full", "interleaved", "keys", "long-ids", "request-ids")


def proc_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def proc_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_cpu_and_wakeups(pid: int) -> tuple[float, int]:
    """(CPU seconds, voluntary context switches of all its threads) of a process."""
    cpu = proc_cpu_seconds(pid)
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    switches += int(line.split()[1])
    return cpu, switches


def _shape_request(shape: str, i: int) -> tuple[str, dict[str, Any]]:
    """The i-th request of a fill: (topic after the prefix, payload)."""
    content = "x" * 120
    if shape == "one-turn":
        return f"c{i}/append", {"role": "user", "content": content}
    if shape == "full":
        return f"c{i // 8}/append", {"role": "user", "content": content}
    if shape == "interleaved":  # a fleet: 20,000 conversations in turn, one turn each
        return f"c{i % 20_000}/append", {"role": "user", "content": content}
    if shape == "long-ids":
        return f"c{i:08d}{'y' * 119}/append", {"role": "user", "content": content}
    if shape == "request-ids":  # 64 appends a conversation, each with a 64-byte id
        return f"c{i // 64}/append", {"role": "user", "content": "x", "id": f"{i:064d}"}
    return f"c{i // 100}/state/save", {"ns": "n", "key": f"key{i % 100}", "value": "v" * 100}


def fill(b: Mosquitto, shape: str, n: int, window: int = 256) -> None:
    """Publish n requests of one shape at QoS 0, at most `window` unanswered at a time."""
    import threading

    import msgpack
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    reply = f"bench/fill/{uuid.uuid4().hex[:8]}"
    answered = threading.Semaphore(0)
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    client.on_message = lambda *_: answered.release()
    client.connect(b.host, b.port)
    client.subscribe(reply, 0)
    client.loop_start()
    try:
        time.sleep(0.2)  # the subscription is in place before the first reply
        for i in range(n):
            if i >= window and not answered.acquire(timeout=10):
                raise TimeoutError(f"the worker stopped answering the {shape} fill at {i}")
            topic, body = _shape_request(shape, i)
            client.publish(f"mem/{topic}", msgpack.packb({**body, "reply_to": reply}), 0)
        for _ in range(min(n, window)):
            answered.acquire(timeout=10)
    finally:
        client.loop_stop()
        client.disconnect()


def memory_budget(args: argparse.Namespace, b: Mosquitto) -> dict[str, Any]:
    """Resident memory growth of a worker filled far past --max-bytes with each data shape,
    against the budget (the worker's own process, RSS from /proc)."""
    budget = args.budget_bytes
    out: dict[str, Any] = {"budget": budget}
    per_request = {
        "one-turn": 630,
        "full": 290,
        "interleaved": 290,
        "keys": 200,
        "long-ids": 750,
        "request-ids": 500,
    }
    for shape in SHAPES:
        cmd = worker_cmd(b, "--max-bytes", str(budget), "--ttl", "0")
        cmd[cmd.index("--max-conversations") + 1] = "10000000"
        with responder(cmd, "serving") as proc:
            time.sleep(1)
            idle = proc_rss(proc.pid)
            n = int(args.budget_fill * budget / per_request[shape])
            fill(b, shape, n)
            time.sleep(0.5)
            grown = proc_rss(proc.pid) - idle
        out[shape] = {"requests": n, "idle_rss": idle, "growth": grown, "ratio": grown / budget}
        print(f"  {shape}: RSS grew {grown / budget:.2f}x the budget", file=sys.stderr)
    # 20,000 conversations of 8 turns, filled one conversation after the other ("full") and
    # as a fleet speaks, the conversations in turn, one turn each ("interleaved")
    for shape, key in (("full", ""), ("interleaved", "_interleaved")):
        cmd = worker_cmd(b, "--ttl", "0", "--max-bytes", str(2**30))
        cmd[cmd.index("--max-conversations") + 1] = "20000"
        with responder(cmd, "serving") as proc:
            time.sleep(1)
            idle = proc_rss(proc.pid)
            fill(b, shape, 160_000)
            time.sleep(0.5)
            out[f"worker_bytes_per_turn{key}"] = (proc_rss(proc.pid) - idle) / 160_000
    return out


def store_rss_child(shape: str, n: int) -> None:
    """In a fresh process: RSS bytes per item of one shape in the memory store (prints JSON)."""
    from worker.protocol import StateSave

    s = Store(Limits(max_conversations=10**8, max_bytes=10**12, max_keys=10**6))
    gc.collect()
    before = proc_rss(os.getpid())
    for i in range(n):
        topic, body = _shape_request(shape, i)
        name = topic.split("/", 1)[0]
        if shape == "keys":
            s.state_save(StateSave(name, body["ns"], body["key"], msgpack_packb(body["value"])))
        else:
            s.append(Append(name, body["role"], body["content"]))
    gc.collect()
    grown = proc_rss(os.getpid()) - before
    print(json.dumps({"per_item": grown / n, "accounted_per_item": s.bytes / n}))


def msgpack_packb(value: Any) -> bytes:
    import msgpack

    return bytes(msgpack.packb(value))


def store_rss() -> dict[str, Any]:
    """Store RSS per item of each shape, each in its own process (the costs in constants.py
    come from these figures); per turn for full conversations (20,000 x 8 turns)."""
    out: dict[str, Any] = {}
    for shape, n in (
        ("one-turn", 200_000),
        ("full", 160_000),
        ("interleaved", 160_000),
        ("keys", 200_000),
    ):
        code = f"from bench.run import store_rss_child; store_rss_child({shape!r}, {n})"
        res = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
        out[shape] = json.loads(res.stdout)
    code = "from bench.run import store_rss_child; store_rss_child('long-ids', 200000)"
    res = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    out["long-ids"] = json.loads(res.stdout)
    return out


def idle_cost(args: argparse.Namespace, b: Mosquitto) -> dict[str, Any]:
    """CPU and wake-ups (voluntary context switches) of a worker with default flags and no
    traffic, over --idle-seconds."""
    cmd = [str(Path(PY).parent / "memory-worker"), "--port", str(b.port), "--client-id"]
    with responder([*cmd, f"bench-{uuid.uuid4().hex[:8]}"], "serving") as proc:
        time.sleep(2)
        cpu0, sw0 = proc_cpu_and_wakeups(proc.pid)
        t0 = time.monotonic()
        time.sleep(args.idle_seconds)
        cpu1, sw1 = proc_cpu_and_wakeups(proc.pid)
        wall = time.monotonic() - t0
    return {
        "seconds": wall,
        "cpu_pct": (cpu1 - cpu0) / wall * 100,
        "wakeups_per_s": (sw1 - sw0) / wall,
    }


def eviction_cost(args: argparse.Namespace, b: Mosquitto, loadgen: Path) -> dict[str, Any]:
    """QoS 1 appends (window 64) to conversations within --max-conversations against appends
    to ever new ones far past it (each evicts one, with its QoS 1 event): time per request."""
    cmd = worker_cmd(b, "--ttl", "0")
    cmd[cmd.index("--max-conversations") + 1] = "1000"
    runs: dict[str, list[float]] = {"within": [], "evicting": []}
    with responder(cmd, "serving"):
        for _ in range(args.rounds):
            for name, convos in (("within", 500), ("evicting", 100_000_000)):
                res = load(loadgen, b, 1, 64, args.warmup, args.seconds, convos, get_pct=0)
                runs[name].append(res["rps"])
    within, evicting = (statistics.median(runs[k]) for k in ("within", "evicting"))
    return {"within_rps": within, "evicting_rps": evicting, "ratio": within / evicting}


def _cpu_per_request(
    loadgen: Path, b: Mosquitto, proc: subprocess.Popen[str], args: argparse.Namespace, **kw: Any
) -> float:
    """The responder's CPU µs per request of one QoS 1, window 64 run."""
    cpu = proc_cpu_seconds(proc.pid)
    res = load(loadgen, b, 1, 64, args.warmup, args.seconds, 100, **kw)
    return float((proc_cpu_seconds(proc.pid) - cpu) / res["sent"] * 1e6)


def context_costs(args: argparse.Namespace, b: Mosquitto, loadgen: Path) -> dict[str, Any]:
    """Issue 21's costs, as the worker's CPU per request in the same run: appends past the
    window with --trimmed-events against without (a trimmed event per append, nobody
    subscribed); gets of the same 8 turns with and without a max_tokens they all fit; and
    a max_tokens that keeps 4 of the 8 (each turn 30 tokens, estimated) against last=4."""
    runs: dict[str, list[float]] = {
        k: [] for k in ("append", "append_trimmed", "get", "get_budget", "get4", "get4_budget")
    }
    gets = {
        "get": {},
        "get_budget": {"max_tokens": 100_000},
        "get4": {"last": 4},
        "get4_budget": {"max_tokens": 120},
    }
    for r in range(args.rounds):
        order = [False, True] if r % 2 == 0 else [True, False]
        for trimmed in order:
            cmd = worker_cmd(b, *(["--trimmed-events"] if trimmed else []))
            with responder(cmd, "serving") as proc:
                cost = _cpu_per_request(loadgen, b, proc, args, get_pct=0)
                runs["append_trimmed" if trimmed else "append"].append(cost)
                if trimmed:
                    continue
                for name in list(gets) if r % 2 == 0 else list(gets)[::-1]:
                    cost = _cpu_per_request(loadgen, b, proc, args, get_pct=100, **gets[name])
                    runs[name].append(cost)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "runs": runs,
        "median_us": med,
        "trimmed_ratio": med["append_trimmed"] / med["append"],
        "budget_ratio": med["get_budget"] / med["get"],
        "cut_ratio": med["get4_budget"] / med["get4"],
    }


def _context_lines(result: dict[str, Any]) -> list[str]:
    if "context" not in result:
        return []
    c = result["context"]
    m = c["median_us"]
    return [
        "",
        "| context for the model (worker CPU per QoS 1 request, window 64) | µs | ratio | target |",
        "|---|---|---|---|",
        f"| append past the window | {m['append']:.1f} | | |",
        f"| the same with --trimmed-events | {m['append_trimmed']:.1f} | "
        f"{c['trimmed_ratio']:.2f}x | <= 1.3x |",
        f"| get of 8 turns | {m['get']:.1f} | | |",
        f"| the same with max_tokens (all fit) | {m['get_budget']:.1f} | "
        f"{c['budget_ratio']:.2f}x | <= 1.1x |",
        f"| get last=4 | {m['get4']:.1f} | | |",
        f"| max_tokens that keeps the same 4 | {m['get4_budget']:.1f} | "
        f"{c['cut_ratio']:.2f}x | <= 1.1x |",
    ]


def frugal_table(result: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if "memory_budget" in result:
        m = result["memory_budget"]
        lines += [
            "",
            f"resident memory growth filled far past --max-bytes {m['budget']:,} "
            "(worker process, /proc VmRSS):",
            "| data shape | requests | RSS growth | vs budget |",
            "|---|---|---|---|",
        ]
        for shape in SHAPES:
            if (v := m.get(shape)) is None:  # a result of before the shape
                continue
            lines.append(
                f"| {shape} | {v['requests']:,} | {v['growth'] / 2**20:.1f} MiB | "
                f"{v['ratio']:.2f}x |"
            )
        lines.append(
            f"worker RSS per stored 120-byte turn: {m['worker_bytes_per_turn']:.0f} bytes "
            "filled one conversation after the other, "
            f"{m.get('worker_bytes_per_turn_interleaved', float('nan')):.0f} bytes filled "
            "interleaved (20,000 conversations x 8 turns, no eviction)"
        )
    if "store_rss" in result:
        r = result["store_rss"]
        lines += [
            "store RSS per item, fresh process (RSS / counted by the budget): "
            + ", ".join(
                f"{k} {v['per_item']:.0f} / {v['accounted_per_item']:.0f} B" for k, v in r.items()
            ),
            f"memory per stored 120-byte turn: {r['full']['per_item']:.0f} bytes "
            "(RSS delta, 20,000 conversations x 8 turns)"
            + (
                f", {r['interleaved']['per_item']:.0f} bytes filled interleaved"
                if "interleaved" in r
                else ""
            ),
        ]
    if "idle" in result:
        i = result["idle"]
        lines.append(
            f"idle worker, default flags, {i['seconds']:.0f} s: {i['cpu_pct']:.3f}% of a core, "
            f"{i['wakeups_per_s']:.2f} wake-ups/s"
        )
    if "eviction_cost" in result:
        e = result["eviction_cost"]
        lines.append(
            f"eviction cost: appends within --max-conversations {e['within_rps']:,.0f} req/s, "
            f"each evicting one {e['evicting_rps']:,.0f} req/s: {e['ratio']:.2f}x per request"
        )
    return lines


def machine() -> dict[str, Any]:
    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False).stdout
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "system": platform.platform(),
        "mosquitto": mosq.splitlines()[0] if mosq else "?",
    }


def _cpu_us(m: dict[str, Any], qos: int) -> str:
    us = m[f"qos{qos}"].get("cpu_us")  # absent from results older than issue 16
    return "?" if us is None else f"{us:.1f}"


def _ratio(a: dict[str, Any], b: dict[str, Any], qos: int, key: str) -> str:
    x, y = a[f"qos{qos}"].get(key), b[f"qos{qos}"].get(key)
    return "?" if x is None or y is None else f"{x / y:.2f}x"


def _target_lines(tp: dict[str, Any]) -> list[str]:
    """Issue 16's targets, as measured in this run."""
    med = tp["median"]
    mem, c = med["worker (memory)"], med["echo, C (libmosquitto)"]
    node = med.get(NODE)
    if node is None:
        why = tp.get("skipped", {}).get(NODE, "not in these results")
        cpu = f"not measured, the Node.js peer was skipped: {why}"
    else:
        cpu = (
            f"{_ratio(mem, node, 0, 'cpu_us')} at QoS 0, {_ratio(mem, node, 1, 'cpu_us')} at "
            "QoS 1 (target at most 1.0x)"
        )
    return [
        f"worker (memory) CPU per request vs Node.js: {cpu}",
        f"worker (memory) throughput vs the C echo: {_ratio(mem, c, 0, 'rps')} at QoS 0, "
        f"{_ratio(mem, c, 1, 'rps')} at QoS 1 (target at least 0.8x)",
    ]


def throughput_table(result: dict[str, Any]) -> list[str]:
    """Every responder's req/s and CPU µs per request, and the targets as ratios."""
    if "throughput" not in result:
        return []
    tp = result["throughput"]
    med = tp["median"]
    floor = med["echo, same transport as the worker"]
    lines = [
        f"closed loop, window {result['args']['window']}, half append / half get, "
        f"120-byte contents, {result['args']['conversations']} conversations, "
        f"median of {result['args']['rounds']} rounds; CPU µs/request is the responder "
        "process's user+system time (/proc) over the requests it served",
        "",
        "| responder | QoS 0 req/s | QoS 0 CPU µs/request | QoS 1 req/s "
        "| QoS 1 CPU µs/request | QoS 1 p50 / p99 / p99.9 ms "
        "| vs same-transport echo (QoS 0 / 1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in med.items():
        r0 = m["qos0"]["rps"] / floor["qos0"]["rps"]
        r1 = m["qos1"]["rps"] / floor["qos1"]["rps"]
        lines.append(
            f"| {name} | {m['qos0']['rps']:,.0f} | {_cpu_us(m, 0)} | {m['qos1']['rps']:,.0f} | "
            f"{_cpu_us(m, 1)} | {m['qos1']['p50_ms']:.2f} / {m['qos1']['p99_ms']:.2f} / "
            f"{m['qos1']['p999_ms']:.2f} | {r0:.0%} / {r1:.0%} |"
        )
    for name, why in tp.get("skipped", {}).items():
        lines.append(f"{name}: skipped, {why}")
    return [*lines, "", *_target_lines(tp)]


def table(result: dict[str, Any]) -> str:
    med = result["throughput"]["median"]
    lines = [
        f"machine: {result['machine']['system']}, {result['machine']['cpus']} CPUs, "
        f"Python {result['machine']['python']}, {result['machine']['mosquitto']}",
        *throughput_table(result),
    ]
    lat = result["latency_window_1"]
    lines += [
        "",
        "QoS 1 round trip at window 1 (ms): "
        + "; ".join(
            f"{name}: p50 {v['p50_ms']:.3f}, p99 {v['p99_ms']:.3f}" for name, v in lat.items()
        ),
    ]
    lines += _client_lines(result)
    lines += _context_lines(result)
    costs = result["store"]
    base = costs["500"]
    lines += [
        "",
        "| conversations | append µs | get µs | append vs 500 | get vs 500 |",
        "|---|---|---|---|---|",
    ]
    for n, v in costs.items():
        lines.append(
            f"| {int(n):,} | {v['append_us']:.2f} | {v['get_us']:.2f} | "
            f"{v['append_us'] / base['append_us']:.2f}x | "
            f"{v['get_us'] / base['get_us']:.2f}x |"
        )
    mem = result["memory"]
    lines += [
        "",
        f"memory per stored 120-byte turn: {mem['bytes_per_turn']:.0f} bytes "
        f"(tracemalloc, {mem['conversations']:,} conversations x 8 turns)",
    ]
    scale = result.get("scale_out", {})
    if "1" in scale:
        lines += [
            "",
            "| workers on one Redis (share group) | QoS 0 req/s | QoS 1 req/s | QoS 1 p99 ms |",
            "|---|---|---|---|",
        ]
        for n, v in scale.items():
            lines.append(
                f"| {n} | {v['qos0']['rps']:,.0f} | {v['qos1']['rps']:,.0f} | "
                f"{v['qos1']['p99_ms']:.2f} |"
            )
    once = result["expiry_at_once"]
    lines += [
        f"expiring {once['conversations']:,} conversations due at once (store alone): "
        f"{once['seconds']:.2f} s in {once['steps']} sweep steps, the longest "
        f"{once['longest_step_ms']:.1f} ms"
    ]
    if "expiry" in result:
        e = result["expiry"]
        lines += [
            f"expiry wave through the worker: {e['conversations']:,} conversations expiring "
            f"over {e['wave_seconds']:.0f} s; a device's QoS 1 requests meanwhile: p50 "
            f"{e['probe_p50_ms']:.2f} ms, p99 {e['probe_p99_ms']:.2f} ms, max "
            f"{e['probe_max_ms']:.2f} ms ({e['probe_requests']} requests)"
        ]
        before = e.get("broker_before")
        if before:
            known = {k: "?" if v is None else f"{v:,}" for k, v in before.items()}
            lines.append(
                f"  the broker before the wave: {known['stopped_sessions']} sessions of stopped "
                f"clients, {known['stored_messages']} stored messages"
            )
    cl = result.get("cluster", {})
    if "cluster" in cl:
        lines += [
            f"1 worker, QoS 1: one Redis {cl['redis']['rps']:.0f} req/s (p99 "
            f"{cl['redis']['p99_ms']:.2f} ms) vs 3-master cluster {cl['cluster']['rps']:.0f} "
            f"req/s (p99 {cl['cluster']['p99_ms']:.2f} ms)"
        ]
    lines += _listing_lines(result)
    lines += frugal_table(result)
    sq, mm = med["worker (sqlite)"], med["worker (memory)"]
    lines += [
        f"sqlite vs memory backend: {sq['qos1']['rps'] / mm['qos1']['rps']:.0%} at QoS 1, "
        f"{sq['qos0']['rps'] / mm['qos0']['rps']:.0%} at QoS 0"
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.5, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--window", type=int, default=64, help="requests outstanding")
    p.add_argument("--conversations", type=int, default=100)
    p.add_argument("--expire-conversations", type=int, default=100_000)
    p.add_argument("--skip-expiry", action="store_true")
    p.add_argument("--list-conversations", type=int, default=1_000_000)
    p.add_argument("--list-probe-seconds", type=float, default=5.0)
    p.add_argument("--idle-seconds", type=float, default=60, help="idle cost measured over")
    p.add_argument("--budget-bytes", type=int, default=16 * 2**20, help="--max-bytes to fill")
    p.add_argument("--budget-fill", type=float, default=3, help="fill this many budgets")
    p.add_argument(
        "--only",
        choices=[
            "frugal",
            "memory",
            "idle",
            "eviction",
            "expiry",
            "throughput",
            "client",
            "context",
            "listing",
        ],
        help="run only these scenarios and print their lines",
    )
    p.add_argument("--json", default=str(REPO / "bench-results" / "latest.json"))
    p.add_argument("--table", action="store_true", help="print the table of --json and exit")
    p.add_argument("--only-cluster", action="store_true", help="run only redis vs cluster")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(Path(args.json).read_text())))
        return
    if shutil.which("gcc") is None:
        sys.exit("scripts/bench: gcc and libmosquitto-dev are needed for the load generator")
    loadgen, echo_c = build_c()
    if args.only_cluster:
        with tempfile.TemporaryDirectory() as tmp:
            b = Mosquitto(Path(tmp) / "mosquitto").start()
            try:
                print(json.dumps(cluster_vs_redis(args, b, loadgen, Path(tmp)), indent=2))
            finally:
                b.stop()
        return
    result: dict[str, Any] = {
        "args": vars(args),
        "machine": machine(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if args.only:
        only(args, result, loadgen)
        return
    with tempfile.TemporaryDirectory() as tmp:
        b = Mosquitto(Path(tmp) / "mosquitto").start()
        try:
            print("throughput ...", file=sys.stderr)
            result["throughput"] = throughput(args, b, loadgen, echo_c, Path(tmp))
            print("latency at window 1 ...", file=sys.stderr)
            result["latency_window_1"] = latency_window_1(args, b, loadgen)
            print("Python client ...", file=sys.stderr)
            result["client"] = client_costs(args, b, loadgen)
            print("context for the model ...", file=sys.stderr)
            result["context"] = context_costs(args, b, loadgen)
            print("scale out ...", file=sys.stderr)
            result["scale_out"] = scale_out(args, b, loadgen, Path(tmp))
            print("redis vs redis cluster ...", file=sys.stderr)
            result["cluster"] = cluster_vs_redis(args, b, loadgen, Path(tmp))
            if not args.skip_expiry:
                print("mass expiry ...", file=sys.stderr)
                result["expiry"] = mass_expiry(args, b, loadgen)
            print("listing ...", file=sys.stderr)
            result["listing_load"] = listing_load(args, b, loadgen)
            frugal(args, result, b, loadgen, "frugal")
        finally:
            b.stop()
    print("store costs and memory ...", file=sys.stderr)
    result["store"] = store_costs()
    result["memory"] = memory_per_turn()
    result["expiry_at_once"] = expiry_at_once()
    result["listing_pages"] = listing_pages()
    result["store_rss"] = store_rss()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"\n(full results: {out})")


def frugal(
    args: argparse.Namespace, result: dict[str, Any], b: Mosquitto, loadgen: Path, which: str
) -> None:
    if which in ("frugal", "eviction"):
        print("eviction cost ...", file=sys.stderr)
        result["eviction_cost"] = eviction_cost(args, b, loadgen)
    if which in ("frugal", "memory"):
        print("memory against the budget ...", file=sys.stderr)
        result["memory_budget"] = memory_budget(args, b)
    if which in ("frugal", "idle"):
        print(f"idle cost over {args.idle_seconds:.0f} s ...", file=sys.stderr)
        result["idle"] = idle_cost(args, b)


def only(args: argparse.Namespace, result: dict[str, Any], loadgen: Path) -> None:
    """Some scenarios alone (results printed, latest.json left alone)."""
    with tempfile.TemporaryDirectory() as tmp:
        b = Mosquitto(Path(tmp) / "mosquitto").start()
        try:
            if args.only == "expiry":
                result["expiry"] = mass_expiry(args, b, loadgen)
            elif args.only == "throughput":
                result["throughput"] = throughput(args, b, loadgen, BUILD / "echo", Path(tmp))
            elif args.only == "client":
                result["client"] = client_costs(args, b, loadgen)
            elif args.only == "context":
                result["context"] = context_costs(args, b, loadgen)
            elif args.only == "listing":
                result["listing_load"] = listing_load(args, b, loadgen)
            else:
                frugal(args, result, b, loadgen, args.only)
        finally:
            b.stop()
    if args.only in ("frugal", "memory"):
        result["store_rss"] = store_rss()
    if args.only == "listing":
        result["listing_pages"] = listing_pages()
    print(json.dumps({k: v for k, v in result.items() if k not in ("args", "machine")}, indent=2))
    lines = throughput_table(result) + _client_lines(result) + _context_lines(result)
    lines += _listing_lines(result)
    print("\n".join(lines + frugal_table(result)))


if __name__ == "__main__":
    main()
