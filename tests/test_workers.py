"""One worker per job: four `backfill up` started at once share one job, exactly one embeds and
the others wait (`--wait`) or exit 4 naming the holder; a worker whose heartbeat stopped loses its
lease once it expires, and the next worker resumes from the checkpoint."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from conftest import ROOT, make_backend
from engine_helpers import RUN_ARGS, assert_vectors_match_recipe, build, embeddings, env_for, is_vector, needing
from support.fake_openai import FakeOpenAI


def _popen(env: dict, *args: str) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL")}
    return subprocess.Popen([sys.executable, "-m", "backfill", *args], env={**full, **env}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _jobs(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text("SELECT * FROM backfill_jobs ORDER BY id")).mappings()]


@pytest.mark.parametrize("name", ["sqlite", "libsql", "postgresql"])
def test_four_ups_at_once_one_embeds_the_others_wait_or_exit_4(name, tmp_path):
    be = make_backend(name, tmp_path)
    engine = be.engine()
    build(engine, memories=240, entities=40, seed=13)
    todo = needing(engine)
    with FakeOpenAI(latency_ms=250) as server:
        env = env_for(server, be.url)
        args = ["up", *RUN_ARGS, "-b", "10", "--concurrency", "2", "--log-format", "json"]
        procs = [_popen(env, *args, *(["--wait"] if i % 2 else [])) for i in range(4)]
        results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
        log = list(server.log)
    embedders = [i for i, (_, out, _) in enumerate(results) if '"batch_committed"' in out]
    assert len(embedders) == 1, [(c, e[-300:]) for c, _, e in results]
    for i, (code, out, err) in enumerate(results):
        if i in embedders or i % 2 == 1:  # the embedder, and the --wait ones (they found nothing left)
            assert code == 0, (out + err)[-3000:]
        else:  # no --wait: exit 4 naming the holder (or 0 if it only arrived after the job was done)
            assert code in (0, 4), (out + err)[-3000:]
            if code == 4:  # the JSON error event names the holder and the fix
                assert re.search(r"job \d+ is held by worker \S+:\d+:\w+ until ", out) and "--wait" in out, out
    blocked = [i for i, (code, out, _) in enumerate(results) if code == 4 or '"job_busy"' in out]
    assert blocked, "no worker ever found the lease held: the run ended before the others started"
    # one job, every row embedded once: the fake server saw each needed input exactly once
    jobs = _jobs(engine)
    assert len(jobs) == 1 and jobs[0]["status"] == "done" and jobs[0]["worker_id"] is None
    assert sum(e["n_inputs"] for e in log if e["status"] == 200) == len(todo)
    assert jobs[0]["embedded"] == len(todo)
    assert assert_vectors_match_recipe(engine, todo) == len(todo)


def test_a_frozen_workers_lease_expires_and_the_next_worker_resumes_from_the_checkpoint(tmp_path, cli):
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=600, entities=0, seed=17)
    todo = needing(engine)
    args = [*RUN_ARGS, "--target", "memories", "-b", "5", "--concurrency", "1"]
    with FakeOpenAI(latency_ms=300) as server:
        env = env_for(server, be.url)
        assert cli("migrate", env=env).code == 0
        first = _popen(env, "run", *args)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (_jobs(engine) and _jobs(engine)[0]["batches"] >= 1):
            time.sleep(0.1)
        _freeze_between_commits(first, be.path)  # alive but silent: its heartbeat stops
        try:
            job = _jobs(engine)[0]
            assert job["worker_id"] and job["worker_id"].split(":")[1] == str(first.pid)
            held = cli("resume", env=env)
            assert held.code == 4, held.output[-2000:]
            assert job["worker_id"] in held.output and "--wait" in held.output
            # the lease runs out (no heartbeat past its timeout): make it so without waiting a minute
            with engine.begin() as conn:
                conn.execute(sa.text("UPDATE backfill_jobs SET lease_expires_at = '2000-01-01T00:00:00.000+00:00'"))
            committed = {(t, i) for t in ("memories",) for i, e in embeddings(engine, t).items() if is_vector(e)} & todo
            checkpoint = _jobs(engine)[0]
            # the frozen worker's request on the wire is still served, and logged, after its 300 ms: let it
            # land before the log restarts, or its inputs count as the new worker's
            _until_quiet(server)
            server.reset_log()
            server.configure(latency_ms=0)
            taken = cli("resume", env=env)
            sent = server.inputs_seen()
        finally:
            first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=120)
    assert taken.code == 0, taken.output[-2000:]
    # the new worker started at the checkpoint: it sent only rows not yet committed (plus none twice)
    assert len(sent) == len(todo - committed)  # exactly the rows after the checkpoint, each once
    final = _jobs(engine)[0]
    assert final["status"] == "done" and final["embedded"] >= checkpoint["embedded"]
    # the frozen worker, woken up, finds its lease gone and stops without writing its batch
    assert first.returncode == 4 and "lost the lease" in out + err, (out + err)[-2000:]
    assert needing(engine) == set()
    assert assert_vectors_match_recipe(engine, todo) == len(todo)
    with engine.connect() as conn:
        written = conn.execute(sa.text("SELECT count(*) FROM backfill_embeddings")).scalar()
    assert final["embedded"] == written == len(todo)  # nothing counted twice


def _until_quiet(server, quiet_s: float = 1.0, limit_s: float = 15.0) -> None:  # noqa: ANN001
    """Wait until the fake server has logged no request for `quiet_s` (at most `limit_s`)."""
    end = time.monotonic() + limit_s
    seen, since = len(server.log), time.monotonic()
    while time.monotonic() < end and time.monotonic() - since < quiet_s:
        time.sleep(0.05)
        if len(server.log) != seen:
            seen, since = len(server.log), time.monotonic()


def _freeze_between_commits(proc: subprocess.Popen, path) -> None:  # noqa: ANN001
    """SIGSTOP the worker at a moment it holds no lock on the file: stopped inside a commit it would hold the
    write lock, and no other process could write (a frozen SQLite writer blocks every writer; that is not
    what this test is about). Bounded: 100 tries."""
    for _ in range(100):
        proc.send_signal(signal.SIGSTOP)
        probe = sqlite3.connect(path, timeout=0.2, isolation_level=None)
        try:
            probe.execute("BEGIN EXCLUSIVE")  # no other reader or writer holds the file
            probe.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.02)
        finally:
            probe.close()
    raise AssertionError("the worker never paused outside a transaction")
