"""The benchmark helpers still work against the current gateway (no timing is asserted)."""

from __future__ import annotations

from typing import Any

import pytest
from benchmarks.__main__ import median
from benchmarks.auth import Held
from benchmarks.inprocess import measure
from benchmarks.instructions import total_instructions


async def test_the_in_process_comparison_runs_both_sides() -> None:
    result = await measure(handshakes=20, rounds=1)
    for metric in ("inproc_cpu_us_per_handshake", "inproc_cpu_us_per_message"):
        assert set(result[metric]) == {"wsgate", "bare trio-websocket"}
        assert all(value > 0 for value in result[metric].values())


def test_seq_gaps_count_the_missing_messages() -> None:
    def messages(*seqs: int) -> list[dict[str, Any]]:
        return [{"type": "event", "seq": s} for s in seqs]

    held = Held("alice", None, {"type": "session.ready", "seq": 1})
    held.messages += messages(2, 3, 5, 9)
    assert held.seq_gaps() == 1 + 3
    held = Held("bob", None, {"type": "session.ready", "seq": 1})
    held.messages += messages(2, 3, 4)
    assert held.seq_gaps() == 0


def test_median_of_numbers_and_of_percentile_dicts() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    rounds = [{"p50_ms": 1.0, "p99_ms": 5.0}, {"p50_ms": 3.0, "p99_ms": 4.0}, {"p50_ms": 2.0, "p99_ms": 9.0}]
    assert median(rounds) == {"p50_ms": 2.0, "p99_ms": 5.0}


def test_instruction_totals_are_read_from_cachegrind_summary() -> None:
    summary = "==1== \n==1== I refs:        4,327,253,118\n==1== \n"
    assert total_instructions(summary) == 4_327_253_118
    with pytest.raises(ValueError, match="no instruction count"):
        total_instructions("valgrind: no such tool\n")
