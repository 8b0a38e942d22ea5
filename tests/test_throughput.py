"""Throughput without breaking promises: quota pacing (few 429s, nothing lost or duplicated) and
SIGKILL/resume with many requests in flight. Real CLI, real SDK, the fake server on loopback."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

from backfill import targets
from backfill.testing.fake_openai import FakeOpenAI

from conftest import ROOT, make_backend
from engine_helpers import (
    RUN_ARGS, assert_vectors_match_recipe, build, embeddings, env_for, expected_text, is_vector, needing,
)


def _texts(engine, rows: set[tuple[str, int]]) -> Counter:
    """The recipe texts the server should have seen for `rows`, as a multiset."""
    out: Counter = Counter()
    with engine.connect() as conn:
        for table, spec in targets.SPECS.items():
            cols = ", ".join(["id", *spec.text_columns])
            for row in conn.exec_driver_sql(f"SELECT {cols} FROM {table}").mappings():
                if (table, row["id"]) in rows:
                    out[expected_text(table, row)] += 1
    return out


def _job_totals(engine) -> dict:
    with engine.connect() as conn:
        row = conn.exec_driver_sql(
            "SELECT coalesce(sum(embedded),0), coalesce(sum(failed),0), coalesce(sum(selected),0), "
            "(SELECT count(*) FROM backfill_embeddings) FROM backfill_jobs").one()
    return dict(zip(("embedded", "failed", "selected", "provenance"), row))


def test_a_run_over_the_token_quota_is_paced_below_one_percent_429s_and_loses_nothing(tmp_path, cli):
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=520, entities=80, seed=21)
    todo = needing(engine)
    expected = _texts(engine, todo)
    tpm = 60_000  # the run needs more than this: a 60k burst, then the rest paced at 1,000 tokens/s
    with FakeOpenAI(tpm=tpm, rpm=3_000, latency_ms=30) as server:
        env = env_for(server, be.url)
        result = cli("up", *RUN_ARGS, "-b", "4", "--concurrency", "6", env=env)
        assert result.code == 0, result.output[-2000:]
        stats = server.stats()
        seen_ok = Counter(server.inputs_seen(status=200))
    assert stats["tokens_embedded"] > tpm * 1.1, stats  # unpaced, this run would have hit the quota
    assert stats["by_status"].get("429", 0) < 0.01 * stats["requests"], stats
    assert set(stats["by_status"]) <= {"200", "429"}, stats
    # nothing lost: every row that needed a vector has the right one; nothing duplicated: each text
    # was embedded exactly as often as rows carry it, and sent again only after a 429
    assert needing(engine) == set()
    assert assert_vectors_match_recipe(engine, todo) == len(todo)
    assert seen_ok == expected
    assert _job_totals(engine) == {"embedded": len(todo), "failed": 0, "selected": len(todo), "provenance": len(todo)}
