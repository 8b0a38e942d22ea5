"""Alembic environment. In-process (`backfill migrate`) it runs on the caller's connection
(`config.attributes["connection"]`); from the `alembic` command line it resolves the database
exactly as the `backfill` CLI does."""

from __future__ import annotations

from alembic import context

from backfill.migrate import include_object, one_transaction
from backfill.schema import metadata

config = context.config


def _run(connection) -> None:  # noqa: ANN001
    context.configure(
        connection=connection,
        target_metadata=metadata,
        include_object=include_object,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _standalone() -> None:
    from backfill.config import load_settings
    from backfill.db import engine_for, resolve

    x_args = context.get_x_argument(as_dictionary=True)
    settings = load_settings(x_args.get("database_url"))
    target = resolve(settings.database_url, settings.auth_token)
    engine = engine_for(target, must_exist=False)
    with one_transaction(engine) as connection:  # all of it or nothing, also on SQLite and libSQL
        _run(connection)


if context.is_offline_mode():
    raise SystemExit("offline (--sql) mode is not supported: run against a database")

connection = config.attributes.get("connection")
if connection is None:
    _standalone()
else:
    _run(connection)
