"""Answers are asked for in base64 (as the SDK does by default) and decoded by the tool, without numpy; a server
that answers floats whatever was asked (some OpenAI-compatible servers ignore `encoding_format`) gives the
same stored vectors. Asserted on the database, against the fake server over loopback with the real SDK."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import sqlalchemy as sa

from conftest import ROOT
from engine_helpers import RUN_ARGS, assert_vectors_match_recipe, build, env_for, needing
from support.fake_openai import FakeOpenAI


@pytest.mark.parametrize("answer_format", [None, "float"])
def test_base64_and_float_answers_store_the_same_exact_vectors(answer_format, tmp_path, cli):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    engine = sa.create_engine(url)
    build(engine, memories=40, entities=0)
    todo = needing(engine)
    assert todo
    with FakeOpenAI(answer_format=answer_format) as server:
        result = cli("up", *RUN_ARGS, "--target", "memories", "-b", "8", env=env_for(server, url))
        answered = {e["answered"] for e in server.log if e["status"] == 200}
    assert result.code == 0, result.output[-2000:]
    assert answered == {answer_format or "base64"}
    assert not needing(engine)
    assert assert_vectors_match_recipe(engine, todo) == len(todo)
    engine.dispose()


def test_a_request_and_its_answer_import_no_numpy(tmp_path):
    """The SDK imports numpy (~0.1 s) to decode base64 when it chooses the format itself; asked explicitly,
    it leaves the answer to us. A fresh interpreter embeds through the provider and numpy stays out."""
    with FakeOpenAI() as server:
        code = textwrap.dedent(f"""
            import sys
            from backfill.config import Secret
            from backfill.providers.openai import OpenAIProvider
            p = OpenAIProvider(api_key=Secret("sk-test"), model="text-embedding-3-small", dimensions=8,
                               send_dimensions=True, base_url={server.base_url!r})
            got = p.embed(["one", "two"])
            assert len(got.vectors) == 2 and len(got.vectors[0]) == 8, got
            print("numpy" in sys.modules)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
