"""Typed errors. Each carries its exit code; `cli.py` maps them to an exit in one place.

Exit codes are a documented contract (README, `backfill --help`):

    0   done
    1   verify found drift (or migrate refused an incompatible live schema)
    2   usage or configuration error (bad URL, missing key, unknown user, refused plan)
    3   the job finished but some rows failed (they are recorded; `backfill retry-failed`)
    4   another worker holds the job's lease
    5   the environment stops the database: disk full, read-only file or mount, journal cannot be created
    130 interrupted (SIGINT/SIGTERM); the job is resumable (a `--follow` stopped with nothing left exits 0)
    70  internal error (a bug): rerun with --traceback and report it
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_DRIFT = 1
EXIT_USAGE = 2
EXIT_ROWS_FAILED = 3
EXIT_LEASE_HELD = 4
EXIT_ENVIRONMENT = 5
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70

# the contract, in one place: `backfill --help` and the README print this table
EXIT_CODES = (  # (code, short name, what it means)
    (EXIT_OK, "done", "done, nothing to do, or stopped on purpose (--limit, --max-runtime, cancel, a signal to "
                      "--follow with nothing left)"),
    (EXIT_DRIFT, "schema drift", "schema drift (verify), or a schema the tool cannot use (nothing changed)"),
    (EXIT_USAGE, "usage or configuration error", "bad flag, URL, missing key, unknown user (nothing changed)"),
    (EXIT_ROWS_FAILED, "some rows failed", "recorded; `backfill retry-failed` re-sends them"),
    (EXIT_LEASE_HELD, "another worker holds the job", "`--wait` waits instead"),
    (EXIT_ENVIRONMENT, "environment problem", "disk full, read-only file or mount, journal cannot be created"),
    (EXIT_INTERRUPTED, "interrupted", "resumable: `backfill resume`"),
    (EXIT_INTERNAL, "internal error (a bug)", "rerun with --traceback and report it"),
)


class BackfillError(Exception):
    """Base of every expected failure: printed as one line, never as a traceback."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, *, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class ConfigError(BackfillError):
    """Bad flags, environment or URL; unreachable database; missing key."""


class SchemaDrift(BackfillError):
    """The live schema differs from the migrations (verify) or cannot be adopted (migrate)."""

    exit_code = EXIT_DRIFT


class RowsFailed(BackfillError):
    """The job ran to the end but some rows are recorded as failed."""

    exit_code = EXIT_ROWS_FAILED


class LeaseHeld(BackfillError):
    """Another live worker holds the job."""

    exit_code = EXIT_LEASE_HELD


class EnvironmentProblem(BackfillError):
    """The machine, not the input: a full disk, a read-only file or mount, a folder where the journal
    cannot be created. Data is intact; fix the environment and run again."""

    exit_code = EXIT_ENVIRONMENT


class Interrupted(BackfillError):
    """Stopped by a signal after committing what finished; resumable."""

    exit_code = EXIT_INTERRUPTED


class EmptyDatabase(ConfigError):
    """`migrate`/`up` on a database with no tables, without `--create`: nothing is created unasked."""
