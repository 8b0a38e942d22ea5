"""Real backends for every test: a stdlib SQLite file, an embedded libSQL file, a real
PostgreSQL (started by `.ci/run` via scripts/pg-start, URL in BACKFILL_TEST_PG) and a remote libSQL
URL served on loopback by the project's Hrana server (`support.libsql_server`)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from backfill.db import engine_for, resolve
from support import cli_fork

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["sqlite", "libsql", "postgresql"]
ENGINE_BACKENDS = ["sqlite", "libsql", "postgresql", "remote-libsql"]
_SERVERS: list = []  # remote-libsql servers started by the current test, stopped after it


@dataclass
class Backend:
    name: str
    url: str
    path: Path | None
    server: Any = None  # the LibsqlServer of a remote-libsql backend (drop_next, stats)

    def engine(self) -> sa.Engine:
        return engine_for(resolve(self.url), must_exist=False)

    @property
    def sqlite_family(self) -> bool:
        return self.name != "postgresql"

    def checksum(self, table: str, engine: sa.Engine | None = None) -> str:
        """sha256 over every row of `table`, ordered by its primary key, values with their types."""
        engine = engine or self.engine()
        with engine.connect() as conn:
            t = sa.Table(table, sa.MetaData(), autoload_with=conn)
            order = list(t.primary_key.columns) or list(t.columns)
            h = hashlib.sha256()
            for row in conn.execute(sa.select(t).order_by(*order)):
                h.update(repr(tuple((type(v).__name__, v) for v in row)).encode())
        return h.hexdigest()


def _pg_url() -> str | None:
    return os.environ.get("BACKFILL_TEST_PG")


def make_backend(name: str, tmp_path: Path) -> Backend:
    if name == "sqlite":
        path = tmp_path / "memory.db"
        return Backend(name, f"sqlite:///{path}", path)
    if name == "libsql":
        path = tmp_path / "memory-libsql.db"
        return Backend(name, f"sqlite+libsql:///{path}", path)
    if name == "remote-libsql":
        from support.libsql_server import LibsqlServer

        path = tmp_path / "memory-remote.db"
        server = LibsqlServer(str(path), idle_timeout=10.0).start()  # sqld expires idle streams after ~10 s
        _SERVERS.append(server)
        return Backend(name, server.url, path, server)
    base = _pg_url()
    if not base:
        if os.environ.get("CI"):
            pytest.fail("BACKFILL_TEST_PG is not set: .ci/run must start PostgreSQL (scripts/pg-start)")
        pytest.skip("PostgreSQL not started (eval \"$(scripts/pg-start)\")")
    dbname = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{dbname}"')
    admin.dispose()
    return Backend(name, base.rsplit("/", 1)[0] + f"/{dbname}", None)


@pytest.fixture(autouse=True)
def _stop_libsql_servers():
    yield
    while _SERVERS:
        _SERVERS.pop().stop()


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path) -> Backend:
    return make_backend(request.param, tmp_path)


@pytest.fixture(params=ENGINE_BACKENDS)
def engine_backend(request, tmp_path) -> Backend:
    """The engine suite's four backends; test ids show each (test_x[remote-libsql])."""
    return make_backend(request.param, tmp_path)


@pytest.fixture(params=["sqlite", "libsql"])
def file_backend(request, tmp_path) -> Backend:
    return make_backend(request.param, tmp_path)


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_backend(request, tmp_path) -> Backend:
    """SQLite's and PostgreSQL's SQL: for end-to-end tests whose SQL libSQL runs as SQLite does (the libSQL
    driver itself is covered by the `backend` and `engine_backend` tests), to keep the suite's time down."""
    return make_backend(request.param, tmp_path)


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 300) -> Result:
    """The real CLI in a subprocess (a pipe, so JSON lines unless --log-format human); forked from a
    server with its modules imported (support.cli_fork) unless BACKFILL_TEST_EXEC=1."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "TURSO_URL", "TURSO_AUTH_TOKEN",
                                                                 "OPENAI_API_KEY", "OPENAI_BASE_URL")}
    full_env.update(env or {})
    if cli_fork.enabled():
        return Result(*cli_fork.run(list(args), full_env, str(cwd or ROOT), timeout))
    proc = subprocess.run(
        [sys.executable, "-m", "backfill", *args],
        capture_output=True, text=True, env=full_env, cwd=cwd or ROOT, timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli():
    return run_cli
