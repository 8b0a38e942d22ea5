"""Starting a job: find the open one with the same parameters or create it, under the jobs lock, after
every refusal (one model per column, `--reembed-stale` mixing, a job open in the other mode) and before
the one piece of DDL a run may issue (`--vector-column`), which comes last."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Connection, Engine

from backfill import changes, db, jobs, locks, stale, tables, vectors
from backfill.errors import ConfigError
from backfill.page import RunOptions


@dataclass
class Started:
    job: jobs.Job
    created: bool  # a new job, else the open one resumed
    added_columns: list[str] = field(default_factory=list)  # tables given the native vector column


def key_for(options: RunOptions, provider: Any) -> jobs.JobKey:
    """What makes two runs the same job."""
    return jobs.JobKey("run", options.target, options.user_id, provider.name, provider.model, provider.dimensions,
                       options.recipe)


def find_or_create(engine: Engine, options: RunOptions, provider: Any, *, user_email: str | None,
                   database_kind: str) -> Started:
    """The job a run of `options` continues or starts; atomic, so workers started at once share one job."""
    return db.retrying(engine, lambda conn: _find_or_create(conn, options, provider, user_email=user_email,
                                                            database_kind=database_kind))


def _find_or_create(conn: Connection, options: RunOptions, provider: Any, *, user_email: str | None,
                    database_kind: str) -> Started:
    """One transaction, retried whole on a locked or dropped database (a killed worker's stream may hold
    the write lock of a remote libSQL database until the server expires it)."""
    specs = tables.specs_for(options.target)
    locks.jobs_lock(conn)
    job = jobs.find_open(conn, key_for(options, provider))
    created = job is None
    if job is None:
        if not (options.reembed_all or options.reembed_stale):
            for spec in specs:
                changes.ensure_compatible(conn, spec, provider, options.user_id)
        elif options.reembed_stale and not options.reembed_all:
            for spec in specs:
                stale.refuse_mixing(conn, spec, provider.model, provider.dimensions, options.user_id)
        job = jobs.create(conn, key_for(options, provider), user_email=user_email,
                          batch_size=options.batch_size, params=options.job_params())
    elif job.params.get("mode", "sync") != options.mode:
        raise ConfigError(f"job {job.id} is open in {job.params.get('mode', 'sync')} mode: continue it with "
                          f"`backfill resume {job.id}` or stop it with `backfill cancel {job.id}`")
    added: list[str] = []
    if options.vector_column:  # last: every refusal above comes before this DDL
        added = list(vectors.prepare(conn, database_kind, specs, options.vector_column, provider.dimensions))
    return Started(job, created, added)
