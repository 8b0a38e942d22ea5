"""The loopback libSQL remote server (support.libsql_server), exercised for real.

The SQLAlchemy tests go through the real client stack: ``sqlite+libsql://`` ->
sqlalchemy-libsql -> libsql_experimental -> Hrana over HTTP -> the server (a child
process) -> stdlib sqlite3 on a file that the tests also open directly.  The raw
protocol tests speak Hrana JSON with urllib to the same server.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

import libsql_experimental
import pytest
import sqlalchemy as sa
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from support.libsql_server import LibsqlServer, split_sql

TOKEN = "s3cret-test-token-5d1f"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "remote.db")


@pytest.fixture
def server(db_path: str):
    with LibsqlServer(db_path, auth_token=TOKEN) as srv:
        yield srv


@pytest.fixture
def engine(server: LibsqlServer):
    eng = create_engine(f"sqlite+libsql://127.0.0.1:{server.port}/", connect_args={"auth_token": TOKEN})
    yield eng
    eng.dispose()


def _local(db_path: str) -> sqlite3.Connection:
    return sqlite3.connect(db_path, timeout=5)


# ------------------------------------------------------------------ basics


def test_addresses(server: LibsqlServer) -> None:
    assert server.url == f"libsql://127.0.0.1:{server.port}?tls=0"
    assert server.http_url == f"http://127.0.0.1:{server.port}"
    assert server.stats()["requests"] == 0


def test_executemany_and_value_round_trip(engine, db_path: str) -> None:
    rows = [
        {"id": 1, "i": 42, "f": 1.5, "t": "plain", "b": b"\x00\x01\xff"},
        {"id": 2, "i": None, "f": None, "t": None, "b": None},
        {"id": 3, "i": -7, "f": -2.25e-10, "t": "héllo wörld ☃ 日本語 🚀", "b": b""},
        {"id": 4, "i": 2**31 - 1, "f": 0.0, "t": "", "b": bytes(range(256))},
    ]
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE vals (id INTEGER PRIMARY KEY, i INTEGER, f REAL, t TEXT, b BLOB)"))
        result = conn.execute(text("INSERT INTO vals (id, i, f, t, b) VALUES (:id, :i, :f, :t, :b)"), rows)
        assert result.rowcount == 4
    with engine.connect() as conn:
        got = conn.execute(text("SELECT id, i, f, t, b FROM vals ORDER BY id")).mappings().all()
    assert [dict(r) for r in got] == rows
    with _local(db_path) as local:
        assert local.execute("SELECT typeof(i), typeof(f), typeof(t), typeof(b) FROM vals WHERE id = 3").fetchone() == (
            "integer", "real", "text", "blob",
        )
        assert local.execute("SELECT t FROM vals WHERE id = 3").fetchone()[0] == rows[2]["t"]


def test_driver_sends_ints_outside_i32_as_float(engine, db_path: str) -> None:
    """Pins a libsql-experimental 0.0.55 quirk (local files too): bound Python ints
    outside the i32 range travel as Hrana floats, so SQLite stores REAL."""
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE big (v INTEGER)"))
        conn.execute(text("INSERT INTO big (v) VALUES (:v)"), {"v": 2**31})
        conn.execute(text("INSERT INTO big (v) VALUES (CAST(:v AS INTEGER))"), {"v": str(2**53 + 1)})
    with _local(db_path) as local:
        assert local.execute("SELECT v FROM big ORDER BY rowid").fetchall() == [(2**31,), (2**53 + 1,)]
        # Column affinity turns the REAL 2147483648.0 back into an integer here;
        # in a column without INTEGER affinity (or beyond 2**53) it would stay REAL/lose precision.
    with engine.connect() as conn:
        assert conn.execute(text("SELECT typeof(:v)"), {"v": 2**31}).scalar() == "real"
        assert conn.execute(text("SELECT typeof(:v)"), {"v": 2**31 - 1}).scalar() == "integer"
        # values coming *from* the server keep full 64-bit precision
        assert conn.execute(text("SELECT 9223372036854775807")).scalar() == 2**63 - 1


def test_rollback_leaves_nothing_and_commit_is_visible(engine, db_path: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"))

    with engine.connect() as conn:
        conn.execute(text("INSERT INTO items (name) VALUES ('gone')"))
        conn.execute(text("INSERT INTO items (name) VALUES (:n)"), [{"n": "also gone"}, {"n": "x"}])
        with _local(db_path) as local:  # uncommitted work is invisible to other connections
            assert local.execute("SELECT count(*) FROM items").fetchone() == (0,)
        conn.rollback()
    with _local(db_path) as local:
        assert local.execute("SELECT count(*) FROM items").fetchone() == (0,)

    with engine.begin() as conn:
        conn.execute(text("INSERT INTO items (name) VALUES (:n)"), [{"n": "kept-1"}, {"n": "kept-2"}])
    with _local(db_path) as local:
        assert local.execute("SELECT name FROM items ORDER BY id").fetchall() == [("kept-1",), ("kept-2",)]

    # a failing statement inside a transaction, then rollback: nothing from it survives
    with pytest.raises(ValueError, match="UNIQUE constraint failed"):
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO items (id, name) VALUES (100, 'half')"))
            conn.execute(text("INSERT INTO items (id, name) VALUES (1, 'dup')"))
    with _local(db_path) as local:
        assert local.execute("SELECT count(*) FROM items").fetchone() == (2,)


def test_insert_returning_and_lastrowid(engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE seq (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT)"))
        result = conn.execute(text("INSERT INTO seq (v) VALUES ('a')"))
        assert result.lastrowid == 1
        returned = conn.execute(text("INSERT INTO seq (v) VALUES ('b') RETURNING id, v")).all()
        assert [tuple(r) for r in returned] == [(2, "b")]
    table = sa.Table("seq", sa.MetaData(), autoload_with=engine)
    with engine.begin() as conn:
        pk = conn.execute(table.insert().values(v="c")).inserted_primary_key
        assert tuple(pk) == (3,)


def test_reflection(engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE parent (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE)"))
        conn.execute(
            text(
                "CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES parent(id) "
                "ON DELETE CASCADE, score REAL DEFAULT 0.5, note TEXT)"
            )
        )
        conn.execute(text("CREATE INDEX ix_child_parent ON child (parent_id, score)"))
    insp = inspect(engine)
    assert insp.get_table_names() == ["child", "parent"]
    cols = {c["name"]: c for c in insp.get_columns("child")}
    assert list(cols) == ["id", "parent_id", "score", "note"]
    assert isinstance(cols["score"]["type"], sa.REAL)
    assert cols["score"]["default"] == "0.5"
    assert insp.get_columns("parent")[1]["nullable"] is False
    [index] = insp.get_indexes("child")
    assert (index["name"], index["column_names"], bool(index["unique"])) == (
        "ix_child_parent", ["parent_id", "score"], False,
    )
    assert insp.get_indexes("parent") == []  # the UNIQUE constraint's auto-index is not reported as an index
    assert insp.get_pk_constraint("child")["constrained_columns"] == ["id"]
    fks = insp.get_foreign_keys("child")
    assert [(fk["referred_table"], fk["constrained_columns"]) for fk in fks] == [("parent", ["parent_id"])]
    assert [u["column_names"] for u in insp.get_unique_constraints("parent")] == [["email"]]
    assert insp.has_table("parent") and not insp.has_table("nope")


def test_alembic_style_ddl_fts5_and_triggers(engine, db_path: str) -> None:
    with engine.begin() as conn:
        op = Operations(MigrationContext.configure(conn))
        op.create_table(
            "memories",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("title", sa.Text, nullable=False),
            sa.Column("content", sa.Text, nullable=False),
            sa.Column("is_archived", sa.Boolean, server_default=sa.false()),
        )
        op.create_index("idx_memories_title", "memories", ["title", sa.text("id DESC")])
        op.execute(
            "CREATE VIRTUAL TABLE memories_fts USING fts5("
            "title, content, content='memories', content_rowid='id')"
        )
        op.execute(
            """CREATE TRIGGER memories_fts_insert AFTER INSERT ON memories BEGIN
                 INSERT INTO memories_fts(rowid, title, content) VALUES (new.id, new.title, new.content);
               END"""
        )
        op.execute(
            """CREATE TRIGGER memories_fts_delete AFTER DELETE ON memories BEGIN
                 INSERT INTO memories_fts(memories_fts, rowid, title, content)
                 VALUES ('delete', old.id, old.title, old.content);
               END"""
        )
        op.bulk_insert(
            sa.table("memories", sa.column("title"), sa.column("content")),
            [{"title": "groceries", "content": "buy oat milk; eggs"}, {"title": "trip", "content": "kyoto in may"}],
        )
        op.create_table("notes", sa.Column("id", sa.Integer, primary_key=True), sa.Column("body", sa.Text))
    # Alembic's SQLite "move and copy" batch mode: PRAGMAs, temp table, INSERT..SELECT, DROP, RENAME.
    # (On a table with triggers it would drop them: SQLite drops a table's triggers with it.)
    with engine.begin() as conn:
        op = Operations(MigrationContext.configure(conn))
        with op.batch_alter_table("notes", recreate="always") as batch:
            batch.add_column(sa.Column("embedding", sa.Text))
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM memories WHERE title = 'trip'"))
    with engine.connect() as conn:
        hits = conn.execute(
            text("SELECT rowid, title FROM memories_fts WHERE memories_fts MATCH :q"), {"q": "milk OR kyoto"}
        ).all()
        assert [tuple(h) for h in hits] == [(1, "groceries")]
    assert [c["name"] for c in inspect(engine).get_columns("notes")] == ["id", "body", "embedding"]
    with _local(db_path) as local:
        kinds = dict(local.execute("SELECT name, type FROM sqlite_master"))
        assert kinds["memories_fts"] == "table" and kinds["idx_memories_title"] == "index"
        assert kinds["memories_fts_insert"] == kinds["memories_fts_delete"] == "trigger"
        assert local.execute("SELECT count(*) FROM memories_fts WHERE memories_fts MATCH 'eggs'").fetchone() == (1,)


# ------------------------------------------------------------------ errors


def test_sql_error_surfaces_as_value_error(engine) -> None:
    with engine.connect() as conn:
        with pytest.raises(ValueError) as info:
            conn.execute(text("SELECT * FROM no_such_table"))
        assert "no such table: no_such_table" in str(info.value)
        assert "SQLITE_ERROR" in str(info.value)
        conn.rollback()
        assert conn.execute(text("SELECT 1")).scalar() == 1  # the connection is still usable


@pytest.mark.parametrize("token", ["wrong-token", None])
def test_wrong_or_missing_token_is_rejected(server: LibsqlServer, token: str | None) -> None:
    args = {"auth_token": token} if token else {}
    eng = create_engine(f"sqlite+libsql://127.0.0.1:{server.port}/", connect_args=args)
    try:
        with pytest.raises(ValueError) as info:
            with eng.connect() as conn:
                conn.execute(text("SELECT 1"))
    finally:
        eng.dispose()
    message = str(info.value)
    assert "401" in message and "Unauthorized" in message
    assert TOKEN not in message
    assert server.stats()["unauthorized"] >= 1


def test_drop_next_causes_client_error_then_recovers(engine, server: LibsqlServer) -> None:
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
        before = server.stats()["requests"]
        server.drop_next(1)
        with pytest.raises(ValueError, match="connection closed before message completed"):
            conn.execute(text("SELECT 2"))
        assert server.stats()["requests"] == before + 1
        # the dropped request was never processed, so the stream (baton) is intact
        assert conn.execute(text("SELECT 3")).scalar() == 3
    assert server.stats()["dropped"] == 1


def test_drop_after_processing_loses_only_the_response(server: LibsqlServer, db_path: str) -> None:
    conn = libsql_experimental.connect(server.http_url, auth_token=TOKEN)
    server.drop_next(1, after_processing=True, kind="batch")  # not the "describe" before it
    with pytest.raises(ValueError, match="connection closed before message completed"):
        conn.execute("CREATE TABLE made_anyway (x)")  # autocommit: executed and committed
    with _local(db_path) as local:
        assert local.execute("SELECT name FROM sqlite_master WHERE name = 'made_anyway'").fetchone()
    # The lost response also carried "the stream is closed" (autocommit), so this client
    # connection keeps sending the dead baton: it is broken for good and must be replaced.
    with pytest.raises(ValueError, match="400 Bad Request.*Stream not found"):
        conn.execute("SELECT count(*) FROM made_anyway")
    fresh = libsql_experimental.connect(server.http_url, auth_token=TOKEN)
    assert fresh.execute("SELECT count(*) FROM made_anyway").fetchall() == [(0,)]


def test_response_lost_mid_transaction_breaks_that_connection(db_path: str) -> None:
    with LibsqlServer(db_path, auth_token=TOKEN, idle_timeout=0.5) as server:
        conn = libsql_experimental.connect(server.http_url, auth_token=TOKEN)
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")  # opens a transaction (BEGIN is sent first)
        server.drop_next(1, after_processing=True, kind="batch")
        with pytest.raises(ValueError, match="connection closed"):
            conn.execute("INSERT INTO t VALUES (2)")
        with pytest.raises(ValueError, match="400 Bad Request.*Stream not found"):
            conn.execute("INSERT INTO t VALUES (3)")  # its baton is stale for good
        # the orphaned stream still holds the write lock until it expires; then it rolls back
        deadline = time.monotonic() + 5
        while server.stats()["streams_expired"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.stats()["streams_expired"] >= 1
        with _local(db_path) as local:
            assert local.execute("SELECT count(*) FROM t").fetchone() == (0,)
            local.execute("INSERT INTO t VALUES (9)")  # not locked any more


def test_idle_stream_expiry_rolls_back(db_path: str) -> None:
    with LibsqlServer(db_path, idle_timeout=0.3) as server:
        conn = libsql_experimental.connect(server.http_url)
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        assert conn.in_transaction
        deadline = time.monotonic() + 5
        while server.stats()["streams_open"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.stats()["streams_open"] == 0
        with pytest.raises(ValueError, match="Stream not found"):
            conn.commit()
        with _local(db_path) as local:
            assert local.execute("SELECT count(*) FROM t").fetchone() == (0,)


def test_two_connections_share_the_file(server: LibsqlServer) -> None:
    # The sqlite dialect treats a URL without a database path like ":memory:" and picks
    # SingletonThreadPool: every Connection in a thread shares ONE libsql connection.
    url = f"sqlite+libsql://127.0.0.1:{server.port}/"
    default = create_engine(url, connect_args={"auth_token": TOKEN})
    assert isinstance(default.pool, sa.pool.SingletonThreadPool)
    default.dispose()
    engine = create_engine(url, connect_args={"auth_token": TOKEN}, poolclass=sa.pool.QueuePool)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE c (x INTEGER)"))
    with engine.connect() as a, engine.connect() as b:
        a.execute(text("INSERT INTO c VALUES (1)"))
        assert b.execute(text("SELECT count(*) FROM c")).scalar() == 0  # not committed yet
        b.rollback()
        a.commit()
        assert b.execute(text("SELECT count(*) FROM c")).scalar() == 1
    engine.dispose()


# ------------------------------------------------------------------ raw Hrana


@pytest.fixture
def raw(db_path: str):
    with LibsqlServer(db_path, auth_token=TOKEN) as srv:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def post(body: dict, path: str = "/v3/pipeline", token: str | None = TOKEN):
            req = urllib.request.Request(srv.http_url + path, data=json.dumps(body).encode(), method="POST")
            if token:
                req.add_header("Authorization", f"Bearer {token}")
            try:
                with opener.open(req, timeout=10) as resp:
                    data = resp.read().decode()
                    return resp.status, data
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        yield post


def _stmt(sql: str, *args, want_rows: bool = True) -> dict:
    return {"sql": sql, "args": list(args), "want_rows": want_rows}


def test_raw_pipeline_request_types(raw) -> None:
    status, data = raw({"baton": None, "requests": [
        {"type": "execute", "stmt": _stmt("CREATE TABLE t (a INTEGER, b TEXT)")},
        {"type": "execute", "stmt": _stmt("CREATE TABLE log (m TEXT)")},
        {"type": "execute",
         "stmt": _stmt("CREATE TRIGGER tr AFTER INSERT ON t BEGIN INSERT INTO log VALUES ('x;y'); END")},
        {"type": "execute", "stmt": {"sql": "INSERT INTO t VALUES (?, ?)", "args": [
            {"type": "integer", "value": "9007199254740993"}, {"type": "text", "value": "ü"}]}},
        {"type": "execute", "stmt": {"sql": "SELECT 1; SELECT 2"}},
        {"type": "execute", "stmt": {"sql": "SELECT a, b, x'00ff', 1.5, NULL FROM t WHERE a = :a",
                                     "named_args": [{"name": ":a", "value": {"type": "integer",
                                                                            "value": "9007199254740993"}}]}},
        {"type": "get_autocommit"},
        {"type": "describe", "sql": "SELECT a AS first, b FROM t WHERE a > ? AND b = :name"},
        {"type": "describe", "sql": "INSERT INTO t VALUES (1, 'z') RETURNING a"},
        {"type": "execute", "stmt": {"sql": "SELECT count(*) FROM log"}},
    ]})
    assert status == 200, data
    out = json.loads(data)
    assert out["baton"] and out["base_url"] is None
    r = out["results"]
    assert [x["type"] for x in r] == ["ok", "ok", "ok", "ok", "error", "ok", "ok", "ok", "ok", "ok"]
    assert r[3]["response"]["result"]["affected_row_count"] == 1
    assert r[3]["response"]["result"]["last_insert_rowid"] == "1"
    assert r[4]["error"]["code"] == "SQL_MANY_STATEMENTS"
    rows = r[5]["response"]["result"]["rows"]
    assert rows == [[
        {"type": "integer", "value": "9007199254740993"}, {"type": "text", "value": "ü"},
        {"type": "blob", "base64": "AP8"}, {"type": "float", "value": 1.5}, {"type": "null"},
    ]]
    assert r[6]["response"] == {"type": "get_autocommit", "is_autocommit": True}
    desc = r[7]["response"]["result"]
    assert desc["params"] == [{"name": None}, {"name": ":name"}]
    assert [c["name"] for c in desc["cols"]] == ["first", "b"]
    assert desc["is_readonly"] is True and desc["is_explain"] is False
    desc = r[8]["response"]["result"]
    assert [c["name"] for c in desc["cols"]] == ["a"] and desc["is_readonly"] is False
    assert r[9]["response"]["result"]["rows"] == [[{"type": "integer", "value": "1"}]]  # describe wrote nothing

    # continue the same stream with the rotated baton; closing returns a null baton
    status, data = raw({"baton": out["baton"], "requests": [
        {"type": "execute", "stmt": _stmt("SELECT count(*) FROM t")}, {"type": "close"}]})
    assert status == 200
    out2 = json.loads(data)
    assert out2["baton"] is None
    assert out2["results"][0]["response"]["result"]["rows"] == [[{"type": "integer", "value": "1"}]]
    # the old baton is dead
    status, data = raw({"baton": out["baton"], "requests": [{"type": "get_autocommit"}]})
    assert status == 400 and "Stream not found" in data


def test_raw_batch_conditions_and_transactions(raw, db_path: str) -> None:
    status, data = raw({"baton": None, "requests": [{"type": "batch", "batch": {"steps": [
        {"stmt": _stmt("BEGIN")},
        {"condition": {"type": "ok", "step": 0}, "stmt": _stmt("CREATE TABLE t (a UNIQUE)")},
        {"condition": {"type": "ok", "step": 1}, "stmt": _stmt("INSERT INTO t VALUES (1)")},
        {"condition": {"type": "ok", "step": 2}, "stmt": _stmt("INSERT INTO t VALUES (1)")},  # fails
        {"condition": {"type": "error", "step": 3}, "stmt": _stmt("ROLLBACK")},
        {"condition": {"type": "not", "cond": {"type": "error", "step": 3}}, "stmt": _stmt("COMMIT")},
        {"condition": {"type": "and", "conds": [{"type": "is_autocommit"}, {"type": "ok", "step": 4}]},
         "stmt": _stmt("SELECT 'rolled back'")},
        {"condition": {"type": "or", "conds": [{"type": "ok", "step": 5}, {"type": "error", "step": 5}]},
         "stmt": _stmt("SELECT 'never'")},
    ]}}, {"type": "close"}]})
    assert status == 200, data
    result = json.loads(data)["results"][0]["response"]["result"]
    ok = [s is not None for s in result["step_results"]]
    err = [e is not None for e in result["step_errors"]]
    assert ok == [True, True, True, False, True, False, True, False]
    assert err == [False, False, False, True, False, False, False, False]
    assert "UNIQUE" in result["step_errors"][3]["message"]
    assert result["step_errors"][3]["code"].startswith("SQLITE_CONSTRAINT")
    with _local(db_path) as local:
        assert local.execute("SELECT name FROM sqlite_master").fetchall() == []


def test_raw_cursor_endpoint(raw) -> None:
    status, data = raw({"baton": None, "batch": {"steps": [
        {"stmt": _stmt("SELECT 1 AS one UNION ALL SELECT 2")},
        {"stmt": _stmt("SELECT * FROM missing")},
        {"condition": {"type": "ok", "step": 1}, "stmt": _stmt("SELECT 3")},
    ]}}, path="/v3/cursor")
    assert status == 200
    lines = [json.loads(line) for line in data.splitlines()]
    assert lines[0]["baton"] and lines[0]["base_url"] is None
    assert [e["type"] for e in lines[1:]] == ["step_begin", "row", "row", "step_end", "step_error"]
    assert lines[1]["cols"] == [{"name": "one", "decltype": None}]
    assert lines[3]["row"] == [{"type": "integer", "value": "2"}]
    assert "no such table" in lines[5]["error"]["message"]


def test_raw_auth_and_paths(raw) -> None:
    status, data = raw({"baton": None, "requests": []}, token="nope")
    assert status == 401 and TOKEN not in data and json.loads(data)["error"]
    status, data = raw({"baton": None, "requests": []}, token=None)
    assert status == 401
    status, data = raw({"baton": None, "requests": [{"type": "sequence", "sql": "SELECT 1"}, {"type": "close"}]})
    assert status == 200 and json.loads(data)["results"][0]["error"]["code"] == "HRANA_PROTO_ERROR"
    status, _ = raw({}, path="/v1/execute")
    assert status == 404


def test_split_sql_keeps_trigger_bodies_and_strings_whole() -> None:
    script = "CREATE TABLE a(x); CREATE TRIGGER t AFTER INSERT ON a BEGIN SELECT ';'; SELECT 2; END; SELECT 'a;b'"
    assert [s.strip() for s in split_sql(script)] == [
        "CREATE TABLE a(x);",
        "CREATE TRIGGER t AFTER INSERT ON a BEGIN SELECT ';'; SELECT 2; END;",
        "SELECT 'a;b'",
    ]
    assert split_sql(" ; ;") == []
