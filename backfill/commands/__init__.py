"""One library function per CLI command: open the database, do the work, report the result.

`database` (migrate, verify, stats), `runs` (run, up, resume, retry-failed), `jobs_view` (status, jobs,
cancel), `failures`, `budget` (plan), `tools` (index, sample-db). What a run is asked is `backfill.request`.
"""

from __future__ import annotations

from backfill.commands.budget import plan
from backfill.commands.database import environment_problem, migrate, open_database, stats, verify
from backfill.commands.jobs_view import cancel, list_jobs, status
from backfill.commands.runs import resume, retry_failed, run, up
from backfill.commands.tools import index, sample_db
from backfill.request import RunRequest

__all__ = [
    "RunRequest",
    "cancel",
    "environment_problem",
    "index",
    "list_jobs",
    "migrate",
    "open_database",
    "plan",
    "resume",
    "retry_failed",
    "run",
    "sample_db",
    "stats",
    "status",
    "up",
    "verify",
]
