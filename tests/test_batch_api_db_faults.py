"""Database faults in Batch API mode: while a finished batch's results are written (the commit step the
sync runner uses too, commit.Committer), the remote libSQL server drops connections, before doing the
work or after it (the answer lost, the stream left holding the write lock). Each page is retried whole
and recognised when it had landed: the job ends with every row embedded once and exact counters."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import sqlalchemy as sa

from conftest import ROOT, make_backend
from engine_helpers import RUN_ARGS, assert_vectors_match_recipe, build, env_for, needing
from support.fake_openai import FakeOpenAI

BATCH = ["--mode", "batch", "--poll-interval", "0.05"]


def _pages(path) -> int:
    """The job's committed pages (`backfill_jobs.batches`), read straight from the served file."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as raw:
        return int(raw.execute("SELECT coalesce(max(batches), 0) FROM backfill_jobs").fetchone()[0])


def test_dropped_connections_while_batch_results_are_written_lose_and_double_nothing(tmp_path, cli):
    be = make_backend("remote-libsql", tmp_path)
    engine = be.engine()
    build(engine, memories=5200, entities=0, seed=11)
    todo = {r for r in needing(engine) if r[0] == "memories"}
    server = be.server
    with FakeOpenAI() as fake:
        env = env_for(fake, be.url)
        fake.batches.configure(hold=True)  # planned, uploaded and submitted; nothing finishes yet
        first = cli("up", *RUN_ARGS, *BATCH, "--target", "memories", "-b", "100", "--max-runtime", "2", env=env)
        assert first.code == 0, first.output[-2000:]
        with engine.connect() as conn:
            job = conn.execute(sa.text("SELECT status, embedded, selected, skipped FROM backfill_jobs")).one()
        assert job[0] == "interrupted" and job[1] == 0
        assert fake.batches.complete_batches() == 1

        # the results are written 1,000 rows (10 request lines of 100) per page: 6 pages
        full = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL")}
        proc = subprocess.Popen([sys.executable, "-m", "backfill", "--traceback", "resume", *BATCH[2:],
                                 "--log-format", "json"], env={**full, **env}, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = []
        for line in proc.stdout:  # bounded: the process ends
            lines.append(line)
            if '"batch_committed"' in line:
                break
        # one drop at a time, each armed once the previous one hit and another page committed; between two
        # pages the worker reads the next request lines' state ("cursor") and then commits, so a "batch" drop
        # lands inside a commit
        plan = [("batch", True), ("batch", False), ("cursor", True), ("batch", True)]
        dropped = server.stats()["dropped"]
        hits = 0
        for kind, after in plan:
            server.drop_next(1, kind=kind, after_processing=after)
            deadline = time.monotonic() + 60
            while server.stats()["dropped"] == dropped and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if server.stats()["dropped"] > dropped:
                hits += 1
            dropped = server.stats()["dropped"]
            mark = _pages(be.path)
            while _pages(be.path) < mark + 1 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        out, err = proc.communicate(timeout=300)
        stats = fake.batches.stats()
    assert proc.returncode == 0, err[-4000:]
    assert hits >= 3, f"only {hits} drops hit the run"
    events = [json.loads(x) for x in (lines + out.splitlines()) if x.strip().startswith("{")]
    assert events[-1]["event"] == "job_finished" and events[-1]["status"] == "done"

    with engine.connect() as conn:
        job = conn.execute(sa.text("SELECT * FROM backfill_jobs")).mappings().one()
        written = conn.execute(sa.text("SELECT count(*) FROM backfill_embeddings")).scalar()
        distinct = conn.execute(sa.text("SELECT count(DISTINCT row_id) FROM backfill_embeddings")).scalar()
        failures = conn.execute(sa.text("SELECT count(*) FROM backfill_failures WHERE kind = 'failed'")).scalar()
        chunk_rows = sum(len(json.loads(r)) for (r,) in conn.execute(sa.text(
            "SELECT row_ids FROM backfill_batch_chunks WHERE state = 'written'")))
        blank = conn.execute(sa.text("SELECT count(*) FROM backfill_failures WHERE kind = 'skipped'")).scalar()
        request_lines = conn.execute(sa.text("SELECT count(*) FROM backfill_batch_chunks")).scalar()
    sent = len(todo) - blank  # rows with a text (blank ones were skipped when planned)
    assert job["status"] == "done" and failures == 0 and job["failed"] == 0
    assert job["embedded"] == written == distinct == chunk_rows == sent  # no page counted twice, none lost
    assert job["selected"] == len(todo) and job["skipped"] == blank
    assert job["batches"] == -(-request_lines // 10)  # each page counted once, a lost answer's commit not repeated
    assert stats["uploaded_inputs"] == stats["billed_inputs"] == sent
    assert needing(engine) & todo == {("memories", i) for i in _skipped(engine)}
    assert assert_vectors_match_recipe(engine, todo - {("memories", i) for i in _skipped(engine)}) == sent


def _skipped(engine: sa.Engine) -> set[int]:
    with engine.connect() as conn:
        return set(conn.execute(sa.text("SELECT row_id FROM backfill_failures WHERE kind = 'skipped'")).scalars())
