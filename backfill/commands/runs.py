"""The commands that embed: `run`, `up`, `resume`, `retry-failed`, and the loop that drives a job."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from backfill import (
    adoption,
    changes,
    db,
    follow,
    jobs,
    launch,
    report,
    runner,
    sources,
    stale,
    stopping,
    tables,
    vectors,
)
from backfill import stats as coverage
from backfill.commands.budget import plan, refuse_over_budget
from backfill.commands.database import (
    migrate,
    open_database,
    require_tables,
    stats,
    verify,
)
from backfill.commands.failures import top_reasons
from backfill.commands.request import (
    RunRequest,
    build_provider,
    from_job,
    resolve_provider,
    run_options,
    validate,
    validate_pacing,
)
from backfill.config import Settings
from backfill.errors import ConfigError, Interrupted, LeaseHeld, RowsFailed
from backfill.page import RunOptions
from backfill.providers import DEFAULT_MODEL
from backfill.providers.base import DEFAULT_DIMENSIONS, FatalProviderError, Provider


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


def _drive(settings: Settings, engine: Engine, job: jobs.Job, provider: Provider, req: RunRequest,
           options: RunOptions, *, retry: bool = False, runner_class: Callable[..., Any] | None = None) -> int:
    worker = jobs.worker_identity()
    job = _claim(engine, job, worker, req)
    options.max_runtime_s = req.max_runtime_s
    stop = stopping.StopFlag()
    with engine.connect() as conn:
        if retry:
            total = len(jobs.open_failures(conn, job.id))
        else:
            total = sum(sources.remaining(conn, spec, job.dimensions, options, job.cursors.get(spec.name, 0))
                        for spec in tables.specs_for(job.target))
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
    with engine.connect() as conn:
        final = jobs.get(conn, job.id)
    if stop.aborted:  # an abort can land between a commit and its accounting: the job row is the truth
        _count_from_job(outcome, job, final)
    with engine.connect() as conn:
        cov = coverage.collect(conn, job.user_email, with_stale=False)
        outcome.failure_reasons = [{**r, "reason": settings.redact(r["reason"])} for r in top_reasons(conn, job.id)]
    outcome.status, outcome.stop_reason = status, reason
    if retry:  # a retry selects no new rows: what it processed is what it wrote or failed again
        outcome.selected = outcome.embedded + len(outcome.failed_ids)
    outcome.failed = int(final.failed)
    if not outcome.failed_ids and outcome.failed:
        with engine.connect() as conn:
            outcome.failed_ids = [(r["target"], r["row_id"]) for r in jobs.open_failures(conn, job.id)]
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


def _batch_runner(settings: Settings, job: jobs.Job, req: RunRequest) -> Callable[..., Any] | None:
    """The batch-mode runner for a job started with `--mode batch`, else None (the sync runner)."""
    # Batch API mode (and the openai SDK it needs) loads only when a job uses it
    from backfill import batch_api

    if not batch_api.is_batch(job):
        return None
    return batch_api.runner_factory(settings, job, req.timeout_s, req.poll_interval_s)


def _tolerated(req: RunRequest, failed: int, selected: int) -> bool:
    """--max-failed-ratio R: failures up to R of the selected rows do not fail the command."""
    return req.max_failed_ratio is not None and selected > 0 and failed / selected <= req.max_failed_ratio


def run(settings: Settings, req: RunRequest) -> int:
    req = resolve_provider(settings, req)
    validate(req)
    target, engine = open_database(settings)
    if req.vector_column:
        vectors.check_backend(target.kind, req.vector_column)
    require_tables(engine)
    with engine.connect() as conn:
        user_id = coverage.user_id_for(conn, req.user_email) if req.user_email else None
    for spec in tables.specs_for(req.target):  # change queue: seeded once (or --full-scan), then settled
        changes.refresh(engine, spec, _identity(req)[2], full_scan=bool(req.extra.get("full_scan")))
    if req.follow:
        _require_queue(engine, req)
    _refuse_mixing(engine, req, user_id)  # before "nothing to do": another model in the column is refused
    if not req.adopt_existing and not req.follow and _nothing_to_do(engine, req, user_id):
        report.nothing("nothing to embed: every row in scope has its embedding (no job recorded)",
                       target=req.target, user_email=req.user_email)
        return 0
    provider = req.extra.pop("provider", None) or build_provider(settings, req)
    req.model = provider.model
    options = run_options(req, user_id, settings.openai_base_url)
    if req.max_cost is not None:
        refuse_over_budget(engine, req, provider, options, launch.key_for(options, provider))
    started = launch.find_or_create(engine, options, provider, user_email=req.user_email, database_kind=target.kind)
    job = started.job
    if started.created:
        report.say(f"started job {job.id}: {req.target} with {provider.model} ({provider.dimensions} dimensions)")
    else:
        report.say(f"resuming job {job.id} from its last committed batch")
    for name in started.added_columns:
        report.say(f"added column {name}.{req.vector_column} F32_BLOB({provider.dimensions})")
    if req.adopt_existing:
        _adopt(engine, job, provider, req, user_id)
    return _drive(settings, engine, job, provider, req, options, runner_class=_batch_runner(settings, job, req))


def _require_queue(engine: Engine, req: RunRequest) -> None:
    with engine.connect() as conn:
        if not all(changes.seeded(conn, spec) for spec in tables.specs_for(req.target)):
            raise ConfigError("--follow reads the change queue, which this database lacks: run `backfill migrate` "
                              "(or `backfill up --follow`)")


def _adopt(engine: Engine, job: jobs.Job, provider: Provider, req: RunRequest, user_id: str | None) -> None:
    for spec in tables.specs_for(req.target):
        n = stale.adopt(engine, spec, provider=provider.name, model=provider.model, dimensions=provider.dimensions,
                        recipe=req.recipe, user_id=user_id, job_id=job.id)
        report.say(f"adopted {n} existing {spec.name} vector(s): provenance recorded, nothing sent")
        report.event("adopted", job=job.id, target=spec.name, rows=n)


def _identity(req: RunRequest) -> tuple[str, str, int]:
    """The provider, model and dimensions a run would write, without a key or a request."""
    prov = req.extra.get("provider")
    if prov is None and req.provider == "local":
        prov = req.extra["provider"] = build_provider(Settings(), req)  # offline, no key; loads in < 1 s
    if prov is not None:
        return prov.name, prov.model, prov.dimensions
    model = req.model or DEFAULT_MODEL
    dims = req.dimensions or DEFAULT_DIMENSIONS.get(model)
    if not dims:
        raise ConfigError(f"unknown dimensions for model {model!r}: pass --dimensions N")
    return req.provider, model, dims


def _open_job(engine: Engine, req: RunRequest, user_id: str | None) -> jobs.Job | None:
    if not sa.inspect(engine).has_table("backfill_jobs"):
        return None
    name, model, dims = _identity(req)
    with engine.connect() as conn:
        return jobs.find_open(conn, jobs.JobKey("run", req.target, user_id, name, model, dims, req.recipe))


def _columnless(engine: Engine) -> set[str]:
    """Tables whose `embedding` column `migrate` has yet to add (a database the server's startup alone made)."""
    with engine.connect() as conn:
        return {table for table, _column in adoption.missing_added_columns(conn)}


def _refuse_mixing(engine: Engine, req: RunRequest, user_id: str | None) -> None:
    """One model per column (changes.ensure_compatible), asked without a key; `run` asks again under
    the job lock."""
    if req.reembed_all or req.reembed_stale or _open_job(engine, req, user_id) is not None:
        return
    _name, model, dims = _identity(req)
    columnless = _columnless(engine)  # no column yet: no vector in it to mix with
    with engine.connect() as conn:
        for spec in (s for s in tables.specs_for(req.target) if s.name not in columnless):
            changes.ensure_compatible(conn, spec, SimpleNamespace(model=model, dimensions=dims), user_id)


def _nothing_to_do(engine: Engine, req: RunRequest, user_id: str | None) -> bool:
    """No open job for these parameters and no row in scope that needs (or, with --reembed-*, deserves)
    a vector: then no key is needed and no job row is recorded."""
    _name, model, dims = _identity(req)
    if _open_job(engine, req, user_id) is not None:
        return False
    columnless = _columnless(engine)
    if any(spec.name in columnless for spec in tables.specs_for(req.target)):
        return False  # a table without its embedding column yet: every row of it will need one
    inspector = sa.inspect(engine)
    opts = RunOptions(target=req.target, user_id=user_id, reembed_all=req.reembed_all,
                      reembed_stale=req.reembed_stale and inspector.has_table("backfill_embeddings"),
                      model=model, recipe=req.recipe)
    with engine.connect() as conn:
        return not any(sources.remaining(conn, spec, dims, opts, 0) for spec in tables.specs_for(req.target))


def _preflight(settings: Settings, req: RunRequest) -> None:
    """`up`: everything that can refuse the run, checked before `migrate` writes anything: the flags
    (done by the caller), the backend, the user, the key and provider, one model per column."""
    target = db.resolve(settings.database_url, settings.auth_token)
    if req.vector_column:
        vectors.check_backend(target.kind, req.vector_column)
    if target.path is not None and not target.path.exists():
        return  # `migrate` decides what a missing file means; nothing of it can be embedded yet
    _target, engine = open_database(settings, data_tables=False)
    if not sa.inspect(engine).has_table("memories"):
        return  # empty or foreign: `migrate` decides; nothing to embed here either
    with engine.connect() as conn:
        if adoption.problems(conn):
            return  # a needed column is missing or unusable: `migrate` (or `verify`) refuses, naming it
    with engine.connect() as conn:
        user_id = coverage.user_id_for(conn, req.user_email) if req.user_email else None
    _refuse_mixing(engine, req, user_id)
    if not req.adopt_existing and not req.follow and _nothing_to_do(engine, req, user_id) and not (
            req.extra.get("full_scan") and changes.missed(engine, tables.specs_for(req.target))):
        return  # nothing to embed: no key needed, and no provider built (the SDK and tokenizer take ~1.5 s)
    if req.provider == "openai" and not settings.openai_api_key:
        build_provider(settings, req)  # the missing-key refusal, before anything is written
    req.extra["provider"] = req.extra.get("provider") or build_provider(settings, req)


def resume(settings: Settings, job_id: int | None, req: RunRequest) -> int:
    validate_pacing(req)
    _target, engine = open_database(settings)
    if not sa.inspect(engine).has_table("backfill_jobs") and job_id is None:
        report.nothing(f"no jobs yet: nothing to resume (start one with `{report.suggest('backfill up')}`)",
                       command="resume")
        return 0
    require_tables(engine)
    with engine.connect() as conn:
        job = jobs.get(conn, job_id) if job_id is not None else jobs.latest(conn, jobs.OPEN_STATUSES)
    if job is None:
        report.nothing(f"no open job: nothing to resume (start one with `{report.suggest('backfill up')}`)",
                       command="resume")
        return 0
    if job.status not in jobs.OPEN_STATUSES:
        report.nothing(f"job {job.id} is {job.status}: nothing to resume", command="resume", job=job.id,
                       status=job.status)
        return 0
    req, options = from_job(job, req)
    provider = build_provider(settings, req)
    report.say(f"resuming job {job.id} from its last committed batch")
    return _drive(settings, engine, job, provider, req, options, runner_class=_batch_runner(settings, job, req))


def retry_failed(settings: Settings, job_id: int | None, req: RunRequest) -> int:
    validate_pacing(req)
    _target, engine = open_database(settings)
    if not sa.inspect(engine).has_table("backfill_jobs") and job_id is None:
        report.nothing("no jobs yet: nothing to retry", command="retry-failed")
        return 0
    require_tables(engine)
    with engine.connect() as conn:
        if job_id is None:
            row = conn.execute(sa.text(
                "SELECT job_id FROM backfill_failures WHERE kind = 'failed' AND resolved = :f "
                "ORDER BY job_id DESC LIMIT 1"
            ), {"f": False}).first()
            if row is None:
                report.nothing("no recorded failures: nothing to retry", command="retry-failed")
                return 0
            job_id = int(row[0])
        job = jobs.get(conn, job_id)
        pending = len(jobs.open_failures(conn, job.id))
    if not pending:
        report.nothing(f"job {job.id} has no unresolved failures: nothing to retry", command="retry-failed",
                       job=job.id)
        return 0
    req, options = from_job(job, req)
    provider = build_provider(settings, req)
    report.say(f"retrying {pending} failed row(s) of job {job.id}")
    return _drive(settings, engine, job, provider, req, options, retry=True)


def up(settings: Settings, req: RunRequest) -> int:
    """migrate -> verify -> run (resuming the open job; with --follow, then the change queue until stopped)
    -> stats; stops at the first failing step. Every flag, the key and the provider are checked before
    `migrate` touches anything."""
    if req.extra.get("dry_run") and not req.follow:
        return plan(settings, req)
    req = resolve_provider(settings, req)
    validate(req)
    _preflight(settings, req)
    migrate(settings)
    verify(settings)
    try:
        run(settings, req)
    except RowsFailed as exc:
        stats(settings, user_email=req.user_email)
        raise exc
    stats(settings, user_email=req.user_email)
    return 0
