"""Migrations on every backend: create, adopt a live database, verify, refuse drift."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import sqlalchemy as sa

from backfill import baseline, sample
from backfill.schema import DATA_TABLE_NAMES
from backfill.migrate import head_revision

from conftest import ROOT

SMALL = sample.SampleSpec(memories=120, entities=40, dimensions=8)


def _legacy(backend) -> sa.Engine:
    engine = backend.engine()
    sample.build(engine, SMALL)
    return engine


def _fts_ids(engine: sa.Engine, word: str) -> list[int]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.text("SELECT rowid FROM memories_fts WHERE memories_fts MATCH :w ORDER BY rowid"), {"w": word})]


def test_migrate_creates_verify_passes_second_run_is_noop(backend, cli):
    first = cli("migrate", "--database-url", backend.url)
    assert first.code == 0, first.output
    assert json.loads(first.stdout.splitlines()[-1])["action"] == "created"
    with backend.engine().connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        assert {"alembic_version", "backfill_jobs", "backfill_failures", "backfill_embeddings"} <= tables
        assert DATA_TABLE_NAMES <= tables
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == head_revision()
    ok = cli("verify", "--database-url", backend.url, "--log-format", "human")
    assert ok.code == 0 and f"schema OK at {head_revision()}" in ok.stdout, ok.output
    again = cli("migrate", "--database-url", backend.url, "--log-format", "human")
    assert again.code == 0 and "already at head" in again.stdout


def test_adopting_a_live_database_keeps_every_row(backend, cli):
    engine = _legacy(backend)
    before = {t: backend.checksum(t, engine) for t in baseline.DATA_TABLES}
    fts_before = _fts_ids(engine, "meeting") if backend.sqlite_family else None
    assert fts_before != []
    engine.dispose()

    result = cli("migrate", "--database-url", backend.url)
    assert result.code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["action"] == "adopted"

    engine = backend.engine()
    after = {t: backend.checksum(t, engine) for t in baseline.DATA_TABLES}
    assert after == before
    if backend.sqlite_family:
        assert _fts_ids(engine, "meeting") == fts_before
    assert cli("verify", "--database-url", backend.url).code == 0
    noop = cli("migrate", "--database-url", backend.url)
    assert json.loads(noop.stdout.splitlines()[-1])["action"] == "at-head"
    assert {t: backend.checksum(t, engine) for t in baseline.DATA_TABLES} == before


@pytest.mark.parametrize("change, expected", [
    ("DROP INDEX idx_memories_user_type", "missing index idx_memories_user_type"),
    ("ALTER TABLE memories RENAME COLUMN importance TO priority", "memories.importance"),
])
def test_verify_names_the_drift(backend, cli, change, expected):
    assert cli("migrate", "--database-url", backend.url).code == 0
    with backend.engine().begin() as conn:
        conn.exec_driver_sql(change)
    result = cli("verify", "--database-url", backend.url, "--log-format", "human")
    assert result.code == 1
    assert expected in result.stderr


def test_incompatible_live_schema_is_refused_and_left_unchanged(file_backend, cli):
    engine = _legacy(file_backend)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX idx_memories_user_type")
        conn.exec_driver_sql("ALTER TABLE entities RENAME COLUMN notes TO remarks")
    engine.dispose()
    digest = hashlib.sha256(file_backend.path.read_bytes()).hexdigest()
    result = cli("migrate", "--database-url", file_backend.url, "--log-format", "human")
    assert result.code == 1, result.output
    assert "idx_memories_user_type" in result.stderr and "entities.notes" in result.stderr
    assert hashlib.sha256(file_backend.path.read_bytes()).hexdigest() == digest


def test_alembic_command_line_works_on_the_same_database(tmp_path, cli):
    db = tmp_path / "alembic.db"
    env = {"DATABASE_URL": f"sqlite:///{db}"}
    import os

    full = {**os.environ, **env}
    up = subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=full,
                        capture_output=True, text=True)
    assert up.returncode == 0, up.stderr
    cur = subprocess.run([sys.executable, "-m", "alembic", "current"], cwd=ROOT, env=full,
                         capture_output=True, text=True)
    assert cur.returncode == 0 and f"{head_revision()} (head)" in cur.stdout, cur.stdout + cur.stderr
    assert cli("verify", "--log-format", "human", env=env).code == 0
    result = cli("migrate", env=env)
    assert json.loads(result.stdout.splitlines()[-1])["action"] == "at-head"
