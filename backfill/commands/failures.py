"""The `failures` command: a job's recorded failure rows (id, table, reason, attempts) and its most
common reasons, also shown by `status` and the final block of a run."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from backfill import jobs, report
from backfill.commands.database import open_database, require_tables
from backfill.config import Settings
from backfill.jobs import top_reasons
from backfill.schema import backfill_failures as failures_t

REASON_WIDTH = 48  # a listing line fits 80 columns


def _open(job_id: int) -> list[sa.ColumnElement[bool]]:
    """A job's failure rows still standing: failed and not since embedded, or skipped."""
    return [failures_t.c.job_id == job_id, failures_t.c.resolved == sa.false()]


def latest_with_failures(conn: Connection) -> int | None:
    """The newest job that has a failure row still standing."""
    row = conn.execute(sa.select(sa.func.max(failures_t.c.job_id)).where(failures_t.c.resolved == sa.false())).scalar()
    return None if row is None else int(row)


def rows(conn: Connection, job_id: int, limit: int | None) -> tuple[int, list[dict[str, Any]]]:
    """(how many, the first `limit` of them in table and key order): failed rows first, then skipped."""
    total = int(conn.execute(sa.select(sa.func.count()).select_from(failures_t).where(*_open(job_id))).scalar() or 0)
    q = (sa.select(failures_t.c.target, failures_t.c.row_id, failures_t.c.kind, failures_t.c.error,
                   failures_t.c.attempts, failures_t.c.updated_at)
         .where(*_open(job_id))
         .order_by(sa.case((failures_t.c.kind == "failed", 0), else_=1), failures_t.c.target, failures_t.c.row_id))
    if limit:
        q = q.limit(limit)
    out = [{"id": f"{r.target}:{r.row_id}", "table": r.target, "row_id": int(r.row_id), "kind": r.kind,
            "reason": r.error, "attempts": int(r.attempts), "updated_at": r.updated_at} for r in conn.execute(q)]
    return total, out


def failures(settings: Settings, job_id: int | None, limit: int = 50) -> int:
    _target, engine = open_database(settings)
    require_tables(engine)
    with engine.connect() as conn:
        if job_id is None:
            job_id = latest_with_failures(conn)
            if job_id is None:
                return _nothing(None)
        job = jobs.get(conn, job_id)
        total, listed = rows(conn, job.id, limit or None)
        reasons = top_reasons(conn, job.id)
    redact = settings.redact
    for item in listed:
        item["reason"] = redact(item["reason"])
    for item in reasons:
        item["reason"] = redact(item["reason"])
    if report.is_json():
        print(json.dumps({"job": job.id, "total": total, "shown": len(listed), "top_reasons": reasons,
                          "failures": listed}), flush=True)
        return 0
    if not total:
        return _nothing(job.id)
    report.say(f"job {job.id}: {total} row(s) not embedded")
    report.say(f"{'table':<9} {'id':>10} {'attempts':>8}  reason")
    for item in listed:
        reason = item["reason"] if item["kind"] == "failed" else f"skipped: {item['reason']}"
        report.say(f"{item['table']:<9} {item['row_id']:>10} {item['attempts']:>8}  {report.cut(reason, REASON_WIDTH)}")
    if total > len(listed):
        report.say(f"... and {total - len(listed)} more (--limit 0 shows all, --json prints them whole)")
    if reasons:
        report.say("Top failure reasons:")
        for line in report.reason_lines(reasons):
            report.say(line)
        report.say(f"Re-send the failed rows with: backfill retry-failed {job.id}")
    return 0


def _nothing(job_id: int | None) -> int:
    if report.is_json():
        print(json.dumps({"job": job_id, "total": 0, "shown": 0, "top_reasons": [], "failures": []}), flush=True)
    else:
        report.say("no recorded failures" if job_id is None else f"job {job_id} has no recorded failures")
    return 0
