"""`--follow`: after the backlog, keep embedding what the change queue gets, within a poll of the server's commit.

The loop around the sync runner (runner.Runner, not a copy of it): each *pass* is one `Runner.run` over the
follow source (sources.followed_rows: queued rows that need a vector or whose text changed, less the job's
failed and skipped rows), from the job's cursor the first time, from key 0 after (an edit to an old row is
queued too, and the source reads the queue, not the table). Passes repeat while rows are left.

Idle, the follower sleeps `poll_s` between polls. A poll asks the follow source for one row per table (a join
on the queue's key: O(queue), never the table) and counts the queue's entries; a changed count first settles
the queue (changes.settle: rows the server embedded itself leave it, so it stays small). Every poll also
checks `--max-runtime` and `backfill cancel` (one read of the job row), and the lease is renewed every
HEARTBEAT_S while idle (commits renew it while busy).

A stop (signal, `--max-runtime`, cancel) ends the pass in progress as any run ends (what landed commits) and
then the loop; `drive.drive` records the job `done` when nothing is left in scope, else
`interrupted`.
"""

from __future__ import annotations

import time

from backfill import changes, db, jobs, report, stopping, tables
from backfill.page import Outcome
from backfill.runner import Runner

HEARTBEAT_S = 15.0  # lease renewal while idle (the lease lasts jobs.LEASE_SECONDS)
SLEEP_SLICE_S = 0.25  # a stop is seen within this while asleep
WAITING = "following: waiting for changes (Ctrl-C to stop)"


def follow(run: Runner, poll_s: float) -> Outcome:
    """Run the backlog, then follow the change queue until `run.stop` is set; `run.outcome` holds every pass."""
    specs = tables.specs_for(run.job.target)
    passes = 0
    told = False
    settled = _size(run, specs)  # the queue's entries when it was last settled (`run` settled it before the job)
    beat = time.monotonic()
    while True:
        if passes == 0 or _work(run, specs):
            passes = _passes(run, passes)
            beat = time.monotonic()
            if run.stop.reason:
                return run.outcome
            report.event("follow_waiting", job=run.job.id, passes=passes, embedded=run.outcome.embedded,
                         failed=run.outcome.failed)
            if not told:
                told = True
                if run.progress is not None and hasattr(run.progress, "note"):
                    run.progress.note(WAITING)
        _sleep(run, poll_s)
        stopping.check(run.stop, run.engine, run.job.id, started=run.started, max_runtime_s=run.options.max_runtime_s)
        if run.stop.reason:
            return run.outcome
        if (count := _size(run, specs)) != settled:  # the triggers add entries, commits and settling take them off
            for spec in specs if count else ():
                changes.settle(run.engine, spec, run.job.dimensions)
            settled = _size(run, specs) if count else 0
        if time.monotonic() - beat >= HEARTBEAT_S:
            jobs.heartbeat(run.engine, run.job.id, run.worker)
            beat = time.monotonic()


def _work(run: Runner, specs: list[tables.Spec]) -> bool:
    """Whether the follow source holds a row (one row read per table)."""
    return any(run.pager.read(spec, 0, 1) for spec in specs)


def _passes(run: Runner, passes: int) -> int:
    """Passes until the source is empty, a pass selects nothing (what is left changed under it, and waits for
    the next change), or the run is stopped. Returns the passes run so far."""
    while True:
        before = run.outcome.selected
        run.run(None if passes == 0 else {})
        passes += 1
        selected = run.outcome.selected - before
        if selected:
            report.event("follow_pass", job=run.job.id, passes=passes, selected=selected,
                         embedded=run.outcome.embedded, failed=run.outcome.failed)
        if run.stop.reason or not selected or not run.left():
            return passes


def _size(run: Runner, specs: list[tables.Spec]) -> int:
    return db.retrying(run.engine, lambda conn: changes.size(conn, specs), write=False)


def _sleep(run: Runner, seconds: float) -> None:
    end = time.monotonic() + seconds
    while not run.stop.reason and (left := end - time.monotonic()) > 0:
        time.sleep(min(left, SLEEP_SLICE_S))
