"""`backfill up --follow`: after the backlog the follower embeds what the server inserts or edits (the change
queue), holds the job's lease while idle, and a SIGTERM ends it cleanly (exit 0, job done, lease released).
The real CLI in a subprocess, real databases, the real openai SDK against the fake server; assertions on data."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import sqlalchemy as sa

from backfill import tables
from conftest import ROOT
from engine_helpers import DIMS, MODEL, RUN_ARGS, build, env_for, expected_text, needing
from support.fake_openai import FakeOpenAI, fake_vector

FOLLOW = ["up", *RUN_ARGS, "--follow", "--poll-interval", "0.2", "--log-format", "json"]
STAMP = "2026-12-03T10:00:00.000Z"


class Follower:
    """`backfill up --follow` in a subprocess; its JSON lines are read on a thread as they come."""

    def __init__(self, env: dict, *args: str, command: str = "up") -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "backfill", command, *FOLLOW[1:], *args], cwd=ROOT,
                                     text=True, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.events: queue.Queue[dict] = queue.Queue()
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            try:
                self.events.put(json.loads(line))
            except ValueError:
                pass

    def wait_for(self, name: str, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.2)
            except queue.Empty:
                assert self.proc.poll() is None, f"the follower exited {self.proc.returncode}: {self.output()}"
                continue
            if event.get("event") == name:
                return event
        raise AssertionError(f"no {name} event within {timeout} s: {self.output()}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def output(self) -> str:
        err = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
        return ("".join(self.lines) + err)[-3000:]


def _until(check, what: str, timeout: float = 60.0) -> None:
    """Wait (bounded) until `check()` holds; the database may be busy with the follower's commit meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except sa.exc.OperationalError:  # locked by the follower's commit (libSQL does not wait)
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _insert_memory(conn: sa.Connection, title: str) -> int:
    """The server's createMemory INSERT; `embedding` '[]': its own OpenAI call failed."""
    conn.execute(sa.text(
        "INSERT INTO memories (user_id, title, content, memory_type, importance, tags, entity_ids, embedding, "
        "metadata, is_archived, created_at, updated_at) VALUES (:u, :t, :c, 'personal', 2, '[\"birds\"]', '[]', "
        "'[]', '{}', :f, :s, :s)"), {"u": "u-alice", "t": title, "c": f"{title}: seen on the quay", "f": False,
                                      "s": STAMP})
    return int(conn.exec_driver_sql("SELECT max(id) FROM memories").scalar())


def _insert_entity(conn: sa.Connection, name: str) -> int:
    conn.execute(sa.text(
        "INSERT INTO entities (user_id, name, entity_type, person_type, description, company, title, email, phone, "
        "address, notes, tags, metadata, created_at, updated_at) VALUES (:u, :n, 'organization', NULL, "
        "'Maker of gramophones', NULL, NULL, NULL, NULL, NULL, 'met at the fair', '[\"music\"]', '{}', :s, :s)"),
        {"u": "u-alice", "n": name, "s": STAMP})
    return int(conn.exec_driver_sql("SELECT max(id) FROM entities").scalar())


def _edit_memory(conn: sa.Connection, row_id: int, title: str) -> None:
    """The server's updateMemory UPDATE: new text, the old vector left in place."""
    conn.execute(sa.text("UPDATE memories SET title = :t, content = :c, tags = '[\"birds\"]', updated_at = :s "
                         "WHERE id = :i"), {"t": title, "c": "A heron waited on the quay at dusk", "s": STAMP,
                                            "i": row_id})


def _matches(engine: sa.Engine, table: str, row_id: int) -> bool:
    """The row holds the fake server's vector for its current recipe text."""
    spec = tables.SPECS[table]
    with engine.connect() as conn:
        row = conn.exec_driver_sql(f"SELECT id, embedding, {', '.join(spec.text_columns)} FROM {table} "
                                   f"WHERE id = {row_id}").mappings().one()
    try:
        stored = json.loads(row["embedding"] or "null")
    except ValueError:
        return False
    return stored == fake_vector(expected_text(table, row), DIMS, MODEL)


def _job(engine: sa.Engine) -> dict:
    with engine.connect() as conn:
        return dict(conn.exec_driver_sql(
            "SELECT id, status, worker_id, lease_expires_at, selected, embedded, failed, skipped FROM backfill_jobs "
            "ORDER BY id DESC").mappings().first())


def _failures(engine: sa.Engine, kind: str) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(
            f"SELECT target, row_id, attempts FROM backfill_failures WHERE kind = '{kind}'")]


def test_follow_embeds_inserts_and_edits_then_a_sigterm_ends_it_cleanly(sql_backend, cli):
    engine = sql_backend.engine()
    build(engine, memories=80, entities=20)
    backlog = needing(engine)
    assert backlog
    with FakeOpenAI() as server:
        env = env_for(server, sql_backend.url)
        follower = Follower(env)
        try:
            follower.wait_for("follow_waiting")
            assert needing(engine) == set()  # the backlog is done, and the follower still runs
            with engine.connect() as conn:
                edited = int(conn.exec_driver_sql(
                    "SELECT min(row_id) FROM backfill_embeddings WHERE target = 'memories'").scalar())
            # a second worker finds the job held while the follower is idle
            second = cli("up", *RUN_ARGS, env=env)
            assert second.code == 4, second.output[-2000:]
            with engine.begin() as conn:
                new = [("memories", _insert_memory(conn, f"Pelican sighting {n}")) for n in range(3)]
                new.append(("entities", _insert_entity(conn, "Walrus Holdings")))
            with engine.begin() as conn:
                _edit_memory(conn, edited, "Heron sighting")
            rows = [*new, ("memories", edited)]
            _until(lambda: all(_matches(engine, t, i) for t, i in rows), "the new and edited rows' vectors")
        finally:
            code = follower.stop(signal.SIGTERM)
        assert code == 0, follower.output()
    job = _job(engine)
    assert job["status"] == "done" and job["worker_id"] is None and job["lease_expires_at"] is None
    skipped = len(_failures(engine, "skipped"))
    assert _failures(engine, "failed") == []
    # every row written once, the edited row twice (its new text); the counters say exactly that
    assert job["embedded"] == len(backlog) - skipped + len(new) + 1
    assert job["selected"] == job["embedded"] + skipped and job["failed"] == 0 and job["skipped"] == skipped
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM backfill_embeddings").scalar() == job["embedded"] - 1
    assert needing(engine) == {(t, i) for t, i, _a in _failures(engine, "skipped")}  # blank text: nothing to send
    assert '"event": "job_finished"' in follower.output() and '"status": "done"' in follower.output()


def test_a_failed_row_is_recorded_once_not_resent_every_pass(tmp_path, cli):
    from conftest import make_backend

    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=20, entities=0)
    with FakeOpenAI(fail_inputs=["POISON"]) as server:
        follower = Follower(env_for(server, be.url), "--target", "memories")
        try:
            follower.wait_for("follow_waiting")
            with engine.begin() as conn:
                bad = _insert_memory(conn, "POISON pill")
            _until(lambda: _failures(engine, "failed"), "the poisoned row's failure row")
            with engine.begin() as conn:  # later passes must not send the poisoned row again
                good = [_insert_memory(conn, f"Cormorant {n}") for n in range(2)]
            _until(lambda: all(_matches(engine, "memories", i) for i in good), "the later rows' vectors")
        finally:
            code = follower.stop(signal.SIGINT)
    assert code == 3, follower.output()  # the job is done, with a failed row (`backfill retry-failed`)
    assert _failures(engine, "failed") == [("memories", bad, 1)]
    job = _job(engine)
    assert job["status"] == "done" and job["failed"] == 1 and job["worker_id"] is None


def test_max_runtime_ends_a_follower_by_itself(file_backend, cli):
    engine = file_backend.engine()
    build(engine, memories=30, entities=5)
    with FakeOpenAI() as server:
        result = cli(*FOLLOW, "--max-runtime", "3", env=env_for(server, file_backend.url), timeout=120)
    assert result.code == 0, result.output[-2000:]
    assert needing(engine) == {(t, i) for t, i, _a in _failures(engine, "skipped")}
    job = _job(engine)
    assert job["status"] == "done" and job["worker_id"] is None and job["lease_expires_at"] is None


def test_follow_refuses_what_it_cannot_combine_with(tmp_path, cli):
    path = tmp_path / "memory.db"
    build(sa.create_engine(f"sqlite:///{path}"), memories=5, entities=0)
    before = path.read_bytes()
    env = {"OPENAI_API_KEY": "sk-test-not-a-real-key", "DATABASE_URL": f"sqlite:///{path}"}
    for args, named in ((["--limit", "5"], "--limit"), (["--mode", "batch"], "--mode batch"),
                        (["--dry-run"], "--dry-run"), (["--reembed-all"], "--reembed-all")):
        for command in ("up", "run"):
            result = cli(command, *RUN_ARGS, "--follow", *args, env=env)
            assert result.code == 2, result.output
            assert f"--follow does not take {named}" in result.stderr and len(result.stderr.splitlines()) == 1
    assert path.read_bytes() == before


def test_a_stop_that_leaves_rows_exits_130_and_resume_finishes(tmp_path, cli):
    """SIGTERM while the backlog is being embedded: what landed commits, the job is interrupted (exit 130)."""
    from conftest import make_backend

    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=300, entities=0)
    with FakeOpenAI(latency_ms=300) as server:
        env = env_for(server, be.url)
        follower = Follower(env, "-b", "10", "--concurrency", "1")
        try:
            follower.wait_for("batch_committed")
        finally:
            code = follower.stop(signal.SIGTERM)
        assert code == 130, follower.output()
        job = _job(engine)
        with engine.connect() as conn:
            written = conn.exec_driver_sql("SELECT count(*) FROM backfill_embeddings").scalar()
        assert job["status"] == "interrupted" and job["worker_id"] is None and 0 < job["embedded"] == written
        assert needing(engine)
        server.configure(latency_ms=0)
        assert cli("resume", env=env).code == 0
    assert needing(engine) == {(t, i) for t, i, _a in _failures(engine, "skipped")}


def test_run_follow_stops_when_the_job_is_cancelled(tmp_path, cli):
    from conftest import make_backend

    be = make_backend("libsql", tmp_path)
    engine = be.engine()
    build(engine, memories=20, entities=5)
    assert cli("migrate", "--database-url", be.url).code == 0
    with FakeOpenAI() as server:
        env = env_for(server, be.url)
        follower = Follower(env, command="run")
        try:
            follower.wait_for("follow_waiting")
            assert cli("cancel", str(_job(engine)["id"]), env=env).code == 0
            code = follower.proc.wait(timeout=60)
        finally:
            if follower.proc.poll() is None:
                follower.proc.kill()
    assert code == 0, follower.output()
    job = _job(engine)
    assert job["status"] == "cancelled" and job["worker_id"] is None
