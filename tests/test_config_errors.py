"""Bad input gets one line naming the fix and exit 2; nothing is created; no secret is printed.
Also: `stats --json` equals counts taken by direct SQL, per table and per user."""

from __future__ import annotations

import json

import pytest

from backfill import sample
from backfill.db import engine_for, resolve
from support.libsql_server import LibsqlServer

SECRET = "tok-SUPER-SECRET-4242"


@pytest.mark.parametrize("url, needle", [
    ("mysql://db.example/x", "unsupported database URL scheme"),
    ("sqlite:///{tmp}/nope.db", "database file not found"),
    ("{tmp}/missing/dir/x.db", "database file not found"),
    (f"postgresql://u:{SECRET}@127.0.0.1:1/db", "cannot connect"),
])
def test_bad_database_urls(tmp_path, cli, url, needle):
    url = url.format(tmp=tmp_path)
    for command in ("stats", "verify", "status"):
        result = cli(command, "--database-url", url, "--log-format", "human")
        assert result.code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], result.stderr
        assert SECRET not in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_remote_libsql_with_a_bad_token_exits_2_without_leaking_it(tmp_path, cli):
    db = tmp_path / "remote.db"
    sample.build(engine_for(resolve(str(db)), must_exist=False),
                 sample.SampleSpec(memories=20, entities=5, dimensions=8))
    with LibsqlServer(str(db), auth_token="right-token-777") as server:
        bad = cli("stats", "--log-format", "human",
                  env={"TURSO_URL": server.url, "TURSO_AUTH_TOKEN": SECRET})
        assert bad.code == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.output
        assert "TURSO_AUTH_TOKEN" in bad.stderr and SECRET not in bad.output and "right-token" not in bad.output
        good = cli("stats", "--json", env={"TURSO_URL": server.url, "TURSO_AUTH_TOKEN": "right-token-777"})
        assert good.code == 0, good.output
        assert json.loads(good.stdout)["tables"]["memories"]["total"] == 20


def test_stats_json_equals_direct_sql(backend, cli):
    engine = backend.engine()
    sample.build(engine, sample.SampleSpec(memories=400, entities=120, dimensions=8))

    def direct(table: str, user: str | None) -> dict:
        where, params = ("WHERE user_id = %s" if backend.name == "postgresql" else "WHERE user_id = ?", (user,)) \
            if user else ("", ())
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(f"SELECT embedding FROM {table} {where}", params).all()
        total = len(rows)
        missing = sum(1 for (e,) in rows if e is None or e.strip() in ("", "[]"))
        good = 0
        for (e,) in rows:
            try:
                v = json.loads(e) if e and e.strip() not in ("", "[]") else None
            except ValueError:
                v = None
            if isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                good += 1
        return {"total": total, "with_embedding": good, "missing": missing, "malformed": total - good - missing,
                "coverage": round(100.0 * good / total, 2) if total else 100.0}

    for email, uid in ((None, None), ("alice@example.com", "u-alice")):
        args = ["stats", "--json", "--database-url", backend.url] + (["-u", email] if email else [])
        result = cli(*args)
        assert result.code == 0, result.output
        got = json.loads(result.stdout)["tables"]
        for table in ("memories", "entities"):
            expected = direct(table, uid)
            assert expected["malformed"] > 0 or uid
            assert {k: got[table][k] for k in expected} == expected
