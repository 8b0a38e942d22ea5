"""Batch API mode end to end: the real CLI in subprocesses, the real openai SDK, the fake server's
Files and Batch APIs on loopback, real databases. Assertions are on the data and on what the fake
server was sent (uploaded request lines and inputs, billed inputs)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from backfill import targets
from backfill.testing.fake_openai import FakeOpenAI

from conftest import ROOT, make_backend
from engine_helpers import (
    RUN_ARGS, assert_vectors_match_recipe, build, checksum_other_columns, env_for, expected_text, needing,
)

BATCH = ["--mode", "batch", "--poll-interval", "0.05"]


def _start(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "backfill", *args], env={**os.environ, **env}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 60.0) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (checked every 10 ms, bounded)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the worker exited ({proc.returncode}) before {what}: {proc.stdout.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()


def _scalar(path, sql: str):
    with sqlite3.connect(path, timeout=30) as raw:
        return raw.execute(sql).fetchone()[0]


def _blank(engine: sa.Engine, rows: set[tuple[str, int]]) -> set[tuple[str, int]]:
    with engine.connect() as conn:
        out = set()
        for table, spec in targets.SPECS.items():
            cols = ", ".join(["id", *spec.text_columns])
            out |= {(table, r["id"]) for r in conn.exec_driver_sql(f"SELECT {cols} FROM {table}").mappings()
                    if (table, r["id"]) in rows and not expected_text(table, r)}
    return out


def _counters_match_rows(engine: sa.Engine) -> None:
    """The job's counters equal the rows actually written (provenance) and the chunks' states."""
    with engine.connect() as conn:
        job = conn.exec_driver_sql("SELECT embedded, failed FROM backfill_jobs").one()
        written = conn.exec_driver_sql("SELECT count(*) FROM backfill_embeddings").scalar()
        chunk_rows = sum(len(json.loads(r)) for (r,) in conn.exec_driver_sql(
            "SELECT row_ids FROM backfill_batch_chunks WHERE state = 'written'"))
    assert job[0] == written == chunk_rows and job[1] == 0


def test_sigkill_during_upload_create_polling_and_writing_then_resume_sends_every_row_once(tmp_path, cli):
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=10_500, entities=500, seed=5)
    with engine.begin() as conn:  # more rows to do: all but every 20th memory lose their vectors
        conn.exec_driver_sql("UPDATE memories SET embedding = NULL WHERE id % 20 <> 0")
    todo = needing(engine)
    blank = _blank(engine, todo)  # nothing to embed under the recipe: recorded as skipped, never sent
    rows = todo - blank
    assert len(rows) >= 10_000
    before = {t: checksum_other_columns(engine, t) for t in ("memories", "entities")}
    args = ["run", *RUN_ARGS, *BATCH, "-b", "20", "--batch-file-lines", "100"]
    files = -(-len(rows) // 20 // 100)  # at least this many files (a line holds up to 20 rows)

    with FakeOpenAI() as server:
        env = env_for(server, be.url)
        assert cli("migrate", env=env).code == 0
        fake = server.batches

        # 1. killed during an upload: the server stored the file, the worker never heard back
        fake.configure(upload_delay_s=60)
        _kill_when(_start(env, *args), lambda: fake.stats()["files_uploaded"] >= 1, "the first upload")
        assert _scalar(be.path, "SELECT count(*) FROM backfill_batches WHERE state = 'planned' "
                                "AND upload_started_at IS NOT NULL") == 1
        _counters_match_rows(engine)

        # 2. killed during a batch create: the batch exists, its id was never recorded
        fake.configure(upload_delay_s=0, create_delay_s=60, hold=True)
        _kill_when(_start(env, "resume", "--poll-interval", "0.05"),
                   lambda: fake.stats()["batches_created"] >= 1, "the first batch")
        assert fake.stats()["files_uploaded"] == 1  # the stored file was found by name, not sent again
        assert _scalar(be.path, "SELECT count(*) FROM backfill_batches WHERE state = 'uploaded' "
                                "AND submit_started_at IS NOT NULL") == 1

        # 3. killed while polling batches that do not finish
        fake.configure(create_delay_s=0)
        _kill_when(_start(env, "resume", "--poll-interval", "0.05"),
                   lambda: fake.stats()["retrieves"] >= 3 * files, "polling")
        stats = fake.stats()
        assert stats["batches_created"] == stats["files_uploaded"] >= files  # the batch was found, not recreated
        assert _scalar(be.path, "SELECT count(*) FROM backfill_batches WHERE state = 'submitted'") == \
            stats["batches_created"]

        # 4. killed while writing results (some request lines written, not all)
        fake.configure(hold=False, polls_to_complete=1)
        _kill_when(_start(env, "resume", "--poll-interval", "0.05"),
                   lambda: _scalar(be.path, "SELECT count(*) FROM backfill_batch_chunks WHERE state = 'written'")
                   >= 30, "result writing")
        written = _scalar(be.path, "SELECT count(*) FROM backfill_batch_chunks WHERE state = 'written'")
        total = _scalar(be.path, "SELECT count(*) FROM backfill_batch_chunks")
        assert 30 <= written < total
        _counters_match_rows(engine)

        # 5. resume to the end
        done = cli("resume", "--poll-interval", "0.05", env=env)
        assert done.code == 0, done.output[-2000:]
        stats = fake.stats()
        assert server.stats()["requests"] == 0  # nothing went through the synchronous endpoint

    assert needing(engine) == blank
    assert assert_vectors_match_recipe(engine, rows) == len(rows)
    assert stats["uploaded_inputs"] == len(rows) == stats["billed_inputs"]  # no row uploaded or paid twice
    assert stats["duplicate_custom_ids"] == 0 and stats["failed_lines"] == 0
    assert stats["uploaded_lines"] == stats["billed_lines"] == total
    with engine.connect() as conn:
        job = conn.exec_driver_sql("SELECT status, selected, embedded, failed, skipped FROM backfill_jobs").one()
        ids = conn.exec_driver_sql("SELECT count(*), count(DISTINCT input_file_id), count(DISTINCT remote_batch_id) "
                                   "FROM backfill_batches WHERE state = 'collected'").one()
    assert tuple(job) == ("done", len(todo), len(rows), 0, len(blank))
    assert ids[0] == ids[1] == ids[2] == stats["files_uploaded"] == stats["batches_created"]
    _counters_match_rows(engine)
    assert {t: checksum_other_columns(engine, t) for t in ("memories", "entities")} == before
