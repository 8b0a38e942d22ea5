"""The real server is the reference: a database mcp-memory-ts 1.7.5's own code made (tests/fixtures/),
and the shapes its other code gives real databases, built from it as the server would build them:

- as shipped (startup, then the server's scripts/add-entity-embeddings.ts);
- startup alone (`entities.embedding` not there);
- with the tables of the server's migration runner, OAuth and Gmail scripts added.

Each is adopted by `migrate`, kept byte-identical, verified, filled by `up`, and its full-text search
still answers as before; the server's own SQL for adding, editing and deleting works after it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import sqlalchemy as sa

from backfill import migrate as migrations
from backfill.db import engine_for, resolve
from engine_helpers import is_vector
from support.fake_openai import FakeOpenAI

FIXTURE = Path(__file__).parent / "fixtures" / "mcp-memory-ts-1.7.5-server-made.db"
ORIGINAL_TABLES = ("users", "entities", "memories", "interactions", "schema_version", "api_usage_tracking")
SERVER_DIMS = 384

# DDL of the server's other code, as those scripts run it on a live database
SERVER_EXTRAS = [
    """CREATE TABLE IF NOT EXISTS schema_migrations (
      version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL, checksum TEXT)""",
    "INSERT INTO schema_migrations (version, name, applied_at) "
    "VALUES (1, 'initial_schema', '2026-12-03T07:48:02.372Z')",
    "INSERT INTO schema_migrations (version, name, applied_at) "
    "VALUES (2, 'add_missing_indices', '2026-12-03T07:48:02.372Z')",
    """CREATE TABLE IF NOT EXISTS oauth_clients (
      client_id TEXT PRIMARY KEY, client_secret_hash TEXT NOT NULL, name TEXT NOT NULL,
      redirect_uris TEXT NOT NULL, allowed_scopes TEXT NOT NULL, created_by TEXT NOT NULL,
      created_at TEXT NOT NULL, updated_at TEXT NOT NULL, is_active INTEGER DEFAULT 1,
      FOREIGN KEY (created_by) REFERENCES users(id) ON DELETE CASCADE)""",
    """CREATE TABLE IF NOT EXISTS oauth_authorization_codes (
      code TEXT PRIMARY KEY, client_id TEXT NOT NULL, user_id TEXT NOT NULL, redirect_uri TEXT NOT NULL,
      scope TEXT NOT NULL, state TEXT, expires_at TEXT NOT NULL, created_at TEXT NOT NULL, used INTEGER DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS oauth_access_tokens (
      token TEXT PRIMARY KEY, client_id TEXT NOT NULL, user_id TEXT NOT NULL, scope TEXT NOT NULL,
      expires_at TEXT NOT NULL, created_at TEXT NOT NULL, revoked INTEGER DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS oauth_refresh_tokens (
      token TEXT PRIMARY KEY, access_token TEXT NOT NULL, client_id TEXT NOT NULL, user_id TEXT NOT NULL,
      scope TEXT NOT NULL, expires_at TEXT NOT NULL, created_at TEXT NOT NULL, revoked INTEGER DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS idx_oauth_access_tokens_user ON oauth_access_tokens(user_id)",
    """CREATE TABLE IF NOT EXISTS gmail_extraction_log (
      id TEXT PRIMARY KEY, user_id TEXT NOT NULL, week_identifier TEXT NOT NULL,
      start_date TEXT NOT NULL, end_date TEXT NOT NULL, emails_processed INTEGER DEFAULT 0,
      memories_created INTEGER DEFAULT 0, entities_created INTEGER DEFAULT 0, status TEXT NOT NULL,
      error_message TEXT, created_at TEXT NOT NULL, completed_at TEXT,
      UNIQUE(user_id, week_identifier))""",
    "CREATE INDEX IF NOT EXISTS idx_gmail_extraction_user ON gmail_extraction_log(user_id)",
    "CREATE INDEX IF NOT EXISTS idx_gmail_extraction_week ON gmail_extraction_log(user_id, week_identifier)",
    # a legacy-column script's leftover
    "ALTER TABLE memories ADD COLUMN source_ref TEXT",
]
SHAPES = {
    "as-shipped": [],
    "startup-only": ["ALTER TABLE entities DROP COLUMN embedding"],
    "server-extras": SERVER_EXTRAS,
}


def _url(kind: str, path: Path) -> str:
    return f"sqlite:///{path}" if kind == "sqlite" else f"sqlite+libsql:///{path}"


def server_made(tmp_path: Path, shape: str = "as-shipped") -> Path:
    """A writable copy of the fixture, given one of the shapes the server's own code produces."""
    path = tmp_path / f"server-{shape}.db"
    shutil.copyfile(FIXTURE, path)
    os.chmod(path, 0o644)
    if SHAPES[shape]:
        with sa.create_engine(f"sqlite:///{path}").begin() as conn:
            for statement in SHAPES[shape]:
                conn.exec_driver_sql(statement)
    return path


def _columns(conn: sa.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.exec_driver_sql(f'PRAGMA table_info("{table}")')]


def snapshot(path: Path, like: dict | None = None) -> dict[str, tuple[tuple[str, ...], str]]:
    """Per table, its columns and a sha256 over every row's values as SQL literals (quote()), in rowid
    order. `like`: the tables and columns of an earlier snapshot (columns added since are left out)."""
    out = {}
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        tables = list(like) if like is not None else [r[0] for r in conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
            "AND name NOT LIKE '%_fts%' AND name NOT LIKE 'backfill_%' AND name != 'alembic_version'")]
        for table in tables:
            columns = like[table][0] if like is not None else tuple(_columns(conn, table))
            cols = ", ".join(f'quote("{c}")' for c in columns)
            h = hashlib.sha256()
            for row in conn.exec_driver_sql(f'SELECT {cols} FROM "{table}" ORDER BY rowid'):
                h.update(repr(tuple(row)).encode())
            out[table] = (columns, h.hexdigest())
    engine.dispose()
    return out


def fts_ids(path: Path, table: str, word: str) -> list[int]:
    with sa.create_engine(f"sqlite:///{path}").connect() as conn:
        return [r[0] for r in conn.exec_driver_sql(
            f"SELECT rowid FROM {table}_fts WHERE {table}_fts MATCH ? ORDER BY rowid", (word,))]


def fts_integrity(path: Path) -> None:
    """FTS5's own check that the index matches the content table; raises 'malformed' when not."""
    with sa.create_engine(f"sqlite:///{path}").connect() as conn:
        for table in ("memories", "entities"):
            conn.exec_driver_sql(f"INSERT INTO {table}_fts({table}_fts, rank) VALUES ('integrity-check', 1)")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _embeddings(path: Path, table: str) -> dict[int, str | None]:
    with sa.create_engine(f"sqlite:///{path}").connect() as conn:
        return dict(conn.exec_driver_sql(f"SELECT id, embedding FROM {table} ORDER BY id").all())


@pytest.mark.parametrize("kind", ["sqlite", "libsql"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_shape_the_server_makes_is_adopted_kept_and_filled(tmp_path, cli, shape, kind):
    path = server_made(tmp_path, shape)
    url = _url(kind, path)
    before = snapshot(path)
    server_vectors = {i: e for i, e in _embeddings(path, "memories").items() if is_vector(e, SERVER_DIMS)}
    assert len(server_vectors) == 20
    words = {("memories", "sourdough"), ("memories", "marathon"), ("entities", "kyoto")}
    fts_before = {w: fts_ids(path, *w) for w in words}
    assert all(fts_before.values()), fts_before

    migrated = cli("migrate", "--database-url", url)
    assert migrated.code == 0, migrated.output
    assert json.loads(migrated.stdout.splitlines()[-1])["action"] == "adopted"
    assert snapshot(path, like=before) == before  # every row of every original table, byte for byte
    assert {w: fts_ids(path, *w) for w in words} == fts_before
    verified = cli("verify", "--database-url", url, "--log-format", "human")
    assert verified.code == 0, verified.output

    with FakeOpenAI() as server:
        env = {"OPENAI_API_KEY": "sk-test-not-a-real-key", "OPENAI_BASE_URL": server.base_url}
        up = cli("up", "--database-url", url, "--model", "text-embedding-3-small", "--dimensions", str(SERVER_DIMS),
                 env=env)
    assert up.code == 0, up.output[-3000:]
    memories, entities = _embeddings(path, "memories"), _embeddings(path, "entities")
    assert all(is_vector(e, SERVER_DIMS) for e in memories.values()), "a memory was left without a vector"
    assert all(is_vector(e, SERVER_DIMS) for e in entities.values()), "an entity was left without a vector"
    assert {i: memories[i] for i in server_vectors} == server_vectors  # the server's own vectors untouched
    fts_integrity(path)
    assert {w: fts_ids(path, *w) for w in words} == fts_before
    after = snapshot(path, like=before)
    assert {t: h for t, h in after.items() if t not in ("memories", "entities")} == \
        {t: h for t, h in before.items() if t not in ("memories", "entities")}


@pytest.mark.parametrize("kind", ["sqlite", "libsql"])
def test_a_database_missing_a_needed_column_is_refused_and_left_unchanged(tmp_path, cli, kind):
    path = server_made(tmp_path)
    with sa.create_engine(f"sqlite:///{path}").begin() as conn:
        conn.exec_driver_sql("ALTER TABLE memories RENAME COLUMN embedding TO vector_json")
    digest = _sha(path)
    result = cli("migrate", "--database-url", _url(kind, path), "--log-format", "human")
    assert result.code == 1, result.output
    assert "missing column memories.embedding" in result.stderr
    assert "nothing was changed" in result.stderr
    assert _sha(path) == digest
    up = cli("up", "--database-url", _url(kind, path), "--provider", "local", "--log-format", "human")
    assert up.code == 1 and "memories.embedding" in up.stderr
    assert _sha(path) == digest


def _server_writes(conn: sa.Connection, user: str) -> tuple[int, int]:
    """What the server's src/database/operations.ts runs to add, then edit, a memory and an entity."""
    memory = conn.exec_driver_sql(
        "INSERT INTO memories (user_id, title, content, memory_type, importance, tags, entity_ids, embedding, "
        "metadata, is_archived, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (user, "Pelican sighting", "A pelican landed on the quay at dawn", "personal", 2, '["birds"]', "[]", "[]",
         "{}", 0, "2026-12-03T10:00:00.000Z", "2026-12-03T10:00:00.000Z")).lastrowid
    entity = conn.exec_driver_sql(
        "INSERT INTO entities (user_id, name, entity_type, person_type, description, company, title, email, phone, "
        "address, notes, tags, metadata, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (user, "Walrus Holdings", "organization", None, "Maker of gramophones", None, None, None, None, None,
         "met at the fair", '["music"]', "{}", "2026-12-03T10:00:00.000Z", "2026-12-03T10:00:00.000Z")).lastrowid
    conn.exec_driver_sql("UPDATE memories SET title = ?, content = ?, tags = ?, updated_at = ? "
                         "WHERE id = ? AND user_id = ?",
                         ("Heron sighting", "A heron waited on the quay at dusk", '["birds"]',
                          "2026-12-03T10:05:00.000Z", memory, user))
    conn.exec_driver_sql("UPDATE entities SET description = ?, notes = ?, updated_at = ? WHERE id = ? AND user_id = ?",
                         ("Maker of harmoniums", "met at the harbour", "2026-12-03T10:05:00.000Z", entity, user))
    return memory, entity


def _search(path: Path) -> dict[str, list[int]]:
    words = {"memories": ("pelican", "heron", "dawn", "dusk", "sourdough"),
             "entities": ("gramophones", "harmoniums", "fair", "harbour")}
    return {f"{t}:{w}": fts_ids(path, t, w) for t, ws in words.items() for w in ws}


@pytest.mark.parametrize("kind", ["sqlite", "libsql"])
def test_the_servers_own_writes_keep_full_text_search_exact_after_migrate(tmp_path, cli, kind):
    path = server_made(tmp_path)
    # on the server's own triggers, a deleted memory's words still match and the index is corrupt
    (tmp_path / "untouched").mkdir()
    untouched = server_made(tmp_path / "untouched")
    with sa.create_engine(f"sqlite:///{untouched}").begin() as conn:
        conn.exec_driver_sql("DELETE FROM memories WHERE id = 3")
    assert 3 in fts_ids(untouched, "memories", "sourdough")
    with pytest.raises(sa.exc.DatabaseError, match="malformed"):
        fts_integrity(untouched)

    assert cli("migrate", "--database-url", _url(kind, path)).code == 0
    sourdough = fts_ids(path, "memories", "sourdough")
    assert 3 in sourdough
    engine = engine_for(resolve(_url(kind, path)))
    with engine.begin() as conn:
        user = conn.exec_driver_sql("SELECT id FROM users WHERE email = 'alice@example.com'").scalar()
        memory, entity = _server_writes(conn, user)
        conn.exec_driver_sql("DELETE FROM memories WHERE id = 3")
    engine.dispose()
    found = _search(path)
    assert found["memories:heron"] == [memory] and found["memories:dusk"] == [memory]
    assert found["memories:pelican"] == [] and found["memories:dawn"] == []
    assert found["memories:sourdough"] == [i for i in sourdough if i != 3]
    assert found["entities:harmoniums"] == [entity] and found["entities:harbour"] == [entity]
    assert found["entities:gramophones"] == [] and found["entities:fair"] == []
    with sa.create_engine(f"sqlite:///{path}").begin() as conn:
        conn.exec_driver_sql("DELETE FROM entities WHERE id = ?", (entity,))
    assert fts_ids(path, "entities", "harmoniums") == []
    fts_integrity(path)
    assert cli("verify", "--database-url", _url(kind, path)).code == 0


def test_stats_before_migrate_counts_the_servers_vectors_as_unknown(tmp_path, cli):
    path = server_made(tmp_path, "startup-only")
    digest = _sha(path)
    result = cli("stats", "--database-url", str(path), "--json")
    assert result.code == 0, result.output
    tables = json.loads(result.stdout.splitlines()[-1])["tables"]
    assert (tables["memories"]["with_embedding"], tables["memories"]["unknown"]) == (20, 20)
    assert (tables["entities"]["total"], tables["entities"]["missing"]) == (36, 36)
    assert _sha(path) == digest  # a read changes nothing


def test_a_new_database_gets_the_servers_startup_schema(tmp_path, cli):
    path = tmp_path / "new.db"
    assert cli("migrate", "--create", "--database-url", str(path)).code == 0
    norm = lambda s: " ".join((s or "").replace("IF NOT EXISTS ", "").split())  # noqa: E731
    with sa.create_engine(f"sqlite:///{FIXTURE}").connect() as conn:
        server = {(t, n): norm(s) for t, n, s in conn.exec_driver_sql("SELECT type, name, sql FROM sqlite_master")}
    with sa.create_engine(f"sqlite:///{path}").connect() as conn:
        ours = {(t, n): norm(s) for t, n, s in conn.exec_driver_sql("SELECT type, name, sql FROM sqlite_master")
                if not n.startswith(("backfill_", "ix_backfill_", "alembic_", "sqlite_autoindex_backfill",
                                     "sqlite_autoindex_alembic"))}
    changed = {k for k in server if ours.get(k) != server[k]}
    # the only differences: the FTS triggers revisions 0005 and 0007 correct
    assert changed == {("trigger", f"{t}_fts_{k}") for t in ("memories", "entities") for k in ("update", "delete")}
    assert set(ours) == set(server)


# --- atomic migrations: SIGKILL at every statement -------------------------------------------------

def _migrate_in_child(url: str, kill_at: int | None, create: bool) -> int:
    """Fork; the child migrates and SIGKILLs itself as statement `kill_at` starts. Its wait status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            engine = engine_for(resolve(url), must_exist=False)
            count = [0]

            def _maybe_die(*_args: object) -> None:
                count[0] += 1
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

            sa.event.listen(engine, "before_cursor_execute", _maybe_die)
            migrations.migrate(engine, create=create)
            os._exit(100 + min(count[0], 150))  # finished: tells how many statements it took
        except BaseException:
            os._exit(3)
    _pid, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize("kind", ["sqlite", "libsql"])
@pytest.mark.parametrize("start", ["empty", "server-made", "at-0002"])
def test_a_migration_killed_at_any_statement_leaves_a_database_migrate_finishes(tmp_path, kind, start):
    """Before each migrate ran in one transaction, a kill inside 0001 (on an empty database) or inside
    0003 (from 0002) left half a revision committed, and every later migrate failed."""
    source = tmp_path / "source.db"
    if start != "empty":
        shutil.copyfile(server_made(tmp_path, "startup-only"), source)
    if start == "at-0002":
        from alembic import command

        with migrations.one_transaction(sa.create_engine(f"sqlite:///{source}")) as conn:
            command.stamp(migrations.alembic_config(conn), "0001")
            command.upgrade(migrations.alembic_config(conn), "0002")
    create = start == "empty"
    probe = tmp_path / "probe.db"
    if source.exists():
        shutil.copyfile(source, probe)
    status = _migrate_in_child(_url(kind, probe), None, create)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) > 100, status
    statements = os.WEXITSTATUS(status) - 100
    assert statements > 10
    before = snapshot(source) if source.exists() else None
    # every statement of a migrate from scratch through sqlite3; from the other starts (the same revisions,
    # fewer of them) every second statement, and through libSQL, whose driver differs only in how the
    # transaction opens (an explicit BEGIN IMMEDIATE), every third; the last one always
    stride = 3 if kind == "libsql" else (1 if start == "empty" else 2)
    kills = sorted({*range(1, statements + 1, stride), statements})
    for k in kills:
        victim = tmp_path / f"k{k}.db"
        if source.exists():
            shutil.copyfile(source, victim)
        status = _migrate_in_child(_url(kind, victim), k, create)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, status)
        if before is not None:  # all or nothing: the server's data and schema as they were
            assert snapshot(victim, like=before) == before, f"killed at statement {k}"
        engine = engine_for(resolve(_url(kind, victim)), must_exist=False)
        migrations.migrate(engine, create=create)
        result = migrations.verify(engine)
        engine.dispose()
        assert result.ok, (k, result.differences)
        fts_integrity(victim)
        victim.unlink()


@pytest.mark.parametrize("shape", ["as-shipped", "startup-only"])
def test_up_refuses_a_missing_key_before_migrate_touches_the_servers_database(tmp_path, cli, shape):
    path = server_made(tmp_path, shape)
    digest = _sha(path)
    result = cli("up", "--database-url", str(path), "--model", "text-embedding-3-small", "--dimensions",
                 str(SERVER_DIMS), "--log-format", "human")
    assert result.code == 2, result.output
    assert "OPENAI_API_KEY" in result.stderr and "Traceback" not in result.output
    assert _sha(path) == digest
