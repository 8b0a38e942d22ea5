"""A user's first hour (issue 13) and values that cannot be right (issue 12, items 8 and 9), at the
CLI: real files, the real CLI in a subprocess, sha256 of the database before and after where it
must stay unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, make_backend
from engine_helpers import RUN_ARGS, build, embeddings, env_for, is_vector, poison
from support.fake_openai import FakeOpenAI

NO_KEY = {"OPENAI_API_KEY": ""}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def legacy_db(tmp_path: Path, memories: int = 40, entities: int = 10, dims: int = 16) -> Path:
    """A live mcp-memory-ts database (no alembic_version) with rows missing their embedding."""
    be = make_backend("sqlite", tmp_path)
    from backfill import sample

    sample.build(be.engine(), sample.SampleSpec(memories=memories, entities=entities, dimensions=dims, seed=5))
    return be.path


def job_rows(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'backfill_jobs'").fetchone():
            return []
        return conn.execute("SELECT id, status FROM backfill_jobs ORDER BY id").fetchall()


def one_error_line(result) -> str:  # noqa: ANN001
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.output[-2000:]
    assert "Traceback" not in result.output
    return lines[0]


# --- 13.3 / 12.9: every flag, the key and the provider are checked before `up` touches anything --------


@pytest.mark.parametrize("args, needle", [
    (["--provider", "locl"], "unknown provider"),
    (["--target", "memory"], "--target"),
    (["--recipe", "foo"], "--recipe"),
    (["-b", "0"], "--batch-size"),
    (["--concurrency", "0"], "--concurrency"),
    (["--mode", "bach"], "--mode"),
    (["--timeout", "0"], "--timeout"),
    (["--timeout", "-1"], "--timeout"),
    (["--dimensions", "-5"], "--dimensions"),
    (["--dimensions", "0"], "--dimensions"),
    (["--dimensions", "100000"], "--dimensions"),
    (["--model", ""], "--model"),
    (["--max-runtime", "-5"], "--max-runtime"),
    (["--price-per-mtok", "-1"], "--price-per-mtok"),
    (["--max-cost", "-1"], "--max-cost"),
    (["--vector-column", "ev"], "--vector-column"),
    (["-u", "nobody@example.com"], "no user"),
    (RUN_ARGS, "OPENAI_API_KEY"),  # no key, rows to embed
])
def test_up_refuses_bad_flags_and_a_missing_key_before_migrate_touches_the_file(tmp_path, cli, args, needle):
    db = legacy_db(tmp_path)
    before = sha(db)
    result = cli("up", "--database-url", str(db), *args, "--log-format", "human", env=NO_KEY)
    assert result.code == 2, result.output[-2000:]
    assert needle in one_error_line(result)
    assert sha(db) == before  # not adopted, no backfill_* tables, FTS triggers untouched


@pytest.mark.parametrize("command", ["run", "plan"])
@pytest.mark.parametrize("args", [["--timeout", "0"], ["--dimensions", "100000"], ["--model", ""],
                                  ["--max-runtime", "-5"], ["--price-per-mtok", "-1"]])
def test_run_and_plan_refuse_values_that_cannot_be_right(tmp_path, cli, command, args):
    if command == "plan" and args[0] in ("--timeout", "--max-runtime"):
        pytest.skip("plan takes no --timeout/--max-runtime")
    db = legacy_db(tmp_path)
    before = sha(db)
    result = cli(command, "--database-url", str(db), *args, "--log-format", "human",
                 env={"OPENAI_API_KEY": "sk-test"})
    assert result.code == 2, result.output[-2000:]
    assert args[0] in one_error_line(result)
    assert sha(db) == before


def test_resume_refuses_a_bad_timeout(tmp_path, cli):
    db = legacy_db(tmp_path)
    result = cli("resume", "--database-url", str(db), "--timeout", "-1", "--log-format", "human")
    assert result.code == 2 and "--timeout" in one_error_line(result)


def test_up_refuses_the_model_mismatch_before_migrate(tmp_path, cli):
    db = legacy_db(tmp_path, dims=384)  # the demo's vectors; the default model writes 1536
    before = sha(db)
    result = cli("up", "--database-url", str(db), "--log-format", "human", env={"OPENAI_API_KEY": "sk-test"})
    assert result.code == 2 and "384" in one_error_line(result)
    assert sha(db) == before


def test_up_with_nothing_to_embed_needs_no_key_exits_0_and_records_no_job(tmp_path, cli):
    db = legacy_db(tmp_path)
    with FakeOpenAI() as server:
        env = env_for(server, str(db))
        first = cli("up", *RUN_ARGS, env=env)
        assert first.code == 0, first.output[-2000:]
    jobs_before = job_rows(db)
    assert len(jobs_before) == 1
    again = cli("up", "--database-url", str(db), *RUN_ARGS, env=NO_KEY)
    assert again.code == 0, again.output[-2000:]
    assert job_rows(db) == jobs_before  # 13.19: a no-op up records no empty job row
    events = [json.loads(line) for line in again.stdout.splitlines()]
    assert any(e["event"] == "nothing_to_do" for e in events)
    last = events[-1]  # 13.19: the final stats object is an event like every other line
    assert last["event"] == "stats" and last["level"] == "info" and "timestamp" in last
    assert last["tables"]["memories"]["missing"] == 0


# --- 13.6: not a database, an empty one, a foreign one: one line, never 70 ----------------------------


@pytest.mark.parametrize("command", ["stats", "verify", "run", "plan", "status", "jobs", "up", "migrate"])
def test_not_a_database_is_exit_2_in_one_line(tmp_path, cli, command):
    notdb = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", notdb)
    before = sha(notdb)
    result = cli(command, "--database-url", str(notdb), "--log-format", "human", env={"OPENAI_API_KEY": "sk-test"})
    assert result.code == 2, result.output[-2000:]
    assert "not a database" in one_error_line(result)
    assert sha(notdb) == before


@pytest.mark.parametrize("command", ["stats", "run", "plan", "status", "jobs"])
def test_empty_and_foreign_databases_say_what_to_do(tmp_path, cli, command):
    empty = tmp_path / "empty.db"
    with sqlite3.connect(empty) as conn:
        conn.execute("PRAGMA user_version = 1")  # a real SQLite file with no tables
    foreign = tmp_path / "invoices.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    for path, code, needle in ((empty, 2, "backfill migrate"), (foreign, 1, "not an mcp-memory-ts database")):
        before = sha(path)
        result = cli(command, "--database-url", str(path), "--log-format", "human", env={"OPENAI_API_KEY": "sk-t"})
        assert result.code == code, (path.name, result.output[-2000:])
        line = one_error_line(result)
        assert needle in line and "no such table" not in line
        assert sha(path) == before


# --- 13.7, 13.8, 13.12: errors in JSON mode, --log-format values, --traceback after the subcommand -------


def test_json_mode_errors_also_reach_stderr_as_one_human_line(tmp_path, cli):
    result = cli("stats", "--database-url", str(tmp_path / "nope.db"), "--log-format", "json")
    assert result.code == 2
    event = json.loads(result.stdout)
    assert event["event"] == "error" and event["level"] == "error" and "timestamp" in event
    line = one_error_line(result)
    assert line.startswith("error: ") and "database file not found" in line and not line.startswith("{")


@pytest.mark.parametrize("value", ["xml", "jsn"])
def test_unknown_log_formats_are_refused(tmp_path, cli, value):
    db = legacy_db(tmp_path)
    result = cli("stats", "--database-url", str(db), "--log-format", value)
    assert result.code == 2 and "--log-format" in result.stderr


def test_traceback_is_accepted_after_the_subcommand_too(tmp_path, cli):
    for args in (["--traceback", "stats"], ["stats", "--traceback"]):
        result = cli(*args, "--database-url", str(tmp_path / "nope.db"))
        assert "No such option" not in result.output
        assert "Traceback" in result.stderr and "database file not found" in result.stderr


# --- 13.9: BACKFILL_PROVIDER in .env ---------------------------------------------------------------


def test_backfill_provider_in_dotenv_is_honoured(tmp_path, cli):
    db = legacy_db(tmp_path, dims=384)
    (tmp_path / ".env").write_text(f"BACKFILL_PROVIDER=local\nDATABASE_URL={db}\n")
    planned = cli("plan", "--json", cwd=tmp_path, env=NO_KEY)
    assert planned.code == 0, planned.output[-2000:]
    assert json.loads(planned.stdout)["provider"] == "local"
    flag_wins = cli("plan", "--json", "--provider", "openai", "--dimensions", "384", cwd=tmp_path, env=NO_KEY)
    assert flag_wins.code == 0 and json.loads(flag_wins.stdout)["provider"] == "openai", flag_wins.output


# --- 13.10: plan reports the refusal run would give ----------------------------------------------------


def test_plan_reports_the_model_dimension_refusal(tmp_path, cli):
    db = legacy_db(tmp_path, dims=384)
    result = cli("plan", "--database-url", str(db), "--log-format", "human", env=NO_KEY)
    assert result.code == 2, result.output
    line = one_error_line(result)
    assert "would refuse" in line and "384" in line and "--reembed-all" in line
    assert cli("plan", "--database-url", str(db), "--reembed-all", "--json", env=NO_KEY).code == 0


# --- 13.11 and 13.16: retry-failed's count; suggested commands carry --database-url ----------------------


def test_retry_failed_counts_what_it_processed_and_suggestions_carry_the_database_url(tmp_path, cli):
    be = make_backend("sqlite", tmp_path)
    engine = be.engine()
    build(engine, memories=120, entities=0)
    poisoned = poison(engine, 4)
    with FakeOpenAI(fail_inputs=["POISON"]) as server:
        env = {k: v for k, v in env_for(server, be.url).items() if k != "DATABASE_URL"}
        first = cli("up", "--database-url", be.url, *RUN_ARGS, "--target", "memories", "--log-format", "human",
                    env=env)
        assert first.code == 3, first.output[-2000:]
        assert f"database: sqlite file {be.path} (from --database-url)" in first.stdout
        assert f"backfill retry-failed 1 --database-url {be.url}" in first.output
        server.configure(fail_inputs=[])
        retry = cli("retry-failed", "--database-url", be.url, "--log-format", "human", env=env)
        assert retry.code == 0, retry.output[-2000:]
        # from the environment: no --database-url in the suggestions, and the source named once
        from_env = cli("stats", "--log-format", "human", env={"DATABASE_URL": be.url})
    assert "Total rows processed: 4" in retry.stdout and "Successfully generated: 4" in retry.stdout, retry.stdout
    assert from_env.stdout.count("(from $DATABASE_URL)") == 1
    stored = embeddings(engine, "memories")
    assert len(poisoned) == 4 and all(is_vector(stored[rid]) for rid in poisoned)  # the retry wrote them


def test_a_password_in_the_url_is_never_printed(tmp_path, cli):
    secret = "pw-SECRET-8181"
    result = cli("stats", "--database-url", f"postgresql://u:{secret}@127.0.0.1:1/db", "--log-format", "human")
    assert result.code == 2 and secret not in result.output
    assert "(from --database-url)" in result.stdout


def test_interrupted_runs_suggest_resume_with_the_flags_used(tmp_path, cli):
    db = legacy_db(tmp_path, memories=60)
    with FakeOpenAI() as server:
        env = {k: v for k, v in env_for(server, str(db)).items() if k != "DATABASE_URL"}
        assert cli("migrate", "--database-url", str(db), env=env).code == 0
        run = cli("run", "--database-url", str(db), *RUN_ARGS, "--limit", "10", "-b", "5", "--log-format", "human",
                  env=env)
    assert run.code == 0, run.output[-2000:]
    assert f"backfill resume 1 --database-url {db}" in run.stdout


# --- 13.13: nothing to do is exit 0 with a line ----------------------------------------------------------


def test_nothing_to_do_is_exit_0_with_a_line(tmp_path, cli):
    db = legacy_db(tmp_path)
    url = ["--database-url", str(db), "--log-format", "human"]
    for command in (["status"], ["jobs"], ["resume"], ["retry-failed"]):  # before any migration
        result = cli(*command, *url)
        assert result.code == 0 and ("nothing" in result.stdout or "no jobs" in result.stdout), (command, result.output)
    with FakeOpenAI() as server:
        env = env_for(server, str(db))
        assert cli("migrate", *url).code == 0
        for command in (["status"], ["resume"], ["retry-failed"]):  # migrated, no job
            result = cli(*command, *url)
            assert result.code == 0 and result.stdout.strip(), (command, result.output)
        assert cli("run", *RUN_ARGS, "--limit", "5", env=env).code == 0
    assert cli("cancel", "1", *url).code == 0
    again = cli("cancel", "1", *url)
    assert again.code == 0 and "already cancelled" in again.stdout
    nothing = cli("resume", *url)
    assert nothing.code == 0 and "nothing to resume" in nothing.stdout
    done = cli("resume", "1", *url)
    assert done.code == 0 and "cancelled" in done.stdout
    assert cli("status", "99", *url).code == 2  # a job id that does not exist is still an error


# --- 13.14: --wait is one line, then a quiet wait bounded by --max-runtime ---------------------------------


def test_wait_says_so_once_and_is_bounded_by_max_runtime(tmp_path, cli):
    db = legacy_db(tmp_path, memories=60)
    with FakeOpenAI() as server:
        env = env_for(server, str(db))
        assert cli("up", *RUN_ARGS, "--limit", "5", env=env).code == 0
        with sqlite3.connect(db) as conn:  # a live worker on another host holds the job
            conn.execute("UPDATE backfill_jobs SET worker_id = 'elsewhere:1:abc', "
                         "lease_expires_at = '2999-01-01T00:00:00.000+00:00'")
        started = time.monotonic()
        waited = cli("up", *RUN_ARGS, "--wait", "--max-runtime", "5", "--log-format", "human", env=env)
        took = time.monotonic() - started
    assert waited.code == 4, waited.output[-2000:]
    assert waited.output.count("busy") == 1 and "elsewhere:1:abc" in waited.stderr
    assert 4 < took < 30


# --- 13.17: 80 columns, help panels, no Python dicts, ETAs as durations, jobs with header and scope ---------


def test_human_output_fits_80_columns(tmp_path, cli):
    db = legacy_db(tmp_path, memories=60)
    with FakeOpenAI() as server:
        env = env_for(server, str(db))
        assert cli("up", *RUN_ARGS, "--limit", "10", "-b", "5", env=env).code == 0
        assert cli("run", *RUN_ARGS, "-u", "alice@example.com", "--limit", "5", env=env).code == 0
    url = ["--database-url", db.name, "--log-format", "human"]  # a long path cannot fit; the rest must
    stats = cli("stats", *url, cwd=tmp_path)
    jobs = cli("jobs", *url, cwd=tmp_path)
    status = cli("status", "1", *url, cwd=tmp_path)
    for result in (stats, jobs, status):
        assert result.code == 0, result.output
        assert all(len(line) <= 80 for line in result.stdout.splitlines()), result.stdout
    assert "{" not in status.stdout and "}" not in status.stdout
    assert re.search(r"ETA (\d+[smhd]( \d+[smh])?|-)\s*$", status.stdout, re.M), status.stdout
    header = jobs.stdout.splitlines()[1]  # after the database line
    assert header.split()[:5] == ["id", "status", "target", "user", "embedded"], jobs.stdout
    assert "alice@example.com" in jobs.stdout and "all users" in jobs.stdout
    for command in ("run", "up", "plan"):
        helped = cli(command, "--help", env={"COLUMNS": "80", "TERM": "dumb"})
        assert helped.code == 0
        panels = set(re.findall(r"╭─ (\w[\w ]*?) ─", helped.stdout))
        assert {"Core", "Pacing", "Output"} <= panels, panels
        if command != "plan":
            assert "Batch mode" in panels
        assert "--help" in helped.stdout and "<bool>" not in helped.stdout  # flags shown as flags


# --- 13.18: --version, -q, colour, completion, up --dry-run, exit 70 in --help ---------------------------


def test_version_quiet_completion_dry_run_and_exit_codes_in_help(tmp_path, cli):
    version = cli("--version")
    assert version.code == 0 and re.fullmatch(r"backfill \d+\.\d+\.\d+\S*\n", version.stdout)
    top = cli("--help", env={"COLUMNS": "100"})
    assert "--install-completion" in top.stdout
    flat = " ".join(top.stdout.split())
    assert "70 internal error" in flat and "5 environment problem" in flat
    db = legacy_db(tmp_path, memories=40)
    before = sha(db)
    dry = cli("up", "--database-url", str(db), "--dry-run", *RUN_ARGS, "--log-format", "json", env=NO_KEY)
    planned = cli("plan", "--database-url", str(db), *RUN_ARGS, "--json", env=NO_KEY)
    assert dry.code == 0 and planned.code == 0, dry.output + planned.output
    strip = lambda d: {k: v for k, v in d.items() if k != "timestamp"}  # noqa: E731
    assert strip(json.loads(dry.stdout)) == strip(json.loads(planned.stdout))
    assert sha(db) == before  # a dry run migrates nothing
    with FakeOpenAI() as server:
        quiet = cli("-q", "up", *RUN_ARGS, "--log-format", "human", env=env_for(server, str(db)))
        assert quiet.code == 0 and quiet.stdout == "", quiet.output
        also_after = cli("stats", "-q", "--log-format", "human", env={"DATABASE_URL": str(db)})
        assert also_after.code == 0 and also_after.stdout == ""
    bad = cli("-q", "stats", "--database-url", str(tmp_path / "nope.db"), "--log-format", "human")
    assert bad.code == 2 and "database file not found" in bad.stderr


def _under_a_pty(args: list[str], env: dict) -> str:
    import pty

    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update(env)
        os.execv(sys.executable, [sys.executable, "-m", "backfill", *args])
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode("utf-8", "replace")


def test_colour_on_a_terminal_unless_no_color(tmp_path):
    db = legacy_db(tmp_path)
    screen = _under_a_pty(["stats", "--database-url", str(tmp_path / "nope.db")], {"NO_COLOR": ""})
    assert "\x1b[1;31merror:" in screen
    healthy = _under_a_pty(["stats", "--database-url", str(db)], {"NO_COLOR": ""})
    assert "\x1b[31mcritical" in healthy or "\x1b[1;31mcritical" in healthy or "\x1b[33m" in healthy, healthy
    plain = _under_a_pty(["stats", "--database-url", str(tmp_path / "nope.db")], {"NO_COLOR": "1"})
    assert "error:" in plain and "\x1b[" not in plain


# --- 13.19: -u ignores case; sample-db refuses negative counts; migrate's refusal has no object repr ------


def test_user_email_matches_ignoring_case(tmp_path, cli):
    db = legacy_db(tmp_path)
    lower = cli("stats", "--database-url", str(db), "-u", "alice@example.com", "--json")
    upper = cli("stats", "--database-url", str(db), "-u", "ALICE@Example.COM", "--json")
    assert lower.code == 0 and upper.code == 0, upper.output
    assert json.loads(lower.stdout)["tables"] == json.loads(upper.stdout)["tables"]


@pytest.mark.parametrize("args", [["--memories", "-5"], ["--entities", "-1"], ["--dimensions", "0"]])
def test_sample_db_refuses_negative_counts(tmp_path, cli, args):
    result = cli("sample-db", str(tmp_path / "x.db"), *args, "--log-format", "human")
    assert result.code == 2 and args[0] in one_error_line(result)
    assert not (tmp_path / "x.db").exists()


def test_migrates_refusal_prints_no_python_repr(tmp_path, cli):
    db = legacy_db(tmp_path)
    with sqlite3.connect(db) as conn:  # what backfill writes is gone: migrate must refuse, in words
        conn.execute("ALTER TABLE memories DROP COLUMN embedding")
    before = sha(db)
    for fmt in ("human", "json"):
        result = cli("migrate", "--database-url", str(db), "--log-format", fmt)
        assert result.code == 1, result.output[-2000:]
        assert "embedding" in result.output
        assert not re.search(r"\w+\(Column\(|Constraint\(|<sqlalchemy|object at 0x|\bTable\(", result.output), \
            result.output
    assert sha(db) == before


# --- 12.8: a broken environment is named, with its own exit code (5), never 70 ----------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chattr +i and mount need root (as in CI)")


def _chattr(flag: str, path: Path) -> bool:
    return shutil.which("chattr") is not None and subprocess.run(
        ["chattr", flag, str(path)], capture_output=True).returncode == 0


@needs_root
def test_a_read_only_file_is_exit_5_naming_the_cause(tmp_path, cli):
    # root ignores file modes (chmod 0444), but not the immutable attribute
    db = legacy_db(tmp_path)
    with FakeOpenAI() as server:
        env = env_for(server, str(db))
        assert cli("migrate", env=env).code == 0
        if not _chattr("+i", db):
            pytest.skip("chattr +i is not supported on this filesystem")
        try:
            before = sha(db)
            result = cli("run", *RUN_ARGS, "--log-format", "human", env=env)
        finally:
            _chattr("-i", db)
    assert result.code == 5, result.output[-2000:]
    assert "read-only" in one_error_line(result) and str(db) in result.stderr
    assert sha(db) == before


@needs_root
def test_a_folder_where_the_journal_cannot_be_created_is_exit_5(tmp_path, cli):
    folder = tmp_path / "locked"
    folder.mkdir()
    db = legacy_db(folder)
    with FakeOpenAI() as server:
        env = env_for(server, str(db))
        if not _chattr("+i", folder):
            pytest.skip("chattr +i is not supported on this filesystem")
        try:
            result = cli("migrate", "--log-format", "human", env=env)
        finally:
            _chattr("-i", folder)
    assert result.code == 5, result.output[-2000:]
    line = one_error_line(result)
    assert "journal" in line and "writable" in line


@needs_root
def test_a_full_disk_is_exit_5_naming_the_cause(tmp_path, cli):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        db = legacy_db(mnt, memories=80, entities=0, dims=8)
        with FakeOpenAI() as server:
            env = env_for(server, str(db))
            assert cli("migrate", env=env).code == 0
            result = cli("run", "--reembed-all", "--model", "text-embedding-3-small", "--dimensions", "1536",
                         "-b", "20", "--log-format", "human", env=env)
        assert result.code == 5, result.output[-2000:]
        assert "full" in one_error_line(result) and "free some space" in result.stderr
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
