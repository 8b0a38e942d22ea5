"""Same-text dedupe: identical recipe texts are sent once (within a page and across pages) and every row
still gets its vector. The real CLI, the fake server's token count, assertions on the database."""

from __future__ import annotations

import json
import random

from backfill import tokens
from conftest import make_backend
from engine_helpers import DIMS, MODEL, RUN_ARGS, build, env_for, expected_text, needing
from support.fake_openai import FakeOpenAI, fake_vector

TEXT_COLUMNS = ("title", "content", "memory_type", "tags")


def _memories(engine) -> dict[int, dict]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, embedding, title, content, memory_type, tags FROM memories").mappings()
        return {r["id"]: dict(r) for r in rows}


def test_thirty_percent_duplicate_texts_cut_tokens_sent_by_their_share_and_every_row_gets_its_vector(tmp_path, cli):
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=1000, entities=10)
    rows = _memories(engine)
    todo = sorted(i for t, i in needing(engine) if t == "memories" and expected_text("memories", rows[i]))
    rng = random.Random(3)
    rng.shuffle(todo)
    n_dup = round(0.3 * len(todo))
    copies, sources = todo[:n_dup], todo[n_dup:]
    with engine.begin() as conn:  # texts of similar size; then 30 % of them take the text of another row
        for row_id in sources:
            conn.exec_driver_sql("UPDATE memories SET title = ?, content = ?, tags = NULL WHERE id = ?",
                                 (f"note {row_id}", f"the meeting about project {row_id} moved to room {row_id % 7}",
                                  row_id))
    rows = _memories(engine)
    with engine.begin() as conn:
        for row_id in copies:
            src = rows[rng.choice(sources)]
            conn.exec_driver_sql("UPDATE memories SET title = ?, content = ?, memory_type = ?, tags = ? WHERE id = ?",
                                 (*(src[c] for c in TEXT_COLUMNS), row_id))
    rows = _memories(engine)
    texts = {i: expected_text("memories", rows[i]) for i in todo}
    all_tokens = sum(tokens.count(t) for t in texts.values())
    unique_tokens = sum(tokens.count(t) for t in set(texts.values()))
    share = 1 - unique_tokens / all_tokens
    assert 0.28 < share < 0.32 and len(set(texts.values())) == len(sources)

    with FakeOpenAI() as server:  # small pages (-b 20 x 2): most duplicates sit in another page than their source
        result = cli("up", *RUN_ARGS, "--target", "memories", "-b", "20", "--concurrency", "2",
                     env=env_for(server, be.url))
        assert result.code == 0, result.output[-2000:]
        sent = server.stats()
        seen = server.inputs_seen()
    assert sent["tokens_embedded"] == unique_tokens  # dropped by exactly the duplicates' share
    assert sent["inputs_embedded"] == len(sources) and sorted(seen) == sorted(set(texts.values()))
    rows = _memories(engine)
    for i in todo:
        assert json.loads(rows[i]["embedding"]) == fake_vector(texts[i], DIMS, MODEL), i
    with engine.connect() as conn:
        prov = conn.exec_driver_sql("SELECT count(*) FROM backfill_embeddings WHERE target = 'memories'").scalar()
        job = conn.exec_driver_sql("SELECT embedded, tokens, tokens_saved FROM backfill_jobs").mappings().one()
    assert prov == len(todo) and job["embedded"] == len(todo)
    assert job["tokens"] == unique_tokens and job["tokens_saved"] == all_tokens - unique_tokens
    finished = [json.loads(line) for line in result.stdout.splitlines() if '"job_finished"' in line]
    assert finished[-1]["tokens_saved"] == all_tokens - unique_tokens


def test_a_source_row_edited_since_is_not_copied_and_human_output_reports_savings(tmp_path, cli):
    be = make_backend("libsql", tmp_path)
    engine = be.engine()
    build(engine, memories=120, entities=10)
    with FakeOpenAI() as server:
        env = env_for(server, be.url)
        assert cli("up", *RUN_ARGS, "--target", "memories", env=env).code == 0
        with engine.connect() as conn:
            src, other = [r for (r,) in conn.exec_driver_sql(
                "SELECT row_id FROM backfill_embeddings WHERE target = 'memories' ORDER BY row_id LIMIT 2")]
        with engine.begin() as conn:
            # `src` is edited behind our back (its vector is now of an old text); `other` then takes the
            # text `src` had, and a fresh row arrives with it too
            old = conn.exec_driver_sql(f"SELECT title, content, memory_type, tags FROM memories WHERE id = {src}").one()
            conn.exec_driver_sql(f"UPDATE memories SET content = 'rewritten entirely' WHERE id = {src}")
            conn.exec_driver_sql("UPDATE memories SET title = ?, content = ?, memory_type = ?, tags = ?, "
                                 f"embedding = NULL WHERE id = {other}", tuple(old))
            conn.exec_driver_sql("INSERT INTO memories "
                                 "(user_id, title, content, memory_type, tags, created_at, updated_at)"
                                 " SELECT user_id, title, content, memory_type, tags, created_at, updated_at "
                                 f"FROM memories WHERE id = {other}")
        server.reset_log()
        result = cli("run", *RUN_ARGS, "--target", "memories", "--log-format", "human", env=env)
        assert result.code == 0, result.output
        assert server.stats()["inputs_embedded"] == 1  # sent once, not copied from the edited row
        assert "Tokens saved by same-text dedupe" in result.output
    rows = _memories(engine)
    new_id = max(rows)
    text = expected_text("memories", rows[other])
    assert expected_text("memories", rows[new_id]) == text
    expected = fake_vector(text, DIMS, MODEL)
    assert json.loads(rows[other]["embedding"]) == json.loads(rows[new_id]["embedding"]) == expected
