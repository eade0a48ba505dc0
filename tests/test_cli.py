"""The programs as a user runs them: memory-worker, memctl, and Mosquitto's own mosquitto_rr."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.clients import decode, device, next_message, watcher
from tests.conftest import program, reap, spawn_worker, unique
from tests.processes import Mosquitto, free_port


def run_worker(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [program("memory-worker"), *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--max-turns", "0"], {}, "--max-turns"),
        (["--port", "x"], {}, "--port"),
        (["--bogus"], {}, "unrecognized"),
        (["--prefix", "a/#"], {}, "--prefix"),
        (["--max-bytes", "10"], {}, "--max-bytes"),
        (["--backend", "mongodb://x"], {}, "--backend"),
        ([], {"MEMORY_WORKER_TTL": "soon"}, "MEMORY_WORKER_TTL"),
        ([], {"MEMORY_WORKER_MAX_TURNS": "abc"}, "expected an integer"),
        # Port 1: were they taken, the worker would not find this machine's broker (a review)
        (["--port", "1", "--ttl", "nan"], {}, "--ttl: expected a finite number, got 'nan'"),
        (["--port", "1", "--ttl", "inf"], {}, "--ttl: expected a finite number"),
        (["--port", "1", "--stats-interval", "nan"], {}, "--stats-interval: expected a finite"),
        (["--port", "1", "--shared-group", "g" * 257], {}, "--shared-group must be a name of"),
        (["--prefix", "rp", "--route-prefix", "rp/x"], {}, "may not go under --prefix"),
        (["--tls-ca", __file__], {}, "TLS CA certificate"),  # a file, not a certificate
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(
    args: list[str], env: dict[str, str], needle: str
) -> None:
    """A bad flag or environment value is one 'memory-worker: error:' line and exit 2."""
    done = run_worker(*args, **env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert needle in lines[0]
    assert lines[0].startswith("memory-worker: error:")


def test_a_mistyped_variable_is_said_and_an_empty_one_is_unset(broker: Mosquitto) -> None:
    """A MEMORY_WORKER_* variable that names no setting was ignored in silence (a typo in
    /etc/memory-worker/memory-worker.env); an empty one, which env files use for "unset",
    was an error (MEMORY_WORKER_SHARED_GROUP=). New operator's trial."""
    proc = spawn_worker(
        broker,
        "--prefix",
        unique("mem"),
        MEMORY_WORKER_MAX_TURN="5",
        MEMORY_WORKER_SHARED_GROUP="",
        MEMORY_WORKER_MAX_TURNS="",
    )
    try:
        assert proc.stdout is not None
        before = []
        for line in proc.stdout:
            before.append(line)
            if "serving" in line:
                break
        said = "".join(before)
        assert (
            "MEMORY_WORKER_MAX_TURN is not a setting of memory-worker (did you mean "
            "MEMORY_WORKER_MAX_TURNS?): ignored"
        ) in said
        assert "serving" in said, said
    finally:
        reap(proc)


def test_a_mistyped_flag_does_not_echo_a_backend_password() -> None:
    """argparse repeats what it did not take, and a flag's check the value it refused: a
    URL's password in them is ***."""
    done = run_worker("--backnd", "redis://:hunter2x@127.0.0.1:6390/0")
    assert done.returncode == 2
    assert "hunter2x" not in done.stderr
    assert "--backnd redis://:***@127.0.0.1:6390/0" in done.stderr
    done = run_worker("--max-bytes", "redis://:hunter2x@127.0.0.1:6390/0")  # a flag's check
    assert done.returncode == 2
    assert "hunter2x" not in done.stderr
    assert "redis://:***@127.0.0.1:6390/0" in done.stderr


def test_help_lists_every_flag_with_its_environment_variable() -> None:
    """--help lists the flags and the environment variable of each."""
    done = run_worker("--help")
    assert done.returncode == 0
    for flag in (
        "--max-turns",
        "--ttl",
        "--max-conversations",
        "--max-bytes",
        "--max-payload-bytes",
        "--stats-interval",
        "--client-id",
        "--backend",
    ):
        assert flag in done.stdout
    assert "MEMORY_WORKER_MAX_TURNS" in done.stdout


def test_python_m_worker_runs_the_worker() -> None:
    """`python -m worker` is the worker, as a newcomer tries it (an audit: no __main__)."""
    done = subprocess.run(
        [sys.executable, "-m", "worker", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: memory-worker" in done.stdout


@pytest.fixture
async def program_worker(
    broker: Mosquitto,
) -> AsyncIterator[tuple[str, str, subprocess.Popen[str]]]:
    """memory-worker as a separate process; yields (prefix, client id, process)."""
    prefix, client_id = unique("mem"), unique("w-")
    status = f"{prefix}/_worker/{client_id}/status"
    async with watcher(broker.host, broker.port, status) as seen:
        proc = spawn_worker(
            broker,
            "--prefix",
            prefix,
            "--client-id",
            client_id,
            "--stats-interval",
            "0.2",
            "--max-turns",
            "3",
        )
        assert decode(await next_message(seen))["state"] == "online"
    yield prefix, client_id, proc
    reap(proc)


async def spawn_memctl(broker: Mosquitto, prefix: str, *args: str) -> asyncio.subprocess.Process:
    """memctl on `broker` and `prefix`, its output piped."""
    where = ["--host", broker.host, "--port", str(broker.port), "--prefix", prefix]
    return await asyncio.create_subprocess_exec(
        program("memctl"), *where, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


async def memctl(
    broker: Mosquitto, prefix: str, *args: str, wait: float = 5
) -> tuple[int, list[Any]]:
    proc = await spawn_memctl(broker, prefix, "--timeout", str(wait), *args)
    out, _ = await proc.communicate()
    rc = proc.returncode
    assert rc is not None
    return rc, [json.loads(line, parse_constant=_no_json) for line in out.decode().splitlines()]


def _no_json(constant: str) -> Any:
    raise AssertionError(f"memctl printed {constant}: no JSON")


async def test_memctl_append_get_delete(broker: Mosquitto, program_worker: Any) -> None:
    """memctl appends, gets the last turns and deletes, printing each reply."""
    prefix = program_worker[0]
    for i in range(4):
        rc, out = await memctl(broker, prefix, "append", "kiosk-1", "user", f"hello {i}")
        assert rc == 0
        assert out == [{"ok": True, "seq": i + 1, "count": min(i + 1, 3)}]
    rc, out = await memctl(broker, prefix, "get", "kiosk-1", "--last", "2")
    assert rc == 0
    assert [t["content"] for t in out[0]["turns"]] == ["hello 2", "hello 3"]
    rc, out = await memctl(broker, prefix, "delete", "kiosk-1")
    assert (rc, out) == (0, [{"ok": True, "deleted": 3}])


async def test_memctl_repeats_a_delete_with_its_id_once(
    broker: Mosquitto, program_worker: Any
) -> None:
    """After a timeout (exit 3) the same command with the same --id is applied once: --id was
    taken and not sent with deletes, so the repeat took what was appended since."""
    prefix = program_worker[0]
    await memctl(broker, prefix, "append", "kiosk-2", "user", "before")
    await memctl(broker, prefix, "state", "save", "kiosk-2", "n", "k", "1")
    for args in (["delete", "kiosk-2"], ["state", "delete", "kiosk-2", "n", "k"]):
        assert (await memctl(broker, prefix, "--id", "once", *args))[0] == 0
    await memctl(broker, prefix, "append", "kiosk-2", "user", "after")
    await memctl(broker, prefix, "state", "save", "kiosk-2", "n", "k", "2")
    assert await memctl(broker, prefix, "--id", "once", "delete", "kiosk-2") == (
        0,
        [{"ok": True, "deleted": 1}],  # the first's reply: one turn then
    )
    await memctl(broker, prefix, "--id", "once", "state", "delete", "kiosk-2", "n", "k")
    _, out = await memctl(broker, prefix, "get", "kiosk-2")
    assert [t["content"] for t in out[0]["turns"]] == ["after"]
    assert (await memctl(broker, prefix, "state", "load", "kiosk-2", "n", "k"))[1][0]["value"] == 2
    loaded = await memctl(broker, prefix, "state", "load", "kiosk-2", "n", "k", "--ttl", "60")
    assert loaded == (0, [{"ok": True, "found": True, "value": 2}])


async def test_memctl_load_finds_a_nil_value(broker: Mosquitto, program_worker: Any) -> None:
    """A key saved as nil is found, as the worker says; memctl said `found: false` (an
    audit), from the value alone."""
    prefix = program_worker[0]
    await memctl(broker, prefix, "state", "save", "nil-1", "n", "k", "null")
    loaded = await memctl(broker, prefix, "state", "load", "nil-1", "n", "k")
    assert loaded == (0, [{"ok": True, "found": True, "value": None}])
    missing = await memctl(broker, prefix, "state", "load", "nil-1", "n", "other")
    assert missing == (0, [{"ok": True, "found": False, "value": None}])


async def test_memctl_budgets_and_summaries(broker: Mosquitto, program_worker: Any) -> None:
    """memctl get --max-tokens prints what fits with the summary; summary shows and saves one,
    a stale one exits 1 with the conflict and the current upto."""
    prefix = program_worker[0]
    for i, tokens in enumerate([5, 6, 7]):
        await memctl(broker, prefix, "append", "k2", "user", f"m{i}", "--tokens", str(tokens))
    rc, out = await memctl(broker, prefix, "summary", "k2")
    assert (rc, out) == (0, [{"ok": True, "summary": None}])
    rc, out = await memctl(broker, prefix, "summary", "k2", "--save", "m0 said", "--upto", "1")
    assert (rc, out) == (0, [{"ok": True, "upto": 1, "dropped": 1}])
    rc, out = await memctl(broker, prefix, "get", "k2", "--max-tokens", "10")
    assert rc == 0
    assert out[0]["summary"] == {"text": "m0 said", "upto": 1, "tokens": 2}
    assert [t["content"] for t in out[0]["turns"]] == ["m2"]
    assert out[0]["tokens"] == 9
    args = ("summary", "k2", "--save", "x", "--upto", "2", "--base", "0")
    rc, out = await memctl(broker, prefix, *args)
    assert rc == 1
    assert (out[0]["error"]["code"], out[0]["error"]["upto"]) == ("conflict", 1)
    assert out[0]["error"]["born"] > 0  # the contract's field, which memctl left out
    rc, out = await memctl(broker, prefix, "summary", "k2", "--save", "x", "--upto", "99")
    assert rc == 1
    assert out[0]["error"]["message"] == (
        "'upto' must be between 2 and 3 (after the summary's upto, up to the newest turn), not 99"
    )


async def test_memctl_exit_codes(broker: Mosquitto, program_worker: Any) -> None:
    """1 on an error reply, 3 when nobody answers."""
    prefix = program_worker[0]
    rc, out = await memctl(broker, prefix, "append", "c", "user", "x" * 70000)
    assert rc == 1
    assert out[0]["error"]["code"] == "too_large"
    rc, out = await memctl(broker, unique("nobody"), "get", "c", wait=0.5)
    assert (rc, out) == (3, [])


async def test_memctl_prints_any_msgpack_value_as_json(
    broker: Mosquitto, program_worker: Any
) -> None:
    """A value a device saved that JSON cannot hold as it is (map keys of bin or integers,
    NaN and infinities, ext) is printed as valid JSON: the first made memctl print a
    traceback, for get-all the whole namespace's, and NaN printed as NaN is no JSON."""
    prefix = program_worker[0]
    value = {
        1: "one",
        b"b": [float("nan"), float("inf")],
        "e": msgpack.ExtType(5, b"abc"),
    }
    async with device(broker.host, broker.port, prefix) as d:
        body = {"ns": "n", "key": "odd", "value": value}
        assert (await d.request("vals", "state/save", body))["ok"]
    for args in (["state", "load", "vals", "n", "odd"], ["state", "get-all", "vals", "n"]):
        rc, (got,) = await memctl(broker, prefix, *args)
        assert rc == 0
        shown = got["value"] if "value" in got else got["items"]["odd"]
        assert shown == {
            "1": "one",
            '{"base64": "Yg=="}': ["nan", "inf"],
            "e": {"ext": 5, "base64": "YWJj"},
        }


async def test_memctl_interrupted_exits_130(broker: Mosquitto) -> None:
    """Ctrl-C while memctl waits for an answer exits 130, as a shell says of a command it
    stopped (0 told a script it had its answer)."""
    prefix = unique("nobody")
    async with watcher(broker.host, broker.port, f"{prefix}/c/get") as asked:
        proc = await spawn_memctl(broker, prefix, "--timeout", "30", "get", "c")
        await next_message(asked)  # it waits for the reply now
    proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(proc.wait(), 10) == 130


async def test_memctl_watch_and_stats(broker: Mosquitto, program_worker: Any) -> None:
    """memctl watch prints an eviction event as JSON; memctl stats shows the worker counting it."""
    prefix = program_worker[0]
    proc = await spawn_memctl(broker, prefix, "watch", "--count", "1")
    assert proc.stdout is not None
    # The watcher has subscribed once the worker's retained status reaches a second client;
    # deleting until the watcher prints makes the test independent of that race.
    line = b""
    n = 0
    while not line:
        n += 1
        await memctl(broker, prefix, "append", f"c{n}", "user", "x")
        await memctl(broker, prefix, "delete", f"c{n}")
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 1)
        except TimeoutError:
            continue
    event = json.loads(line)
    assert event["reason"] == "deleted"
    assert event["count"] == 1
    assert await proc.wait() == 0
    deleted = 0
    while deleted < n:  # stats are refreshed every 0.2 s; each call reads the latest
        rc, out = await memctl(broker, prefix, "stats")
        assert rc == 0
        assert out[0]["client_id"] == program_worker[1]
        deleted = out[0]["evictions"].get("deleted", 0)
        assert 0 <= out[0]["age"] < 60


async def test_memctl_retire_clears_a_stopped_workers_status_and_stats(
    broker: Mosquitto, program_worker: Any
) -> None:
    """memctl retire refuses an online worker; once it stopped, clears its retained status and
    stats, so that memctl stats (and the page) no longer show it."""
    prefix, client_id, proc = program_worker
    rc, out = await memctl(broker, prefix, "retire", client_id)
    assert (rc, out) == (1, [])
    assert (await memctl(broker, prefix, "stats"))[0] == 0
    assert reap(proc, signal.SIGTERM) == 0
    rc, out = await memctl(broker, prefix, "retire", client_id)
    assert (rc, out) == (0, [{"ok": True, "retired": client_id}])
    assert await memctl(broker, prefix, "stats", wait=0.5) == (3, [])
    assert (await memctl(broker, prefix, "retire", client_id, wait=0.5))[0] == 1


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["append", "bad+convo", "user", "hi"], "wildcard"),
        (["append", "a#", "user", "hi"], "wildcard"),
        (["append", "a/b", "user", "hi"], "slash"),
        (["get", ""], "1-128"),
        (["get", "x" * 129], "1-128"),
        (["get", "bell\x07"], "control"),
        (["get", "_worker"], "reserved"),
        (["append", "c", "", "hi"], "'role'"),
        (["state", "save", "c", "n+s", "k", "1"], None),
        (["state", "save", "c", "ns", "flag", "TRUE"], "not JSON"),
        (["state", "save", "c", "ns", "lang", "en"], "--string"),
        (["state", "save", "c", "ns", "b", "--base64", "AP8"], "is not base64"),
        (["state", "load", "c", "ns", "k" * 129], "'key'"),
        (["state", "load", "c", "ns", "k", "--ttl", "0"], "'ttl'"),
        (["state", "get-all", "c", ""], "'ns'"),
        (["--reply-prefix", "a/#", "get", "c"], "reply prefix"),
        (["--reply-prefix", "", "get", "c"], "reply prefix"),
        (["--reply-prefix", "$SYS/x", "get", "c"], "reply prefix"),
        (["--prefix", "a+b", "get", "c"], "--prefix"),
        (["--id", "i" * 65, "append", "c", "user", "hi"], "'id'"),
        (["get", "c", "--last", "0"], "'last'"),
        (["get", "c", "--max-tokens", "0"], "'max_tokens'"),
        (["append", "c", "user", "hi", "--tokens", "-1"], "'tokens'"),
        (["summary", "c", "--save", "s"], "--upto"),
        (["summary", "c", "--save", "s", "--upto", "0"], "'upto'"),
        (["--timeout", "0", "get", "c"], "--timeout"),
        (["--timeout", "nan", "get", "c"], "--timeout must be more than 0 seconds, got nan"),
        (["state", "save", "c", "ns", "k", "1", "--ttl", "nan"], "'ttl'"),
        (["retire", "a/b"], "client id"),
        (["--host", "mqtt://127.0.0.1", "get", "c"], "--host 'mqtt://127.0.0.1' is a URL"),
        (["--host", "127.0.0.1:1883", "get", "c"], "give the host '127.0.0.1' and the port"),
        (["--host", "", "get", "c"], "--host must be"),
        (["state", "save", "c", "ns", "k", "1", "--ttl", "0"], "'ttl'"),
        (["watch", "--count", "0"], "--count"),
        (["--tls-ca", "/nope/ca.crt", "get", "c"], "TLS CA certificate '/nope/ca.crt'"),
        (["--tls-ca", __file__, "get", "c"], "--tls-ca: TLS CA certificate"),
    ],
)
def test_memctl_refuses_bad_input_before_sending(args: list[str], words: str | None) -> None:
    """Input the contract refuses: one line on stderr naming the problem, exit 2, no traceback.

    Nothing listens on the port: a request sent would end in exit 3, not 2.
    """
    proc = subprocess.run(
        [program("memctl"), "--port", str(free_port()), "--timeout", "0.5", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if words is None:  # a namespace may hold + and #: it is not a topic level
        assert proc.returncode == 3, proc.stderr
        return
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith("memctl: ")
    assert proc.stderr.count("\n") == 1
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr


def test_memctl_names_the_variable_a_bad_port_came_from() -> None:
    """A port that is no number names $MEMORY_WORKER_PORT when it came from there (the
    error said --port, which the user never typed)."""
    proc = subprocess.run(
        [program("memctl"), "get", "c"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "MEMORY_WORKER_PORT": "abc"},
    )
    assert proc.returncode == 2
    assert "not a number: 'abc' (from $MEMORY_WORKER_PORT)" in proc.stderr


def test_memctls_own_option_after_the_command_says_where_it_goes() -> None:
    """`memctl get kiosk-7 --port 21883` (a user's first try) said only "unrecognized
    arguments": the error now says memctl's options go before the command."""
    for extra in (["--port", "21883"], ["--timeout=2"]):
        proc = subprocess.run(
            [program("memctl"), "get", "kiosk-7", *extra],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 2
        name = extra[0].partition("=")[0]
        assert f"({name} is memctl's own option: it goes before the command" in proc.stderr
    proc = subprocess.run(
        [program("memctl"), "get", "c", "--nope"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.rstrip().endswith("unrecognized arguments: --nope")


def _get_from(listener: socket.socket, timeout: float) -> subprocess.CompletedProcess[str]:
    """memctl get, run against whatever listens on `listener`'s port."""
    port = str(listener.getsockname()[1])
    return subprocess.run(
        [program("memctl"), "--port", port, "--timeout", str(timeout), "get", "c"],
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_listener_that_never_answers_is_one_line_and_exit_3() -> None:
    """A port that takes the connection but sends no CONNACK: one line and exit 3 (paho's
    traceback from closing the left-open socket after the loop closed followed it)."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        proc = _get_from(silent, timeout=0.5)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith("memctl: cannot reach the broker")
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_a_listener_that_closes_at_once_is_said_at_once() -> None:
    """A port that takes the connection and closes it without a CONNACK (a broker at its
    max_connections, a listener of another protocol): memctl says so, at once, exit 3. It
    waited out its whole timeout and said 'timed out'."""
    with socket.create_server(("127.0.0.1", 0)) as closing:

        def close_each() -> None:
            with contextlib.suppress(OSError):
                while True:
                    peer, _ = closing.accept()
                    peer.close()

        threading.Thread(target=close_each, daemon=True).start()
        start = time.monotonic()
        proc = _get_from(closing, timeout=30)
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - start < 20, proc.stderr
    assert "closed the connection before its CONNACK" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.skipif(shutil.which("mosquitto_rr") is None, reason="mosquitto-clients missing")
async def test_mosquitto_rr_gets_a_msgpack_reply(broker: Mosquitto, program_worker: Any) -> None:
    """mosquitto_rr with a response topic gets the worker's msgpack reply."""
    prefix = program_worker[0]
    request = msgpack.packb({"role": "user", "content": "from the shell"})
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_rr",
        "-V",
        "5",
        "-h",
        broker.host,
        "-p",
        str(broker.port),
        "-t",
        f"{prefix}/shell/append",
        "-e",
        "shell/reply",
        "-m",
        request,
        "-N",
        "-W",
        "5",
        stdout=subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert msgpack.unpackb(out) == {"ok": True, "seq": 1, "count": 1}


async def test_sigterm_is_graceful_and_sigkill_leaves_the_will(broker: Mosquitto) -> None:
    """SIGTERM: exit 0 and status offline; SIGKILL: the broker publishes the offline will."""
    for sig, code in ((signal.SIGTERM, 0), (signal.SIGKILL, -signal.SIGKILL)):
        prefix, cid = unique("mem"), unique("w-")
        status = f"{prefix}/_worker/{cid}/status"
        async with watcher(broker.host, broker.port, status) as seen:
            proc = spawn_worker(broker, "--prefix", prefix, "--client-id", cid)
            assert decode(await next_message(seen))["state"] == "online"
            proc.send_signal(sig)
            assert decode(await next_message(seen))["state"] == "offline"
            assert proc.wait(timeout=10) == code
            reap(proc)


async def test_unreachable_broker_is_retried(tmp_path: Path) -> None:
    """With no broker the worker logs and retries; when one appears it serves."""
    port = free_port()
    late = Mosquitto(tmp_path, port=port)
    prefix, cid = unique("mem"), unique("w-")
    proc = spawn_worker(late, "--prefix", prefix, "--client-id", cid, "--reconnect-max", "0.3")
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        assert "unreachable" in line
        assert proc.poll() is None
        late.start()
        async with watcher(late.host, late.port, f"{prefix}/_worker/{cid}/status") as seen:
            assert decode(await next_message(seen))["state"] == "online"
    finally:
        reap(proc, signal.SIGTERM)
        late.stop()


def test_memctl_takes_the_login_from_the_workers_variables() -> None:
    """MEMORY_WORKER_USERNAME and _PASSWORD log memctl in as they do the worker, so the
    password need not be on the command line (where ps shows it); a flag still wins."""
    from worker.memctl import build_parser

    env = {"MEMORY_WORKER_USERNAME": "kiosk-7", "MEMORY_WORKER_PASSWORD": "s3cret"}
    args = build_parser(env).parse_args(["get", "c"])
    assert (args.username, args.password) == ("kiosk-7", "s3cret")
    args = build_parser(env).parse_args(["--username", "other", "get", "c"])
    assert args.username == "other"


def test_empty_variables_are_unset_for_memctl_and_the_summarizer_too() -> None:
    """The worker reads an empty MEMORY_WORKER_* variable as unset; memctl and the
    summarizer, which read the same environment file, refused it (MEMORY_WORKER_PORT=:
    "expected an integer"), so following the docs stopped the summarizer (a review)."""
    from worker.memctl import build_parser
    from worker.summarizer import from_args

    env = {f"MEMORY_WORKER_{k}": "" for k in ("PORT", "PREFIX", "TLS_CA", "HOST")}
    args = build_parser(env).parse_args(["get", "c"])
    assert (args.host, args.port, args.prefix) == ("127.0.0.1", 1883, "mem")
    cfg = from_args([], env)
    assert (cfg.host, cfg.port, cfg.prefix, cfg.tls_ca) == ("127.0.0.1", 1883, "mem", None)
