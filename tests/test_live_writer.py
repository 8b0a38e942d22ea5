"""The server's own writes beside a job (issue 12, item 7): another process inserts a memory and edits another
every 10 ms (stdlib sqlite3, 5 s busy timeout, as a small server would) while `backfill up -b 20` runs on the
same file. The job holds the write lock only for each commit, so none of those writes may fail, on either file
driver; and no row ends up with the vector of a text it no longer has."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import sqlalchemy as sa

from conftest import make_backend, run_cli
from engine_helpers import DIMS, MODEL, RUN_ARGS, build, env_for, expected_text
from support.fake_openai import FakeOpenAI, fake_vector

WRITER = textwrap.dedent("""
    import json, random, sqlite3, sys, time
    path, seconds = sys.argv[1], float(sys.argv[2])
    db = sqlite3.connect(path, timeout=5.0, isolation_level=None)
    rng = random.Random(1)
    ok = failed = 0
    errors = []
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
        now = "2030-01-01T00:00:%02d.000Z" % (n % 60)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO memories (user_id, title, content, memory_type, importance, tags, embedding, "
                       "is_archived, created_at, updated_at) "
                       "VALUES ('u-alice', ?, ?, 'semantic', 1, '[]', NULL, 0, ?, ?)",
                       ("live %d" % n, "written by the server while the job runs %d" % n, now, now))
            rid = rng.randint(1, 400)
            db.execute("UPDATE memories SET content = ?, embedding = NULL, updated_at = ? WHERE id = ?",
                       ("edited by the server %d" % n, now, rid))
            db.execute("COMMIT")
            ok += 1
        except sqlite3.Error as exc:
            failed += 1
            errors.append(str(exc))
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        time.sleep(0.01)
    print(json.dumps({"ok": ok, "failed": failed, "errors": errors[:5]}))
""")


@pytest.mark.parametrize("name", ["sqlite", "libsql"])
def test_the_servers_writes_never_fail_beside_a_running_job(name, tmp_path):
    be = make_backend(name, tmp_path)
    engine = be.engine()
    build(engine, memories=1500, entities=0, seed=4)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE memories SET embedding = NULL"))
    engine.dispose()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(be.path), "12"], stdout=subprocess.PIPE, text=True)
    with FakeOpenAI(latency_ms=20) as server:
        result = run_cli("up", *RUN_ARGS, "--target", "memories", "-b", "20", env=env_for(server, be.url), timeout=300)
    out, _ = writer.communicate(timeout=60)
    live = json.loads(out)
    assert result.code == 0, result.output[-3000:]
    assert live["failed"] == 0 and live["ok"] > 100, live
    with engine.connect() as conn:  # every vector written is of the text its row holds now
        rows = conn.execute(sa.text(
            "SELECT m.id, m.title, m.content, m.memory_type, m.tags, m.embedding FROM memories m "
            "JOIN backfill_embeddings p ON p.target = 'memories' AND p.row_id = m.id WHERE m.embedding IS NOT NULL"
        )).mappings().all()
        written = conn.execute(sa.text("SELECT count(*) FROM backfill_embeddings")).scalar()
        embedded = conn.execute(sa.text("SELECT embedded FROM backfill_jobs")).scalar()
    assert written == embedded
    assert rows and all(json.loads(r["embedding"]) == fake_vector(expected_text("memories", r), DIMS, MODEL)
                        for r in rows)
