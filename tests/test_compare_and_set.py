"""Compare-and-set (promise 10): while a page is in flight the server edits rows 1-5 (new text, its own new
vector, new updated_at) and deletes rows 6-8. After the commit rows 1-5 keep the server's vectors, rows 6-8 have
no provenance, and the job counts exactly the rows written, with 5 `changed` and 3 `gone`. The real CLI in a
subprocess, the real SDK against the fake server (slowed down so the edit lands mid-flight), real databases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from conftest import ROOT, make_backend
from engine_helpers import DIMS, MODEL, RUN_ARGS, build, env_for, expected_text
from support.fake_openai import FakeOpenAI, fake_vector

EDITED = [1, 2, 3, 4, 5]
DELETED = [6, 7, 8]
ROWS = 30


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "TURSO_URL", "TURSO_AUTH_TOKEN",
                                                            "OPENAI_API_KEY", "OPENAI_BASE_URL")}
    full.update(env)
    return subprocess.Popen([sys.executable, "-m", "backfill", *args], cwd=ROOT, env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_request(server: FakeOpenAI, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until the first embeddings request is open at the server (its answer is slowed by latency_ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        with server._lock:
            if server._conns:
                return
        time.sleep(0.02)
    raise AssertionError("no request reached the fake server")


@pytest.mark.parametrize("name", ["sqlite", "libsql", "postgresql"])
def test_a_row_edited_or_deleted_while_its_page_is_in_flight_keeps_the_servers_write(name, tmp_path):
    be = make_backend(name, tmp_path)
    engine = be.engine()
    build(engine, memories=ROWS, entities=0, seed=3)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE memories SET embedding = NULL"))
        ids = [r[0] for r in conn.execute(sa.text("SELECT id FROM memories ORDER BY id"))]
    assert ids[:8] == EDITED + DELETED
    server_vectors = {}
    with FakeOpenAI(latency_ms=4000) as server:
        proc = _start(["up", *RUN_ARGS, "--target", "memories", "-b", "100", "--log-format", "json"],
                      env_for(server, be.url))
        try:
            _wait_for_request(server, proc)
            with engine.begin() as conn:  # the server's own writes, as its update path makes them
                for rid in EDITED:
                    row = {"title": f"edited {rid}", "content": f"new content of memory {rid}",
                           "memory_type": "semantic", "tags": "[]"}
                    vec = fake_vector(expected_text("memories", row), DIMS, MODEL)
                    server_vectors[rid] = vec
                    conn.execute(sa.text("UPDATE memories SET title = :t, content = :c, memory_type = 'semantic', "
                                         "tags = '[]', embedding = :e, updated_at = '2030-01-01T00:00:00.000Z' "
                                         "WHERE id = :i"),
                                 {"t": row["title"], "c": row["content"], "e": json.dumps(vec), "i": rid})
                conn.execute(sa.text(f"DELETE FROM memories WHERE id IN ({', '.join(map(str, DELETED))})"))
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        sent = server.inputs_seen()
    assert proc.returncode == 0, (out + err)[-3000:]
    assert len(sent) == ROWS  # the page was read (and sent) before the edits

    with engine.connect() as conn:
        rows = {r["id"]: dict(r) for r in conn.execute(sa.text(
            "SELECT id, title, content, memory_type, tags, embedding FROM memories")).mappings()}
        prov = {r[0]: r[1] for r in conn.execute(sa.text(
            "SELECT row_id, content_hash FROM backfill_embeddings WHERE target = 'memories'"))}
        job = conn.execute(sa.text("SELECT * FROM backfill_jobs")).mappings().one()
        notices = dict(conn.execute(sa.text(
            "SELECT row_id, kind FROM backfill_failures WHERE kind IN ('changed', 'gone')")).all())
    for rid in EDITED:  # the server's vector of the new text, not ours of the old one
        assert json.loads(rows[rid]["embedding"]) == server_vectors[rid], rid
        assert rid not in prov
    assert not set(DELETED) & set(rows) and not set(DELETED) & set(prov)  # no orphan provenance
    others = [rid for rid in ids if rid not in EDITED + DELETED]
    for rid in others:
        assert json.loads(rows[rid]["embedding"]) == fake_vector(expected_text("memories", rows[rid]), DIMS, MODEL)
    assert sorted(prov) == others
    assert job["embedded"] == len(prov) == ROWS - 8  # counters equal rows actually written
    assert notices == {**dict.fromkeys(EDITED, "changed"), **dict.fromkeys(DELETED, "gone")}
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    batches = [e for e in events if e.get("event") == "batch_committed"]
    assert sum(e["embedded"] for e in batches) == ROWS - 8
    assert (sum(e["changed"] for e in batches), sum(e["gone"] for e in batches)) == (5, 3)

    from conftest import run_cli

    status = run_cli("status", "--log-format", "json", env={"DATABASE_URL": be.url})
    view = json.loads(status.stdout.strip().splitlines()[-1])
    assert (view["embedded"], view["changed"], view["gone"]) == (ROWS - 8, 5, 3), status.output
