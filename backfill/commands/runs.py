"""The commands that embed: `run`, `up`, `resume`, `retry-failed`, and the loop that drives a job."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from backfill import (
    compat,
    db,
    jobs,
    locks,
    report,
    runner,
    stale,
    stopping,
    targets,
    vectors,
)
from backfill import stats as coverage
from backfill.commands.budget import refuse_over_budget
from backfill.commands.database import (
    migrate,
    open_database,
    require_tables,
    stats,
    verify,
)
from backfill.commands.failures import top_reasons
from backfill.commands.jobs_view import pick_job
from backfill.commands.request import (
    RunRequest,
    build_provider,
    from_job,
    run_options,
    validate,
)
from backfill.config import Settings
from backfill.errors import ConfigError, Interrupted, LeaseHeld, RowsFailed
from backfill.providers.base import FatalProviderError, Provider


def _claim(engine: Engine, job: jobs.Job, worker: str, req: RunRequest) -> jobs.Job:
    deadline = time.monotonic() + req.wait_timeout_s
    while True:
        try:
            return db.retrying(engine, lambda conn: jobs.claim(conn, jobs.get(conn, job.id), worker))
        except LeaseHeld:
            if not req.wait or time.monotonic() >= deadline:
                raise
            report.say(f"job {job.id} is busy; waiting for its worker to finish")
            report.event("job_busy", job=job.id, waiting=True)
            time.sleep(2.0)


def _drive(settings: Settings, engine: Engine, job: jobs.Job, provider: Provider, req: RunRequest,
           options: runner.RunOptions, *, retry: bool = False, runner_class: Callable[..., Any] | None = None) -> int:
    worker = jobs.worker_identity()
    job = _claim(engine, job, worker, req)
    stop = stopping.StopFlag()
    with engine.connect() as conn:
        if retry:
            total = len(jobs.open_failures(conn, job.id))
        else:
            total = sum(runner.count_remaining(conn, spec, job.dimensions, options, job.cursors.get(spec.name, 0))
                        for spec in targets.specs_for(job.target))
    run = (runner_class or runner.Runner)(engine, provider, job, worker, options, None, stop)
    status, reason = "interrupted", None
    try:
        with report.Progress(job.id, total, "retry" if retry else "embedding") as progress, \
                stopping.signals_stop(stop, lambda: _stopping_notice(job.id, run, stop, progress)):
            run.progress = progress
            outcome = run.retry() if retry else run.run()
        reason = stop.reason
        status = "cancelled" if reason == "cancelled" else ("interrupted" if reason else "done")
    except FatalProviderError as exc:
        reason = str(exc)
        raise ConfigError(f"{exc} (job {job.id} is resumable: backfill resume {job.id})") from None
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
    with engine.connect() as conn:
        final = jobs.get(conn, job.id)
    if stop.aborted:  # an abort can land between a commit and its accounting: the job row is the truth
        _count_from_job(outcome, job, final)
    with engine.connect() as conn:
        cov = coverage.collect(conn, job.user_email, with_stale=False)
        outcome.failure_reasons = [{**r, "reason": settings.redact(r["reason"])} for r in top_reasons(conn, job.id)]
    outcome.status, outcome.stop_reason = status, reason
    outcome.failed = int(final.failed)
    if not outcome.failed_ids and outcome.failed:
        with engine.connect() as conn:
            outcome.failed_ids = [(r["target"], r["row_id"]) for r in jobs.open_failures(conn, job.id)]
    tables = [t for t in cov.tables if job.target in ("all", t.table)]
    outcome.unaddressable = sum(t.unaddressable for t in tables)
    total_rows = sum(t.total for t in tables)
    pct = 100.0 * sum(t.with_embedding for t in tables) / total_rows if total_rows else 100.0
    report.event("job_finished", job=job.id, status=status, stop_reason=reason, selected=final.selected,
                 embedded=final.embedded, failed=final.failed, skipped=final.skipped, batches=final.batches,
                 requests=final.requests, tokens=final.tokens, cost_usd=round(final.cost_usd, 6),
                 tokens_saved=final.tokens_saved, unaddressable=outcome.unaddressable,
                 coverage=round(pct, 2), failed_ids=[f"{t}:{i}" for t, i in outcome.failed_ids[:100]],
                 failure_reasons=outcome.failure_reasons)
    report.say(report.final_block(outcome, pct, total_rows))
    if status == "interrupted" and stop.signalled:
        raise Interrupted(f"job {job.id} interrupted; resume with `backfill resume {job.id}`")
    if status == "done" and final.failed and _tolerated(req, final.failed, final.selected):
        report.say(f"{final.failed} of {final.selected} row(s) failed, within --max-failed-ratio "
                   f"{req.max_failed_ratio}: exit 0 (re-run them with `backfill retry-failed {job.id}`)")
        report.event("failures_tolerated", job=job.id, failed=final.failed, selected=final.selected,
                     max_failed_ratio=req.max_failed_ratio)
    elif status == "done" and final.failed:
        raise RowsFailed(f"job {job.id}: {final.failed} row(s) failed; re-run them with `backfill retry-failed {job.id}`")
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


def _batch_runner(settings: Settings, job: jobs.Job, req: RunRequest) -> Callable[..., Any] | None:
    """The batch-mode runner for a job started with `--mode batch`, else None (the sync runner)."""
    # Batch API mode (and the openai SDK it needs) loads only when a job uses it
    from backfill import batch

    if not batch.is_batch(job):
        return None
    return batch.runner_factory(settings, job, req.timeout_s, float(req.extra.get("poll_interval", 60.0)))


def _tolerated(req: RunRequest, failed: int, selected: int) -> bool:
    """--max-failed-ratio R: failures up to R of the selected rows do not fail the command."""
    return req.max_failed_ratio is not None and selected > 0 and failed / selected <= req.max_failed_ratio


def run(settings: Settings, req: RunRequest) -> int:
    validate(req)
    mode = req.extra.get("mode", "sync")
    if mode != "sync":
        from backfill import batch

        if mode not in batch.MODES:
            raise ConfigError(f"--mode must be one of {', '.join(batch.MODES)}")
        batch.validate(req.provider, int(req.extra.get("file_lines", batch.MAX_LINES)),
                       float(req.extra.get("poll_interval", 60.0)))
        if req.reembed_stale or req.vector_column:
            raise ConfigError("--mode batch does not take --reembed-stale or --vector-column yet: run those in sync mode")
    target, engine = open_database(settings)
    if req.vector_column:
        vectors.check_backend(target.kind, req.vector_column)
    require_tables(engine)
    with engine.connect() as conn:
        user_id = coverage.user_id_for(conn, req.user_email) if req.user_email else None
    provider = build_provider(settings, req)
    req.model = provider.model
    options = run_options(req, user_id)
    key = jobs.JobKey("run", req.target, user_id, provider.name, provider.model, provider.dimensions, req.recipe)
    if req.max_cost is not None:
        refuse_over_budget(engine, req, provider, options, key)
    with engine.begin() as conn:
        locks.jobs_lock(conn)  # find-or-create is atomic: workers started at once share one job
        job = jobs.find_open(conn, key)
        if job is None:
            if not (req.reembed_all or req.reembed_stale):
                for spec in targets.specs_for(req.target):
                    compat.ensure_compatible(conn, spec, provider, user_id)
            elif req.reembed_stale and not req.reembed_all:
                for spec in targets.specs_for(req.target):
                    stale.refuse_mixing(conn, spec, provider.model, provider.dimensions, user_id)
            params = {"batch_size": req.batch_size, "concurrency": req.concurrency, "delay_ms": req.delay_ms,
                      "reembed_all": req.reembed_all, "base_url": settings.openai_base_url}
            if mode == "batch":
                params.update(mode="batch", file_lines=int(req.extra.get("file_lines", 50_000)))
            if req.reembed_stale:
                params["reembed_stale"] = True
            if req.vector_column:
                params["vector_column"] = req.vector_column
            if req.price_per_mtok is not None:
                params["price_per_mtok"] = req.price_per_mtok  # so resume and retry-failed cost the same
            job = jobs.create(conn, key, user_email=req.user_email, batch_size=req.batch_size, params=params)
            report.say(f"started job {job.id}: {req.target} with {provider.model} ({provider.dimensions} dimensions)")
        elif job.params.get("mode", "sync") != mode:
            raise ConfigError(f"job {job.id} is open in {job.params.get('mode', 'sync')} mode: continue it with "
                              f"`backfill resume {job.id}` or stop it with `backfill cancel {job.id}`")
        else:
            report.say(f"resuming job {job.id} from its last committed batch")
        if req.vector_column:  # last: every refusal above comes before this DDL
            for name in vectors.prepare(conn, target.kind, targets.specs_for(req.target), req.vector_column,
                                        provider.dimensions):
                report.say(f"added column {name}.{req.vector_column} F32_BLOB({provider.dimensions})")
    if req.adopt_existing:
        _adopt(engine, job, provider, req, user_id)
    return _drive(settings, engine, job, provider, req, options, runner_class=_batch_runner(settings, job, req))


def _adopt(engine: Engine, job: jobs.Job, provider: Provider, req: RunRequest, user_id: str | None) -> None:
    for spec in targets.specs_for(req.target):
        n = stale.adopt(engine, spec, provider=provider.name, model=provider.model, dimensions=provider.dimensions,
                        recipe=req.recipe, user_id=user_id, job_id=job.id)
        report.say(f"adopted {n} existing {spec.name} vector(s): provenance recorded, nothing sent")
        report.event("adopted", job=job.id, target=spec.name, rows=n)


def resume(settings: Settings, job_id: int | None, req: RunRequest) -> int:
    _target, engine = open_database(settings)
    require_tables(engine)
    with engine.connect() as conn:
        job = pick_job(conn, job_id, jobs.OPEN_STATUSES, "open")
    if job.status not in jobs.OPEN_STATUSES:
        raise ConfigError(f"job {job.id} is {job.status}; nothing to resume (start a new one with `backfill run`)")
    req = from_job(job, req)
    provider = build_provider(settings, req)
    report.say(f"resuming job {job.id} from its last committed batch")
    return _drive(settings, engine, job, provider, req, run_options(req, job.user_id),
                  runner_class=_batch_runner(settings, job, req))


def retry_failed(settings: Settings, job_id: int | None, req: RunRequest) -> int:
    _target, engine = open_database(settings)
    require_tables(engine)
    with engine.connect() as conn:
        if job_id is None:
            row = conn.execute(sa.text(
                "SELECT job_id FROM backfill_failures WHERE kind = 'failed' AND resolved = :f ORDER BY job_id DESC LIMIT 1"
            ), {"f": False}).first()
            if row is None:
                report.say("no recorded failures: nothing to retry")
                return 0
            job_id = int(row[0])
        job = jobs.get(conn, job_id)
        pending = len(jobs.open_failures(conn, job.id))
    if not pending:
        report.say(f"job {job.id} has no unresolved failures")
        return 0
    req = from_job(job, req)
    provider = build_provider(settings, req)
    report.say(f"retrying {pending} failed row(s) of job {job.id}")
    return _drive(settings, engine, job, provider, req, run_options(req, job.user_id), retry=True)


def up(settings: Settings, req: RunRequest) -> int:
    """migrate -> verify -> run (resuming the open job) -> stats; stops at the first failing step."""
    migrate(settings)
    verify(settings)
    try:
        run(settings, req)
    except RowsFailed as exc:
        stats(settings, user_email=req.user_email)
        raise exc
    stats(settings, user_email=req.user_email)
    return 0
