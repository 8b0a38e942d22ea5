"""The schema commands: open the database, `migrate`, `verify`, `stats`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from backfill import db, locks, report
from backfill import migrate as migrations
from backfill import stats as coverage
from backfill.config import Settings
from backfill.errors import ConfigError, SchemaDrift

_opened: dict[str, db.Database] = {}  # the database this command opened, named by environment errors
_shared: dict[str, Engine] = {}  # inside `one_engine()`: the engine each step of `up` opens, by URL
_sharing: list[bool] = []


@contextmanager
def one_engine() -> Iterator[None]:
    """`up`: its steps (migrate, verify, run, stats) open the database through one engine, probed once,
    with one pool and one statement cache; disposed at the end."""
    _sharing.append(True)
    try:
        yield
    finally:
        _sharing.pop()
        if not _sharing:
            for engine in _shared.values():
                engine.dispose()
            _shared.clear()


def open_database(settings: Settings, *, must_exist: bool = True,
                  data_tables: bool = True) -> tuple[db.Database, Engine]:
    """Resolve, create the engine and check it answers; never creates a file unless asked.
    With `data_tables`, a database without the server's `memories` table is refused in one line."""
    target = db.resolve(settings.database_url, settings.auth_token)
    _opened["target"] = target
    report.tell_source(target.display)
    key = target.url.render_as_string(hide_password=False)
    engine = _shared.get(key) if _sharing else None
    if engine is None:
        engine = db.engine_for(target, must_exist=must_exist)
        db.probe(engine, target, settings)
        if _sharing:
            _shared[key] = engine
    if data_tables:
        require_data_tables(engine, target)
    return target, engine


def require_data_tables(engine: Engine, target: db.Database) -> None:
    """`memories` is what every command reads: an empty or foreign database gets one line, not
    "no such table" (exit 70)."""
    names = set(sa.inspect(engine).get_table_names())
    if "memories" in names:
        return
    if not names:
        raise ConfigError(f"{target.display} is empty (no mcp-memory-ts tables): check --database-url, or "
                          f"create the schema there with `{report.suggest('backfill migrate --create')}`")
    found = sorted(names)
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    raise SchemaDrift(f"{target.display} is not an mcp-memory-ts database (no memories table; found {shown}): "
                      "check --database-url")


def environment_problem(exc: BaseException) -> str | None:
    """A full disk, read-only file or mount, or no room for the journal, named for this command's database."""
    return db.environment_problem(exc, _opened.get("target"))


def require_tables(engine: Engine) -> None:
    if not sa.inspect(engine).has_table("backfill_jobs"):
        raise ConfigError(f"backfill's tables are missing: run `{report.suggest('backfill migrate')}` "
                          f"(or `{report.suggest('backfill up')}`) first")


def migrate(settings: Settings, *, create: bool = False) -> int:
    """`create`: a missing file or an empty database gets the schema; otherwise both are refused (exit 2)."""
    target, engine = open_database(settings, must_exist=not create, data_tables=False)
    with locks.schema_lock(target, engine):  # concurrent `up`s migrate one after the other
        result = migrations.migrate(engine, create=create)
    messages = {
        "at-head": f"schema already at head ({result.to_revision}); nothing to do",
        "repaired": f"schema at head ({result.to_revision}); put back {', '.join(result.notes)}",
        "created": f"created the schema at {result.to_revision} in {target.display}",
        "adopted": f"adopted the existing mcp-memory-ts database (stamped 0001) and upgraded to {result.to_revision}",
        "upgraded": f"upgraded {result.from_revision} -> {result.to_revision}",
    }
    report.say(messages[result.action])
    report.event("migrate", action=result.action, from_revision=result.from_revision, to_revision=result.to_revision)
    return 0


def verify(settings: Settings, *, deep: bool = False) -> int:
    _target, engine = open_database(settings, data_tables=False)  # an empty database is drift to report
    result = migrations.verify(engine, deep=deep)  # deep: rows the change queue missed (changes.py)
    report.event("verify", ok=result.ok, revision=result.revision, head=result.head, differences=result.differences)
    if result.ok:
        report.say(f"schema OK at {result.revision}")
        return 0
    raise SchemaDrift(f"schema drift: {len(result.differences)} difference(s)", details=result.differences)


def stats(settings: Settings, *, user_email: str | None = None, deep: bool = False) -> int:
    _target, engine = open_database(settings)
    with engine.connect() as conn:
        result = coverage.collect(conn, user_email, deep=deep)  # deep: scan the table, not the change queue
    data = result.as_dict()
    if report.is_json():
        report.record("stats", data)
    else:
        report.say(report.stats_block(data))
    return 0
