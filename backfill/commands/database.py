"""The schema commands: open the database, `migrate`, `verify`, `stats`."""

from __future__ import annotations

import json

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from backfill import db, locks, report
from backfill import migrate as migrations
from backfill import stats as coverage
from backfill.config import Settings
from backfill.errors import ConfigError, SchemaDrift


def open_database(settings: Settings, *, must_exist: bool = True) -> tuple[db.Target, Engine]:
    """Resolve, create the engine and check it answers; never creates a file unless asked."""
    target = db.resolve(settings.database_url, settings.auth_token)
    engine = db.engine_for(target, must_exist=must_exist)
    db.probe(engine, target, settings)
    return target, engine


def require_tables(engine: Engine) -> None:
    if not sa.inspect(engine).has_table("backfill_jobs"):
        raise ConfigError("backfill's tables are missing: run `backfill migrate` (or `backfill up`) first")


def migrate(settings: Settings, *, create: bool = False) -> int:
    """`create`: a missing file or an empty database gets the schema; otherwise both are refused (exit 2)."""
    target, engine = open_database(settings, must_exist=not create)
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


def verify(settings: Settings) -> int:
    _target, engine = open_database(settings)
    result = migrations.verify(engine)
    report.event("verify", ok=result.ok, revision=result.revision, head=result.head, differences=result.differences)
    if result.ok:
        report.say(f"schema OK at {result.revision}")
        return 0
    raise SchemaDrift(f"schema drift: {len(result.differences)} difference(s)", details=result.differences)


def stats(settings: Settings, *, user_email: str | None = None) -> int:
    _target, engine = open_database(settings)
    with engine.connect() as conn:
        result = coverage.collect(conn, user_email)
    data = result.as_dict()
    if report.is_json():
        print(json.dumps(data), flush=True)
    else:
        report.say(report.stats_block(data))
    return 0
