"""Bad rows never stop a job: blank text is skipped with a reason, text far over the token limit is
truncated by tokens, control characters and undecodable text are cleaned, malformed existing
embeddings are re-embedded. Each case is asserted in the database."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from backfill import tables
from backfill.schema import memories
from backfill.tokens import MAX_INPUT_TOKENS
from conftest import make_backend
from engine_helpers import DIMS, MODEL, RUN_ARGS, build, embeddings, env_for, expected_text
from support.fake_openai import FakeOpenAI, count_tokens, fake_vector

NOW = "2025-01-01T00:00:00.000Z"
BAD_VECTORS = ["[1, 2,", '{"a": 1}', '[1, "x"]', "[0.1, 0.2]", "not json", " [] "]


def _insert(conn, title, content, embedding=None, kind="semantic") -> int:
    return conn.execute(memories.insert().values(
        user_id="u-alice", title=title, content=content, memory_type=kind, importance=0.5, tags="[]",
        embedding=embedding, is_archived=False, created_at=NOW, updated_at=NOW).returning(memories.c.id)).scalar()


@pytest.mark.parametrize("name", ["sqlite", "libsql", "postgresql"])
def test_bad_rows_are_skipped_truncated_cleaned_or_reembedded_and_the_job_finishes(name, tmp_path, cli):
    be = make_backend(name, tmp_path)
    engine = be.engine()
    build(engine, memories=30, entities=0, seed=9)
    long_text = "lorem ipsum dolor sit amet " * 6000  # ~30k tokens: far over the 8,192-token input limit
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE memories SET embedding = :v"), {"v": json.dumps([0.5] * DIMS)})
        # the recipe joins title, content, "Type: …" and tags: with no type and no tags there is nothing
        blank = [_insert(conn, "", "", kind=""), _insert(conn, "   ", "\n\t  ", kind=""),
                 _insert(conn, "", "\u200b\ufeff", kind="")]
        long_id = _insert(conn, "long", long_text)
        ctl_id = _insert(conn, "bell\x07 and escape\x1b[31m red\x7f", "tab\tand\x0bvertical\x0cfeed")
        malformed = [_insert(conn, f"malformed {i}", f"existing embedding {v!r}", v) for i, v in enumerate(BAD_VECTORS)]
    bytes_id = None
    if name == "sqlite":  # SQLite keeps whatever bytes it is given: a TEXT value that is not UTF-8
        with engine.begin() as conn:
            bytes_id = _insert(conn, "undecodable", "x")
            conn.execute(sa.text("UPDATE memories SET content = CAST(X'4142EDA08043' AS TEXT) WHERE id = :i"),
                         {"i": bytes_id})
    with FakeOpenAI() as server:
        result = cli("up", *RUN_ARGS, "--target", "memories", "-b", "4", env=env_for(server, be.url))
        sent = server.inputs_seen()
    assert result.code == 0, result.output[-2000:]
    stored = embeddings(engine, "memories")
    with engine.connect() as conn:
        rows = {r["id"]: dict(r) for r in conn.execute(sa.text("SELECT * FROM memories")).mappings()}
        skipped = dict(conn.execute(sa.text(
            "SELECT row_id, error FROM backfill_failures WHERE kind = 'skipped'")).all())
        failed = conn.execute(sa.text("SELECT count(*) FROM backfill_failures WHERE kind = 'failed'")).scalar()
        job = conn.execute(sa.text("SELECT * FROM backfill_jobs")).mappings().one()
    # blank text: skipped with a reason, nothing sent, nothing written
    assert sorted(skipped) == sorted(blank) and all("blank" in why for why in skipped.values())
    assert all(stored[i] is None or stored[i] == "" for i in blank)
    # every other row needing an embedding got the vector of its recipe text, truncated by tokens
    embedded = [long_id, ctl_id, *malformed, *([bytes_id] if bytes_id else [])]
    for rid in embedded:
        text = expected_text("memories", rows[rid])
        assert text and json.loads(stored[rid]) == fake_vector(text, DIMS, MODEL), rid
    assert count_tokens(long_text) > 20_000
    long_sent = expected_text("memories", rows[long_id])
    assert 8000 < count_tokens(long_sent) <= MAX_INPUT_TOKENS and long_sent in sent
    ctl_sent = expected_text("memories", rows[ctl_id])
    assert not any(ch in ctl_sent for ch in "\x07\x1b\x7f\x0b\x0c") and "bell" in ctl_sent
    if bytes_id:
        assert rows[bytes_id]["content"] == "AB\udced\udca0\udc80C"  # undecodable bytes, kept as they were
        assert tables.recipe_text(tables.SPECS["memories"], rows[bytes_id]) == "undecodable ABC Type: semantic"
    assert failed == 0 and sorted(sent) == sorted(expected_text("memories", rows[i]) for i in embedded)
    assert (job["status"], job["embedded"], job["skipped"], job["failed"]) == ("done", len(embedded), len(blank), 0)


def test_the_ascii_fast_path_of_the_recipe_equals_the_servers_regexes():
    """tables._clean takes a shortcut for ASCII text; on any input it must give what the server's
    two regexes give (whitespace runs collapsed, then everything outside its keep-set deleted)."""
    import random
    import re

    def server(text: str) -> str:
        text = tables._COLLAPSE.sub(" ", text)
        return tables._ASCII_KEEP.sub("", text).strip(tables._JS_STRIP)

    rng = random.Random(7)
    alphabet = "ab Z09_-.,!?;:()[]{}'\"\t\n\v\f\r\x00\x01\x1c\x1f@#$%^&*~`|\\/<>+=\x7f\u00e9\u00a0\u2003\ufeff"
    fast = 0
    for _ in range(50_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        fast += text.isascii() and not re.search("[\x1c-\x1f]", text)
        assert tables._clean(text, tables._ASCII_KEEP) == server(text), repr(text)
    assert fast > 10_000  # the shortcut was exercised, not only the fallback
