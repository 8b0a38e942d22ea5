"""One library function per CLI command: open the database, do the work, report the result.

`database` (migrate, verify, stats), `runs` (run, up, resume, retry-failed), `jobs_view` (status, jobs,
cancel), `failures`, `budget` (plan), `tools` (index, sample-db). What a run is asked is `backfill.request`.
Each is imported when first used, so a command loads only its own modules.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_HOME = {
    "RunRequest": "backfill.request",
    "cancel": "backfill.commands.jobs_view",
    "environment_problem": "backfill.commands.database",
    "index": "backfill.commands.tools",
    "list_jobs": "backfill.commands.jobs_view",
    "migrate": "backfill.commands.database",
    "open_database": "backfill.commands.database",
    "plan": "backfill.commands.budget",
    "resume": "backfill.commands.runs",
    "retry_failed": "backfill.commands.runs",
    "run": "backfill.commands.runs",
    "sample_db": "backfill.commands.tools",
    "stats": "backfill.commands.database",
    "status": "backfill.commands.jobs_view",
    "up": "backfill.commands.runs",
    "verify": "backfill.commands.database",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_HOME[name]), name)
