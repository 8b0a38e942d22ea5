"""Requests fitted to the quota and to the server: a request larger than the token bucket is split
until it fits, a long wait is said once, a request that times out is sent again in halves and fewer
go at once. Real CLI, real SDK, the fake server on loopback."""

from __future__ import annotations

import io
import json
import random

import pytest
import sqlalchemy as sa

from backfill import limits, report
from conftest import make_backend
from engine_helpers import RUN_ARGS, assert_vectors_match_recipe, build, check_counters, env_for, needing
from support.fake_openai import FakeOpenAI

WORDS = "alpha beta gamma delta quarterly offsite onboarding kubernetes postgres invoice roadmap".split()


def _long_memories(engine: sa.Engine, words: int, seed: int = 5) -> int:
    """Every memory gets a distinct content of `words` words (about as many tokens); returns how many."""
    rng = random.Random(seed)
    with engine.begin() as conn:
        ids = [r[0] for r in conn.exec_driver_sql("SELECT id FROM memories")]
        for i in ids:
            text = f"note {i}: " + " ".join(rng.choice(WORDS) for _ in range(words))
            conn.exec_driver_sql("UPDATE memories SET content = ? WHERE id = ?", (text, i))
    return len(ids)


def _failures(engine: sa.Engine) -> list[tuple]:
    with engine.connect() as conn:
        return list(conn.exec_driver_sql("SELECT target, row_id, kind, error FROM backfill_failures"))


def _events(output: str) -> list[dict]:
    out = []
    for line in output.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


@pytest.mark.parametrize("tpm", [300_000, 30_000])
def test_a_request_larger_than_the_token_bucket_is_split_until_it_fits(tmp_path, cli, tpm):
    """300k TPM with a 10k-token bucket (the issue's case), and 30k TPM where refilling the bucket takes
    over 10 s: a request of ~17k tokens used to wait forever; now every row is embedded by requests of
    at most 10k tokens, and the long wait is said once in the JSON log."""
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=40, entities=0, seed=3)
    _long_memories(engine, words=600)  # 27 of the 40 need a vector: ~17k tokens, one request
    todo = needing(engine)
    with FakeOpenAI(tpm=tpm, tpm_burst=10_000) as server:
        result = cli("up", *RUN_ARGS, "-b", "40", "--log-format", "json", env=env_for(server, be.url), timeout=240)
        log = list(server.log)
    assert result.code == 0, result.output[-3000:]
    assert needing(engine) == set()
    assert assert_vectors_match_recipe(engine, todo) == len(todo)
    assert _failures(engine) == []
    check_counters(engine)
    answered = [e for e in log if e["status"] == 200]
    assert answered and max(e["tokens"] for e in answered) <= 10_000, [(e["status"], e["tokens"]) for e in log]
    assert max(e["tokens"] for e in log) > 10_000  # the first request was over the bucket: split, not re-sent whole
    assert sum(e["n_inputs"] for e in answered) == len(todo)  # nothing embedded twice
    waits = [e for e in _events(result.stdout) if e.get("event") == "quota_wait"]
    if tpm == 30_000:  # the second half (~8.5k tokens) waits ~14 s for the bucket: said, once
        assert len(waits) == 1, waits
        assert waits[0]["waiting_for"] == "tokens" and waits[0]["bucket"] == 10_000, waits
        assert "tokens-per-minute quota" in waits[0]["message"]
    else:
        assert waits == []


def test_one_input_larger_than_the_bucket_fails_alone_with_the_reason(tmp_path, cli):
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=12, entities=0, seed=4)
    _long_memories(engine, words=60)
    with engine.connect() as conn:
        big = conn.exec_driver_sql("SELECT min(id) FROM memories WHERE embedding IS NULL OR embedding IN ('', '[]')"
                                   ).scalar()
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE memories SET content = ? WHERE id = ?", ("word " * 3_000, big))
    with FakeOpenAI(tpm=120_000, tpm_burst=2_000) as server:
        result = cli("up", *RUN_ARGS, "--log-format", "json", env=env_for(server, be.url), timeout=240)
    assert result.code == 3, result.output[-3000:]
    assert needing(engine) == {("memories", big)}
    [(target, row_id, kind, error)] = _failures(engine)
    assert (target, row_id, kind) == ("memories", big, "failed")
    assert "more than the quota admits in one request" in error and "2,000" in error, error
    check_counters(engine)


def test_a_request_that_times_out_is_sent_again_in_halves_and_fewer_go_at_once(tmp_path, cli):
    """A server that takes one request at a time (as a small self-hosted one does): four requests of 100
    inputs at once queue, the later ones time out. At -b 100 and a short --timeout, every row gets its
    vector, no row fails, and the requests after the first timeout are smaller."""
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=400, entities=0, seed=9)
    todo = needing(engine)
    with FakeOpenAI(one_at_a_time=True, latency_ms=200, latency_per_input_ms=20) as server:  # 100 inputs: 2.2 s
        result = cli("up", *RUN_ARGS, "-b", "100", "--timeout", "3", "--log-format", "json",
                     env=env_for(server, be.url), timeout=240)
        log = list(server.log)
    assert result.code == 0, result.output[-3000:]
    assert needing(engine) == set()
    assert assert_vectors_match_recipe(engine, todo) == len(todo)
    assert _failures(engine) == []
    check_counters(engine)
    sizes = [e["n_inputs"] for e in log]
    assert max(sizes) == 100, sizes
    assert sum(1 for n in sizes if n > 50) <= 4, sizes  # the first four went whole; after the timeout, halves
    assert sizes[-1] <= 50 and sum(sizes) > len(todo), sizes  # and the timed-out inputs were sent again
    fits = [e for e in _events(result.stdout) if e.get("event") == "server_fit"]
    assert any("timed out" in e["message"] for e in fits), fits
    assert min(e["in_flight_limit"] for e in fits) < 4, fits


def _four_waits() -> None:
    """Four acquires against a spent requests bucket, each given up after a few naps (the clock does not move)."""
    limiter = limits.Limiter(rpm=5, tpm=1_000_000)  # both given: no probe
    for _ in range(5):
        limiter.acquire()
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) % 3 == 0:
            raise TimeoutError

    limiter._sleep = sleep
    for _ in range(4):
        with pytest.raises(TimeoutError):
            limiter.acquire()


def test_a_long_wait_is_said_once_not_per_thread_or_per_second(capsys):
    stream = io.StringIO()
    report.configure_logging("json", stream=stream)
    try:
        _four_waits()
    finally:
        report.configure_logging("human")
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["quota_wait"], events
    assert events[0]["waiting_for"] == "requests" and events[0]["wait_s"] > 10
    capsys.readouterr()
    _four_waits()  # on a terminal: the same, as one line
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("waiting 12 s for the requests-per-minute quota"), lines
