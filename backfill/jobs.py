"""The job, its checkpoint and its failure rows: start, claim (lease), advance, finish.

Every checkpoint update checks that exactly one row changed and that we still hold the lease;
a surprise is an error, never a silent no-op.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from backfill.errors import ConfigError, LeaseHeld
from backfill.schema import backfill_failures as failures_t
from backfill.schema import backfill_jobs as jobs_t

OPEN_STATUSES = ("pending", "running", "interrupted")
LEASE_SECONDS = 60.0


def now_iso(offset_s: float = 0.0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=offset_s)).isoformat(timespec="milliseconds")


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class JobKey:
    """What makes two runs the same job."""

    kind: str
    target: str
    user_id: str | None
    provider: str
    model: str
    dimensions: int
    recipe_version: str


@dataclass
class Job:
    row: dict[str, Any]

    @property
    def id(self) -> int:
        return int(self.row["id"])

    @property
    def cursors(self) -> dict[str, int]:
        return {k: int(v) for k, v in json.loads(self.row["cursors"] or "{}").items()}

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.row["params"] or "{}")

    @property
    def batch_mode(self) -> bool:
        """Started with `--mode batch` (OpenAI's Batch API: batch_api.py, loaded only for such a job)."""
        return self.params.get("mode") == "batch"

    def __getattr__(self, name: str) -> Any:
        try:
            return self.row[name]
        except KeyError:
            raise AttributeError(name) from None


def _where_key(key: JobKey) -> list[sa.ColumnElement[bool]]:
    user = jobs_t.c.user_id.is_(None) if key.user_id is None else jobs_t.c.user_id == key.user_id
    return [
        jobs_t.c.kind == key.kind, jobs_t.c.target == key.target, user,
        jobs_t.c.provider == key.provider, jobs_t.c.model == key.model,
        jobs_t.c.dimensions == key.dimensions, jobs_t.c.recipe_version == key.recipe_version,
    ]


def get(conn: Connection, job_id: int) -> Job:
    row = conn.execute(sa.select(jobs_t).where(jobs_t.c.id == job_id)).mappings().one_or_none()
    if row is None:
        raise ConfigError(f"no job {job_id}: see `backfill jobs`")
    return Job(dict(row))


def find_open(conn: Connection, key: JobKey) -> Job | None:
    row = conn.execute(
        sa.select(jobs_t)
        .where(jobs_t.c.status.in_(OPEN_STATUSES), *_where_key(key))
        .order_by(jobs_t.c.id.desc())
        .limit(1)
    ).mappings().one_or_none()
    return Job(dict(row)) if row else None


def latest(conn: Connection, statuses: tuple[str, ...] | None = None) -> Job | None:
    q = sa.select(jobs_t).order_by(jobs_t.c.id.desc()).limit(1)
    if statuses:
        q = q.where(jobs_t.c.status.in_(statuses))
    row = conn.execute(q).mappings().one_or_none()
    return Job(dict(row)) if row else None


def listing(conn: Connection, limit: int = 20) -> list[Job]:
    rows = conn.execute(sa.select(jobs_t).order_by(jobs_t.c.id.desc()).limit(limit)).mappings().all()
    return [Job(dict(r)) for r in rows]


def create(conn: Connection, key: JobKey, *, user_email: str | None, batch_size: int, params: dict[str, Any]) -> Job:
    stamp = now_iso()
    result = conn.execute(
        jobs_t.insert().values(
            status="pending", kind=key.kind, target=key.target, user_id=key.user_id, user_email=user_email,
            provider=key.provider, model=key.model, dimensions=key.dimensions, recipe_version=key.recipe_version,
            batch_size=batch_size, params=json.dumps(params, sort_keys=True), cursors="{}",
            created_at=stamp, updated_at=stamp,
        )
    )
    inserted = result.inserted_primary_key
    if inserted is None:  # (not for a one-row INSERT ... VALUES: every dialect reports its key)
        raise RuntimeError("the new job row reported no id")
    return get(conn, int(inserted[0]))


def _holder_is_dead(worker: str | None) -> bool:
    """A worker on this host whose process is gone holds nothing."""
    if not worker:
        return True
    host, _, rest = worker.partition(":")
    pid = rest.split(":", 1)[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # killed but not yet reaped (a zombie) is dead too
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def claim(conn: Connection, job: Job, worker: str, lease_s: float = LEASE_SECONDS) -> Job:
    """Take the job's lease: free, expired, or held by a dead process on this host."""
    stamp = now_iso()
    holder, expires = job.row.get("worker_id"), job.row.get("lease_expires_at")
    takeover = holder is None or expires is None or expires < stamp or _holder_is_dead(holder) or holder == worker
    if not takeover:
        raise LeaseHeld(f"job {job.id} is held by worker {holder} until {expires}; wait, or run again with --wait")
    cond = [jobs_t.c.id == job.id]
    cond.append(jobs_t.c.worker_id.is_(None) if holder is None else jobs_t.c.worker_id == holder)
    changed = conn.execute(
        jobs_t.update().where(*cond).values(
            worker_id=worker, heartbeat_at=stamp, lease_expires_at=now_iso(lease_s), status="running",
            stop_reason=None, updated_at=stamp,
        )
    ).rowcount
    if changed != 1:  # another worker won the race: name it, like any held lease
        holder = sa.select(jobs_t.c.worker_id, jobs_t.c.lease_expires_at).where(jobs_t.c.id == job.id)
        row = conn.execute(holder).first()
        who, until = (row[0], row[1]) if row is not None and row[0] else ("(another worker)", "its lease ends")
        raise LeaseHeld(f"job {job.id} is held by worker {who} until {until}; wait, or run again with --wait")
    return get(conn, job.id)


def advance(conn: Connection, job_id: int, worker: str, *, cursors: dict[str, int] | None = None,
            lease_s: float = LEASE_SECONDS, **deltas: float) -> None:
    """Add to the counters, move the cursor and extend the lease, in the caller's transaction."""
    stamp = now_iso()
    values: dict[str, Any] = {name: getattr(jobs_t.c, name) + amount for name, amount in deltas.items() if amount}
    values.update(heartbeat_at=stamp, lease_expires_at=now_iso(lease_s), updated_at=stamp)
    if cursors is not None:
        values["cursors"] = json.dumps(cursors, sort_keys=True)
    changed = conn.execute(
        jobs_t.update().where(jobs_t.c.id == job_id, jobs_t.c.worker_id == worker).values(**values)
    ).rowcount
    if changed != 1:
        raise LeaseHeld(f"lost the lease on job {job_id}: another worker took it over; stopping")


def heartbeat(engine: sa.Engine, job_id: int, worker: str) -> None:
    """Extend the lease in a transaction of its own (a locked or dropped database is retried)."""
    from backfill.db import retrying

    retrying(engine, lambda conn: advance(conn, job_id, worker))


def batches(conn: Connection, job_id: int) -> int:
    """The job's batch counter: each committed batch adds exactly one, and only the lease holder commits."""
    return int(conn.execute(sa.select(jobs_t.c.batches).where(jobs_t.c.id == job_id)).scalar() or 0)


def batch_landed(job_id: int, before: int) -> Callable[[Connection], bool]:
    """For a batch's commit: a check that tells, after a lost answer, whether the commit landed.
    `before` is the counter before this commit (the lease holder reads it once and counts its own commits)."""
    return lambda conn: batches(conn, job_id) > before


def finish(conn: Connection, job_id: int, worker: str, status: str, reason: str | None = None) -> None:
    stamp = now_iso()
    values: dict[str, Any] = dict(status=status, stop_reason=reason, worker_id=None, lease_expires_at=None,
                                  updated_at=stamp)
    if status in ("done", "failed", "cancelled"):
        values["finished_at"] = stamp
    conn.execute(jobs_t.update().where(jobs_t.c.id == job_id, jobs_t.c.worker_id == worker).values(**values))


def release(engine: sa.Engine, job_id: int, worker: str, status: str, reason: str | None = None) -> None:
    """On any exit of a worker holding the lease: record how the job ended and free the lease, so a worker
    elsewhere need not wait for it to expire. A locked or restarting database is retried (db.retrying); if the
    pool's connections are the trouble (one left inside a failed transaction), a fresh pool is tried once."""
    from backfill.db import retrying

    try:
        retrying(engine, lambda conn: finish(conn, job_id, worker, status, reason))
    except Exception:
        engine.dispose()
        retrying(engine, lambda conn: finish(conn, job_id, worker, status, reason), budget_s=10.0)


def cancel(conn: Connection, job_id: int) -> Job:
    job = get(conn, job_id)
    if job.status not in OPEN_STATUSES:
        raise ConfigError(f"job {job_id} is {job.status}; only an open job can be cancelled")
    conn.execute(jobs_t.update().where(jobs_t.c.id == job_id).values(
        status="cancelled", stop_reason="cancelled by user", finished_at=now_iso(), updated_at=now_iso()))
    return get(conn, job_id)


def is_cancelled(conn: Connection, job_id: int) -> bool:
    return conn.execute(sa.select(jobs_t.c.status).where(jobs_t.c.id == job_id)).scalar() == "cancelled"


def upsert_failures(conn: Connection, job_id: int, rows: list[dict[str, Any]]) -> None:
    """rows: {target, row_id, kind, error}; a row failing again counts another attempt."""
    if not rows:
        return
    stamp = now_iso()
    from sqlalchemy.dialects import postgresql, sqlite

    stmt: postgresql.Insert | sqlite.Insert
    if conn.dialect.name == "postgresql":
        stmt = postgresql.insert(failures_t)
    else:
        stmt = sqlite.insert(failures_t)
    stmt = stmt.on_conflict_do_update(
        index_elements=[failures_t.c.job_id, failures_t.c.target, failures_t.c.row_id],
        set_={"error": stmt.excluded.error, "kind": stmt.excluded.kind, "attempts": failures_t.c.attempts + 1,
              "resolved": stmt.excluded.resolved, "updated_at": stmt.excluded.updated_at},
    )
    conn.execute(stmt, [{"job_id": job_id, "created_at": stamp, "updated_at": stamp, "attempts": 1,
                         "resolved": False, **r} for r in rows])


NOTICE_KINDS = ("changed", "gone")  # rows left alone by compare-and-set: recorded, never retried


def notices(target: str, changed: list[int], gone: list[int]) -> list[dict[str, Any]]:
    """Failure-table rows (resolved: nothing to retry) for rows the server edited or deleted while their page
    was in flight: the job's `changed` and `gone` counts are these rows, so a repeated page counts once."""
    why = {"changed": "left alone: the row changed while its page was embedded (its new text is embedded by a "
                      "later run)",
           "gone": "left alone: the row was deleted while its page was embedded"}
    return [{"target": target, "row_id": rid, "kind": kind, "error": why[kind], "resolved": True}
            for kind, ids in (("changed", changed), ("gone", gone)) for rid in ids]


def notice_counts(conn: Connection, job_id: int) -> dict[str, int]:
    """{"changed": n, "gone": m} for the job."""
    got: dict[str, int] = dict(conn.execute(sa.select(failures_t.c.kind, sa.func.count()).where(
        failures_t.c.job_id == job_id, failures_t.c.kind.in_(NOTICE_KINDS)).group_by(failures_t.c.kind)).all())
    return {kind: int(got.get(kind, 0)) for kind in NOTICE_KINDS}


def resolve_failures(conn: Connection, job_id: int, target: str, row_ids: list[int]) -> None:
    if row_ids:
        conn.execute(
            failures_t.update()
            .where(
                failures_t.c.job_id == job_id,
                failures_t.c.target == target,
                failures_t.c.row_id == sa.bindparam("rid"),
            )
            .values(resolved=True, updated_at=now_iso()),
            [{"rid": r} for r in row_ids],
        )


def open_failures(conn: Connection, job_id: int, kind: str = "failed") -> list[dict[str, Any]]:
    q = (sa.select(failures_t).where(failures_t.c.job_id == job_id, failures_t.c.kind == kind,
                                     failures_t.c.resolved == sa.false())
         .order_by(failures_t.c.target, failures_t.c.row_id))
    return [dict(r) for r in conn.execute(q).mappings()]


TOP_REASONS = 5


def top_reasons(conn: Connection, job_id: int, n: int = TOP_REASONS, kind: str = "failed") -> list[dict[str, Any]]:
    """The `n` most common reasons among a job's unresolved failures, with their counts."""
    count = sa.func.count().label("rows")
    q = (sa.select(failures_t.c.error, count)
         .where(failures_t.c.job_id == job_id, failures_t.c.resolved == sa.false(), failures_t.c.kind == kind)
         .group_by(failures_t.c.error).order_by(count.desc(), failures_t.c.error).limit(n))
    return [{"reason": r[0], "count": int(r[1])} for r in conn.execute(q)]


def latest_failed(conn: Connection) -> int | None:
    """The newest job with an unresolved failed row: what `retry-failed` retries when no job is named."""
    row = conn.execute(sa.text(
        "SELECT job_id FROM backfill_failures WHERE kind = 'failed' AND resolved = :f "
        "ORDER BY job_id DESC LIMIT 1"
    ), {"f": False}).first()
    return None if row is None else int(row[0])
