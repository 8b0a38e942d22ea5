"""Database faults during a run: a remote libSQL server that drops connections (before or after
doing the work) and a libSQL file locked by another process. Retried with backoff; each batch is
committed fully or not at all, and never counted twice."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from conftest import ROOT, SERVED_FILES, Backend, make_backend
from engine_helpers import RUN_ARGS, assert_vectors_match_recipe, build, env_for, needing
from support.fake_openai import FakeOpenAI

ARGS = [*RUN_ARGS, "--target", "memories", "-b", "5", "--concurrency", "1"]


def _start(env: dict) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL")}
    return subprocess.Popen([sys.executable, "-m", "backfill", "--traceback", "run", *ARGS, "--log-format", "json"],
                            env={**full, **env}, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_first_batch(proc: subprocess.Popen) -> list[str]:
    lines = []
    for line in proc.stdout:  # bounded: the process ends
        lines.append(line)
        if '"batch_committed"' in line:
            break
    return lines


def _batches(path) -> int:
    """The job's committed batches, read straight from the served file."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as raw:
        return int(raw.execute("SELECT coalesce(max(batches), 0) FROM backfill_jobs").fetchone()[0])


@contextmanager
def _served(path, *, idle_timeout: float) -> Iterator[Backend]:
    """A loopback libSQL server on `path` whose streams expire after `idle_timeout`; `build` writes its file."""
    from support.libsql_server import LibsqlServer

    with LibsqlServer(str(path), idle_timeout=idle_timeout) as server:
        assert server.port is not None
        SERVED_FILES[server.port] = path
        try:
            yield Backend("remote-libsql", server.url, path, server)
        finally:
            SERVED_FILES.pop(server.port, None)


def _assert_exact(engine, todo) -> None:
    assert needing(engine) & {("memories", i) for _, i in todo} == set()
    assert assert_vectors_match_recipe(engine, todo) == len(todo)
    with engine.connect() as conn:
        job = conn.execute(sa.text("SELECT * FROM backfill_jobs")).mappings().one()
        written = conn.execute(sa.text("SELECT count(*) FROM backfill_embeddings")).scalar()
        failures = conn.execute(sa.text("SELECT count(*) FROM backfill_failures WHERE kind = 'failed'")).scalar()
    assert job["status"] == "done" and failures == 0
    assert job["embedded"] == written == len(todo)  # no batch counted twice, none lost
    assert job["selected"] == len(todo) + job["skipped"]


def test_dropped_remote_connections_are_retried_and_no_batch_is_lost_or_counted_twice(tmp_path, cli):
    be = make_backend("remote-libsql", tmp_path)
    engine = be.engine()
    build(engine, memories=400, entities=0, seed=5)
    todo = {r for r in needing(engine) if r[0] == "memories"}
    server = be.server
    with FakeOpenAI(latency_ms=20) as fake:
        env = env_for(fake, be.url)
        assert cli("migrate", env=env).code == 0
        proc = _start(env)
        lines = _wait_first_batch(proc)
        plan = [("batch", True), ("cursor", False), ("describe", False), ("batch", False), ("cursor", True),
                ("batch", True), ("describe", True), ("batch", False)]
        dropped = server.stats()["dropped"]
        for kind, after in plan:  # one drop at a time; the next is armed once two more batches committed
            server.drop_next(1, kind=kind, after_processing=after)
            deadline = time.monotonic() + 30
            while server.stats()["dropped"] == dropped and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            dropped = server.stats()["dropped"]
            mark = _batches(be.path)
            while _batches(be.path) < mark + 2 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    assert dropped >= 6, f"only {dropped} drops hit the run"
    events = [json.loads(x) for x in (lines + out.splitlines()) if x.strip().startswith("{")]
    assert events[-1]["event"] == "job_finished"
    _assert_exact(engine, todo)


def test_a_libsql_file_locked_by_another_process_is_waited_out(tmp_path, cli):
    be = make_backend("libsql", tmp_path)
    engine = be.engine()
    build(engine, memories=200, entities=0, seed=6)
    todo = {r for r in needing(engine) if r[0] == "memories"}
    with FakeOpenAI(latency_ms=150) as fake:
        env = env_for(fake, be.url)
        assert cli("migrate", env=env).code == 0
        proc = _start(env)
        _wait_first_batch(proc)
        for _ in range(2):  # another writer holds the file's exclusive lock for 1.5 s, twice
            subprocess.run([sys.executable, "-c", (
                "import sqlite3, time, sys\n"
                "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                "c.execute('BEGIN EXCLUSIVE'); time.sleep(1.5); c.execute('COMMIT')\n"
            ), str(be.path)], check=True, timeout=30)
            assert proc.poll() is None  # the run was going on all along: it waited the lock out
            time.sleep(0.2)
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (err + out)[-3000:]
    _assert_exact(engine, todo)


def test_a_write_lock_left_on_a_remote_server_by_a_killed_run_is_waited_out_from_the_first_statement(tmp_path, cli):
    """A run killed inside a transaction leaves its stream holding the write lock until the server expires it
    (sqld: ~10 s; here 7 s, longer than the server's own 5 s busy timeout). The next `up` waits from its first
    statement on (migrate's BEGIN IMMEDIATE), instead of failing with SQLITE_BUSY as an internal error."""
    import urllib.request

    with _served(tmp_path / "memory-remote.db", idle_timeout=7.0) as be:
        build(be.engine(), memories=60, entities=0, seed=8)
        todo = {r for r in needing(be.engine()) if r[0] == "memories"}
        begin = {"requests": [{"type": "execute", "stmt": {"sql": "BEGIN IMMEDIATE", "want_rows": False}}]}
        req = urllib.request.Request(be.server.http_url + "/v3/pipeline", data=json.dumps(begin).encode(),
                                     method="POST")
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10) as resp:
            assert json.loads(resp.read())["results"][0]["type"] == "ok"  # the stream holds the lock; no one closes it
        started = time.monotonic()
        with FakeOpenAI() as fake:
            done = cli("up", *ARGS, env=env_for(fake, be.url), timeout=120)
        waited = time.monotonic() - started
        assert done.code == 0, done.output[-3000:]
        assert waited > 5, "the lock was not held: the test proves nothing"
        _assert_exact(be.engine(), todo)


def test_a_link_dropped_under_any_of_ups_first_statements_is_read_again(tmp_path, cli):
    """Before the job, `up` probes, checks, migrates and verifies: about 40 statements, on a fresh connection
    to a remote libSQL server. One dropped link under any of them failed the whole step with an internal
    error (exit 70; a drop under the probe said "cannot connect"). Reads are read again and the migration's
    transaction is run again, like the run's own commits."""
    for k in (0, 5, 13, 22, 32, 50):  # the Hrana request after which one is dropped: probe, checks, migrate, ...
        with _served(tmp_path / f"drop-{k}.db", idle_timeout=10.0) as be:
            server = be.server
            build(be.engine(), memories=30, entities=0, seed=9)
            todo = {r for r in needing(be.engine()) if r[0] == "memories"}
            with FakeOpenAI() as fake:
                env = {**os.environ, **env_for(fake, be.url)}
                base = server.stats()["requests"]
                proc = subprocess.Popen([sys.executable, "-m", "backfill", "up", *ARGS], env=env, cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                deadline = time.monotonic() + 60
                while server.stats()["requests"] < base + k and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.001)
                server.drop_next(1)
                out, err = proc.communicate(timeout=120)
                dropped = server.stats()["dropped"]
            assert proc.returncode == 0, (k, err[-2000:])
            assert dropped == 1, f"the drop after request {k} never hit the run: the test proves nothing"
            _assert_exact(be.engine(), todo)
