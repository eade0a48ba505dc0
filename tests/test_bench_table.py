"""scripts/bench's throughput table: CPU per request for every responder and issue 16's
targets as ratios, from a result made here (no load is run and nothing is timed)."""

from __future__ import annotations

from typing import Any

from bench.run import NODE, SHAPES, _shape_request, frugal_table, throughput_table

ARGS = {"window": 64, "conversations": 100, "rounds": 3}


def _median(rps: tuple[float, float], cpu_us: tuple[float, float]) -> dict[str, Any]:
    return {
        f"qos{q}": {"rps": rps[q], "cpu_us": cpu_us[q], "p50_ms": 1, "p99_ms": 2, "p999_ms": 3}
        for q in (0, 1)
    }


def _result(node: bool) -> dict[str, Any]:
    med = {
        "worker (memory)": _median((10_000, 8_000), (75, 100)),
        "echo, same transport as the worker": _median((12_000, 9_000), (60, 80)),
        "echo, C (libmosquitto)": _median((40_000, 20_000), (10, 20)),
    }
    if node:
        med[NODE] = _median((30_000, 16_000), (25, 40))
    skipped = {} if node else {NODE: "node is not installed"}
    return {"args": ARGS, "throughput": {"median": med, "skipped": skipped}}


def test_table_states_cpu_per_request_and_the_targets_as_ratios() -> None:
    """Each responder's row carries its CPU µs per request at QoS 0 and 1; the target lines
    give the worker's CPU over Node's and its throughput over the C echo's."""
    text = "\n".join(throughput_table(_result(node=True)))
    assert f"| {NODE} | 30,000 | 25.0 | 16,000 | 40.0 |" in text
    assert "| worker (memory) | 10,000 | 75.0 | 8,000 | 100.0 |" in text
    assert "CPU per request vs Node.js: 3.00x at QoS 0, 2.50x at QoS 1" in text
    assert "throughput vs the C echo: 0.25x at QoS 0, 0.40x at QoS 1" in text


def test_table_says_why_the_node_peer_was_skipped() -> None:
    """Without node the table has no Node.js row and says why in one line."""
    text = "\n".join(throughput_table(_result(node=False)))
    assert f"| {NODE} |" not in text
    assert f"{NODE}: skipped, node is not installed" in text
    assert "vs Node.js: not measured, the Node.js peer was skipped: node is not installed" in text


def test_table_of_results_without_cpu_figures_still_prints() -> None:
    """Results written before CPU per request was measured show '?' rather than failing."""
    result = _result(node=True)
    for m in result["throughput"]["median"].values():
        for q in (0, 1):
            del m[f"qos{q}"]["cpu_us"]
    text = "\n".join(throughput_table(result))
    assert "| worker (memory) | 10,000 | ? | 8,000 | ? |" in text
    assert "vs Node.js: ? at QoS 0, ? at QoS 1" in text


def test_memory_lines_report_both_fills() -> None:
    """The memory lines give RSS per turn filled one conversation after the other and
    interleaved, as a fleet speaks (each conversation in turn, one turn each)."""
    shape = {"requests": 1, "idle_rss": 0, "growth": 2**20, "ratio": 0.8}
    budget = {"budget": 2**24, **dict.fromkeys(SHAPES, shape)}
    budget |= {"worker_bytes_per_turn": 189.4, "worker_bytes_per_turn_interleaved": 228.0}
    item = {"per_item": 169.0, "accounted_per_item": 317.0}
    stored = {"full": item, "interleaved": {**item, "per_item": 203.0}}
    text = "\n".join(frugal_table({"memory_budget": budget, "store_rss": stored}))
    assert "| interleaved | 1 | 1.0 MiB | 0.80x |" in text
    assert "189 bytes filled one conversation after the other, 228 bytes filled interleaved" in text
    assert (
        "169 bytes (RSS delta, 20,000 conversations x 8 turns), 203 bytes filled interleaved"
        in text
    )
    assert [_shape_request("interleaved", i)[0] for i in (0, 1, 20_000)] == [
        "c0/append",
        "c1/append",
        "c0/append",
    ]


def test_client_lines_state_the_four_targets_as_ratios() -> None:
    """The client's lines give its window-1 round trip over raw MQTT's, its window-64
    throughput over the load generator's, its CPU over the worker's, and the blocking
    client's throughput over the async client's."""
    from bench.run import _client_lines

    window = {"raw_rps": 20_000, "raw_p50_ms": 0.1, "client_p50_ms": 0.15, "worker_cpu_us": 20}
    client = {
        "1": {**window, "client_rps": 5_000, "client_cpu_us": 60},
        "8": {**window, "client_rps": 12_000, "client_cpu_us": 30, "blocking_rps": 6_000},
        "64": {**window, "client_rps": 15_000, "client_cpu_us": 30},
    }
    text = "\n".join(_client_lines({"client": client}))
    assert "(1.50x; client CPU 60 us per append; target within 1.5x)" in text
    assert "15,000 req/s vs load generator at window 64 20,000 req/s (75%;" in text
    assert (
        "30.0 us vs the worker's 20.0 us per request it serves (1.50x; target at most 2x)" in text
    )
    assert "6,000 req/s vs the async client at window 64 15,000 req/s (40%;" in text
    assert "at window 8 12,000 req/s (50%)" in text
