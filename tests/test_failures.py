"""`backfill failures [JOB]`, and the top failure reasons in `status` and the final block: what the
`backfill_failures` table holds, read through the real CLI from a real SQLite file."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from conftest import make_backend
from engine_helpers import RUN_ARGS, build, env_for, needing, poison_ids
from support.fake_openai import FakeOpenAI

ARGS = [*RUN_ARGS, "--target", "memories", "-b", "10", "--concurrency", "1", "--timeout", "2"]


def _failure_rows(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(
            "SELECT job_id, target, row_id, kind, error, attempts FROM backfill_failures "
            "WHERE resolved = 0 AND kind = 'failed' ORDER BY row_id")).mappings()]


@pytest.fixture
def failed_job(tmp_path, cli):
    """A job where 3 memories were rejected (400) and 10 exhausted their retries (500)."""
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=60, entities=0, seed=3)
    todo = sorted(i for t, i in needing(engine) if t == "memories")
    poisoned = todo[20:23]
    poison_ids(engine, poisoned)
    with FakeOpenAI(fail_inputs=["POISON"]) as server:
        server.push_faults("500", "500", "500", "500")  # the first request (10 rows) fails every attempt
        result = cli("up", *ARGS, "--log-format", "human", env=env_for(server, be.url))
    assert result.code == 3, result.output[-2000:]
    return be, engine, result, poisoned, todo[:10]


def test_failures_lists_each_row_with_reason_and_attempts_and_the_top_reasons(failed_job, cli):
    be, engine, up, poisoned, first = failed_job
    stored = _failure_rows(engine)
    assert {r["row_id"] for r in stored} == set(poisoned) | set(first)
    job_id = stored[0]["job_id"]

    shown = cli("failures", "--json", env={"DATABASE_URL": be.url})
    assert shown.code == 0, shown.output
    view = json.loads(shown.stdout)
    assert view["job"] == job_id and view["total"] == len(stored) == 13
    assert [(f["table"], f["row_id"], f["reason"], f["attempts"]) for f in view["failures"]] == \
        [(r["target"], r["row_id"], r["error"], r["attempts"]) for r in stored]
    counts = {}
    for r in stored:
        counts[r["error"]] = counts.get(r["error"], 0) + 1
    assert {r["reason"]: r["count"] for r in view["top_reasons"]} == counts
    assert [r["count"] for r in view["top_reasons"]] == sorted(counts.values(), reverse=True)

    human = cli("failures", str(job_id), "--log-format", "human", "--limit", "5", env={"DATABASE_URL": be.url})
    assert human.code == 0, human.output
    lines = human.stdout.splitlines()
    assert any(line.split()[:3] == ["memories", str(first[0]), "1"] for line in lines), human.stdout
    assert "... and 8 more" in human.stdout and "Top failure reasons:" in human.stdout
    assert f"{max(counts.values()):>6} x " in human.stdout
    # the first line names the database and where its URL came from: a path as long as it is
    assert all(len(line) <= 80 for line in lines if not line.startswith("database: ")), human.stdout

    # the same reasons in the final block of the run and in `status`
    assert "Top failure reasons:" in up.stdout and "    10 x " in up.stdout and "     3 x " in up.stdout
    status = cli("status", str(job_id), "--json", env={"DATABASE_URL": be.url})
    assert json.loads(status.stdout)["top_reasons"] == view["top_reasons"]
    status_human = cli("status", str(job_id), "--log-format", "human", env={"DATABASE_URL": be.url})
    assert "  failures   10 x 500: " in status_human.stdout and "\n             3 x 400: " in status_human.stdout
    assert f"backfill failures {job_id}" in status_human.stdout

    # after a successful retry nothing is left to show: exit 0 with one line
    with FakeOpenAI() as server:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE memories SET title = substr(title, 8) WHERE title LIKE 'POISON %'"))
        assert cli("retry-failed", env=env_for(server, be.url)).code == 0
    assert _failure_rows(engine) == []
    again = cli("failures", str(job_id), "--log-format", "human", env={"DATABASE_URL": be.url})
    assert again.code == 0 and again.stdout.strip().splitlines()[-1] == f"job {job_id} has no recorded failures"
    none = cli("failures", "--log-format", "human", env={"DATABASE_URL": be.url})
    assert none.code == 0 and none.stdout.strip().splitlines()[-1] == "no recorded failures"
    empty = cli("failures", str(job_id), "--json", env={"DATABASE_URL": be.url})
    assert empty.code == 0 and json.loads(empty.stdout)["failures"] == []
