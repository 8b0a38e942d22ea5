"""`up` and `migrate` never create or change a file they should not (issue 13, items 1 and 2):
a typo'd path, a 0-byte file, another application's database. Creating one is an explicit act."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import sqlalchemy as sa


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("how", ["flag", "env", "dotenv"])
@pytest.mark.parametrize("command", ["up", "migrate"])
def test_a_typod_path_exits_2_and_creates_nothing(tmp_path, cli, command, how):
    missing = tmp_path / "typo.db"
    args, env = [command, "--provider", "local"] if command == "up" else [command], {}
    if how == "flag":
        args += ["--database-url", str(missing)]
    elif how == "env":
        env["DATABASE_URL"] = str(missing)
    else:
        (tmp_path / ".env").write_text(f"DATABASE_URL={missing}\n")
    result = cli(*args, "--log-format", "human", env=env, cwd=tmp_path)
    assert result.code == 2, result.output
    assert "database file not found" in result.stderr and "backfill migrate --create" in result.stderr
    assert not missing.exists()
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["up", "migrate"])
def test_a_zero_byte_file_is_refused_unchanged(tmp_path, cli, command):
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    extra = ["--provider", "local"] if command == "up" else []
    result = cli(command, "--database-url", str(empty), *extra, "--log-format", "human")
    assert result.code == 2, result.output
    assert "the database is empty" in result.stderr and "--create" in result.stderr
    assert empty.read_bytes() == b""


def test_migrate_create_makes_a_new_database_and_up_then_runs_on_it(tmp_path, cli):
    path = tmp_path / "new.db"
    created = cli("migrate", "--create", "--database-url", str(path))
    assert created.code == 0, created.output
    assert json.loads(created.stdout.splitlines()[-1])["action"] == "created"
    up = cli("up", "--database-url", str(path), "--provider", "local")
    assert up.code == 0, up.output
    again = cli("migrate", "--create", "--database-url", str(path))  # --create on a live database: just at head
    assert json.loads(again.stdout.splitlines()[-1])["action"] == "at-head"


@pytest.mark.parametrize("command", ["up", "migrate", "migrate --create"])
def test_another_applications_database_is_refused_unchanged(tmp_path, cli, command):
    path = tmp_path / "invoices.db"
    with sa.create_engine(f"sqlite:///{path}").begin() as conn:
        conn.exec_driver_sql("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.exec_driver_sql("INSERT INTO invoices (total) VALUES (12.5), (99.0)")
    digest = _sha(path)
    extra = ["--provider", "local"] if command == "up" else []
    result = cli(*command.split(), "--database-url", str(path), *extra, "--log-format", "human")
    assert result.code == 1, result.output
    assert "not an mcp-memory-ts database" in result.stderr and "invoices" in result.stderr
    assert _sha(path) == digest
    with sa.create_engine(f"sqlite:///{path}").connect() as conn:
        assert [r[0] for r in conn.exec_driver_sql("SELECT name FROM sqlite_master")] == ["invoices"]
