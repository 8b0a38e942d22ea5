"""The engine for a database URL: SQLite file, libSQL embedded file, libSQL remote, PostgreSQL.

Accepted forms (`--database-url`, `DATABASE_URL`, or `TURSO_URL` + `TURSO_AUTH_TOKEN`):

    ./memory.db, /abs/memory.db           SQLite file, stdlib driver
    sqlite:///memory.db                   SQLite file, stdlib driver
    sqlite+libsql:///memory.db, file:x.db libSQL embedded file
    libsql://HOST[:PORT]                  libSQL remote over TLS (token from TURSO_AUTH_TOKEN)
    libsql://HOST:PORT?tls=0, http://…    libSQL remote without TLS (a local sqld)
    postgresql://USER:PASS@HOST/DB        PostgreSQL (psycopg 3)
"""

from __future__ import annotations

import random
import re
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import parse_qsl, urlsplit

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import QueuePool

from backfill import lockwait
from backfill.config import Secret, Settings
from backfill.errors import ConfigError, EnvironmentProblem

_FIX = "pass --database-url or set DATABASE_URL (or TURSO_URL and TURSO_AUTH_TOKEN)"


@dataclass(frozen=True)
class Database:
    """A resolved database: the SQLAlchemy URL, driver arguments and a printable name."""

    url: sa.URL
    kind: str  # "sqlite" | "libsql" | "libsql-remote" | "postgresql"
    display: str
    path: Path | None = None
    connect_args: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_sqlite_family(self) -> bool:
        return self.kind != "postgresql"


def resolve(raw: str | None, auth_token: Secret | None = None) -> Database:
    """Turn what the user gave into a `Database`, or raise `ConfigError` naming the fix."""
    if not raw or not raw.strip():
        raise ConfigError(f"no database given: {_FIX}")
    raw = raw.strip()
    scheme = raw.split("://", 1)[0].lower() if "://" in raw else ""
    if scheme in ("", "file") or raw.startswith("file:"):
        if raw.startswith("file:"):
            path = raw[len("file:"):].lstrip("/") if raw.startswith("file://") else raw[len("file:"):]
            return _file_target(path, libsql=True)
        return _file_target(raw, libsql=False)
    if scheme in ("sqlite", "sqlite+pysqlite"):
        return _file_target(_sqlite_path(raw), libsql=False)
    if scheme == "sqlite+libsql":
        url = _parse(raw)
        if url.host:
            # a repeated parameter counts once, its last value (as parse_qsl gives for libsql://)
            query = {k: v if isinstance(v, str) else v[-1] for k, v in url.query.items()}
            return _remote(url.host, url.port, query, auth_token, secure_default=False)
        return _file_target(_sqlite_path(raw), libsql=True)
    if scheme in ("libsql", "https", "http", "wss", "ws"):
        parts = urlsplit(raw)
        if not parts.hostname:
            raise ConfigError(f"libSQL URL has no host: {redact_url(raw)}; use libsql://HOST")
        secure = scheme in ("libsql", "https", "wss")
        return _remote(parts.hostname, parts.port, dict(parse_qsl(parts.query)), auth_token, secure_default=secure)
    if scheme in ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2"):
        url = _parse(raw.replace("postgres://", "postgresql://", 1))
        url = url.set(drivername="postgresql+psycopg")
        if not url.database:
            raise ConfigError(f"PostgreSQL URL names no database: {redact_url(raw)}; use postgresql://USER:PASS@HOST/DB")
        return Database(url=url, kind="postgresql", display=url.render_as_string(hide_password=True))
    raise ConfigError(
        f"unsupported database URL scheme {scheme!r}: use a file path, sqlite:///FILE, "
        "sqlite+libsql:///FILE, libsql://HOST or postgresql://USER@HOST/DB"
    )


def _parse(raw: str) -> sa.URL:
    try:
        return make_url(raw)
    except Exception:
        raise ConfigError(f"malformed database URL {redact_url(raw)}: {_FIX}") from None


def _sqlite_path(raw: str) -> str:
    path = _parse(raw).database
    if not path or path == ":memory:":
        raise ConfigError(f"{redact_url(raw)} names no file: use sqlite:///path/to/memory.db")
    return path


def _file_target(path: str, *, libsql: bool) -> Database:
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"database path is a directory: {p}; give the database file")
    absolute = p.resolve()
    if libsql:
        url = sa.URL.create("sqlite+libsql", database=str(absolute))
        return Database(url=url, kind="libsql", display=f"libsql file {p}", path=absolute)
    url = sa.URL.create("sqlite", database=str(absolute))
    return Database(url=url, kind="sqlite", display=f"sqlite file {p}", path=absolute)


def _remote(
    host: str, port: int | None, query: dict[str, str], token: Secret | None, *, secure_default: bool
) -> Database:
    query = dict(query)
    inline = query.pop("authToken", None) or query.pop("auth_token", None)
    tls = query.pop("tls", None)
    secure = query.pop("secure", None)
    if tls is not None:
        secure_flag = tls.lower() not in ("0", "false", "no")
    elif secure is not None:
        secure_flag = secure.lower() in ("1", "true", "yes")
    else:
        secure_flag = secure_default
    token_value = inline or (token.reveal() if token else None)
    url = sa.URL.create(
        "sqlite+libsql",
        host=host,
        port=port,
        query={**query, **({"secure": "true"} if secure_flag else {})},
    )
    hostport = f"{host}:{port}" if port else host
    args: dict[str, Any] = {"auth_token": token_value} if token_value else {}
    return Database(url=url, kind="libsql-remote", display=f"libsql://{hostport}", connect_args=args)


_SECRETISH = re.compile(r"(?i)((?:authToken|auth_token|password|token)=)[^&\s]+")


def redact_url(raw: str) -> str:
    """A URL fit to print: password and token parameters replaced by ***."""
    text = _SECRETISH.sub(r"\1***", raw)
    try:
        parts = urlsplit(text)
        if parts.password:
            text = text.replace(f":{parts.password}@", ":***@", 1)
    except ValueError:
        pass
    return text


def engine_for(target: Database, *, must_exist: bool = True) -> Engine:
    """Create the engine. File databases that must exist are checked first: never created by a read."""
    if target.path is not None:
        if must_exist and not target.path.exists():
            raise ConfigError(
                f"database file not found: {target.path}; check --database-url, "
                "or run `backfill migrate --create` to create a new database there"
            )
        if not target.path.parent.exists():
            raise ConfigError(f"folder does not exist: {target.path.parent}; create it or fix --database-url")
    kwargs: dict[str, Any] = {}
    if target.kind == "sqlite":
        kwargs["connect_args"] = {"timeout": 30}
    elif target.kind in ("libsql", "libsql-remote"):
        kwargs["connect_args"] = dict(target.connect_args)
        if target.kind == "libsql-remote":  # the dialect's default SingletonThreadPool shares one stream per thread
            kwargs["poolclass"] = QueuePool
            kwargs["pool_recycle"] = 8  # servers expire idle streams (sqld after ~10 s): never reuse an old one
    elif target.kind == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": 10}
        kwargs["pool_pre_ping"] = True
    engine = sa.create_engine(target.url, **kwargs)
    _engines.add(engine)
    if target.kind == "sqlite":
        _sqlite_pragmas(engine)
    elif target.kind == "libsql":
        _busy_timeout(engine)
    elif target.kind == "postgresql":
        _lz4_toast(engine)
    _discard_broken_connections(engine)
    return engine


_engines: weakref.WeakSet[Engine] = weakref.WeakSet()  # every engine made here, for close_all


def close_all() -> None:
    """Close the pooled connections of every engine still alive (before a process leaves by os._exit)."""
    for engine in list(_engines):
        engine.dispose()


def _sqlite_pragmas(engine: Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 30000")
        cur.close()
        # a TEXT value that is not valid UTF-8 (SQLite stores whatever it is given) must not stop a
        # job: undecodable bytes become lone surrogates, which every text recipe removes
        dbapi_conn.text_factory = _lenient_text


def _busy_timeout(engine: Engine) -> None:
    """An embedded libSQL file waits for another process's write lock instead of failing at once with
    "database is locked": in Python, with the other threads running (lockwait.py: the driver's own busy
    timeout keeps the GIL)."""
    @sa.event.listens_for(engine, "do_connect")
    def _connect(dialect, _record, cargs, cparams):  # noqa: ANN001, ANN202
        return lockwait.Connection(dialect.loaded_dbapi.connect(*cargs, **cparams))


def _lz4_toast(engine: Engine) -> None:
    """A stored vector is ~30 KB of JSON text, which PostgreSQL compresses as it writes it: lz4 (14+, in
    common builds) takes a third of the time of the default pglz (scripts/bench (f)). This session's writes
    only; the column keeps its settings. A server without lz4 keeps pglz."""
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        try:
            with dbapi_conn.cursor() as cur:
                cur.execute("SET default_toast_compression = lz4")
            dbapi_conn.commit()
        except Exception:  # PostgreSQL before 14, or built without lz4
            dbapi_conn.rollback()


def _lenient_text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


PROBE_ATTEMPTS = 3  # a link dropped under the first statement is tried again; a server that refuses is not waited for


def probe(engine: Engine, target: Database, settings: Settings | None = None) -> None:
    """Open one connection and run `SELECT 1`; any failure becomes a one-line ConfigError."""
    # on SQLite the first read of the schema is what finds "file is not a database"
    check = "SELECT count(*) FROM sqlite_master" if target.is_sqlite_family else "SELECT 1"
    for attempt in range(PROBE_ATTEMPTS):
        try:
            with engine.connect() as conn:
                conn.execute(sa.text(check))
            return
        except Exception as exc:
            if attempt + 1 < PROBE_ATTEMPTS and _dropped(exc):
                time.sleep(RETRY_BASE_S * 2 ** attempt)
                continue
            _refuse(exc, target, settings)


def _dropped(exc: BaseException) -> bool:
    text = _text(exc)
    return bool(_BROKEN.search(text)) and "refused" not in text.lower()


def _refuse(exc: BaseException, target: Database, settings: Settings | None) -> NoReturn:
    """The probe's failure as a typed one-line error (driver errors differ per backend; libSQL's are plain
    ValueErrors)."""
    problem = environment_problem(exc, target)
    if problem:
        raise EnvironmentProblem(problem) from None
    raise ConfigError(f"cannot connect to {target.display}: {describe_error(exc, settings, target)}") from None


def describe_error(exc: BaseException, settings: Settings | None = None, target: Database | None = None) -> str:
    """One line, secrets removed, with a hint for the common causes."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text[:300]
    if settings is not None:
        text = settings.redact(text)
    if target is not None:
        token = target.connect_args.get("auth_token")
        if token:
            text = text.replace(token, "***")
    lowered = text.lower()
    if "401" in lowered or "unauthorized" in lowered or "auth" in lowered and "fail" in lowered:
        return f"{text} (check TURSO_AUTH_TOKEN)"
    if "password authentication failed" in lowered:
        return f"{text} (check the user and password in DATABASE_URL)"
    if "not a database" in lowered:
        return f"{text} (not a SQLite database: check --database-url)"
    return text


# --- the environment, not the input: full disk, read-only file or mount, no room for the journal ---

_ENVIRONMENT = (
    (re.compile(r"(?i)database or disk is full|no space left on device|could not extend file|disk quota exceeded"),
     "the disk holding {where} is full: free some space, then run the same command again "
     "(committed batches are kept)"),
    (re.compile(r"(?i)attempt to write a readonly database|read-only file system|readonly database|"
                r"read-only transaction|read only database"),
     "{where} is read-only (the file, its folder or its mount): make it writable, or point "
     "--database-url at a writable copy"),
    (re.compile(r"(?i)unable to open database file|cannot open database file"),
     "cannot open {where} or create its journal beside it: the folder must be writable and exist "
     "(check permissions, chattr, a read-only mount)"),
    (re.compile(r"(?i)disk i/o error"),
     "disk I/O error on {where}: check the disk (space, mount, hardware), then run the same command again"),
)


def environment_problem(exc: BaseException, target: Database | None = None) -> str | None:
    """One line naming the cause and the fix when `exc` (or what it wraps) is the machine's fault
    (exit 5), not a bug; None otherwise."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = _text(current)
        if isinstance(current, OSError) and current.errno in (28, 30):  # ENOSPC, EROFS
            text += " no space left on device" if current.errno == 28 else " read-only file system"
        for pattern, message in _ENVIRONMENT:
            if pattern.search(text):
                if target is None:
                    where = "the database"
                elif target.path is not None:
                    where = str(target.path)
                else:
                    where = target.display
                return message.format(where=where)
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return None


# --- database faults: discard broken connections, retry transient errors ------------------------

_TRANSIENT = re.compile(
    rf"(?i){lockwait.LOCKED}|"
    r"connection closed before message completed|stream not found|baton is invalid|stream expired|"
    r"http error|connection (?:refused|reset|closed|aborted)|broken pipe|server closed the connection|"
    r"terminating connection|could not receive data|ssl syscall error|deadlock detected|"
    r"could not serialize access|timed out|timeout expired|"
    # PostgreSQL starting up, shutting down or restarting (SQLSTATE 57P01-57P03), and the link it dropped
    r"the database system is (?:starting up|shutting down|in recovery|not (?:yet )?accepting connections)|"
    r"terminating connection due to (?:administrator command|crash of another server process)|"
    r"server closed the connection unexpectedly|no connection to the server|consuming input failed|"
    r"server conn crashed"
)
# SQLSTATEs of a PostgreSQL server going away or coming back: admin_shutdown, crash_shutdown, cannot_connect_now
_PG_RESTARTING = frozenset({"57P01", "57P02", "57P03"})
_BROKEN = re.compile(
    r"(?i)connection closed before message completed|stream not found|baton is invalid|stream expired|"
    r"http error|connection (?:refused|reset|closed|aborted)|broken pipe"
)


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {getattr(exc, 'orig', None) or exc}"


def is_transient(exc: BaseException) -> bool:
    """A database error worth retrying: busy/locked, a dropped connection or stream, a PG disconnect."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, (sa.exc.DBAPIError, ValueError, OSError)):  # libSQL raises plain ValueError
        return False
    if getattr(getattr(exc, "orig", None), "sqlstate", None) in _PG_RESTARTING:
        return True
    return bool(_TRANSIENT.search(_text(exc)))


def _discard_broken_connections(engine: Engine) -> None:
    """libSQL errors are plain ValueErrors that SQLAlchemy does not recognise as disconnects; after a
    dropped response the connection's stream is gone for good. Mark it a disconnect so the pool
    throws that one connection away (and keeps the others)."""

    @sa.event.listens_for(engine, "handle_error")
    def _on_error(ctx):  # noqa: ANN001, ANN202
        if not ctx.is_disconnect and _BROKEN.search(_text(ctx.original_exception)):
            ctx.is_disconnect = True
            ctx.invalidate_pool_on_disconnect = False


def lock_for_write(conn: Connection) -> None:
    """Take the write lock at the start of the caller's transaction, for the commit alone: everything else
    is prepared before. On the SQLite family that is `BEGIN IMMEDIATE` (a deferred transaction that reads
    before it writes can deadlock with another writer, and holds its read lock meanwhile); where the driver
    has begun a transaction already, a write that changes nothing takes the lock. PostgreSQL locks rows
    as they are read FOR UPDATE (writer.current): nothing to do here."""
    if conn.dialect.name != "sqlite":
        return
    raw = conn.connection.driver_connection
    if getattr(raw, "in_transaction", True):
        conn.exec_driver_sql("UPDATE backfill_jobs SET id = id WHERE 0 = 1")
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


T = TypeVar("T")

RETRY_BUDGET_S = 45.0  # longer than a server takes to expire a stream left holding the write lock (sqld: ~10 s)
RETRY_BASE_S = 0.1
RETRY_CAP_S = 2.0


def retrying(engine: Engine, fn: Callable[[Connection], T], *, landed: Callable[[Connection], bool] | None = None,
             budget_s: float = RETRY_BUDGET_S, write: bool = True) -> T:
    """Run `fn(conn)` in one transaction (`write`) or on one connection, retrying busy/locked
    databases and dropped connections with jittered exponential backoff for up to `budget_s`
    seconds (a stream orphaned by a lost answer may hold the write lock until the server expires
    it). All or nothing: a failed
    attempt's transaction is rolled back (or never committed) before the next one starts.

    A commit whose answer was lost may still have landed; `landed(conn)` is asked before each
    retry and, when it says so, the work is not done twice (the batch's counters stay exact)."""
    give_up = time.monotonic() + budget_s
    attempt = 0
    while True:
        attempt += 1
        try:
            if attempt > 1 and landed is not None:
                with engine.connect() as conn:
                    if landed(conn):
                        return None  # type: ignore[return-value]
            if write:
                with engine.begin() as conn:
                    return fn(conn)
            with engine.connect() as conn:
                return fn(conn)
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() >= give_up:
                raise
            delay = min(RETRY_CAP_S, RETRY_BASE_S * 2 ** min(attempt - 1, 10))
            time.sleep(delay * (0.5 + random.random() / 2))
