"""Native libSQL vectors: `--vector-column` writes F32_BLOB(dims) beside the JSON, `backfill index` builds
the libsql_vector_idx index, and vector_top_k finds the true nearest row. Real libSQL files, the real
CLI and SDK against the fake server."""

from __future__ import annotations

import json
import math
import random

import libsql_experimental as libsql
import sqlalchemy as sa

from conftest import make_backend
from engine_helpers import RUN_ARGS, build, env_for, is_vector
from support.fake_openai import FakeOpenAI

COLUMN = "embedding_vec"


def _cos_distance(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return 1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_vector_column_index_and_vector_top_k_find_the_nearest_row_for_20_probes(tmp_path, cli):
    be = make_backend("libsql", tmp_path)
    build(be.engine(), memories=300, entities=40)
    with FakeOpenAI() as server:
        env = env_for(server, be.url)
        first = cli("up", *RUN_ARGS, "--vector-column", COLUMN, env=env)
        assert first.code == 0, first.output[-2000:]
        again = cli("up", *RUN_ARGS, "--vector-column", COLUMN, env=env)  # verify accepts the added column
        assert again.code == 0, again.output[-2000:]
    built = cli("index", "--vector-column", COLUMN, env={"DATABASE_URL": be.url})
    assert built.code == 0, built.output
    events = [json.loads(line) for line in built.stdout.splitlines()]
    assert {e["table"]: (e["probes"], e["found"]) for e in events if e["event"] == "index_built"} == {
        "memories": (20, 20), "entities": (20, 20)}

    conn = libsql.connect(str(be.path))
    kinds = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE name LIKE '%_vidx'").fetchall())
    assert "libsql_vector_idx(embedding_vec)" in kinds["memories_embedding_vec_vidx"]
    assert "F32_BLOB(16)" in conn.execute("SELECT sql FROM sqlite_master WHERE name = 'memories'").fetchone()[0]
    rows = conn.execute(f"SELECT id, embedding, vector_extract({COLUMN}) FROM memories").fetchall()
    assert all(is_vector(e) for _i, e, _v in rows)  # every row embedded, and its native copy equals the JSON
    for _i, e, v in rows:
        assert all(abs(a - b) < 1e-6 * max(1.0, abs(a)) for a, b in zip(json.loads(e), json.loads(v), strict=True))
    vectors = {i: json.loads(e) for i, e, _v in rows}

    rng = random.Random(11)
    probes = rng.sample(sorted(vectors), 20)
    for row_id in probes:
        probe = [x + rng.uniform(-0.01, 0.01) for x in vectors[row_id]]
        best = min(_cos_distance(probe, v) for v in vectors.values())
        expected = {i for i, v in vectors.items() if _cos_distance(probe, v) - best < 1e-9}
        got = conn.execute(f"SELECT t.id FROM vector_top_k('memories_{COLUMN}_vidx', vector32(?), 1) AS k "
                           "JOIN memories AS t ON t.rowid = k.id", (json.dumps(probe),)).fetchall()
        assert len(got) == 1 and got[0][0] in expected, (row_id, got, expected)
    conn.close()


def test_vector_column_is_refused_outside_libsql_and_for_a_bad_name(tmp_path, cli):
    be = make_backend("sqlite", tmp_path)
    build(be.engine(), memories=20, entities=5)
    with FakeOpenAI() as server:
        env = env_for(server, be.url)
        refused = cli("run", *RUN_ARGS, "--vector-column", COLUMN, "--log-format", "human", env=env)
        assert refused.code == 2 and "needs libSQL" in refused.stderr, refused.output
        assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.output
        assert cli("index", "--vector-column", COLUMN, env={"DATABASE_URL": be.url}).code == 2
        lib = make_backend("libsql", tmp_path)
        build(lib.engine(), memories=20, entities=5)
        bad = cli("run", *RUN_ARGS, "--vector-column", "v; DROP TABLE memories", "--log-format", "human",
                  env=env_for(server, lib.url))
        assert bad.code == 2 and "not a plain SQL name" in bad.stderr, bad.output
        assert cli("migrate", "--database-url", lib.url).code == 0
        other_dims = cli("run", "--model", "text-embedding-3-small", "--dimensions", "8", "--vector-column", COLUMN,
                         "--log-format", "human", env=env_for(server, lib.url))
        assert other_dims.code == 2 and "16 dimensions" in other_dims.stderr, other_dims.output
        assert server.stats()["requests"] == 0
    for engine in (be.engine(), lib.engine()):  # nothing was added: the refusal rolled the DDL back
        with engine.connect() as conn:
            assert COLUMN not in {c["name"] for c in sa.inspect(conn).get_columns("memories")}
