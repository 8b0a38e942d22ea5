"""Driving a job to its end: take its lease, run it (sync, Batch API or `--follow`) under the stop
signals, release it with its status, then the final block and the exit the failures call for."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection, Engine

from backfill import db, follow, jobs, report, runner, sources, startup, stopping, tables
from backfill import stats as coverage
from backfill.config import Settings
from backfill.errors import ConfigError, Interrupted, LeaseHeld, RowsFailed
from backfill.jobs import top_reasons
from backfill.page import RunOptions
from backfill.providers.base import FatalProviderError, Provider
from backfill.request import RunRequest, build_provider, from_job


def _claim(engine: Engine, job: jobs.Job, worker: str, req: RunRequest) -> jobs.Job:
    """Take the job's lease. With --wait: say so once, then wait quietly, for at most --max-runtime
    (else `wait_timeout_s`); still held then, exit 4."""
    started = time.monotonic()
    bound = req.wait_timeout_s if req.max_runtime_s is None else min(req.wait_timeout_s, req.max_runtime_s)
    told = False
    while True:
        try:
            claimed = db.retrying(engine, lambda conn: jobs.claim(conn, jobs.get(conn, job.id), worker))
        except LeaseHeld as exc:
            waited = time.monotonic() - started
            if not req.wait:
                raise
            if waited >= bound:
                raise LeaseHeld(f"{exc.message.split(';')[0]}; still held after waiting {waited:.0f} s"
                                f"{' (--max-runtime)' if req.max_runtime_s is not None else ''}") from None
            if not told:
                told = True
                report.say(f"job {job.id} is busy (another worker holds it); waiting up to "
                           f"{report.duration(bound)} for it to finish")
                report.event("job_busy", job=job.id, waiting=True, wait_s=bound)
            time.sleep(min(2.0, max(bound - waited, 0.05)))
            continue
        if req.max_runtime_s is not None and told:  # the wait counts against --max-runtime
            req.max_runtime_s = max(req.max_runtime_s - (time.monotonic() - started), 0.001)
        return claimed


def drive(settings: Settings, engine: Engine, job: jobs.Job, provider: Provider, req: RunRequest,
           options: RunOptions, *, retry: bool = False, runner_class: Callable[..., Any] | None = None) -> int:
    startup.settled()  # the modules are loaded: the cycle collector runs as usual from here (startup.py)
    worker = jobs.worker_identity()
    job = _claim(engine, job, worker, req)
    options.max_runtime_s = req.max_runtime_s
    stop = stopping.StopFlag()

    def remaining(conn: Connection) -> int:
        if retry:
            return len(jobs.open_failures(conn, job.id))
        return sum(sources.remaining(conn, spec, job.dimensions, options, job.cursors.get(spec.name, 0))
                   for spec in tables.specs_for(job.target))

    total = db.retrying(engine, remaining, write=False)  # reads only, here and below: a dropped link reads again
    run = (runner_class or runner.Runner)(engine, provider, job, worker, options, None, stop)
    status, reason = "interrupted", None
    try:
        with report.Progress(job.id, total, "retry" if retry else "embedding") as progress, \
                stopping.signals_stop(stop, lambda: _stopping_notice(job.id, run, stop, progress)):
            run.progress = progress
            if options.follow:
                outcome = follow.follow(run, req.poll_interval_s)
            else:
                outcome = run.retry() if retry else run.run()
        reason = stop.reason
        status = "cancelled" if reason == "cancelled" else ("interrupted" if reason else "done")
        if options.follow and status == "interrupted" and not run.left():
            status = "done"  # a follower's stop (signal, --max-runtime) with nothing left in scope: exit 0
    except FatalProviderError as exc:
        reason = str(exc)
        raise ConfigError(f"{exc} (job {job.id} is resumable: {report.suggest(f'backfill resume {job.id}')})") from None
    except KeyboardInterrupt:
        if not stop.aborted:
            reason = "KeyboardInterrupt"
            raise
        reason = f"{stop.reason}, then aborted by a second signal"  # the summary below is still printed
        outcome = run.outcome
    except BaseException as exc:
        reason = f"{type(exc).__name__}"
        raise
    finally:
        jobs.release(engine, job.id, worker, status, reason)
    final = db.retrying(engine, lambda conn: jobs.get(conn, job.id), write=False)
    if stop.aborted:  # an abort can land between a commit and its accounting: the job row is the truth
        _count_from_job(outcome, job, final)
    cov, reasons = db.retrying(engine, lambda conn: (coverage.collect(conn, job.user_email, with_stale=False),
                                                     top_reasons(conn, job.id)), write=False)
    outcome.failure_reasons = [{**r, "reason": settings.redact(r["reason"])} for r in reasons]
    outcome.status, outcome.stop_reason = status, reason
    if retry:  # a retry selects no new rows: what it processed is what it wrote or failed again
        outcome.selected = outcome.embedded + len(outcome.failed_ids)
    outcome.failed = int(final.failed)
    if not outcome.failed_ids and outcome.failed:
        failures = db.retrying(engine, lambda conn: jobs.open_failures(conn, job.id), write=False)
        outcome.failed_ids = [(r["target"], r["row_id"]) for r in failures]
    shown = [t for t in cov.tables if job.target in ("all", t.table)]
    outcome.unaddressable = sum(t.unaddressable for t in shown)
    total_rows = sum(t.total for t in shown)
    pct = 100.0 * sum(t.with_embedding for t in shown) / total_rows if total_rows else 100.0
    report.event("job_finished", job=job.id, status=status, stop_reason=reason, selected=final.selected,
                 embedded=final.embedded, failed=final.failed, skipped=final.skipped, batches=final.batches,
                 requests=final.requests, tokens=final.tokens, cost_usd=round(final.cost_usd, 6),
                 tokens_saved=final.tokens_saved, unaddressable=outcome.unaddressable,
                 coverage=round(pct, 2), failed_ids=[f"{t}:{i}" for t, i in outcome.failed_ids[:100]],
                 failure_reasons=outcome.failure_reasons)
    report.say(report.final_block(outcome, pct, total_rows))
    if status == "interrupted" and stop.signalled:
        raise Interrupted(f"job {job.id} interrupted; resume with `{report.suggest(f'backfill resume {job.id}')}`")
    if status == "done" and final.failed and _tolerated(req, final.failed, final.selected):
        report.say(f"{final.failed} of {final.selected} row(s) failed, within --max-failed-ratio "
                   f"{req.max_failed_ratio}: exit 0 (re-run them with "
                   f"`{report.suggest(f'backfill retry-failed {job.id}')}`)")
        report.event("failures_tolerated", job=job.id, failed=final.failed, selected=final.selected,
                     max_failed_ratio=req.max_failed_ratio)
    elif status == "done" and final.failed:
        raise RowsFailed(f"job {job.id}: {final.failed} row(s) failed; re-run them with "
                         f"`{report.suggest(f'backfill retry-failed {job.id}')}`")
    return 0


def _stopping_notice(job_id: int, run: Any, stop: stopping.StopFlag, progress: report.Progress) -> None:
    """Said at once on the first Ctrl-C/SIGTERM: what will happen, and how to abort instead."""
    in_flight, embedded = run.rows_in_flight() if hasattr(run, "rows_in_flight") else (0, progress.count)
    report.event("stop_requested", job=job_id, reason=stop.reason, rows_in_flight=in_flight, rows_embedded=embedded)
    progress.note(f"{stop.reason}: stopping after the {in_flight} rows in flight; Ctrl-C again to abort")


def _count_from_job(outcome: Any, before: jobs.Job, after: jobs.Job) -> None:
    """This run's counts as the job row's counters moved, for a run whose accounting was cut short."""
    for name in ("selected", "embedded", "skipped", "batches", "tokens", "tokens_saved"):
        setattr(outcome, name, int(getattr(after, name) or 0) - int(getattr(before, name) or 0))
    outcome.cost_usd = float(after.cost_usd or 0) - float(before.cost_usd or 0)


def batch_runner(settings: Settings, job: jobs.Job, req: RunRequest) -> Callable[..., Any] | None:
    """The batch-mode runner for a job started with `--mode batch`, else None (the sync runner)."""
    if not job.batch_mode:
        return None
    from backfill import batch_api  # Batch API mode (and its Files/Batches client) loads only for a job that uses it

    return batch_api.runner_factory(settings, job, req.timeout_s, req.poll_interval_s)


def _tolerated(req: RunRequest, failed: int, selected: int) -> bool:
    """--max-failed-ratio R: failures up to R of the selected rows do not fail the command."""
    return req.max_failed_ratio is not None and selected > 0 and failed / selected <= req.max_failed_ratio


def resume(settings: Settings, engine: Engine, job: jobs.Job, req: RunRequest) -> int:
    """`resume`: an open job continued as it was started, at this invocation's pace."""
    req, options = from_job(job, req)
    provider = build_provider(settings, req)
    report.say(f"resuming job {job.id} from its last committed batch")
    return drive(settings, engine, job, provider, req, options, runner_class=batch_runner(settings, job, req))


def retry(settings: Settings, engine: Engine, job: jobs.Job, pending: int, req: RunRequest) -> int:
    """`retry-failed`: a job's `pending` unresolved failed rows, sent again."""
    req, options = from_job(job, req)
    provider = build_provider(settings, req)
    report.say(f"retrying {pending} failed row(s) of job {job.id}")
    return drive(settings, engine, job, provider, req, options, retry=True)
