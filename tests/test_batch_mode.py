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

from backfill import tables
from conftest import ROOT, make_backend
from engine_helpers import (
    DIMS,
    MODEL,
    RUN_ARGS,
    assert_vectors_match_recipe,
    build,
    checksum_other_columns,
    env_for,
    expected_text,
    needing,
)
from support.fake_openai import FakeOpenAI, fake_vector

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


def _texts(engine: sa.Engine, rows: set[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """The recipe text of each of `rows` ('' for a row with nothing to embed)."""
    out = {}
    with engine.connect() as conn:
        for table, spec in tables.SPECS.items():
            cols = ", ".join(["id", *spec.text_columns])
            found = conn.exec_driver_sql(f"SELECT {cols} FROM {table}").mappings()
            out.update({(table, r["id"]): expected_text(table, r) for r in found if (table, r["id"]) in rows})
    return out


def _blank(engine: sa.Engine, rows: set[tuple[str, int]]) -> set[tuple[str, int]]:
    return {key for key, text in _texts(engine, rows).items() if not text}


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
    build(engine, memories=5_250, entities=250, seed=5)
    with engine.begin() as conn:  # more rows to do: all but every 20th memory lose their vectors
        conn.exec_driver_sql("UPDATE memories SET embedding = NULL WHERE id % 20 <> 0")
    todo = needing(engine)
    texts = _texts(engine, todo)
    blank = {key for key, text in texts.items() if not text}  # nothing to embed: recorded as skipped, never sent
    rows = todo - blank
    assert len(rows) >= 5_000
    before = {t: checksum_other_columns(engine, t) for t in ("memories", "entities")}
    args = ["up", *RUN_ARGS, *BATCH, "-b", "20", "--batch-file-lines", "50"]  # migrate, verify, run
    files = -(-len(rows) // 20 // 50)  # at least this many files (a line holds up to 20 rows)

    with FakeOpenAI() as server:
        env = env_for(server, be.url)
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
    with engine.connect() as conn:  # every row holds the fake server's vector of its recipe text
        for table in ("memories", "entities"):
            for rid, emb in conn.exec_driver_sql(f"SELECT id, embedding FROM {table}"):
                if (table, rid) in rows:
                    assert json.loads(emb) == fake_vector(texts[table, rid], DIMS, MODEL), (table, rid)
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
    print(f"batch mode: {len(rows)} rows ({len(blank)} blank skipped) in {stats['files_uploaded']} files / "
          f"{total} request lines; uploaded inputs {stats['uploaded_inputs']}, billed inputs {stats['billed_inputs']}, "
          f"job embedded {job[2]}; 4 kills (upload, create, polling, writing at {written}/{total} lines)")


def _job(engine: sa.Engine) -> dict:
    with engine.connect() as conn:
        return dict(conn.exec_driver_sql("SELECT * FROM backfill_jobs ORDER BY id DESC LIMIT 1").mappings().one())


@pytest.mark.parametrize("kind", ["libsql", "postgresql"])  # the other tests here use stdlib SQLite
def test_failed_lines_become_failure_rows_and_retry_failed_resends_only_them(kind, tmp_path, cli):
    backend = make_backend(kind, tmp_path)
    engine = backend.engine()
    build(engine, memories=150, entities=40)
    todo = needing(engine)
    rows = todo - _blank(engine, todo)
    with engine.connect() as conn:  # reject one memory's text: its whole request line fails
        victim = min(i for t, i in rows if t == "memories")
        row = conn.exec_driver_sql(f"SELECT id, title, content, memory_type, tags FROM memories WHERE id = {victim}")
        bad = expected_text("memories", row.mappings().one())
    with FakeOpenAI(fail_inputs=[bad]) as server:
        env = env_for(server, backend.url)
        first = cli("up", *RUN_ARGS, *BATCH, "-b", "10", "--batch-file-lines", "4", env=env)
        assert first.code == 3, first.output[-2000:]
        with engine.connect() as conn:
            failed = set(conn.exec_driver_sql(
                "SELECT target, row_id FROM backfill_failures WHERE kind = 'failed' AND NOT resolved").all())
            line = conn.exec_driver_sql(
                "SELECT row_ids FROM backfill_batch_chunks WHERE state = 'failed'").scalars().all()
        assert len(line) == 1 and failed == {("memories", i) for i in json.loads(line[0])}
        assert ("memories", victim) in failed
        assert needing(engine) - _blank(engine, todo) == failed  # every other row holds its vector
        assert assert_vectors_match_recipe(engine, rows - failed) == len(rows - failed)
        assert server.batches.stats()["uploaded_inputs"] == len(rows)
        server.configure(fail_inputs=[])
        retry = cli("retry-failed", env=env)
        assert retry.code == 0, retry.output[-2000:]
        assert server.stats()["inputs_embedded"] == len(failed)  # only the failed rows, through the sync API
    assert assert_vectors_match_recipe(engine, rows) == len(rows)
    job = _job(engine)
    assert (job["status"], job["embedded"], job["failed"]) == ("done", len(rows), 0)


def test_run_returns_while_batches_wait_and_status_collects_them_when_done(tmp_path, cli):
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=120, entities=30)
    todo = needing(engine)
    rows = todo - _blank(engine, todo)
    with FakeOpenAI() as server:
        server.batches.configure(hold=True)
        env = env_for(server, be.url)
        first = cli("up", *RUN_ARGS, *BATCH, "-b", "25", "--max-runtime", "1", env=env)
        assert first.code == 0, first.output[-2000:]
        assert _job(engine)["status"] == "interrupted" and needing(engine) == todo  # nothing written yet
        mixed = cli("run", *RUN_ARGS, "--log-format", "human", env=env)  # a sync run may not take the batch job over
        assert mixed.code == 2 and "job 1 is open in batch mode" in mixed.stderr and "backfill resume 1" in mixed.stderr
        waiting = cli("status", "--json", env=env)
        view = json.loads(waiting.stdout.splitlines()[-1])
        assert view["batch_api"]["rows_waiting"] == len(rows)
        assert [f["state"] for f in view["batch_api"]["files"]] == ["submitted"]
        assert view["batch_api"]["files"][0]["remote_batch_id"] and view["batch_api"]["files"][0]["input_file_id"]
        assert server.batches.complete_batches() == 1
        done = cli("status", "--log-format", "human", env=env)
        assert done.code == 0 and "batch api  files: 1 collected" in done.stdout, done.output[-2000:]
        assert server.batches.stats()["uploaded_inputs"] == len(rows)
        stats = json.loads(cli("stats", "--json", env=env).stdout.splitlines()[-1])
    assert {t: v["stale"] for t, v in stats["tables"].items()} == {"memories": 0, "entities": 0}  # provenance hashes
    assert assert_vectors_match_recipe(engine, rows) == len(rows)
    job = _job(engine)
    assert (job["status"], job["embedded"], job["failed"], job["worker_id"]) == ("done", len(rows), 0, None)


def test_sigterm_while_polling_exits_130_and_cancel_cancels_the_remote_batches(tmp_path, cli):
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=120, entities=30)
    with FakeOpenAI() as server:
        server.batches.configure(hold=True)
        env = env_for(server, be.url)
        proc = _start(env, "up", *RUN_ARGS, *BATCH, "-b", "10", "--batch-file-lines", "5")
        deadline = time.monotonic() + 60
        while server.batches.stats()["retrieves"] < 5 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out[-2000:]
        job = _job(engine)
        assert (job["status"], job["worker_id"], job["embedded"]) == ("interrupted", None, 0)
        files = server.batches.stats()["batches_created"]
        assert files >= 2
        result = cli("cancel", str(_job(engine)["id"]), "--log-format", "human", env=env)
        assert result.code == 0 and f"cancelled {files} batch(es) at the provider" in result.stdout, result.output
        assert server.batches.stats()["cancels"] == files
    with engine.connect() as conn:
        states = conn.exec_driver_sql("SELECT DISTINCT state, remote_status FROM backfill_batches").all()
    assert states == [("cancelled", "cancelling")] and _job(engine)["status"] == "cancelled"


@pytest.mark.parametrize("args, message", [
    (["--mode", "batch", "--provider", "local"], "--mode batch needs --provider openai"),
    (["--mode", "fast"], "--mode must be one of sync, batch"),
    (["--mode", "batch", "--batch-file-lines", "50001"], "--batch-file-lines must be between 1 and 50000"),
    (["--mode", "batch", "--poll-interval", "0"], "--poll-interval must be > 0 seconds"),
    (["--mode", "batch", "--reembed-stale"], "--mode batch does not take --reembed-stale or --vector-column yet"),
])
def test_bad_batch_options_are_refused_before_any_work(tmp_path, args, message):
    from typer.testing import CliRunner

    from backfill.cli import app

    db = tmp_path / "never.db"
    result = CliRunner().invoke(app, ["run", "--database-url", str(db), *args, "--log-format", "human"],
                                env={"OPENAI_API_KEY": "sk-test-not-a-real-key"})
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {message}"), result.output
    assert len(result.stderr.splitlines()) == 1
    assert not db.exists()


def test_a_timed_out_upload_or_create_is_found_not_repeated_and_a_cut_download_is_read_again(tmp_path, cli):
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=80, entities=20)
    todo = needing(engine)
    rows = todo - _blank(engine, todo)
    with FakeOpenAI() as server:
        # the server stores the file / creates the batch, then answers after the client gave up
        server.batches.configure(upload_delay_s=1.5, create_delay_s=1.5, polls_to_complete=1, cut_downloads=1)
        env = env_for(server, be.url)
        result = cli("up", *RUN_ARGS, *BATCH, "-b", "50", "--timeout", "0.5", env=env)
        assert result.code == 0, result.output[-2000:]
        stats = server.batches.stats()
    assert stats["files_uploaded"] == stats["batches_created"] == 1 and stats["content_downloads"] == 2
    assert stats["uploaded_inputs"] == stats["billed_inputs"] == len(rows)
    assert assert_vectors_match_recipe(engine, rows) == len(rows)


def test_files_stay_under_the_byte_limit(tmp_path, monkeypatch):
    """The planner bounds each file's bytes before it is built (here the limit is made small)."""
    from backfill import batch_api, commands
    from backfill.config import load_settings

    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=200, entities=0)
    todo = needing(engine)
    rows = todo - _blank(engine, todo)
    limit = 60_000  # above one row at its longest (8,191 tokens), far below the whole table
    monkeypatch.setattr(batch_api, "PLAN_BYTES", limit)
    with FakeOpenAI() as server:
        server.batches.configure(polls_to_complete=0)
        settings = load_settings(be.url, environ=env_for(server, be.url), cwd=tmp_path)
        commands.migrate(settings)
        req = commands.RunRequest(model=MODEL, dimensions=DIMS, batch_size=50)
        req.extra.update(mode="batch", poll_interval=0.05)
        assert commands.run(settings, req) == 0
        sizes = [f["bytes"] for f in server.batches.files.values() if f["purpose"] == "batch"]
        stats = server.batches.stats()
    assert len(sizes) >= 2 and max(sizes) <= limit, sizes
    assert stats["uploaded_inputs"] == stats["billed_inputs"] == len(rows)
    assert assert_vectors_match_recipe(engine, rows) == len(rows)


def test_a_batch_refused_for_the_queue_limit_is_created_again_from_the_same_file(tmp_path, cli):
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=150, entities=0)
    todo = needing(engine)
    rows = todo - _blank(engine, todo)
    with FakeOpenAI() as server:
        # room for about one file at a time; a batch finishes on its third poll
        server.batches.configure(token_queue_limit=12_000, polls_to_complete=3)
        env = env_for(server, be.url)
        result = cli("up", *RUN_ARGS, *BATCH, "-b", "10", "--batch-file-lines", "4", env=env)
        assert result.code == 0, result.output[-2000:]
        stats = server.batches.stats()
    assert stats["by_status"].get("failed", 0) >= 1  # some were refused, then created again
    assert stats["batches_created"] == stats["files_uploaded"] + stats["by_status"]["failed"]
    assert stats["uploaded_inputs"] == stats["billed_inputs"] == len(rows)  # nothing uploaded or billed twice
    assert assert_vectors_match_recipe(engine, rows) == len(rows)
    with engine.connect() as conn:
        submits = conn.exec_driver_sql("SELECT sum(submits), count(*) FROM backfill_batches").one()
    assert submits[0] == stats["batches_created"] and submits[1] == stats["files_uploaded"]
    assert _job(engine)["failed"] == 0


def test_limit_selects_exactly_that_many_rows_across_files_and_a_resume_sends_the_rest_once(tmp_path, cli):
    """`--limit` is counted by the sync runner's Pager: blank rows count, files split, nothing sent twice."""
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=150, entities=40)
    todo = needing(engine)
    rows = todo - _blank(engine, todo)
    with FakeOpenAI() as server:
        server.batches.configure(polls_to_complete=0)
        env = env_for(server, be.url)
        first = cli("up", *RUN_ARGS, *BATCH, "-b", "10", "--batch-file-lines", "2", "--limit", "57", env=env)
        assert first.code == 0, first.output[-2000:]
        job = _job(engine)
        assert (job["status"], job["selected"], job["stop_reason"]) == ("interrupted", 57, "limit reached")
        assert job["embedded"] + job["skipped"] == 57 and len(todo - needing(engine)) == job["embedded"]
        assert server.batches.stats()["uploaded_inputs"] == job["embedded"]
        rest = cli("resume", "--poll-interval", "0.05", env=env)
        assert rest.code == 0, rest.output[-2000:]
        stats = server.batches.stats()
    assert stats["uploaded_inputs"] == stats["billed_inputs"] == len(rows)  # no row uploaded twice
    assert needing(engine) == todo - rows
    job = _job(engine)
    assert (job["status"], job["selected"], job["embedded"], job["failed"]) == ("done", len(todo), len(rows), 0)
