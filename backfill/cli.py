"""The `backfill` command line: parse, call one library function, map typed errors to exit codes.

Exit codes (backfill.errors.EXIT_CODES): 0 done · 1 verify drift · 2 usage/config · 3 some rows failed ·
4 job held by another worker · 5 environment problem (disk full, read-only) · 130 interrupted
(resumable) · 70 internal error (a bug; rerun with --traceback).
"""

from __future__ import annotations

import enum
import os
import signal
import sys
from collections.abc import Callable
from typing import Annotated

import typer

from backfill import report
from backfill.config import DEFAULT_BATCH_SIZE, DEFAULT_CONCURRENCY, Settings, load_settings
from backfill.errors import EXIT_CODES, EXIT_INTERNAL, EXIT_OK, BackfillError

CORE, PACING, BATCH, OUTPUT = "Core", "Pacing", "Batch mode", "Output"
GLOBAL_FLAGS = ("--traceback", "-q", "--quiet")  # accepted before or after the subcommand

class _Flags:
    """--help shows boolean options as flags (no `<bool>` type column), --help itself included."""

    def get_help_option(self, ctx):  # noqa: ANN001, ANN201 - click's signature
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option

    def get_params(self, ctx):  # noqa: ANN001, ANN201
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class FlagCommand(_Flags, typer.core.TyperCommand):
    pass


class FlagGroup(_Flags, typer.core.TyperGroup):
    pass


app = typer.Typer(
    cls=FlagGroup,
    name="backfill",
    help=(
        "Fill in missing vector embeddings in a live mcp-memory-ts database, run like a schema "
        "migration: recorded, resumable, idempotent.\n\n"
        "Start with `backfill up` (migrate -> verify -> run/resume -> stats).\n\n"
        "Exit codes: " + " · ".join(f"{code} {short}" for code, short, _ in EXIT_CODES) + "."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # so help text may say [default: …] and `code`
)


def flag(*names: str, help: str, panel: str = CORE) -> typer.models.OptionInfo:  # noqa: A002
    """A boolean option shown as a flag in --help (no `<bool>` type column)."""
    return typer.Option(*names, help=help, metavar="", rich_help_panel=panel)


DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="Database: a file path, sqlite:///FILE, sqlite+libsql:///FILE, libsql://HOST, postgresql://…  "
        "[default: $DATABASE_URL, else $TURSO_URL + $TURSO_AUTH_TOKEN, also read from .env.local / .env]",
        show_default=False, rich_help_panel=CORE,
    ),
]
class Format(enum.StrEnum):
    auto = "auto"
    human = "human"
    json = "json"


LogFormat = Annotated[
    Format,
    typer.Option("--log-format", help="auto (human on a terminal, JSON lines on a pipe), human or json.",
                 rich_help_panel=OUTPUT),
]
JsonFlag = Annotated[bool, flag("--json", help="Print one JSON object instead of text.", panel=OUTPUT)]
UserEmail = Annotated[
    str | None, typer.Option("-u", "--user-email", rich_help_panel=CORE,
                                help="Only this user's rows (matched ignoring case; an unknown email is an error).")
]

_global = {"traceback": False, "quiet": False}  # what this invocation asked for
_from_argv = {"traceback": False, "quiet": False}  # found after the subcommand by main()


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"backfill {version('backfill')}")
        except PackageNotFoundError:  # a source tree without metadata
            from backfill import __version__

            print(f"backfill {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    traceback: Annotated[bool, flag("--traceback", help="Show the full traceback of an error (also accepted "
                                    "after the subcommand).", panel=OUTPUT)] = False,
    quiet: Annotated[bool, flag("-q", "--quiet", help="No progress bar and no informational lines; errors still "
                                "go to stderr (also accepted after the subcommand).", panel=OUTPUT)] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", metavar="",
                                          callback=_version, is_eager=True, rich_help_panel=OUTPUT)] = False,
) -> None:
    _global["traceback"] = traceback or _from_argv["traceback"]
    _global["quiet"] = quiet or _from_argv["quiet"]


def _execute(
    log_format: Format | str, settings_factory: Callable[[], Settings], body: Callable[[Settings], int | None]
) -> None:
    """Run one command body; every expected failure becomes one line and its exit code."""
    settings: Settings | None = None
    log_format = Format(log_format).value
    report.configure_logging(log_format)
    report.set_quiet(_global["quiet"])
    try:
        settings = settings_factory()
        report.configure_logging(log_format, settings)
        code = body(settings) or EXIT_OK
    except BackfillError as exc:
        if _global["traceback"]:
            raise
        report.error(exc.message, exc.details, exc.exit_code)
        code = exc.exit_code
    except KeyboardInterrupt:
        report.error("interrupted", exit_code=130)
        code = 130
    except Exception as exc:  # the machine (disk full, read-only) or a bug: one line, secrets removed
        from backfill.commands import environment_problem
        from backfill.errors import EnvironmentProblem

        problem = environment_problem(exc)
        if _global["traceback"]:
            raise
        if problem is not None:
            report.error(problem, exit_code=EnvironmentProblem.exit_code)
            raise typer.Exit(EnvironmentProblem.exit_code) from None
        message = f"internal error: {type(exc).__name__}: {exc}".splitlines()[0][:400]
        if settings is not None:
            message = settings.redact(message)
        report.error(f"{message} (rerun with --traceback for details)", exit_code=EXIT_INTERNAL)
        code = EXIT_INTERNAL
    raise typer.Exit(code)


@app.command(cls=FlagCommand)
def migrate(
    database_url: DatabaseUrl = None,
    create: Annotated[bool, flag(
        "--create", help="Create the mcp-memory-ts schema in a new file or an empty database "
        "(without it, a missing file or an empty database is refused).")] = False,
    log_format: LogFormat = Format.auto,
) -> None:
    """Bring the schema to head (`alembic upgrade head`), adopting a live mcp-memory-ts database.

    Adopts any database the server made that has the columns backfill reads and writes; the server's
    other tables, columns and indexes are left alone. All of it in one transaction.

    Example: backfill migrate --database-url ./memory.db
    """
    from backfill import commands

    _execute(log_format, lambda: load_settings(database_url), lambda s: commands.migrate(s, create=create))


@app.command(cls=FlagCommand)
def verify(database_url: DatabaseUrl = None, log_format: LogFormat = Format.auto,
           deep: Annotated[bool, flag("--deep", help="Also read every row: rows that need a vector but are "
                                      "not in the change queue are drift.")] = False) -> None:
    """Compare the live schema with the migrations; print the drift and exit 1 on any.

    Example: backfill verify --database-url ./memory.db
    """
    from backfill import commands

    _execute(log_format, lambda: load_settings(database_url), lambda s: commands.verify(s, deep=deep))


@app.command(cls=FlagCommand)
def stats(
    database_url: DatabaseUrl = None,
    user_email: UserEmail = None,
    as_json: JsonFlag = False,
    log_format: LogFormat = Format.auto,
    deep: Annotated[bool, flag("--deep", help="Read and re-validate every row (and re-hash every embedded "
                               "text) instead of reading the change queue.")] = False,
) -> None:
    """Coverage of memories and entities: totals, with embedding, missing, malformed, health.

    Example: backfill stats --json -u alice@example.com
    """
    from backfill import commands

    _execute(
        "json" if as_json else log_format,
        lambda: load_settings(database_url),
        lambda s: commands.stats(s, user_email=user_email, deep=deep),
    )


Provider = Annotated[str | None, typer.Option(
    "--provider", rich_help_panel=CORE, show_default=False,
    help="openai (any OpenAI-compatible API) or local (offline, no key). "
    "[default: $BACKFILL_PROVIDER (also from .env.local / .env), else openai]")]
Model = Annotated[str | None, typer.Option("--model", rich_help_panel=CORE,
                                              help="Embedding model [default: text-embedding-3-small].")]
Dimensions = Annotated[int | None, typer.Option("--dimensions", rich_help_panel=CORE,
                                                   help="Vector size (text-embedding-3-* can shorten).")]
BaseUrl = Annotated[str | None, typer.Option("--base-url", rich_help_panel=CORE,
                                                help="OpenAI-compatible API root [default: $OPENAI_BASE_URL].")]
Target = Annotated[str, typer.Option("--target", help="memories, entities or all.", rich_help_panel=CORE)]
BatchSize = Annotated[int, typer.Option("-b", "--batch-size", rich_help_panel=PACING,
                                        help="Inputs per API request (seed: rows per batch).")]
DelayMs = Annotated[int, typer.Option(
    "-d", "--delay-ms", rich_help_panel=PACING,
    help="Extra pause between requests, in ms (pacing follows the quota without it).")]
Concurrency = Annotated[int, typer.Option("--concurrency", help="Requests in flight at once.", rich_help_panel=PACING)]
Limit = Annotated[int | None, typer.Option("--limit", rich_help_panel=PACING,
                                              help="Stop after this many rows (the job stays resumable).")]
MaxRuntime = Annotated[float | None, typer.Option(
    "--max-runtime", rich_help_panel=PACING,
    help="Stop after this many seconds (resumable); also bounds the wait of --wait.")]
Recipe = Annotated[str, typer.Option("--recipe", rich_help_panel=CORE,
                                     help="Text recipe: mcp-memory-ts/1 (the server's) or unicode/1.")]
ReembedAll = Annotated[bool, flag("--reembed-all", help="Re-embed every row in scope, e.g. to change model.")]
MaxRpm = Annotated[float | None, typer.Option("--max-rpm", rich_help_panel=PACING,
                                                 help="Requests per minute [default: learned from headers].")]
MaxTpm = Annotated[float | None, typer.Option("--max-tpm", rich_help_panel=PACING,
                                                 help="Tokens per minute [default: learned from headers].")]
Timeout = Annotated[float, typer.Option("--timeout", help="Seconds per API request.", rich_help_panel=PACING)]
Wait = Annotated[bool, flag("--wait", panel=PACING, help="If another worker holds the job, wait for it (at most "
                            "--max-runtime) instead of exiting 4.")]
Mode = Annotated[str, typer.Option(
    "--mode", rich_help_panel=BATCH,
    help="sync (embeddings API, now) or batch (OpenAI Batch API: JSONL files, half the price, results "
    "within 24 h; `status`/`resume` collect them).")]
BatchFileLines = Annotated[int, typer.Option(
    "--batch-file-lines", rich_help_panel=BATCH,
    help="Batch mode: request lines (of -b inputs each) per uploaded file and batch, <= 50000.")]
PollInterval = Annotated[float | None, typer.Option(
    "--poll-interval", rich_help_panel=BATCH, show_default=False,
    help="Seconds between polls: of the running batches in batch mode (bound the wait with --max-runtime) "
    "[default: 60], or of the change queue with --follow [default: 1].")]
Follow = Annotated[bool, flag(
    "--follow", help="After the backlog, keep running: embed rows the server inserts or edits (the change queue) "
    "within --poll-interval seconds. Stop it with SIGTERM or Ctrl-C: what landed commits, then exit 0 with "
    "the job done, 130 if rows were left (`backfill resume`), 3 if rows failed. --max-runtime ends it too. "
    "Not with --mode batch, --limit, --dry-run, --reembed-all or --reembed-stale.")]
ReembedStale = Annotated[bool, flag(
    "--reembed-stale", help="Also re-embed stale rows: text edited since it was embedded, another model/dimensions, "
    "or an older recipe (see `backfill stats`). Rows without provenance are left alone.")]
AdoptExisting = Annotated[bool, flag(
    "--adopt-existing", help="Record provenance (today's text hash) for vectors embedded before this tool, "
    "without re-embedding them, so later edits count as stale.")]
MaxFailedRatio = Annotated[float | None, typer.Option(
    "--max-failed-ratio", rich_help_panel=PACING,
    help="Exit 3 only when failed/selected rows exceed this ratio "
    "(e.g. 0.01); at or below it failures are reported and the exit is 0. [default: any failure exits 3]")]
VectorColumn = Annotated[str | None, typer.Option(
    "--vector-column", rich_help_panel=CORE,
    help="libSQL only: also write each vector into this native F32_BLOB(dims) column "
    "(added if missing) via vector32(); then run `backfill index`.")]
MaxCost = Annotated[float | None, typer.Option(
    "--max-cost", rich_help_panel=PACING,
    help="Refuse (exit 2, before any request) when the plan costs more than this many US dollars.")]
PricePerMtok = Annotated[float | None, typer.Option(
    "--price-per-mtok", rich_help_panel=PACING,
    help="USD per 1M tokens, overriding the model's price table (e.g. a negotiated rate).")]
FullScan = Annotated[bool, flag("--full-scan", help="Read the whole table for rows that need a vector "
                                "(re-seeding the change queue) instead of trusting the queue.")]
DryRun = Annotated[bool, flag("--dry-run", help="Only plan: the same as `backfill plan` with these options "
                              "(nothing is migrated, written or sent).")]
JobArg = Annotated[int | None, typer.Argument(help="Job id [default: the latest matching job].", show_default=False)]


def _request(provider: str | None, model, dimensions, target, user_email, batch_size, delay_ms, concurrency, limit,  # noqa: ANN001
             max_runtime, recipe, reembed_all, max_rpm, max_tpm, timeout, wait):
    from backfill.commands import RunRequest

    # "" when --provider is not given: resolve_provider falls back to BACKFILL_PROVIDER, then openai
    return RunRequest(provider=provider or "", model=model, dimensions=dimensions, target=target, user_email=user_email,
                      batch_size=batch_size, delay_ms=delay_ms, concurrency=concurrency, limit=limit,
                      max_runtime_s=max_runtime, recipe=recipe, reembed_all=reembed_all, max_rpm=max_rpm,
                      max_tpm=max_tpm, timeout_s=timeout, wait=wait)


def _job_command(action: str, doc: str) -> Callable[..., None]:
    """`run` and `up` take the same options; they differ only in the library function they call."""

    def command(
        database_url: DatabaseUrl = None, provider: Provider = None, model: Model = None,
        dimensions: Dimensions = None, base_url: BaseUrl = None, target: Target = "all", user_email: UserEmail = None,
        batch_size: BatchSize = DEFAULT_BATCH_SIZE, delay_ms: DelayMs = 0,
        concurrency: Concurrency = DEFAULT_CONCURRENCY, limit: Limit = None,
        max_runtime: MaxRuntime = None, recipe: Recipe = "mcp-memory-ts/1", reembed_all: ReembedAll = False,
        max_rpm: MaxRpm = None, max_tpm: MaxTpm = None, timeout: Timeout = 60.0, wait: Wait = False,
        log_format: LogFormat = Format.auto, mode: Mode = "sync", batch_file_lines: BatchFileLines = 50_000,
        poll_interval: PollInterval = None, reembed_stale: ReembedStale = False, adopt_existing: AdoptExisting = False,
        max_failed_ratio: MaxFailedRatio = None, vector_column: VectorColumn = None, max_cost: MaxCost = None,
        price_per_mtok: PricePerMtok = None, dry_run: DryRun = False, full_scan: FullScan = False,
        follow: Follow = False,
    ) -> None:
        from backfill import commands

        req = _request(provider, model, dimensions, target, user_email, batch_size, delay_ms, concurrency, limit,
                       max_runtime, recipe, reembed_all, max_rpm, max_tpm, timeout, wait)
        req.reembed_stale, req.adopt_existing = reembed_stale, adopt_existing
        req.max_failed_ratio, req.vector_column = max_failed_ratio, vector_column
        req.max_cost, req.price_per_mtok = max_cost, price_per_mtok
        req.extra.update(mode=mode, file_lines=batch_file_lines, poll_interval=poll_interval, full_scan=full_scan,
                         follow=follow, dry_run=dry_run)
        name = "plan" if dry_run else action  # --dry-run: the same options, planned
        _execute(log_format, lambda: load_settings(database_url, openai_base_url=base_url),
                 lambda s: getattr(commands, name)(s, req))

    command.__name__ = action
    command.__doc__ = doc
    return command


app.command("run", cls=FlagCommand)(_job_command("run", """Embed every row that needs it: start a job,
    or resume the open one with the same parameters.

    Example: backfill run -b 100 -u alice@example.com

    Batch API (half price, within 24 h): backfill run --mode batch -b 500 --max-runtime 60; later: backfill resume
    """))
app.command("up", cls=FlagCommand)(_job_command("up", """The whole chain: migrate -> verify -> run
    (resuming the open job) -> stats. Safe after every deploy.

    Example: backfill up --database-url ./memory.db --provider local

    As a service, embedding what the server writes within seconds: backfill up --follow
    """))


@app.command(cls=FlagCommand)
def plan(
    database_url: DatabaseUrl = None, provider: Provider = None, model: Model = None, dimensions: Dimensions = None,
    target: Target = "all", user_email: UserEmail = None, batch_size: BatchSize = DEFAULT_BATCH_SIZE,
    concurrency: Concurrency = DEFAULT_CONCURRENCY,
    limit: Limit = None, recipe: Recipe = "mcp-memory-ts/1", reembed_all: ReembedAll = False, max_rpm: MaxRpm = None,
    max_tpm: MaxTpm = None, price_per_mtok: PricePerMtok = None, max_cost: MaxCost = None, as_json: JsonFlag = False,
    log_format: LogFormat = Format.auto,
) -> None:
    """Dry run, nothing sent: rows to embed, exact tokens (the model's tokenizer, on the text `run` would
    send), requests, cost (price table or --price-per-mtok) and ETA at --max-rpm/--max-tpm (default:
    OpenAI tier-1 limits). Takes the same options as `run`; no API key needed.

    Example: backfill plan -u alice@example.com --max-tpm 5000000 --json
    """
    from backfill import commands

    req = _request(provider, model, dimensions, target, user_email, batch_size, 0, concurrency, limit, None,
                   recipe, reembed_all, max_rpm, max_tpm, 60.0, False)
    req.max_cost, req.price_per_mtok = max_cost, price_per_mtok
    _execute("json" if as_json else log_format, lambda: load_settings(database_url), lambda s: commands.plan(s, req))


@app.command(cls=FlagCommand)
def resume(
    job: JobArg = None, database_url: DatabaseUrl = None, base_url: BaseUrl = None,
    batch_size: BatchSize = DEFAULT_BATCH_SIZE,
    delay_ms: DelayMs = 0, concurrency: Concurrency = DEFAULT_CONCURRENCY, limit: Limit = None,
    max_runtime: MaxRuntime = None,
    max_rpm: MaxRpm = None, max_tpm: MaxTpm = None, timeout: Timeout = 60.0, wait: Wait = False,
    log_format: LogFormat = Format.auto, poll_interval: PollInterval = 60.0,
) -> None:
    """Continue an interrupted job from its last committed batch (model and scope come from the job).

    A batch-mode job reconciles its files with the provider (nothing is uploaded twice), then polls and
    writes each finished batch.

    Example: backfill resume 7
    """
    from backfill import commands

    req = _request("openai", None, None, "all", None, batch_size, delay_ms, concurrency, limit, max_runtime,
                   "mcp-memory-ts/1", False, max_rpm, max_tpm, timeout, wait)
    req.extra.update(poll_interval=poll_interval)
    _execute(log_format, lambda: load_settings(database_url, openai_base_url=base_url),
             lambda s: commands.resume(s, job, req))


@app.command("retry-failed", cls=FlagCommand)
def retry_failed(
    job: JobArg = None, database_url: DatabaseUrl = None, base_url: BaseUrl = None,
    batch_size: BatchSize = DEFAULT_BATCH_SIZE,
    concurrency: Concurrency = DEFAULT_CONCURRENCY, timeout: Timeout = 60.0, wait: Wait = False,
    log_format: LogFormat = Format.auto,
) -> None:
    """Re-embed only the rows recorded as failed (nothing else is sent).

    Example: backfill retry-failed 7
    """
    from backfill import commands

    req = _request("openai", None, None, "all", None, batch_size, 0, concurrency, None, None, "mcp-memory-ts/1",
                   False, None, None, timeout, wait)
    _execute(log_format, lambda: load_settings(database_url, openai_base_url=base_url),
             lambda s: commands.retry_failed(s, job, req))


@app.command(cls=FlagCommand)
def status(job: JobArg = None, database_url: DatabaseUrl = None, as_json: JsonFlag = False,
           log_format: LogFormat = Format.auto) -> None:
    """Progress of one job: counts, cursor, rate, tokens, cost, ETA.

    For a batch-mode job it also polls the provider once and writes the batches that finished.

    Example: backfill status 7 --json
    """
    from backfill import commands

    _execute("json" if as_json else log_format, lambda: load_settings(database_url), lambda s: commands.status(s, job))


@app.command("jobs", cls=FlagCommand)
def jobs_(database_url: DatabaseUrl = None, log_format: LogFormat = Format.auto) -> None:
    """The latest jobs, newest first.

    Example: backfill jobs
    """
    from backfill import commands

    _execute(log_format, lambda: load_settings(database_url), commands.list_jobs)


@app.command(cls=FlagCommand)
def cancel(job: Annotated[int, typer.Argument(help="Job id.")], database_url: DatabaseUrl = None,
           log_format: LogFormat = Format.auto) -> None:
    """Mark a job cancelled; a running worker stops after its in-flight batch.

    A batch-mode job's batches are cancelled at the provider too.

    Example: backfill cancel 7
    """
    from backfill import commands

    _execute(log_format, lambda: load_settings(database_url), lambda s: commands.cancel(s, job))


@app.command(cls=FlagCommand)
def index(
    vector_column: Annotated[str, typer.Option("--vector-column", help="The F32_BLOB column written by "
                                               "`run --vector-column` (libSQL only).")],
    database_url: DatabaseUrl = None, target: Target = "all", log_format: LogFormat = Format.auto,
) -> None:
    """Build the libSQL vector index (libsql_vector_idx) after the backfill and check vector_top_k on 20 probes.

    Fills the column where it is still NULL first. Exit 1 if a probe is not found.

    Example: backfill index --vector-column embedding_vec --database-url sqlite+libsql:///memory.db
    """
    from backfill import commands

    _execute(log_format, lambda: load_settings(database_url), lambda s: commands.index(s, vector_column, target))


@app.command("sample-db", cls=FlagCommand)
def sample_db(
    path: Annotated[str, typer.Argument(help="SQLite file to create (must not exist).")],
    memories: Annotated[int, typer.Option("--memories", help="Memories to create.")] = 300,
    entities: Annotated[int, typer.Option("--entities", help="Entities to create.")] = 100,
    dimensions: Annotated[int, typer.Option("--dimensions", help="Size of the embeddings already present.")] = 384,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 7,
    log_format: LogFormat = Format.auto,
) -> None:
    """Build a demo mcp-memory-ts database (legacy: no alembic_version) with a mix of missing embeddings.

    Example: backfill sample-db demo.db
    """
    from backfill import commands

    _execute(log_format, lambda: load_settings(path),
             lambda s: commands.sample_db(s, memories=memories, entities=entities, dimensions=dimensions, seed=seed))


@app.command()
def failures(job: JobArg = None, database_url: DatabaseUrl = None, as_json: JsonFlag = False,
             limit: Annotated[int, typer.Option("--limit", min=0, help="Rows to list (0: all).")] = 50,
             log_format: LogFormat = Format.auto) -> None:
    """The rows a job could not embed: table, id, attempts, reason; then the most common reasons.

    Example: backfill failures 7 --json
    """
    from backfill.commands.failures import failures as show

    _execute("json" if as_json else log_format, lambda: load_settings(database_url), lambda s: show(s, job, limit))


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM before the run loop takes over: clean up and exit 130 like Ctrl-C


def _global_flags(argv: list[str]) -> list[str]:
    """--traceback and -q/--quiet work before or after the subcommand (the error hint says
    "rerun with --traceback", and people append it)."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        if arg in GLOBAL_FLAGS:
            _from_argv["traceback" if arg == "--traceback" else "quiet"] = True
            continue
        out.append(arg)
    return out


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app(args=_global_flags(sys.argv[1:]), prog_name="backfill")
    except SystemExit as exc:
        from backfill import stopping

        if stopping.ABORTED.is_set():  # a second Ctrl-C: the job is closed and the summary out; requests
            sys.stdout.flush()         # still on the wire are not waited for (nothing is written after)
            sys.stderr.flush()
            os._exit(exc.code if isinstance(exc.code, int) else 130)
        if exc.code is None or isinstance(exc.code, int):
            _leave(exc.code or 0)
        raise


def _leave(code: int) -> None:
    """The command's work is committed and its output written: close the database connections and leave
    without the interpreter's teardown of every module and object (the SDK's types alone cost ~0.5 s of
    CPU). Only when nothing else runs (the normal exit waits for other threads) and no profiler or tracer
    (cProfile, coverage) is on to write its data at the normal exit."""
    import logging
    import threading

    if threading.active_count() > 1 or sys.getprofile() is not None or sys.gettrace() is not None:
        return
    try:
        from backfill import db

        db.close_all()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # a closed pipe, a dropped connection: the normal exit reports it as before
        return
    os._exit(code)
