"""A PostgreSQL restart during a job (issue 12, item 6): `pg_ctl stop -m immediate`, start again 10 s later.
"the database system is starting up" (57P03), "terminating connection" (57P01) and connection refused are
transient: the job waits and finishes, and its lease is released. The test runs its OWN throwaway server
(initdb in a temporary folder, a free port on 127.0.0.1), never the shared one."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import ROOT
from engine_helpers import RUN_ARGS, assert_vectors_match_recipe, build, env_for, needing
from support.fake_openai import FakeOpenAI

PG_BIN = Path(os.environ.get("BACKFILL_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port, self.data = root, port, root / "data"
        self.as_postgres = os.geteuid() == 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(PG_BIN / args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def start_in_recovery(self) -> None:
        """Start as a standby without hot standby: every connection is refused with FATAL 57P03 ("the database
        system is not yet accepting connections" / "is starting up") until `promote`, as during crash recovery."""
        (self.data / "standby.signal").touch()
        if self.as_postgres:
            shutil.chown(self.data / "standby.signal", "postgres", "postgres")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c hot_standby=off",
                  "start")

    def promote(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "promote")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture
def own_pg():
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"no PostgreSQL binaries in {PG_BIN}")
    root = Path(tempfile.mkdtemp(prefix="backfill-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    server = Server(root, _free_port())
    server.init()
    server.start()
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def test_a_postgresql_restart_mid_job_is_waited_out_and_the_lease_released(own_pg):
    engine = sa.create_engine(own_pg.url.replace("postgresql://", "postgresql+psycopg://", 1))
    build(engine, memories=400, entities=0)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE memories SET embedding = NULL"))
    missing = needing(engine)
    engine.dispose()
    with FakeOpenAI(latency_ms=300) as server:
        ours = ("DATABASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL")
        env = {**{k: v for k, v in os.environ.items() if k not in ours}, **env_for(server, own_pg.url)}
        proc = subprocess.Popen([sys.executable, "-m", "backfill", "up", *RUN_ARGS, "-b", "5", "--concurrency", "1"],
                                cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while server.stats()["requests"] < 3 and time.monotonic() < deadline:
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.1)
            own_pg.stop("immediate")  # the server is gone: connection refused ...
            time.sleep(4)
            own_pg.start_in_recovery()  # ... then up, but refusing connections while it "starts up" (57P03) ...
            time.sleep(8)
            own_pg.promote()  # ... then accepting them again, 12 s after it went, within the 45 s retry budget
            server.configure(latency_ms=0)  # the latency kept the job running through the outage; now let it finish
            out, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    log = (own_pg.root / "log").read_text(errors="replace")
    assert "FATAL:  the database system is" in log  # the job did meet 57P03 (not accepting connections)
    assert proc.returncode == 0, (out + err)[-3000:]
    engine = sa.create_engine(own_pg.url.replace("postgresql://", "postgresql+psycopg://", 1))
    assert needing(engine) == set()
    assert assert_vectors_match_recipe(engine, missing) == len(missing)
    with engine.connect() as conn:
        job = conn.execute(sa.text("SELECT status, worker_id, embedded FROM backfill_jobs")).mappings().one()
    assert (job["status"], job["worker_id"]) == ("done", None)
    engine.dispose()
