"""The commands that embed: `run`, `up`, `resume`, `retry-failed`. Each opens the database, calls `launch`
(start a job) or `drive` (continue one) and reports what there is nothing to do for."""

from __future__ import annotations

import sqlalchemy as sa

from backfill import db, drive, jobs, launch, report, vectors
from backfill.commands.database import (
    migrate,
    one_engine,
    open_database,
    require_tables,
    stats,
    verify,
)
from backfill.config import Settings
from backfill.errors import RowsFailed
from backfill.request import RunRequest, resolve_provider, validate, validate_pacing


def run(settings: Settings, req: RunRequest) -> int:
    req = resolve_provider(settings, req)
    validate(req)
    target, engine = open_database(settings)
    if req.vector_column:
        vectors.check_backend(target.kind, req.vector_column)
    require_tables(engine)
    return launch.run(settings, req, engine, target.kind)


def _preflight(settings: Settings, req: RunRequest) -> None:
    """`up`: everything that can refuse the run, checked before `migrate` writes anything: the flags
    (done by the caller), the backend, then what `launch.preflight` checks."""
    target = db.resolve(settings.database_url, settings.auth_token)
    if req.vector_column:
        vectors.check_backend(target.kind, req.vector_column)
    if target.path is not None and not target.path.exists():
        return  # `migrate` decides what a missing file means; nothing of it can be embedded yet
    _target, engine = open_database(settings, data_tables=False)
    launch.preflight(settings, req, engine)


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
    return drive.resume(settings, engine, job, req)


def retry_failed(settings: Settings, job_id: int | None, req: RunRequest) -> int:
    validate_pacing(req)
    _target, engine = open_database(settings)
    if not sa.inspect(engine).has_table("backfill_jobs") and job_id is None:
        report.nothing("no jobs yet: nothing to retry", command="retry-failed")
        return 0
    require_tables(engine)
    with engine.connect() as conn:
        if job_id is None:
            job_id = jobs.latest_failed(conn)
            if job_id is None:
                report.nothing("no recorded failures: nothing to retry", command="retry-failed")
                return 0
        job = jobs.get(conn, job_id)
        pending = len(jobs.open_failures(conn, job.id))
    if not pending:
        report.nothing(f"job {job.id} has no unresolved failures: nothing to retry", command="retry-failed",
                       job=job.id)
        return 0
    return drive.retry(settings, engine, job, pending, req)


def up(settings: Settings, req: RunRequest) -> int:
    """migrate -> verify -> run (resuming the open job; with --follow, then the change queue until stopped)
    -> stats; stops at the first failing step. Every flag, the key and the provider are checked before
    `migrate` touches anything."""
    if req.extra.get("dry_run") and not req.follow:
        from backfill.commands.budget import plan

        return plan(settings, req)
    req = resolve_provider(settings, req)
    validate(req)
    with one_engine():
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
