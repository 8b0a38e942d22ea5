"""A small libSQL *remote* server (Hrana over HTTP) on loopback, for tests.

``sqld`` is not available on every machine, so this module implements the part of
the Hrana-over-HTTP protocol (version 3: ``POST /v3/pipeline`` and
``POST /v3/cursor``) that the client sends, on top of the standard-library
:mod:`sqlite3` module for ``libsql_experimental`` (and therefore the
``sqlite+libsql://`` SQLAlchemy dialect) to talk to it as to a real remote
libSQL database.

Important: ``libsql_experimental`` keeps the GIL while it waits on the network,
so a server running on a thread of the *same* process as the client would
never get to answer.  :class:`LibsqlServer` therefore runs the server in a
child process (``python -m support.libsql_server``, started by
:meth:`LibsqlServer.start`; not a command for people) and talks to it through
small loopback control endpoints for :meth:`drop_next` and :meth:`stats`.

Usage::

    with LibsqlServer(str(tmp_path / "db.sqlite"), auth_token="t") as srv:
        engine = create_engine(
            f"sqlite+libsql://127.0.0.1:{srv.port}/",
            connect_args={"auth_token": "t"},
        )

Streams: every baton belongs to one stream, and every stream owns one
:mod:`sqlite3` connection (``isolation_level=None``, so the client's own
``BEGIN``/``COMMIT``/``ROLLBACK`` statements are what governs transactions; 5 s
busy timeout).  Requests on a stream are serialized.  A stream ends with a
``close`` request, or when it has been idle longer than ``idle_timeout``
(checked on every request and by a background reaper); ending a stream rolls
back whatever transaction it left open.  Batons are rotated on every response,
as sqld does (sqld itself expires idle HTTP streams much sooner, after ~10 s).

What libsql_experimental 0.0.55 actually sends (observed):

* ``POST /v3/pipeline`` with ``Authorization: Bearer <token>``; no version probe.
* Before every statement a ``describe``; its ``cols`` decide the path: with
  columns the statement runs through ``POST /v3/cursor`` (newline-delimited
  JSON: a ``{"baton", "base_url"}`` line, then ``step_begin``/``row``/
  ``step_end``/``step_error`` entries), without columns through a pipeline
  ``batch`` (+ ``get_autocommit``, + ``close`` when back in autocommit).  So
  ``describe`` must report result columns accurately, PRAGMAs included.
* Transactions are the driver's (sqlite3-style legacy control): ``BEGIN``
  before the first DML, ``COMMIT``/``ROLLBACK`` from ``commit()``/
  ``rollback()``, each a one-step batch.  ``executescript`` is one batch whose
  steps are chained with ``{"type": "ok", "step": i-1}`` conditions.
* The driver re-formats SQL before executing it (``count(*)`` -> ``count (*)``,
  a trailing ``;``), while ``describe`` gets the original text.
* ``Connection.close()`` sends ``close`` (unless a Cursor object is still alive).
* Errors all surface as plain ``ValueError`` ("Hrana: `stream error: ...`",
  "Hrana: `api error: `status=401 ...`", "Hrana: `http error: `connection
  closed before message completed``").

Also implemented: ``execute`` (the plain one-statement request), so raw-HTTP
tests can read values back.
"""

from __future__ import annotations

import argparse
import base64
import collections
import hmac
import json
import math
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["LibsqlServer", "split_sql"]

HOST = "127.0.0.1"
DEFAULT_IDLE_TIMEOUT = 60.0
BUSY_TIMEOUT_S = 5.0

_AUTH_ENV = "BACKFILL_LIBSQL_AUTH_TOKEN"
_CONTROL_ENV = "BACKFILL_LIBSQL_CONTROL_TOKEN"
_CONTROL_HEADER = "X-Backfill-Control"
_CONTROL_PREFIX = "/_backfill/"
_DEBUG_ENV = "BACKFILL_LIBSQL_SERVER_DEBUG"

_PIPELINE_PATHS = {"/v3/pipeline"}
_CURSOR_PATHS = {"/v3/cursor"}


class HranaError(Exception):
    """An error reported to the client as a Hrana ``Error`` object."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message}
        if self.code:
            out["code"] = self.code
        return out


class _ProtocolError(Exception):
    """A request the server rejects as a whole, with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _sqlite_error(exc: sqlite3.Error) -> HranaError:
    code = getattr(exc, "sqlite_errorname", None)
    if not code:
        code = "SQLITE_MISUSE" if isinstance(exc, sqlite3.ProgrammingError) else "SQLITE_ERROR"
    return HranaError(str(exc), code)


# ---------------------------------------------------------------- values


def _b64decode(text: str) -> bytes:
    text = text.strip()
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        return base64.urlsafe_b64decode(text)


def decode_value(value: Any) -> Any:
    """Hrana ``Value`` -> Python value for :mod:`sqlite3`."""
    if not isinstance(value, dict):
        raise HranaError(f"invalid value: {value!r}", "HRANA_PROTO_ERROR")
    kind = value.get("type")
    if kind == "null":
        return None
    if kind == "integer":
        return int(value["value"])
    if kind == "float":
        return float(value["value"])
    if kind == "text":
        return str(value["value"])
    if kind == "blob":
        return _b64decode(value.get("base64", ""))
    raise HranaError(f"unknown value type: {kind!r}", "HRANA_PROTO_ERROR")


def encode_value(value: Any) -> dict[str, Any]:
    """Python value from :mod:`sqlite3` -> Hrana ``Value``."""
    if value is None:
        return {"type": "null"}
    if isinstance(value, bool):
        return {"type": "integer", "value": str(int(value))}
    if isinstance(value, int):
        return {"type": "integer", "value": str(value)}
    if isinstance(value, float):
        if not math.isfinite(value):
            # JSON has no Infinity/NaN; serde_json (sqld) writes null here, the
            # client then fails to parse the value.  Keep it valid JSON at least.
            return {"type": "float", "value": None}
        return {"type": "float", "value": value}
    if isinstance(value, str):
        return {"type": "text", "value": value}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"type": "blob", "base64": base64.b64encode(bytes(value)).decode("ascii").rstrip("=")}
    return {"type": "text", "value": str(value)}


# ---------------------------------------------------------------- SQL helpers


def split_sql(sql: str) -> list[str]:
    """Split a script into complete statements (trigger bodies and strings stay whole)."""
    statements: list[str] = []
    pieces = sql.split(";")
    current = ""
    for index, piece in enumerate(pieces):
        current += piece
        if index < len(pieces) - 1:
            current += ";"
            if not sqlite3.complete_statement(current):
                continue
        if current.strip().strip(";").strip():
            statements.append(current)
        current = ""
    return statements


_WRITE_ACTIONS = {
    getattr(sqlite3, name)
    for name in (
        "SQLITE_ALTER_TABLE", "SQLITE_ANALYZE", "SQLITE_CREATE_INDEX",
        "SQLITE_CREATE_TABLE", "SQLITE_CREATE_TEMP_INDEX", "SQLITE_CREATE_TEMP_TABLE",
        "SQLITE_CREATE_TEMP_TRIGGER", "SQLITE_CREATE_TEMP_VIEW", "SQLITE_CREATE_TRIGGER",
        "SQLITE_CREATE_VIEW", "SQLITE_CREATE_VTABLE", "SQLITE_DELETE",
        "SQLITE_DROP_INDEX", "SQLITE_DROP_TABLE", "SQLITE_DROP_TEMP_INDEX",
        "SQLITE_DROP_TEMP_TABLE", "SQLITE_DROP_TEMP_TRIGGER", "SQLITE_DROP_TEMP_VIEW",
        "SQLITE_DROP_TRIGGER", "SQLITE_DROP_VIEW", "SQLITE_DROP_VTABLE", "SQLITE_INSERT",
        "SQLITE_REINDEX", "SQLITE_UPDATE",
    )
    if hasattr(sqlite3, name)
}

# Statements that never return rows and must not be run speculatively by describe.
_NO_ROWS_KEYWORDS = {
    "BEGIN", "COMMIT", "END", "ROLLBACK", "SAVEPOINT", "RELEASE", "VACUUM", "ATTACH", "DETACH",
}


# ---------------------------------------------------------------- streams


class _Stream:
    def __init__(self, db_path: str) -> None:
        self.conn = sqlite3.connect(
            db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        self.conn.text_factory = lambda b: b.decode("utf-8", "replace")
        self.lock = threading.Lock()
        self.last_used = time.monotonic()
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.conn.in_transaction:
                self.conn.rollback()
        except sqlite3.Error:
            pass
        try:
            self.conn.close()
        except sqlite3.Error:
            pass

    # -- statements

    @staticmethod
    def _sql(stmt: dict[str, Any]) -> str:
        if stmt.get("sql") is None:
            raise HranaError("statement has no sql", "HRANA_PROTO_ERROR")
        return stmt["sql"]

    def execute(self, stmt: dict[str, Any]) -> tuple[list[dict[str, Any]], list[list[Any]], dict[str, Any]]:
        """Run one statement; return (cols, python rows, extra result fields)."""
        sql = self._sql(stmt)
        args = [decode_value(v) for v in stmt.get("args") or []]
        named = {}
        for item in stmt.get("named_args") or []:
            name = str(item["name"])
            if name[:1] in ":@$?":
                name = name[1:]
            named[name] = decode_value(item["value"])
        if args and named:
            raise HranaError(
                "mixing positional and named arguments is not supported by this test server",
                "ARGS_INVALID",
            )
        params: Any = named if named else args
        if len(split_sql(sql)) > 1:
            raise HranaError("SQL string contains more than one statement", "SQL_MANY_STATEMENTS")
        started = time.perf_counter()
        try:
            cur = self.conn.execute(sql, params)
            rows = cur.fetchall()
        except sqlite3.Error as exc:
            raise _sqlite_error(exc) from None
        except (OverflowError, ValueError, TypeError) as exc:
            raise HranaError(str(exc), "SQLITE_MISUSE") from None
        duration_ms = (time.perf_counter() - started) * 1000.0
        cols = [{"name": d[0], "decltype": None} for d in (cur.description or [])]
        affected = cur.rowcount if cur.rowcount is not None and cur.rowcount >= 0 else 0
        lastrowid = cur.lastrowid
        extra = {
            "affected_row_count": affected,
            "last_insert_rowid": None if lastrowid is None else str(lastrowid),
            "rows_read": len(rows),
            "rows_written": affected,
            "query_duration_ms": duration_ms,
        }
        if not stmt.get("want_rows", True):
            rows = []
        return cols, rows, extra

    def stmt_result(self, stmt: dict[str, Any]) -> dict[str, Any]:
        cols, rows, extra = self.execute(stmt)
        return {
            "cols": cols,
            "rows": [[encode_value(v) for v in row] for row in rows],
            **extra,
        }

    def _cond(self, cond: dict[str, Any] | None, results: list, errors: list) -> bool:
        if cond is None:
            return True
        kind = cond.get("type")
        if kind == "ok":
            step = int(cond["step"])
            return step < len(results) and results[step] is not None
        if kind == "error":
            step = int(cond["step"])
            return step < len(errors) and errors[step] is not None
        if kind == "not":
            return not self._cond(cond["cond"], results, errors)
        if kind == "and":
            return all(self._cond(c, results, errors) for c in cond["conds"])
        if kind == "or":
            return any(self._cond(c, results, errors) for c in cond["conds"])
        if kind == "is_autocommit":
            return not self.conn.in_transaction
        raise HranaError(f"unknown batch condition {kind!r}", "HRANA_PROTO_ERROR")

    def batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        results: list[dict[str, Any] | None] = []
        errors: list[dict[str, Any] | None] = []
        for step in batch.get("steps") or []:
            if not self._cond(step.get("condition"), results, errors):
                results.append(None)
                errors.append(None)
                continue
            try:
                results.append(self.stmt_result(step["stmt"]))
                errors.append(None)
            except HranaError as exc:
                results.append(None)
                errors.append(exc.to_json())
        return {"step_results": results, "step_errors": errors}

    def cursor_entries(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        results: list[Any] = []
        errors: list[Any] = []
        for index, step in enumerate(batch.get("steps") or []):
            if not self._cond(step.get("condition"), results, errors):
                results.append(None)
                errors.append(None)
                continue
            try:
                cols, rows, extra = self.execute(step["stmt"])
            except HranaError as exc:
                results.append(None)
                errors.append(exc.to_json())
                entries.append({"type": "step_error", "step": index, "error": exc.to_json()})
                continue
            results.append(True)
            errors.append(None)
            entries.append({"type": "step_begin", "step": index, "cols": cols})
            for row in rows:
                entries.append({"type": "row", "row": [encode_value(v) for v in row]})
            entries.append(
                {
                    "type": "step_end",
                    "affected_row_count": extra["affected_row_count"],
                    "last_insert_rowid": extra["last_insert_rowid"],
                }
            )
        return entries

    def _explain(self, sql: str, prefix: str = "EXPLAIN ") -> tuple[list[Any], int]:
        """EXPLAIN ``sql`` with NULLs bound to every parameter; return (program, n_params)."""
        params: list[None] = []
        for _ in range(2):
            try:
                # (Python >= 3.12 warns about binding named parameters by position.)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return self.conn.execute(prefix + sql, params).fetchall(), len(params)
            except sqlite3.ProgrammingError as exc:
                match = re.search(r"statement uses (\d+)", str(exc))
                if not match or params:
                    raise
                params = [None] * int(match.group(1))
        raise AssertionError("unreachable")

    def _columns_of(self, sql: str, count: int) -> list[dict[str, Any]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            cur = self.conn.execute(sql, [None] * count)
        try:
            return [{"name": d[0], "decltype": None} for d in (cur.description or [])]
        finally:
            cur.close()

    def describe(self, req: dict[str, Any]) -> dict[str, Any]:
        """Hrana ``describe``: parameters, result columns, explain/read-only flags.

        The stdlib module cannot prepare without stepping, so: EXPLAIN (which
        only prepares) gives parameters and, through the authorizer, whether
        the statement writes; result columns come from running read-only
        statements once, and writers with a RETURNING clause inside a
        SAVEPOINT that is rolled back.  ``decltype`` is always null.
        """
        sql = self._sql(req)
        if len(split_sql(sql)) > 1:
            raise HranaError("SQL string contains more than one statement", "SQL_MANY_STATEMENTS")
        writes: list[int] = []

        def authorizer(action: int, *_: Any) -> int:
            if action in _WRITE_ACTIONS:
                writes.append(action)
            return sqlite3.SQLITE_OK

        words = sql.strip().split(None, 1)
        head = words[0].upper().rstrip(";") if words else ""
        pragma_assign = head == "PRAGMA" and "=" in sql
        self.conn.set_authorizer(authorizer)
        try:
            # EXPLAIN prepares the statement (running the authorizer) without executing it;
            # an EXPLAIN statement itself (not explainable again) does not execute either.
            program, count = self._explain(sql, "" if head == "EXPLAIN" else "EXPLAIN ")
            if head == "EXPLAIN":
                program = []
        except sqlite3.Error as exc:
            if head != "PRAGMA" or pragma_assign:
                raise _sqlite_error(exc) from None
            # "EXPLAIN PRAGMA temp.x(...)" can fail before the temp schema exists,
            # although the pragma itself works; query pragmas are read-only anyway.
            program, count = [], 0
        finally:
            self.conn.set_authorizer(None)
        names: dict[int, str] = {}
        result_width = 0
        for row in program:  # addr, opcode, p1, p2, p3, p4, p5, comment
            if row[1] == "Variable" and row[5]:
                names[int(row[2])] = str(row[5])
            elif row[1] == "ResultRow":
                result_width = max(result_width, int(row[3]))
        readonly = not writes and not pragma_assign
        cols: list[dict[str, Any]] = []
        try:
            if head in _NO_ROWS_KEYWORDS:
                cols = []
            elif pragma_assign:
                pragma = re.sub(r"^\w+\.", "", sql.strip()[6:].split("=", 1)[0].strip())
                cols = [{"name": pragma, "decltype": None}] if result_width else []
            elif readonly:
                cols = self._columns_of(sql, count)
            elif result_width:  # a writer that returns rows (RETURNING): run it, then undo it
                self.conn.execute("SAVEPOINT hrana_describe")
                try:
                    cols = self._columns_of(sql, count)
                finally:
                    self.conn.execute("ROLLBACK TO hrana_describe")
                    self.conn.execute("RELEASE hrana_describe")
        except sqlite3.Error:
            # (the client insists on string names)
            cols = [{"name": f"column{i + 1}", "decltype": None} for i in range(result_width)]
        return {
            "params": [{"name": names.get(i)} for i in range(1, count + 1)],
            "cols": cols,
            "is_explain": head == "EXPLAIN",
            "is_readonly": readonly,
        }

    # -- one stream request

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        kind = req.get("type")
        if kind == "execute":
            return {"type": "execute", "result": self.stmt_result(req["stmt"])}
        if kind == "batch":
            return {"type": "batch", "result": self.batch(req["batch"])}
        if kind == "describe":
            return {"type": "describe", "result": self.describe(req)}
        if kind == "get_autocommit":
            return {"type": "get_autocommit", "is_autocommit": not self.conn.in_transaction}
        if kind == "close":
            self.close()
            return {"type": "close"}
        raise HranaError(f"unknown request type {kind!r}", "HRANA_PROTO_ERROR")


class _Backend:
    """Protocol state shared by all HTTP handler threads."""

    def __init__(
        self,
        db_path: str,
        auth_token: str | None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        control_token: str | None = None,
        debug: bool = False,
    ) -> None:
        self.db_path = db_path
        self.auth_token = auth_token or None
        self.control_token = control_token or None
        self.idle_timeout = idle_timeout
        self.debug = debug
        self.lock = threading.Lock()
        self.streams: dict[str, _Stream] = {}  # baton -> stream
        self.requests = 0
        # pending drops, oldest first: (after_processing, request kind or None for any)
        self.drop_plan: collections.deque[tuple[bool, str | None]] = collections.deque()
        self.dropped = 0
        self.unauthorized = 0
        self.streams_opened = 0
        self.expired = 0
        self._stopped = threading.Event()
        threading.Thread(target=self._reaper, name="libsql-server-reaper", daemon=True).start()

    def _reaper(self) -> None:
        interval = min(1.0, max(0.05, self.idle_timeout / 4))
        while not self._stopped.wait(interval):
            self._reap_idle()

    def log(self, *parts: Any) -> None:
        if self.debug:
            print("[libsql-server]", *parts, file=sys.stderr, flush=True)

    def authorized(self, header: str | None) -> bool:
        if self.auth_token is None:
            return True
        if not header:
            return False
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer":  # the client sends "Bearer <token>"
            return False
        return hmac.compare_digest(value.strip().encode(), self.auth_token.encode())

    def count_request(self, kinds: set[str]) -> str | None:
        """Count a Hrana request; say whether (and when) to drop its connection.

        ``kinds`` are the request types in it ("cursor" for the cursor endpoint).
        Returns None, "before" (drop without processing) or "after" (process,
        then drop instead of answering).
        """
        with self.lock:
            self.requests += 1
            if self.drop_plan:
                after, kind = self.drop_plan[0]
                if kind is None or kind in kinds:
                    self.drop_plan.popleft()
                    self.dropped += 1
                    return "after" if after else "before"
            return None

    def drop_next(self, n: int, after_processing: bool = False, kind: str | None = None) -> None:
        with self.lock:
            self.drop_plan.extend([(bool(after_processing), kind)] * max(0, int(n)))

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {
                "requests": self.requests,
                "drop_pending": len(self.drop_plan),
                "dropped": self.dropped,
                "unauthorized": self.unauthorized,
                "streams_open": len(self.streams),
                "streams_opened": self.streams_opened,
                "streams_expired": self.expired,
            }

    def _reap_idle(self) -> None:
        now = time.monotonic()
        expired: list[_Stream] = []
        with self.lock:
            for baton, stream in list(self.streams.items()):
                if now - stream.last_used > self.idle_timeout:
                    del self.streams[baton]
                    expired.append(stream)
                    self.expired += 1
        for stream in expired:
            with stream.lock:
                stream.close()

    def _acquire(self, baton: str | None) -> _Stream:
        self._reap_idle()
        with self.lock:
            if baton is None:
                stream = _Stream(self.db_path)
                self.streams_opened += 1
                return stream
            stream = self.streams.pop(baton, None)
        if stream is None:
            raise _ProtocolError(
                HTTPStatus.BAD_REQUEST, "Stream not found: the baton is invalid or the stream expired"
            )
        return stream

    def _release(self, stream: _Stream) -> str | None:
        stream.last_used = time.monotonic()
        if stream.closed:
            return None
        baton = secrets.token_urlsafe(18)
        with self.lock:
            self.streams[baton] = stream
        return baton

    def pipeline(self, body: dict[str, Any]) -> dict[str, Any]:
        stream = self._acquire(body.get("baton"))
        results: list[dict[str, Any]] = []
        with stream.lock:
            try:
                for req in body.get("requests") or []:
                    if stream.closed:
                        error = HranaError("stream is closed", "STREAM_CLOSED")
                        results.append({"type": "error", "error": error.to_json()})
                        continue
                    try:
                        results.append({"type": "ok", "response": stream.handle(req)})
                    except HranaError as exc:
                        results.append({"type": "error", "error": exc.to_json()})
                    except (KeyError, TypeError, ValueError) as exc:
                        error = HranaError(f"malformed request: {exc!r}", "HRANA_PROTO_ERROR")
                        results.append({"type": "error", "error": error.to_json()})
            finally:
                baton = self._release(stream)
        return {"baton": baton, "base_url": None, "results": results}

    def cursor(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        stream = self._acquire(body.get("baton"))
        with stream.lock:
            try:
                try:
                    entries = stream.cursor_entries(body.get("batch") or {})
                except HranaError as exc:
                    entries = [{"type": "error", "error": exc.to_json()}]
            finally:
                baton = self._release(stream)
        return [{"baton": baton, "base_url": None}, *entries]

    def close_all(self) -> None:
        self._stopped.set()
        with self.lock:
            streams = list(self.streams.values())
            self.streams.clear()
        for stream in streams:
            with stream.lock:
                stream.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "backfill-libsql-test-server/1"
    backend: _Backend  # set on the server subclass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        self.backend.log(self.address_string(), format % args)

    # -- plumbing

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def setup(self) -> None:
        super().setup()
        try:  # small request/response pairs: don't let Nagle + delayed ACK add 40 ms each
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def _send(self, status: int, payload: Any, content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        # headers and body in one write
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD":
            self._headers_buffer.append(data)
        self.flush_headers()

    def _send_error(self, status: int, message: str) -> None:
        self._send(status, {"error": message, "message": message})

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- verbs

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        path = self.path.split("?", 1)[0]
        if path.startswith(_CONTROL_PREFIX):
            self._control(path, b"")
        else:
            self._send_error(HTTPStatus.NOT_FOUND, f"not found: {path}")

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        path = self.path.split("?", 1)[0]
        body = self._read_body()
        backend = self.backend
        if path.startswith(_CONTROL_PREFIX):
            self._control(path, body)
            return
        if path not in _PIPELINE_PATHS and path not in _CURSOR_PATHS:
            self._send_error(HTTPStatus.NOT_FOUND, f"not found: {path}")
            return
        request: Any = None
        bad_json: str | None = None
        try:
            request = json.loads(body or b"{}")
            if not isinstance(request, dict):
                raise ValueError("request body must be a JSON object")
        except ValueError as exc:
            bad_json = str(exc)
        kinds = {"cursor"} if path in _CURSOR_PATHS else set()
        if isinstance(request, dict):
            for item in request.get("requests") or []:
                if isinstance(item, dict):
                    kinds.add(str(item.get("type")))
        drop = backend.count_request(kinds)
        backend.log("POST", path, body[:4000].decode("utf-8", "replace"))
        if drop == "before":
            backend.log("dropping connection without processing the request")
            self._drop()
            return
        if not backend.authorized(self.headers.get("Authorization")):
            with backend.lock:
                backend.unauthorized += 1
            self._send_error(HTTPStatus.UNAUTHORIZED, "Unauthorized: missing or invalid auth token")
            return
        if bad_json is not None:
            self._send_error(HTTPStatus.BAD_REQUEST, f"invalid JSON body: {bad_json}")
            return
        try:
            if path in _CURSOR_PATHS:
                lines = backend.cursor(request)
                data = b"".join(json.dumps(line).encode("utf-8") + b"\n" for line in lines)
                content_type = "text/plain"
            else:
                data = json.dumps(backend.pipeline(request)).encode("utf-8")
                content_type = "application/json"
        except _ProtocolError as exc:
            if drop == "after":
                self._drop()
            else:
                self._send_error(exc.status, exc.message)
            return
        backend.log("->", data[:4000].decode("utf-8", "replace"))
        if drop == "after":
            backend.log("dropping connection after processing the request")
            self._drop()
            return
        self._send(HTTPStatus.OK, data, content_type)

    def _control(self, path: str, body: bytes) -> None:
        backend = self.backend
        token = self.headers.get(_CONTROL_HEADER) or ""
        if backend.control_token is None or not hmac.compare_digest(
            token.encode(), backend.control_token.encode()
        ):
            self._send_error(HTTPStatus.FORBIDDEN, "control endpoints need the control token")
            return
        if path == _CONTROL_PREFIX + "stats":
            self._send(HTTPStatus.OK, backend.stats())
        elif path == _CONTROL_PREFIX + "drop_next":
            try:
                n = int(json.loads(body or b"{}").get("n", 1))
            except (ValueError, AttributeError):
                self._send_error(HTTPStatus.BAD_REQUEST, "body must be {\"n\": int}")
                return
            payload = json.loads(body or b"{}")
            backend.drop_next(n, bool(payload.get("after_processing")), payload.get("kind"))
            self._send(HTTPStatus.OK, backend.stats())
        else:
            self._send_error(HTTPStatus.NOT_FOUND, f"not found: {path}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    backend: _Backend


def serve(
    db_path: str,
    auth_token: str | None = None,
    port: int = 0,
    *,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    control_token: str | None = None,
    debug: bool = False,
) -> _Server:
    """Bind (but do not start) a server on 127.0.0.1; call ``serve_forever()`` on it."""
    backend = _Backend(db_path, auth_token, idle_timeout, control_token, debug)
    handler = type("_BoundHandler", (_Handler,), {"backend": backend})
    server = _Server((HOST, port), handler)
    server.backend = backend
    return server


# ---------------------------------------------------------------- public API


class LibsqlServer:
    """A loopback libSQL remote server backed by the SQLite file ``db_path``, in a child process.

    ``url`` is the project's form (``libsql://127.0.0.1:PORT?tls=0``); ``http_url`` is what
    ``libsql_experimental.connect`` takes.  Set ``BACKFILL_LIBSQL_SERVER_DEBUG=1`` to log every
    request and response to stderr.
    """

    def __init__(
        self,
        db_path: str,
        auth_token: str | None = None,
        port: int = 0,
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        startup_timeout: float = 15.0,
    ) -> None:
        self.db_path = str(db_path)
        self.auth_token = auth_token
        self._requested_port = int(port)
        self.idle_timeout = idle_timeout
        self.startup_timeout = startup_timeout
        self._control_token = secrets.token_urlsafe(24)
        self._proc: subprocess.Popen[str] | None = None
        self.port: int | None = None

    # -- lifecycle

    def start(self) -> LibsqlServer:
        if self.port is not None:
            return self
        package_root = str(Path(__file__).resolve().parents[1])  # tests/: `support` is importable from there
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env[_CONTROL_ENV] = self._control_token
        env.pop(_AUTH_ENV, None)
        if self.auth_token:
            env[_AUTH_ENV] = self.auth_token  # via the environment: not visible in `ps`
        cmd = [
            sys.executable, "-m", "support.libsql_server", self.db_path,
            "--port", str(self._requested_port),
            "--idle-timeout", str(self.idle_timeout),
            "--parent-pid", str(os.getpid()),
        ]
        proc = self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env, text=True
        )
        stdout = proc.stdout
        assert stdout is not None  # stdout=PIPE
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(self.startup_timeout)
        first = line[0] if line else ""
        try:
            url = json.loads(first)["url"]
            self.port = int(url.split("//", 1)[1].split("?", 1)[0].rsplit(":", 1)[1])
        except (ValueError, KeyError, IndexError):
            self.stop()
            raise RuntimeError(f"libsql test server did not start (first output line: {first!r})") from None
        return self

    def stop(self) -> None:
        if self._proc is not None:
            proc, self._proc = self._proc, None
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
        self.port = None

    def __enter__(self) -> LibsqlServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses

    def _need_port(self) -> int:
        if self.port is None:
            raise RuntimeError("LibsqlServer is not running")
        return self.port

    @property
    def url(self) -> str:
        return f"libsql://{HOST}:{self._need_port()}?tls=0"

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self._need_port()}"

    # -- control

    def _control(self, name: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            f"{self.http_url}{_CONTROL_PREFIX}{name}",
            data=data,
            method="GET" if data is None else "POST",
            headers={_CONTROL_HEADER: self._control_token, "Content-Type": "application/json"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
        with opener.open(req, timeout=10) as resp:
            return json.loads(resp.read())

    def drop_next(self, n: int = 1, *, after_processing: bool = False, kind: str | None = None) -> None:
        """Close the TCP connection of the next ``n`` Hrana requests without answering.

        By default the requests are not processed at all (the client may
        retry them on the same stream).  With ``after_processing=True`` they
        are executed first and only the response is lost, like a connection
        that breaks on the way back (the stream's baton has moved on, so
        the client's next request on that stream fails).

        ``kind`` restricts the drop to requests containing that Hrana request
        type ("batch", "describe", "execute", "sequence", "get_autocommit",
        "close", ...) or "cursor" for the cursor endpoint; others pass.
        libsql_experimental sends a "describe" before running every statement,
        then a "batch" (statements without result columns) or a "cursor"
        request (queries), so ``kind="batch"`` targets the write itself.
        """
        self._control(
            "drop_next", {"n": int(n), "after_processing": bool(after_processing), "kind": kind}
        )

    def stats(self) -> dict[str, int]:
        """Counters: requests, drop_pending, dropped, unauthorized, streams_open,
        streams_opened, streams_expired."""
        return self._control("stats")


# ---------------------------------------------------------------- command line


def _watch_parent(pid: int, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        if os.getppid() != pid:
            stop.set()


def main(argv: list[str] | None = None) -> int:
    """The child process of :class:`LibsqlServer`: token and control token come from the environment."""
    parser = argparse.ArgumentParser(prog="python -m support.libsql_server")
    parser.add_argument("db_path")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)

    server = serve(
        args.db_path,
        os.environ.get(_AUTH_ENV) or None,
        args.port,
        idle_timeout=args.idle_timeout,
        control_token=os.environ.get(_CONTROL_ENV) or None,
        debug=bool(os.environ.get(_DEBUG_ENV)),
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, stop), daemon=True).start()
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="libsql-server", daemon=True
    )
    thread.start()
    print(json.dumps({"url": f"libsql://{HOST}:{server.server_address[1]}?tls=0"}), flush=True)
    try:
        stop.wait()  # signal handlers run in the main thread and interrupt this wait
    finally:
        server.shutdown()
        server.server_close()
        server.backend.close_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
