"""Migrations on every backend: create, adopt a live database, verify, refuse drift."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import sqlalchemy as sa

from backfill import baseline, sample
from backfill.migrate import head_revision
from backfill.schema import DATA_TABLE_NAMES
from conftest import ROOT

SMALL = sample.SampleSpec(memories=120, entities=40, dimensions=8)


def _legacy(backend) -> sa.Engine:
    engine = backend.engine()
    sample.build(engine, SMALL)
    return engine


def _fts_ids(engine: sa.Engine, word: str) -> list[int]:
    with engine.connect() as conn:
        query = sa.text("SELECT rowid FROM memories_fts WHERE memories_fts MATCH :w ORDER BY rowid")
        return [r[0] for r in conn.execute(query, {"w": word})]


def test_migrate_creates_verify_passes_second_run_is_noop(backend, cli):
    first = cli("migrate", "--create", "--database-url", backend.url)
    assert first.code == 0, first.output
    assert json.loads(first.stdout.splitlines()[-1])["action"] == "created"
    with backend.engine().connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        assert {"alembic_version", "backfill_jobs", "backfill_failures", "backfill_embeddings", "backfill_batches",
                "backfill_batch_chunks"} <= tables
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
    ("ALTER TABLE memories RENAME COLUMN embedding TO vec", "missing column memories.embedding"),
    ("ALTER TABLE entities RENAME COLUMN notes TO remarks", "missing column entities.notes"),
    ("DROP INDEX ix_backfill_jobs_status", "missing index ix_backfill_jobs_status"),
    ("ALTER TABLE backfill_embeddings RENAME COLUMN content_hash TO h", "backfill_embeddings.content_hash"),
])
def test_verify_names_the_drift_in_what_the_tool_needs_and_owns(backend, cli, change, expected):
    assert cli("migrate", "--create", "--database-url", backend.url).code == 0
    with backend.engine().begin() as conn:
        conn.exec_driver_sql(change)
    result = cli("verify", "--database-url", backend.url, "--log-format", "human")
    assert result.code == 1
    assert expected in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    if all("run `backfill migrate`" in line for line in lines):  # the fix it prints works
        assert cli("migrate", "--database-url", backend.url).code == 0
        assert cli("verify", "--database-url", backend.url).code == 0


@pytest.mark.parametrize("change", [
    "DROP INDEX idx_memories_user_type",
    "ALTER TABLE memories RENAME COLUMN importance TO priority",
    "ALTER TABLE entities ADD COLUMN legacy_score INTEGER",
    "CREATE TABLE oauth_clients (client_id TEXT PRIMARY KEY, name TEXT)",
])
def test_what_the_server_adds_or_drops_beyond_the_tools_needs_is_not_drift(backend, cli, change):
    assert cli("migrate", "--create", "--database-url", backend.url).code == 0
    with backend.engine().begin() as conn:
        conn.exec_driver_sql(change)
    result = cli("verify", "--database-url", backend.url, "--log-format", "human")
    assert result.code == 0, result.output


def test_incompatible_live_schema_is_refused_and_left_unchanged(file_backend, cli):
    engine = _legacy(file_backend)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX idx_memories_user_type")  # not needed by the tool: not named
        conn.exec_driver_sql("ALTER TABLE entities RENAME COLUMN notes TO remarks")
    engine.dispose()
    digest = hashlib.sha256(file_backend.path.read_bytes()).hexdigest()
    result = cli("migrate", "--database-url", file_backend.url, "--log-format", "human")
    assert result.code == 1, result.output
    assert "entities.notes" in result.stderr and "idx_memories_user_type" not in result.stderr
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


_INTEGRITY = "INSERT INTO memories_fts(memories_fts, rank) VALUES ('integrity-check', 1)"  # index vs table


def _fts_index(engine: sa.Engine) -> list[tuple]:
    """The FTS5 index itself (its segment and structure records), byte for byte."""
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text("SELECT id, block FROM memories_fts_data ORDER BY id"))]


def _trigger_sql(engine: sa.Engine, name: str) -> str:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = :n"),
                            {"n": name}).scalar()


def _edit_and_search(engine: sa.Engine, row_id: int) -> tuple[list[int], list[int]]:
    """Edit one memory's content as the server would; which rows match the old and the new word."""
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE memories SET content = 'zebracorn migration', title = 'edited' WHERE id = :i"),
                     {"i": row_id})
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE memories SET content = 'quokkafish arrived' WHERE id = :i"), {"i": row_id})
    return _fts_ids(engine, "zebracorn"), _fts_ids(engine, "quokkafish")


def test_embedding_writes_leave_the_fts_index_alone_and_edits_keep_it_exact(file_backend, cli):
    """0005: the FTS update triggers fire only on the indexed columns and delete the old words."""
    engine = _legacy(file_backend)
    # the server's own triggers: an edit leaves the old word searchable (why 0005 exists)
    assert _edit_and_search(engine, 1) == ([1], [1])
    with pytest.raises(Exception, match="malformed"), engine.connect() as conn:  # and the index is corrupt
        conn.execute(sa.text(_INTEGRITY))
    engine.dispose()
    assert cli("migrate", "--database-url", file_backend.url).code == 0
    engine = file_backend.engine()
    assert "AFTER UPDATE OF title, content, tags ON memories" in _trigger_sql(engine, "memories_fts_update")
    assert "AFTER UPDATE OF name, description, notes, tags ON entities" in _trigger_sql(engine, "entities_fts_update")

    index = _fts_index(engine)
    meeting = _fts_ids(engine, "meeting")
    with engine.begin() as conn:  # what a backfill writes, and another column the server updates
        conn.execute(sa.text("UPDATE memories SET embedding = '[0.5, 0.25]', importance = 3 WHERE id <= 60"))
    assert _fts_index(engine) == index  # not one byte of the index was rewritten
    assert _fts_ids(engine, "meeting") == meeting

    # row 2's old word is gone and its new one found; row 1 still shows the word its pre-0005 edit left
    assert _edit_and_search(engine, 2) == ([1], [1, 2])
    with engine.begin() as conn:  # the README's one-off clean-up of such leftovers
        conn.execute(sa.text("INSERT INTO memories_fts(memories_fts) VALUES ('rebuild')"))
    assert (_fts_ids(engine, "zebracorn"), _fts_ids(engine, "quokkafish")) == ([], [1, 2])
    with engine.connect() as conn:  # the index agrees with the table again
        conn.execute(sa.text(_INTEGRITY))
    assert cli("verify", "--database-url", file_backend.url).code == 0


def test_downgrade_below_0005_restores_the_servers_triggers(tmp_path):
    """0005 and 0007 are the only changes to the server's own objects, and both can be undone."""
    db = tmp_path / "down.db"
    env = {**__import__("os").environ, "DATABASE_URL": f"sqlite:///{db}"}
    for args in (["upgrade", "head"], ["downgrade", "0004"]):
        done = subprocess.run([sys.executable, "-m", "alembic", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    engine = sa.create_engine(f"sqlite:///{db}")
    for name in ("memories_fts_update", "entities_fts_update", "memories_fts_delete", "entities_fts_delete"):
        original = next(s for s in baseline.FTS if f" {name} " in s)
        assert _trigger_sql(engine, name) == original.replace("IF NOT EXISTS ", "")


def test_verify_names_a_server_trigger_put_back_and_its_fix_works(file_backend, cli, tmp_path):
    """If the server re-creates its own FTS update trigger after 0005, verify says so, and the line's fix works."""
    assert cli("migrate", "--create", "--database-url", file_backend.url).code == 0
    engine = file_backend.engine()
    original = next(s for s in baseline.FTS if " memories_fts_update " in s)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER memories_fts_update")
        conn.exec_driver_sql(original)
    engine.dispose()
    drift = cli("verify", "--database-url", file_backend.url, "--log-format", "human")
    assert drift.code == 1
    assert "FTS trigger memories_fts_update is the server's own version again" in drift.stderr
    assert "entities_fts_update" not in drift.stderr
    assert "run `backfill migrate`" in drift.stderr

    fixed = cli("migrate", "--database-url", file_backend.url, "--log-format", "human")  # the line's fix
    assert fixed.code == 0 and "put back memories_fts_update" in fixed.stdout, fixed.output
    trigger = _trigger_sql(file_backend.engine(), "memories_fts_update")
    assert "AFTER UPDATE OF title, content, tags ON memories" in trigger
    assert cli("verify", "--database-url", file_backend.url).code == 0
