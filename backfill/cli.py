"""The `backfill` command line: parse, call one library function, map typed errors to exit codes.

Exit codes: 0 done · 1 verify drift · 2 usage/config · 3 some rows failed · 4 job held by another
worker · 130 interrupted (resumable) · 70 internal error (a bug; rerun with --traceback).
"""

from __future__ import annotations

import sys
from typing import Annotated, Callable, Optional

import typer

from backfill import report
from backfill.config import Settings, load_settings
from backfill.errors import EXIT_OK, BackfillError

EXIT_INTERNAL = 70

app = typer.Typer(
    name="backfill",
    help=(
        "Fill in missing vector embeddings in a live mcp-memory-ts database, run like a schema "
        "migration: recorded, resumable, idempotent.\n\n"
        "Start with `backfill up` (migrate -> verify -> run/resume -> stats).\n\n"
        "Exit codes: 0 done, 1 schema drift, 2 usage or configuration error, 3 some rows failed "
        "(recorded; see `retry-failed`), 4 another worker holds the job, 130 interrupted (resumable)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DatabaseUrl = Annotated[
    Optional[str],
    typer.Option(
        "--database-url",
        help="Database: a file path, sqlite:///FILE, sqlite+libsql:///FILE, libsql://HOST, postgresql://…  "
        "[default: $DATABASE_URL, else $TURSO_URL + $TURSO_AUTH_TOKEN, also read from .env.local / .env]",
        show_default=False,
    ),
]
LogFormat = Annotated[
    str,
    typer.Option("--log-format", help="auto (human on a terminal, JSON lines on a pipe), human or json."),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
UserEmail = Annotated[
    Optional[str], typer.Option("-u", "--user-email", help="Only this user's rows (an unknown email is an error).")
]

_traceback = {"on": False}


@app.callback()
def _main(
    traceback: Annotated[bool, typer.Option("--traceback", help="Show the full traceback of an error.")] = False,
) -> None:
    _traceback["on"] = traceback


def _execute(log_format: str, settings_factory: Callable[[], Settings], body: Callable[[Settings], int | None]) -> None:
    """Run one command body; every expected failure becomes one line and its exit code."""
    settings: Settings | None = None
    report.configure_logging(log_format)
    try:
        settings = settings_factory()
        report.configure_logging(log_format, settings)
        code = body(settings) or EXIT_OK
    except BackfillError as exc:
        if _traceback["on"]:
            raise
        report.error(exc.message, exc.details, exc.exit_code)
        code = exc.exit_code
    except KeyboardInterrupt:
        report.error("interrupted", exit_code=130)
        code = 130
    except Exception as exc:  # a bug: one line, secrets removed, traceback on request
        if _traceback["on"]:
            raise
        message = f"internal error: {type(exc).__name__}: {exc}".splitlines()[0][:400]
        if settings is not None:
            message = settings.redact(message)
        report.error(f"{message} (rerun with --traceback for details)", exit_code=EXIT_INTERNAL)
        code = EXIT_INTERNAL
    raise typer.Exit(code)


@app.command()
def migrate(database_url: DatabaseUrl = None, log_format: LogFormat = "auto") -> None:
    """Bring the schema to head (`alembic upgrade head`), adopting a live mcp-memory-ts database.

    Example: backfill migrate --database-url ./memory.db
    """
    from backfill import commands

    _execute(log_format, lambda: load_settings(database_url), commands.migrate)


@app.command()
def verify(database_url: DatabaseUrl = None, log_format: LogFormat = "auto") -> None:
    """Compare the live schema with the migrations; print the drift and exit 1 on any.

    Example: backfill verify --database-url ./memory.db
    """
    from backfill import commands

    _execute(log_format, lambda: load_settings(database_url), commands.verify)


@app.command()
def stats(
    database_url: DatabaseUrl = None,
    user_email: UserEmail = None,
    as_json: JsonFlag = False,
    log_format: LogFormat = "auto",
) -> None:
    """Coverage of memories and entities: totals, with embedding, missing, malformed, health.

    Example: backfill stats --json -u alice@example.com
    """
    from backfill import commands

    _execute(
        "json" if as_json else log_format,
        lambda: load_settings(database_url),
        lambda s: commands.stats(s, user_email=user_email),
    )


def main() -> None:
    try:
        app()
    except SystemExit:
        raise
    sys.exit(0)
