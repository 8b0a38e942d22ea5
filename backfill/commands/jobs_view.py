"""The job commands: `status`, `jobs` and `cancel`."""

from __future__ import annotations

import json

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from backfill import db, jobs, report, sources, tables
from backfill.commands.database import open_database, require_tables
from backfill.commands.failures import top_reasons
from backfill.config import Settings
from backfill.errors import ConfigError
from backfill.page import RunOptions


def pick_job(conn: Connection, job_id: int | None, statuses: tuple[str, ...], what: str) -> jobs.Job:
    if job_id is not None:
        return jobs.get(conn, job_id)
    job = jobs.latest(conn, statuses)
    if job is None:
        raise ConfigError(f"no {what} job: see `backfill jobs`")
    return job


def _job_view(conn: Connection, job: jobs.Job, *, remaining: bool) -> dict:
    row = dict(job.row)
    row["cursors"] = job.cursors
    row["params"] = job.params
    row.update(jobs.notice_counts(conn, job.id))  # rows left alone by compare-and-set (writer.current)
    rate = row["embedded"] / row["elapsed_s"] if row["elapsed_s"] else None
    row["rate_rows_s"] = None if rate is None else round(rate, 2)
    if remaining and job.status in jobs.OPEN_STATUSES:
        opts = RunOptions.from_job(job)
        left = sum(sources.remaining(conn, s, job.dimensions, opts, job.cursors.get(s.name, 0))
                   for s in tables.specs_for(job.target))
        row["remaining"] = left
        row["eta_s"] = round(left / rate, 1) if rate else None
    return row


def status(settings: Settings, job_id: int | None) -> int:
    _target, engine = open_database(settings)
    if job_id is None and not sa.inspect(engine).has_table("backfill_jobs"):
        return _no_jobs()
    require_tables(engine)
    with engine.connect() as conn:
        job = jobs.get(conn, job_id) if job_id is not None else jobs.latest(conn, ())
    if job is None:
        return _no_jobs()
    polled = _batch_status(settings, engine, job)
    with engine.connect() as conn:
        view = _job_view(conn, jobs.get(conn, job.id), remaining=True)
        view["top_reasons"] = [{**r, "reason": settings.redact(r["reason"])} for r in top_reasons(conn, job.id)]
        if polled is not None:
            from backfill import batch_api

            view["batch_api"] = {**batch_api.summary(conn, job.id), "poll": polled}
    if report.is_json():
        print(json.dumps(view, default=str), flush=True)
        return 0
    w = report.wrap
    report.say(f"job {view['id']}  {view['status']}  {view['kind']} {view['target']}  "
               f"{_scope(view['user_email'])}")
    report.say(w(f"model      {view['provider']}:{view['model']} ({view['dimensions']} dims, "
                 f"recipe {view['recipe_version']})", "             ", "  "))
    report.say(w(f"rows       selected {view['selected']}  embedded {view['embedded']}  failed {view['failed']}  "
                 f"skipped {view['skipped']}  changed {view['changed']}  gone {view['gone']}", "             ", "  "))
    for i, line in enumerate(report.reason_lines(view["top_reasons"], width=60)):
        report.say(f"  {'failures' if i == 0 else '':<10} {line.strip()}")
    if view["top_reasons"]:
        every = report.suggest(f"backfill failures {view['id']}")
        report.say(f"  {'':<10} (all of them: {every})")
    cursor = ", ".join(f"{t} after id {c}" for t, c in sorted(view["cursors"].items())) or "not started"
    report.say(w(f"cursor     {cursor}", "             ", "  "))
    report.say(f"  work       {view['batches']} batches, {view['requests']} requests, {view['tokens']:,} tokens, "
               f"${view['cost_usd']:.4f}")
    rate = view["rate_rows_s"]
    report.say(f"  rate       {rate if rate is not None else '-'} rows/s"
               + (f"   remaining {view['remaining']}   ETA {report.duration(view.get('eta_s'))}"
                  if "remaining" in view else ""))
    if view["worker_id"]:
        report.say(w(f"worker     {view['worker_id']} (lease until {_when(view['lease_expires_at'])})",
                     "             ", "  "))
    if view["stop_reason"]:
        report.say(w(f"stopped    {view['stop_reason']}", "             ", "  "))
    if "batch_api" in view:
        b = view["batch_api"]
        states = ", ".join(f"{n} {s}" for s, n in b["by_state"].items()) or "none yet"
        report.say(w(f"batch api  files: {states}; {b['rows_waiting']} row(s) waiting at the provider"
                     + (f"; {b['poll']}" if b["poll"] else ""), "             ", "  "))
        for f in b["files"]:
            report.say(w(f"{f['name']}  {f['state']}  file {f['input_file_id'] or '-'}  "
                         f"batch {f['remote_batch_id'] or '-'} ({f['remote_status'] or '-'})",
                         "               ", "             "))
    return 0


def _no_jobs() -> int:
    report.nothing(f"no jobs yet: nothing to show (start one with `{report.suggest('backfill up')}`)", command="status")
    return 0


def _scope(email: str | None) -> str:
    return f"user {email}" if email else "all users"


def _when(stamp: object) -> str:
    """An ISO timestamp as people read it: 2026-12-03 09:40 (UTC)."""
    text = str(stamp or "-").replace("T", " ")
    return text[:16] if len(text) >= 16 and text[4] == "-" else text


def _batch_status(settings: Settings, engine: Engine, job: jobs.Job) -> str | None:
    """For a batch job: poll the provider once and write what finished (None for a sync job)."""
    if not job.batch_mode:
        return None
    from backfill import batch_api  # Batch API mode (and the openai SDK it needs) loads only for a job that uses it

    return batch_api.collect_for_status(settings, engine, job)


def list_jobs(settings: Settings) -> int:
    _target, engine = open_database(settings)
    if not sa.inspect(engine).has_table("backfill_jobs"):
        report.nothing(f"no jobs yet: start one with `{report.suggest('backfill up')}`", command="jobs")
        return 0
    with engine.connect() as conn:
        views = [_job_view(conn, j, remaining=False) for j in jobs.listing(conn)]
    if report.is_json():
        for v in views:
            print(json.dumps(v, default=str), flush=True)
        return 0
    if not views:
        report.say(f"no jobs yet: start one with `{report.suggest('backfill up')}`")
        return 0
    # 79 columns; the model and the rest are in `backfill status JOB`
    report.say(f"{'id':>4} {'status':<11} {'target':<8} {'user':<20} {'embedded':>8} {'failed':>6} updated (UTC)")
    for v in views:
        user = _scope(v["user_email"]) if not v["user_email"] else v["user_email"]
        if len(user) > 20:
            user = user[:19] + "…"
        report.say(f"{v['id']:>4} {v['status']:<11} {v['target']:<8} {user:<20} {v['embedded']:>8} "
                   f"{v['failed']:>6} {_when(v['updated_at'])}")
    return 0


def cancel(settings: Settings, job_id: int) -> int:
    _target, engine = open_database(settings)
    require_tables(engine)
    with engine.connect() as conn:
        job = jobs.get(conn, job_id)
    if job.status not in jobs.OPEN_STATUSES:
        report.nothing(f"job {job.id} is already {job.status}: nothing to cancel", command="cancel", job=job.id,
                       status=job.status)
        return 0
    if job.params.get("mode") == "batch":
        from backfill import batch_api

        report.say(f"cancelled {batch_api.cancel_remote(settings, engine, job)} batch(es) at the provider")
    db.retrying(engine, lambda conn: jobs.cancel(conn, job_id), landed=lambda conn: jobs.is_cancelled(conn, job_id))
    with engine.connect() as conn:
        job = jobs.get(conn, job_id)
    report.say(f"job {job.id} cancelled; a running worker stops after its in-flight batch")
    report.event("job_cancelled", job=job.id)
    return 0
