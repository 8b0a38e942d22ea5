"""Rows no driver should trip on (issue 12, items 3 and 4), on both file backends:

- `content` holding a BLOB becomes a failure row naming the column; the job goes on (exit 3, not 70);
- TEXT that is not valid UTF-8 is read leniently on libSQL too (its driver used to panic on it);
- a NUL inside the text is embedded and hashed whole, the same on `sqlite:///` and `sqlite+libsql:///`.

Each is asserted in the database."""

from __future__ import annotations

import json
import shutil

import pytest
import sqlalchemy as sa

from backfill import tables
from backfill.schema import memories
from conftest import make_backend
from engine_helpers import DIMS, MODEL, RUN_ARGS, build, env_for
from support.fake_openai import FakeOpenAI, fake_vector

NOW = "2025-01-01T00:00:00.000Z"


def _insert(conn, title: str, content: str) -> int:
    return conn.execute(memories.insert().values(
        user_id="u-alice", title=title, content=content, memory_type="semantic", importance=1, tags="[]",
        embedding=None, is_archived=False, created_at=NOW, updated_at=NOW).returning(memories.c.id)).scalar()


def _bad_database(path) -> dict[str, int]:
    be = make_backend("sqlite", path)
    engine = be.engine()
    build(engine, memories=20, entities=0, seed=5)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE memories SET embedding = NULL"))
        ids = {"blob": _insert(conn, "blob row", "x"), "utf8": _insert(conn, "undecodable", "x"),
               "nul": _insert(conn, "nul row", "before\x00after the nul byte"), "after": _insert(conn, "last", "fine")}
        conn.execute(sa.text("UPDATE memories SET content = X'00010203' WHERE id = :i"), {"i": ids["blob"]})
        conn.execute(sa.text("UPDATE memories SET content = CAST(X'4142EDA08043' AS TEXT) WHERE id = :i"),
                     {"i": ids["utf8"]})
    engine.dispose()
    return ids


@pytest.mark.parametrize("name", ["sqlite", "libsql"])
def test_a_blob_bad_utf8_or_a_nul_never_stops_the_job(name, tmp_path, cli):
    ids = _bad_database(tmp_path)
    be = make_backend(name, tmp_path)  # the same file, through this backend's driver
    if name == "libsql":
        shutil.move(tmp_path / "memory.db", be.path)
    with FakeOpenAI() as server:
        result = cli("up", *RUN_ARGS, "--target", "memories", "-b", "4", env=env_for(server, be.url), timeout=120)
        sent = server.inputs_seen()
    assert result.code == 3, result.output[-3000:]  # some rows failed: recorded, not an internal error
    engine = be.engine()
    with engine.connect() as conn:
        job = conn.execute(sa.text("SELECT * FROM backfill_jobs")).mappings().one()
        failures = dict(
            conn.execute(sa.text("SELECT row_id, error FROM backfill_failures WHERE kind = 'failed'")).all())
        stored = dict(conn.execute(sa.text("SELECT id, embedding FROM memories")).all())
        hashes = dict(conn.execute(sa.text("SELECT row_id, content_hash FROM backfill_embeddings")).all())
    assert (job["status"], job["worker_id"]) == ("done", None)
    assert list(failures) == [ids["blob"]] and "memories.content holds a BLOB" in failures[ids["blob"]]
    assert stored[ids["blob"]] is None
    assert job["embedded"] == len(stored) - 1 == len(hashes)  # every other row, the last one included
    nul_text = "nul row\n\nbeforeafter the nul byte\n\nType: semantic"
    nul_text = tables._clean(nul_text, tables.RECIPES[tables.DEFAULT_RECIPE])
    assert nul_text == "nul row beforeafter the nul byte Type: semantic" and nul_text in sent  # not cut at the NUL
    assert json.loads(stored[ids["nul"]]) == fake_vector(nul_text, DIMS, MODEL)
    assert hashes[ids["nul"]] == tables.content_hash(nul_text)
    utf8_text = "undecodable ABC Type: semantic"
    assert utf8_text in sent and hashes[ids["utf8"]] == tables.content_hash(utf8_text)


def test_the_same_file_gets_the_same_texts_vectors_and_hashes_on_both_drivers(tmp_path, cli):
    """One recipe text per row whatever the URL: run the same file through each driver, compare everything."""
    got = {}
    for name in ("sqlite", "libsql"):
        where = tmp_path / name
        where.mkdir()
        ids = _bad_database(where)
        be = make_backend(name, where)
        if name == "libsql":
            shutil.move(where / "memory.db", be.path)
        with FakeOpenAI() as server:
            result = cli("up", *RUN_ARGS, "--target", "memories", env=env_for(server, be.url), timeout=120)
            sent = sorted(server.inputs_seen())
        assert result.code == 3, result.output[-3000:]
        with be.engine().connect() as conn:
            got[name] = (sent, sorted(conn.execute(sa.text("SELECT id, embedding FROM memories")).all()),
                         sorted(conn.execute(sa.text("SELECT row_id, content_hash FROM backfill_embeddings")).all()))
    assert got["sqlite"] == got["libsql"]
    assert any("beforeafter" in t for t in got["libsql"][0]) and ids["nul"] in dict(got["libsql"][2])


def test_text_that_is_not_utf8_never_panics_libsqls_driver(tmp_path, cli):
    """Alone (no BLOB row before it): the libSQL driver used to panic on this row, exit 70 after waiting 45 s on
    "database is locked", and leave the job running under a dead worker's lease."""
    be = make_backend("libsql", tmp_path)
    engine = be.engine()
    build(engine, memories=10, entities=0, seed=6)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE memories SET embedding = NULL"))
        conn.execute(sa.text("UPDATE memories SET content = CAST(X'4142EDA08043' AS TEXT) WHERE id = 3"))
    engine.dispose()
    with FakeOpenAI() as server:
        result = cli("up", *RUN_ARGS, "--target", "memories", env=env_for(server, be.url), timeout=120)
    assert result.code == 0, result.output[-3000:]
    with be.engine().connect() as conn:
        job = conn.execute(sa.text("SELECT status, worker_id, embedded FROM backfill_jobs")).mappings().one()
        content = conn.execute(sa.text("SELECT CAST(content AS BLOB) FROM memories WHERE id = 3")).scalar()
    assert (job["status"], job["worker_id"], job["embedded"]) == ("done", None, 10)
    assert content == b"AB\xed\xa0\x80C"  # the row itself is left as it was
