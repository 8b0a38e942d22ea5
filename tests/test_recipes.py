"""The README's CI/CD recipes, run verbatim: each block is read from README.md (so the docs cannot
drift) and run by a real shell with the real CLI on PATH, a real database and the fake server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backfill import sample, tables
from conftest import ROOT, make_backend
from engine_helpers import embeddings, is_vector
from support.fake_openai import FakeOpenAI

DIMS = 1536  # the README's commands use the default model, text-embedding-3-small

_BLOCK = re.compile(r"<!-- recipe: (?P<name>[\w-]+) -->\s*```[a-z]*\n(?P<body>.*?)```", re.S)


def recipe(name: str) -> str:
    found = {m["name"]: m["body"] for m in _BLOCK.finditer((ROOT / "README.md").read_text())}
    assert name in found, f"README has no recipe {name!r} (found {sorted(found)})"
    return found[name]


def _env(server, url: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "TURSO_URL", "TURSO_AUTH_TOKEN")}
    bin_dir = str(Path(sys.executable).parent)  # the `backfill` console script of this environment
    return {**keep, "PATH": f"{bin_dir}:{keep.get('PATH', '')}", "DATABASE_URL": url,
            "OPENAI_API_KEY": "sk-test-not-a-real-key", "OPENAI_BASE_URL": server.base_url}


def _sh(script: str, env: dict, cwd: Path, shell: str = "bash", timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([shell, "-c", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def needing(engine) -> set[tuple[str, int]]:
    return {(t, i) for t in tables.SPECS for i, e in embeddings(engine, t).items() if not is_vector(e, DIMS)}


def _poison(engine, n: int) -> list[int]:
    """Give n rows that need an embedding a text the fake server rejects with 400."""
    ids = sorted(i for t, i in needing(engine) if t == "memories")[:n]
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"UPDATE memories SET content = 'POISONED ' || content WHERE id IN ({','.join(map(str, ids))})")
    return ids


@pytest.fixture
def db(tmp_path):
    be = make_backend("sqlite", tmp_path)
    sample.build(be.engine(), sample.SampleSpec(memories=150, entities=20, dimensions=DIMS, long_every=10_000))
    return be


def test_post_deploy_step_embeds_everything_and_a_second_deploy_sends_nothing(db, tmp_path):
    with FakeOpenAI() as server:
        env = _env(server, db.url)
        first = _sh(recipe("post-deploy"), env, tmp_path)
        assert first.returncode == 0, first.stdout[-1500:] + first.stderr[-1500:]
        assert needing(db.engine()) == set()
        server.reset_log()
        again = _sh(recipe("post-deploy"), env, tmp_path)
        assert again.returncode == 0 and server.stats()["requests"] == 0


@pytest.mark.parametrize("poisoned, code", [(1, 0), (6, 3)])
def test_ci_stage_fails_only_above_max_failed_ratio(db, tmp_path, poisoned, code):
    bad = _poison(db.engine(), poisoned)
    script = recipe("ci-stage")
    with FakeOpenAI(fail_inputs=["POISONED"]) as server:
        result = _sh(script, _env(server, db.url), tmp_path)
    assert result.returncode == code, result.stdout[-1500:] + result.stderr[-1500:]
    assert needing(db.engine()) == {("memories", i) for i in bad}  # everything else is written
    finished = [e for e in _lines(tmp_path / "backfill.jsonl") if e.get("event") == "job_finished"][-1]
    ratio = finished["failed"] / finished["selected"]
    assert finished["failed"] == poisoned and (ratio > 0.01 if code else ratio <= 0.01)


def test_ci_stage_fails_on_schema_drift_before_writing_anything(db, tmp_path, cli):
    assert cli("migrate", "--database-url", db.url).code == 0
    with db.engine().begin() as conn:
        conn.exec_driver_sql("ALTER TABLE memories RENAME COLUMN tags TO labels")  # a column backfill reads
    before = needing(db.engine())
    with FakeOpenAI() as server:
        result = _sh(recipe("ci-stage"), _env(server, db.url), tmp_path)
        assert server.stats()["requests"] == 0
    assert result.returncode == 1, result.stdout + result.stderr
    events = _lines(tmp_path / "backfill.jsonl")
    assert events[-1]["exit_code"] == 1 and "memories.tags" in json.dumps(events[-1]["details"])
    assert not any(e.get("event") == "job_finished" for e in events)
    assert needing(db.engine()) == before


def _cron_command(tmp_path: Path) -> str:
    line = recipe("cron").strip()
    fields = line.split(None, 5)
    assert len(fields) == 6 and fields[0] == "*/15", line
    return fields[5].replace("/srv/memory", str(tmp_path))  # the README's example directory


def test_cron_line_is_lock_safe_and_the_next_run_finishes_the_job(db, tmp_path):
    command = _cron_command(tmp_path)
    with FakeOpenAI(latency_per_input_ms=400) as server:  # ~40 s per request: the first run is still going
        env = _env(server, db.url)
        first = subprocess.Popen(["sh", "-c", command], env=env, cwd=tmp_path, start_new_session=True)
        try:
            engine = db.engine()
            for _ in range(600):  # wait (bounded) until the first run holds the job's lease
                with engine.connect() as conn:
                    names = {r[0] for r in conn.exec_driver_sql("SELECT name FROM sqlite_master")}
                    held = "backfill_jobs" in names and conn.exec_driver_sql(
                        "SELECT count(*) FROM backfill_jobs WHERE worker_id IS NOT NULL").scalar()
                if held:
                    break
                assert first.poll() is None, "the first run ended before taking the lease"
                time.sleep(0.1)
            second = _sh(command, env, tmp_path, shell="sh")
            assert second.returncode == 0, second.stderr  # exit 4 is absorbed by `|| test $? -eq 4`
            events = _lines(tmp_path / "backfill.jsonl")
            assert any(e.get("exit_code") == 4 for e in events), events[-3:]
        finally:
            os.killpg(first.pid, signal.SIGKILL)  # a crashed run: its lease is left behind
            first.wait(timeout=60)
        server.configure(latency_per_input_ms=0)
        third = _sh(command, env, tmp_path, shell="sh")
        assert third.returncode == 0, third.stderr
    assert needing(db.engine()) == set()
    with db.engine().connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*), max(status) FROM backfill_jobs").one() == (1, "done")


def test_background_run_logs_to_a_file_and_finishes(db, tmp_path):
    script = recipe("background")
    with FakeOpenAI() as server:
        started = _sh(script, _env(server, db.url), tmp_path)
        assert started.returncode == 0, started.stderr
        pid = int((tmp_path / "backfill.pid").read_text())
        for _ in range(1200):  # bounded wait for the background process to exit
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("background run did not finish")
    events = _lines(tmp_path / "backfill.log")
    assert [e for e in events if e.get("event") == "job_finished"][-1]["status"] == "done"
    assert needing(db.engine()) == set()
