"""A libSQL file locked by another process is waited for in Python (backfill/lockwait.py): our other threads
keep running meanwhile. The driver's own busy timeout keeps the GIL while it waits, which froze the thread
whose read held the lock the other process's commit needed (test_live_writer failed on it under load)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import sqlalchemy as sa

from backfill.db import engine_for, resolve

HOLDER = textwrap.dedent("""
    import sqlite3, sys, time
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO t VALUES (1)")
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
    db.execute("COMMIT")
""")


def _spin_rate(seconds: float, during=None) -> int:  # noqa: ANN001
    """Iterations of a Python loop in another thread while `during()` runs (or for `seconds`)."""
    count, stop = [0], threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.1)
    start = count[0]
    if during is None:
        time.sleep(seconds)
    else:
        during()
    got = count[0] - start
    stop.set()
    t.join()
    return got


def test_a_wait_for_another_processs_lock_leaves_our_other_threads_running(tmp_path):
    path = tmp_path / "locked.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.commit()
    engine = engine_for(resolve(f"sqlite+libsql:///{path}"))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), "1.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        waited = []

        def write() -> None:
            began = time.monotonic()
            with engine.begin() as conn:  # waits for the holder's commit, then writes
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                conn.exec_driver_sql("INSERT INTO t VALUES (2)")
            waited.append(time.monotonic() - began)

        during = _spin_rate(0, during=write)
        assert holder.wait(timeout=30) == 0
        baseline = _spin_rate(waited[0])
    finally:
        if holder.poll() is None:
            holder.kill()
    assert waited[0] > 0.5, "the write did not wait for the other process's lock"
    # same duration: with the driver's busy timeout the other thread got under 1 % of its share
    assert during > baseline * 0.2, (during, baseline)
    with engine.connect() as conn:
        assert sorted(r[0] for r in conn.execute(sa.text("SELECT x FROM t"))) == [1, 2]
    engine.dispose()


def test_a_query_left_unread_lets_go_of_its_read_lock_when_its_result_goes(tmp_path, monkeypatch):
    """A statement not read to its end holds a read lock on the file until its cursor is gone. Our wrapper must not
    outlive the result (a reference cycle kept it until the cycle collector ran): then our own next commit, on
    another pooled connection, waited the whole lock wait and failed (`up --vector-column`, 2 runs in 6)."""
    from backfill import lockwait

    monkeypatch.setattr(lockwait, "WAIT_S", 1.0)
    path = tmp_path / "unread.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (x)")
    db.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(5000)])
    db.commit()
    db.close()
    engine = engine_for(resolve(f"sqlite+libsql:///{path}"))

    def first_of_many() -> int:
        with engine.connect() as conn:
            for (x,) in conn.exec_driver_sql("SELECT x FROM t ORDER BY x"):
                return int(x)  # the rest stays unread
        raise AssertionError("no rows")

    import gc

    gc.disable()  # only reference counting frees the result, as between two collector runs
    try:
        assert first_of_many() == 0
        with engine.connect() as a, engine.connect() as b:  # two pooled connections, as the runner holds
            a.exec_driver_sql("SELECT count(*) FROM t").all()
            with b.begin():
                b.exec_driver_sql("UPDATE t SET x = x + 1 WHERE x = 0")  # COMMIT fails if a read lock is left
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM t WHERE x = 1").scalar() == 2
    finally:
        gc.enable()
        engine.dispose()
