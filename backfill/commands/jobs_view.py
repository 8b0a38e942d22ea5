"""The job commands: `status`, `jobs` and `cancel`."""

from __future__ import annotations

import json

from sqlalchemy.engine import Connection, Engine

from backfill import jobs, report, runner, targets
from backfill.commands.database import open_database, require_tables
from backfill.commands.failures import top_reasons
from backfill.config import Settings
from backfill.errors import ConfigError


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
        opts = runner.RunOptions(target=job.target, user_id=job.user_id,
                                 reembed_all=bool(job.params.get("reembed_all")),
                                 reembed_stale=bool(job.params.get("reembed_stale")), model=job.model,
                                 recipe=job.recipe_version)
        left = sum(runner.count_remaining(conn, s, job.dimensions, opts, job.cursors.get(s.name, 0))
                   for s in targets.specs_for(job.target))
        row["remaining"] = left
        row["eta_s"] = round(left / rate, 1) if rate else None
    return row


def status(settings: Settings, job_id: int | None) -> int:
    _target, engine = open_database(settings)
    require_tables(engine)
    with engine.connect() as conn:
        job = pick_job(conn, job_id, (), "")
    polled = _batch_status(settings, engine, job)
    with engine.connect() as conn:
        view = _job_view(conn, jobs.get(conn, job.id), remaining=True)
        view["top_reasons"] = [{**r, "reason": settings.redact(r["reason"])} for r in top_reasons(conn, job.id)]
        if polled is not None:
            from backfill import batch

            view["batch_api"] = {**batch.summary(conn, job.id), "poll": polled}
    if report.is_json():
        print(json.dumps(view, default=str), flush=True)
        return 0
    report.say(f"job {view['id']}  {view['status']}  {view['kind']} {view['target']}"
               f"{' for ' + view['user_email'] if view['user_email'] else ''}")
    report.say(f"  model      {view['provider']}:{view['model']} ({view['dimensions']} dims, recipe {view['recipe_version']})")
    report.say(f"  rows       selected {view['selected']}  embedded {view['embedded']}  failed {view['failed']}  "
               f"skipped {view['skipped']}  changed {view['changed']}  gone {view['gone']}")
    for i, line in enumerate(report.reason_lines(view["top_reasons"], width=60)):
        report.say(f"  {'failures' if i == 0 else '':<10} {line.strip()}")
    if view["top_reasons"]:
        report.say(f"  {'':<10} (all of them: backfill failures {view['id']})")
    report.say(f"  cursor     {view['cursors']}")
    report.say(f"  work       {view['batches']} batches, {view['requests']} requests, {view['tokens']:,} tokens, "
               f"${view['cost_usd']:.4f}")
    rate = view["rate_rows_s"]
    report.say(f"  rate       {rate if rate is not None else '-'} rows/s"
               + (f"   remaining {view['remaining']}   ETA {view['eta_s'] if view.get('eta_s') is not None else '-'} s"
                  if "remaining" in view else ""))
    if view["worker_id"]:
        report.say(f"  worker     {view['worker_id']} (lease until {view['lease_expires_at']})")
    if view["stop_reason"]:
        report.say(f"  stopped    {view['stop_reason']}")
    if "batch_api" in view:
        b = view["batch_api"]
        states = ", ".join(f"{n} {s}" for s, n in b["by_state"].items()) or "none yet"
        report.say(f"  batch api  files: {states}; {b['rows_waiting']} row(s) waiting at the provider"
                   + (f"; {b['poll']}" if b["poll"] else ""))
        for f in b["files"]:
            report.say(f"             {f['name']}  {f['state']}  file {f['input_file_id'] or '-'}  "
                       f"batch {f['remote_batch_id'] or '-'} ({f['remote_status'] or '-'})")
    return 0


def _batch_status(settings: Settings, engine: Engine, job: jobs.Job) -> str | None:
    """For a batch job: poll the provider once and write what finished (None for a sync job)."""
    # Batch API mode (and the openai SDK it needs) loads only when a job uses it
    from backfill import batch

    return batch.collect_for_status(settings, engine, job) if batch.is_batch(job) else None


def list_jobs(settings: Settings) -> int:
    _target, engine = open_database(settings)
    require_tables(engine)
    with engine.connect() as conn:
        views = [_job_view(conn, j, remaining=False) for j in jobs.listing(conn)]
    if report.is_json():
        for v in views:
            print(json.dumps(v, default=str), flush=True)
        return 0
    if not views:
        report.say("no jobs yet: start one with `backfill up`")
    for v in views:
        report.say(f"{v['id']:>5}  {v['status']:<11} {v['kind']:<5} {v['target']:<8} {v['model']:<32} "
                   f"embedded {v['embedded']:>7}  failed {v['failed']:>5}  {v['updated_at']}")
    return 0


def cancel(settings: Settings, job_id: int) -> int:
    _target, engine = open_database(settings)
    require_tables(engine)
    with engine.connect() as conn:
        job = jobs.get(conn, job_id)
    if job.status in jobs.OPEN_STATUSES and job.params.get("mode") == "batch":
        from backfill import batch

        report.say(f"cancelled {batch.cancel_remote(settings, engine, job)} batch(es) at the provider")
    with engine.begin() as conn:
        job = jobs.cancel(conn, job_id)
    report.say(f"job {job.id} cancelled; a running worker stops after its in-flight batch")
    report.event("job_cancelled", job=job.id)
    return 0
