"""`python -m backfill ARGS` in a new process, forked from a server that has the CLI's modules imported.

Each CLI call of a test would otherwise spend most of its time importing (openai, SQLAlchemy, alembic).
The server is a plain Python process (started once per test process, no threads) that imports them
and then, per request, forks: the child takes the caller's stdin/stdout/stderr, working directory,
environment and argv, and runs the `backfill` package as `__main__`, as `python -m backfill` does.
A middle process waits for it and sends its wait status back, so the caller gets the same return
code as from `subprocess.run` (negative for a signal).

Set BACKFILL_TEST_EXEC=1 to run every CLI call as a fresh interpreter instead."""

from __future__ import annotations

import atexit
import json
import locale
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# what `up` imports (python -X importtime -m backfill up ...); names a version lacks are skipped
PRELOAD = ("backfill.cli", "backfill.commands", "backfill.batch_api", "backfill.compat", "typer._adapters", "numpy",
           "sqlite3", "encodings.idna", "h11", "anyio", "httpcore2", "truststore")
_STATUS = struct.Struct("!ii")  # (pid, 0) once forked, then (0, wait status)
_TESTS = str(Path(__file__).resolve().parent.parent)  # on the server's path only to import this module


# --- the server (runs in its own interpreter) -------------------------------------------------------------


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data = b""
    fds: list[int] = []
    while not data.endswith(b"\n"):
        msg, more, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
        if not msg:
            raise EOFError
        data += msg
        fds += more
    return json.loads(data), fds


def _child(request: dict, fds: list[int]) -> None:
    """The CLI, as `python -m backfill` would run it; never returns."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[0] = request["cwd"]  # -m puts the working directory first
        sys.argv = ["-m", *request["args"]]
        import runpy

        try:
            runpy.run_module("backfill", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _serve(path: str) -> None:
    import importlib
    import signal

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    from backfill import tokens

    tokens.encoding()  # the tokenizer's tables, loaded once rather than in every run
    sys.path[:] = [p for p in sys.path if p != _TESTS]  # the CLI sees the path `python -m` gives it
    assert threading.active_count() == 1, "the fork server must not run threads"
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # middle processes are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([listener.fileno(), 0], [], [])
        if 0 in ready and not os.read(0, 1):  # the test process is gone (its end of our stdin closed)
            os._exit(0)
        if listener.fileno() not in ready:
            continue
        conn, _ = listener.accept()
        if os.fork() == 0:  # the middle process: fork the CLI, report its pid and wait status
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            request, fds = _recv_request(conn)
            pid = os.fork()
            if pid == 0:
                conn.close()
                _child(request, fds)
            for fd in fds:
                os.close(fd)
            conn.sendall(_STATUS.pack(pid, 0))
            _, status = os.waitpid(pid, 0)
            conn.sendall(_STATUS.pack(0, status))
            os._exit(0)
        conn.close()


# --- the caller (the test process) ---------------------------------------------------------------------------


class _Server:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="backfill-cli-")
        self.path = os.path.join(self.dir, "s")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TURSO_", "DATABASE_URL"))}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from support.cli_fork import _serve; _serve({self.path!r})"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)  # stdin: closed when we exit
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the CLI fork server did not start")
        atexit.register(self.stop)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        try:
            os.unlink(self.path)
            os.rmdir(self.dir)
        except OSError:
            pass


_server: _Server | None = None
_lock = threading.Lock()


def _get_server() -> _Server:
    global _server
    with _lock:
        if _server is None or _server.proc.poll() is not None:
            _server = _Server()
        return _server


def _read_all(fd: int, out: list[bytes]) -> None:
    with os.fdopen(fd, "rb") as f:
        out.append(f.read())


def run(args: list[str], env: dict[str, str], cwd: str, timeout: float) -> tuple[int, str, str]:
    """(return code, stdout, stderr) of `python -m backfill *args`, like subprocess.run(capture_output=True)."""
    server = _get_server()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(server.path)
        payload = (json.dumps({"args": list(args), "env": env, "cwd": str(cwd)}) + "\n").encode()
        try:
            os.fstat(0)
            stdin = 0
        except OSError:
            stdin = os.open(os.devnull, os.O_RDONLY)
        socket.send_fds(conn, [payload], [stdin, out_w, err_w])
        if stdin:
            os.close(stdin)
    finally:
        os.close(out_w)
        os.close(err_w)
    outs: list[bytes] = []
    errs: list[bytes] = []
    readers = [threading.Thread(target=_read_all, args=(out_r, outs), daemon=True),
               threading.Thread(target=_read_all, args=(err_r, errs), daemon=True)]
    for t in readers:
        t.start()
    conn.settimeout(timeout)
    with conn:
        pid, _ = _STATUS.unpack(_recv_exact(conn, _STATUS.size))
        try:
            _, status = _STATUS.unpack(_recv_exact(conn, _STATUS.size))
        except TimeoutError:
            os.kill(pid, 9)
            raise subprocess.TimeoutExpired([sys.executable, "-m", "backfill", *args], timeout) from None
    for t in readers:
        t.join()
    return os.waitstatus_to_exitcode(status), _text(b"".join(outs)), _text(b"".join(errs))


def _text(data: bytes) -> str:
    """As subprocess's text mode reads a pipe: the locale's encoding, universal newlines."""
    return data.decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise RuntimeError("the CLI fork server went away")
        data += chunk
    return data


def enabled() -> bool:
    return os.environ.get("BACKFILL_TEST_EXEC", "") in ("", "0")


__all__ = ["run", "enabled"]
