"""Unit tests of the ledger accounting (no lab needed): the drills are only as good as this."""

from __future__ import annotations

import threading
import time

import pytest
from support.ledger import Ledger, Producer, longest_gap, new_run_id, parse_lines, wait_until


def test_parse_skips_torn_and_foreign_lines() -> None:
    text = (
        "D r-0000001 10.5 w@node1 42\nS r-0000002 11.0 w@node2 43\nD r-00000\ngarbage\nX a 1 b 2\n"
    )
    execs = parse_lines(text, "node1")
    assert [(e.kind, e.ledger_id, e.pid) for e in execs] == [
        ("D", "r-0000001", 42),
        ("S", "r-0000002", 43),
    ]
    assert execs[0].host == "node1"


def test_report_counts_lost_duplicates_and_parked() -> None:
    led = Ledger("run")
    for seq in range(5):
        led.mark_published(led.ledger_id(seq), ts=float(seq))
    led.mark_failed_publish(led.ledger_id(5), "ConnectionError")
    led.set_host_lines(
        "node1",
        "D run-0000000 1.0 a 1\nD run-0000001 2.0 a 1\n"
        "D run-0000001 9.0 a 2\nS run-0000003 3.0 a 1\n",
    )
    # Another run's lines in the same file must not count.
    led.set_host_lines("node2", "D other-0000002 1.0 b 1\n")
    rep = led.report(parked=["run-0000004"], gap_window=(0.0, 10.0))
    assert rep.published == 5
    assert rep.publish_failures == 1
    assert rep.ran == 2
    assert rep.lost == ["run-0000002", "run-0000003"]
    assert rep.duplicates == {"run-0000001": 2}
    assert rep.parked == ["run-0000004"]
    assert rep.gap == (7.0, 2.0, 9.0)
    assert "lost=2" in rep.summary()


def test_host_lines_never_shrink_when_a_host_is_unreachable() -> None:
    led = Ledger("run")
    led.mark_published("run-0000000")
    led.set_host_lines("node1", "D run-0000000 1.0 a 1\n")
    led.set_host_lines("node1", "")  # host crashed: the read came back empty
    assert led.pending() == set()


def test_longest_gap_includes_window_edges() -> None:
    assert longest_gap([], 0.0, 5.0) == (5.0, 0.0, 5.0)
    assert longest_gap([1.0, 2.0, 8.0, 20.0], 0.0, 10.0) == (6.0, 2.0, 8.0)


def test_producer_marks_only_accepted_publishes() -> None:
    led = Ledger(new_run_id("unit"))
    calls: list[str] = []

    def send(ledger_id: str) -> None:
        calls.append(ledger_id)
        if len(calls) % 3 == 0:
            raise ConnectionError("broker down")

    prod = Producer(led, send, rate=500.0, max_seconds=5.0)
    with prod:
        wait_until(lambda: len(calls) >= 30, timeout=10, interval=0.01, what="30 publishes")
    assert not prod.running
    assert len(led.published) + len(led.publish_failures) == len(calls)
    assert len(set(calls)) == len(calls)
    assert all(i not in led.published for i, _, _ in led.publish_failures)


def test_producer_stops_by_itself() -> None:
    led = Ledger("bounded")
    prod = Producer(led, lambda _i: None, rate=100.0, max_seconds=0.3)
    prod.start()
    time.sleep(1.0)
    assert not prod.running


def test_producer_does_not_burst_after_a_blocked_publish() -> None:
    led = Ledger("steady")
    gate = threading.Event()
    stamps: list[float] = []

    def send(_ledger_id: str) -> None:
        stamps.append(time.monotonic())
        if len(stamps) == 2:
            gate.wait(1.0)  # a publish retrying through a failover

    with Producer(led, send, rate=20.0, max_seconds=5.0):
        wait_until(lambda: len(stamps) >= 6, timeout=10, interval=0.01)
    # After the block the next publishes keep the interval instead of firing all at once.
    assert stamps[3] - stamps[2] >= 0.04


def test_wait_until_names_what_it_waited_for() -> None:
    with pytest.raises(TimeoutError, match="the moon"):
        wait_until(lambda: False, timeout=0.2, interval=0.05, what="the moon")


def test_bad_run_id_refused() -> None:
    with pytest.raises(ValueError):
        Ledger("has space")
