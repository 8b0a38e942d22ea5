"""No secret leaves (promise 8). Recognisable fake secrets (an API key, a libSQL auth token, a
PostgreSQL password) go through runs that succeed and runs that fail in several ways, with
`--traceback` and JSON logs; then stdout, stderr, the job rows and the failure rows are searched:
zero occurrences."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from backfill.config import Secret
from backfill.db import engine_for, resolve
from conftest import ROOT, make_backend
from engine_helpers import RUN_ARGS, build
from support.fake_openai import FakeOpenAI
from support.libsql_server import LibsqlServer

API_KEY = "sk-LEAKCHECK-apikey-7f3a9c1e"
TOKEN = "tok-LEAKCHECK-libsql-5e1b77d0"
PG_PASSWORD = "pw-LEAKCHECK-pg-93ad02"
SECRETS = (API_KEY, TOKEN, PG_PASSWORD)
ARGS = [*RUN_ARGS, "-b", "10", "--timeout", "2"]


def _dump(engine) -> str:
    """Every value of every job row and failure row, as text."""
    out = []
    with engine.connect() as conn:
        for table in ("backfill_jobs", "backfill_failures"):
            for row in conn.execute(sa.text(f"SELECT * FROM {table}")).mappings():
                out.extend(f"{k}={v!r}" for k, v in row.items())
    return "\n".join(out)


def _assert_clean(texts: list[str], what: str) -> None:
    joined = "\n".join(texts)
    found = {s: joined.count(s) for s in SECRETS if s in joined}
    assert not found, f"secrets found in {what}: {found}"


def _sigterm_run(env: dict) -> str:
    full = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL",
                                                               "TURSO_URL", "TURSO_AUTH_TOKEN")}
    proc = subprocess.Popen([sys.executable, "-m", "backfill", "--traceback", "up", *ARGS, "--concurrency", "1"],
                            env={**full, **env}, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return out + err


def test_no_secret_in_output_logs_job_rows_or_failure_rows(tmp_path, cli):
    outputs: list[str] = []

    def run(*args: str, env: dict, code: int | tuple[int, ...] | None = None, traceback: bool = True) -> None:
        result = cli(*args, "--log-format", "json", env=env)
        if code is not None:
            assert result.code in ((code,) if isinstance(code, int) else code), result.output[-2000:]
        outputs.append(result.output)
        # the same again for people, with full tracebacks of every error (exit codes differ then)
        if traceback:
            outputs.append(cli("--traceback", *args, "--log-format", "human", env=env).output)

    # 1. the API key: rejected (401), faults that exhaust the retries (failure rows), a success, SIGTERM
    be = make_backend("sqlite", tmp_path)
    build(be.engine(), memories=120, entities=20, seed=21)
    with FakeOpenAI(api_key="sk-the-right-key") as server:
        env = {"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": server.base_url, "DATABASE_URL": be.url}
        run("up", *ARGS, env=env, code=2)  # the key is refused: one line, exit 2
        server.configure(api_key=API_KEY)
        server.push_faults(*["500"] * 4, *["not_json"] * 4)
        run("up", *ARGS, env=env, code=(0, 3))  # failure rows carry the provider's errors
        server.configure(latency_ms=400)
        outputs.append(_sigterm_run({**env, "OPENAI_API_KEY": API_KEY}))
        server.configure(latency_ms=0)
        run("retry-failed", env=env, code=(0, 3))
        run("status", env=env, code=0, traceback=False)
        run("jobs", env=env, code=0, traceback=False)
        run("run", *ARGS, "--base-url", "http://127.0.0.1:1/v1", env=env, code=(0, 3))  # nothing listens there
    _assert_clean(outputs, "CLI output (API key runs)")
    _assert_clean([_dump(be.engine())], "job and failure rows (sqlite)")

    # 2. the libSQL auth token: a wrong token, then the right one through a failing and a working run
    remote_file = tmp_path / "remote.db"
    with LibsqlServer(str(remote_file), auth_token=TOKEN) as libsql, FakeOpenAI() as server:
        engine = engine_for(resolve(libsql.url, Secret(TOKEN)), must_exist=False)
        build(engine, memories=60, entities=10, seed=22)
        base = {"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": server.base_url, "TURSO_URL": libsql.url}
        run("up", *ARGS, env={**base, "TURSO_AUTH_TOKEN": "tok-wrong"}, code=2)
        run("stats", env={**base, "TURSO_AUTH_TOKEN": "tok-wrong"}, code=2, traceback=False)
        server.push_faults(*["reset"] * 4)
        run("up", *ARGS, env={**base, "TURSO_AUTH_TOKEN": TOKEN}, code=(0, 3))
        run("up", *ARGS, env={**base, "DATABASE_URL": f"{libsql.url}&authToken={TOKEN}"}, code=(0, 3))
        run("status", env={**base, "TURSO_AUTH_TOKEN": TOKEN}, code=0, traceback=False)
        _assert_clean([_dump(engine)], "job and failure rows (remote libSQL)")
        engine.dispose()
    _assert_clean(outputs, "CLI output (libSQL token runs)")

    # 3. the PostgreSQL password: unreachable server, wrong database, then a real run (trust auth)
    pg = os.environ.get("BACKFILL_TEST_PG")
    if not pg:
        pytest.skip("PostgreSQL not started")
    pg_be = make_backend("postgresql", tmp_path)
    url = pg_be.url.replace("postgresql://postgres@", f"postgresql://postgres:{PG_PASSWORD}@", 1)
    build(pg_be.engine(), memories=60, entities=10, seed=23)
    with FakeOpenAI() as server:
        base = {"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": server.base_url}
        run("up", *ARGS, env={**base, "DATABASE_URL": f"postgresql://postgres:{PG_PASSWORD}@127.0.0.1:1/x"}, code=2)
        run("stats", env={**base, "DATABASE_URL": url.rsplit("/", 1)[0] + "/no_such_db"}, code=2)
        server.push_faults(*["503"] * 4)
        run("up", *ARGS, env={**base, "DATABASE_URL": url}, code=(0, 3))
        run("jobs", env={**base, "DATABASE_URL": url}, code=0, traceback=False)
    _assert_clean(outputs, "CLI output (PostgreSQL runs)")
    _assert_clean([_dump(pg_be.engine())], "job and failure rows (PostgreSQL)")
    assert len(outputs) >= 20 and sum(len(o) for o in outputs) > 5000  # the runs really said things
