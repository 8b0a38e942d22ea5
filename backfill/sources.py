"""Page sources: where a job's rows come from, each one function of one shape (after job-iteration's
`build_enumerator(cursor:)`):

    next_page(conn, spec, after, size) -> list[Row]

up to `size` rows of `spec` with key > `after`, in key order (keyset, never OFFSET), each with the
columns of `tables.select_columns(spec)` first. An empty list means the source is done for that table.
A source's own options are bound beforehand (`functools.partial`); `for_run` picks the one a run needs.

The caller (runner.Pager) owns the rest: the cursor, `--limit`, the stop flag and retrying a dropped or
locked database. A new source (a change queue) is one more function of this shape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from backfill import changes, stale, tables
from backfill.page import RunOptions
from backfill.schema import backfill_failures as failures_t

Source = Callable[[Connection, tables.Spec, int, int], list[Any]]


def needing(spec: tables.Spec, dialect: str, dimensions: int, options: RunOptions) -> sa.ColumnElement[bool]:
    """The rows a run selects: those missing a vector, or every row with --reembed-all."""
    if options.reembed_all:
        return sa.true()
    return tables.needs_embedding(spec, dialect, dimensions)


def missing_rows(conn: Connection, spec: tables.Spec, after: int, size: int, *, dimensions: int,
                 options: RunOptions) -> list[Any]:
    """Rows in scope that need a vector (every row with --reembed-all): read from the change queue once the
    table is seeded (`queued_rows`), else from the table."""
    if not options.reembed_all and changes.seeded(conn, spec):
        return queued_rows(conn, spec, after, size, dimensions=dimensions, user_id=options.user_id)
    query = (sa.select(*tables.select_columns(spec))
             .where(spec.key > after, needing(spec, conn.dialect.name, dimensions, options),
                    *tables.scope(spec, options.user_id))
             .order_by(spec.key)
             .limit(size))
    return list(conn.execute(query).all())


def queued_rows(conn: Connection, spec: tables.Spec, after: int, size: int, *, dimensions: int,
                user_id: str | None) -> list[Any]:
    """Rows the change queue holds that need a vector (changes.py): no table scan."""
    return changes.next_page(conn, spec, after, size, user_id, dimensions)


def followed_rows(conn: Connection, spec: tables.Spec, after: int, size: int, *, dimensions: int, user_id: str | None,
                  job_id: int) -> list[Any]:
    """`--follow`: what the change queue holds that needs a vector or whose text changed since it was embedded,
    less the rows the job recorded as failed or skipped (changes.follow_page). No table scan."""
    return changes.follow_page(conn, spec, after, size, user_id, dimensions, job_id)


def stale_rows(conn: Connection, spec: tables.Spec, after: int, size: int, *, reference: stale.Reference,
               user_id: str | None) -> list[Any]:
    """`--reembed-stale`: rows that need or deserve a new vector (stale.wanted). Fresh rows are scanned past;
    the cursor is the last row handed out, so a resume rescans at most one page of fresh rows and never
    skips a stale one."""
    page: list[Any] = []
    for rows in stale.scan(conn, spec, after=after, user_id=user_id, dimensions=reference.dimensions,
                           page=max(size, stale.SCAN_PAGE)):
        for row in rows:
            if stale.wanted(spec, row, reference):
                page.append(row)
                if len(page) >= size:
                    return page
    return page


def failed_rows(conn: Connection, spec: tables.Spec, after: int, size: int, *, job_id: int,
                user_id: str | None) -> list[Any]:
    """`retry-failed`: rows recorded as failed by the job and not resolved since."""
    open_failure = sa.exists().where(failures_t.c.job_id == job_id, failures_t.c.target == spec.name,
                                     failures_t.c.row_id == spec.key, failures_t.c.kind == "failed",
                                     failures_t.c.resolved == sa.false())
    query = (sa.select(*tables.select_columns(spec))
             .where(spec.key > after, open_failure, *tables.scope(spec, user_id))
             .order_by(spec.key)
             .limit(size))
    return list(conn.execute(query).all())


def for_run(options: RunOptions, dimensions: int, model: str | None) -> Source:
    """The source a run of `options` reads: stale rows with --reembed-stale, else missing rows."""
    if options.reembed_stale and not options.reembed_all:
        return functools.partial(stale_rows, reference=stale.Reference(model, dimensions, options.recipe),
                                 user_id=options.user_id)
    return functools.partial(missing_rows, dimensions=dimensions, options=options)


def for_follow(job_id: int, dimensions: int, options: RunOptions) -> Source:
    return functools.partial(followed_rows, dimensions=dimensions, user_id=options.user_id, job_id=job_id)


def for_retry(job_id: int, user_id: str | None) -> Source:
    return functools.partial(failed_rows, job_id=job_id, user_id=user_id)


def remaining(conn: Connection, spec: tables.Spec, dimensions: int, options: RunOptions, after: int) -> int:
    """Rows a run of `options` still has to select after `after` (what the progress bar counts down)."""
    if options.reembed_stale and not options.reembed_all:
        ref = stale.Reference(options.model, dimensions, options.recipe)
        return stale.remaining(conn, spec, ref, options.user_id, after)
    if not options.reembed_all and changes.seeded(conn, spec):
        return changes.pending(conn, spec, options.user_id, dimensions, after)
    q = sa.select(sa.func.count()).select_from(spec.table).where(
        spec.key > after, needing(spec, conn.dialect.name, dimensions, options), *tables.scope(spec, options.user_id))
    return int(conn.execute(q).scalar() or 0)
