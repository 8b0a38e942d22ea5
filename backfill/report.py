"""Output for people and for machines.

On a terminal: readable lines, a progress bar and the seed's final statistics block.
On a pipe, or with `--log-format json`: one JSON object per line (structlog), nothing else on stdout.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import textwrap
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

import structlog

from backfill.config import Settings

if TYPE_CHECKING:
    from rich.progress import Progress as Bar
    from rich.progress import TaskID

_state: dict[str, Any] = {"json": False, "settings": None, "quiet": False, "told_source": False}
WIDTH = 80  # human output fits a classic terminal


def set_quiet(quiet: bool) -> None:
    """-q/--quiet: no progress bar and no informational lines; errors still go to stderr."""
    _state["quiet"] = quiet
    if quiet:
        import rich

        rich.reconfigure(quiet=True)  # the progress bar draws on rich's global console


def is_quiet() -> bool:
    return bool(_state["quiet"])


def colour_enabled(stream: TextIO) -> bool:
    """Colour on a terminal only, and never when NO_COLOR is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR", "") != "":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


_STYLES = {"red": "1;31", "green": "32", "yellow": "33", "bold": "1"}


def paint(text: str, style: str, stream: TextIO | None = None) -> str:
    if not colour_enabled(stream or sys.stdout):
        return text
    return f"\x1b[{_STYLES[style]}m{text}\x1b[0m"


VERDICT_STYLE = {"healthy": "green", "degraded": "yellow", "critical": "red"}


def suggest(command: str) -> str:
    """A command to type next, with the flags this invocation needed: `--database-url` when the URL
    came from the command line (not from the environment or .env). Secrets in the URL are masked."""
    settings: Settings | None = _state["settings"]
    if settings is None or not settings.database_url_from_flag or not settings.database_url:
        return command
    from backfill.db import redact_url

    return f"{command} --database-url {shlex.quote(settings.redact(redact_url(settings.database_url)))}"


def tell_source(display: str) -> None:
    """Once per command, in human mode (stdout, so an error stays the one line on stderr): which
    database, and where its URL came from."""
    settings: Settings | None = _state["settings"]
    if _state["told_source"] or is_json() or is_quiet() or settings is None:
        return
    _state["told_source"] = True
    source = settings.database_url_source or "the command line"
    text = settings.redact(f"database: {display} (from {source})")
    print(text, flush=True)


def configure_logging(log_format: str = "auto", settings: Settings | None = None, stream: TextIO | None = None) -> bool:
    """Pick human or JSON output; returns True for JSON. Called once per command."""
    stream = stream or sys.stdout
    use_json = log_format == "json" or (log_format == "auto" and not stream.isatty())
    _state["json"] = use_json
    _state["settings"] = settings
    _state["stream"] = stream
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
        structlog.processors.JSONRenderer(sort_keys=False),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    return use_json


def is_json() -> bool:
    return bool(_state["json"])


def _redact(_logger, _name, event: dict) -> dict:  # noqa: ANN001 - structlog processor signature
    settings: Settings | None = _state["settings"]
    if settings is None:
        return event
    return {k: settings.redact(v) if isinstance(v, str) else v for k, v in event.items()}


def event(name: str, **fields: Any) -> None:
    """A machine event (JSON mode only)."""
    if is_json():
        structlog.get_logger().info(name, **fields)


def nothing(message: str, **fields: Any) -> None:
    """Nothing to do (exit 0): the line for people, or a `nothing_to_do` event carrying the same message."""
    say(message)
    event("nothing_to_do", message=message, **fields)


def say(text: str = "") -> None:
    """A line for people (human mode only; -q silences it)."""
    if not is_json() and not is_quiet():
        print(text, flush=True)


def error(message: str, details: list[str] | None = None, exit_code: int = 2) -> None:
    settings: Settings | None = _state["settings"]
    if settings is not None:
        message = settings.redact(message)
        details = [settings.redact(d) for d in details or []]
    if is_json():  # the JSON stream gets the event; stderr gets the line a person reads in a CI log
        print(json.dumps({"event": "error", "level": "error", "message": message, "details": details or [],
                          "exit_code": exit_code, "timestamp": now_iso()}), flush=True)
    print(f"{paint('error:', 'red', sys.stderr)} {message}", file=sys.stderr, flush=True)
    for line in details or []:
        print(f"  - {line}", file=sys.stderr, flush=True)


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def record(name: str, data: dict) -> None:
    """A command's result object on the JSON stream, with `event`, `level` and `timestamp` like
    every other line (`stats --json`, the last line of `up`)."""
    settings: Settings | None = _state["settings"]
    line = json.dumps({"event": name, "level": "info", "timestamp": now_iso(), **data}, default=str)
    print(settings.redact(line) if settings is not None else line, flush=True)


def wrap(text: str, indent: str = "", first: str | None = None) -> str:
    """Wrap at word boundaries to fit WIDTH columns (never mid-word, never inside a `command`)."""
    parts = text.split("`")
    glued = "`".join(p.replace(" ", "\u00a0") if i % 2 else p for i, p in enumerate(parts))
    out = textwrap.fill(glued, WIDTH - 1, initial_indent=indent if first is None else first,
                        subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)
    return out.replace("\u00a0", " ")


def duration(seconds: float | None) -> str:
    """An ETA for people: 45s, 12m 5s, 3h 20m, 2d 4h; '-' when unknown."""
    if seconds is None:
        return "-"
    s = int(round(max(seconds, 0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def stats_block(stats_dict: dict) -> str:
    """The coverage table, 80 columns wide: one row per table, then health and the next step."""
    scope = f"for {stats_dict['user_email']}" if stats_dict.get("user_email") else "(all users)"
    lines = [f"Embedding coverage {scope}",
             f"  {'table':<9}{'total':>9}{'embedded':>10}{'missing':>9}{'malformed':>11}{'coverage':>10}  health"]
    for name, t in stats_dict["tables"].items():
        lines.append(f"  {name:<9}{t['total']:>9}{t['with_embedding']:>10}{t['missing']:>9}{t['malformed']:>11}"
                     f"{t['coverage']:>9.2f}%  {paint(t['verdict'], VERDICT_STYLE.get(t['verdict'], 'bold'))}")
        notes = []
        if t.get("unaddressable"):
            notes.append(f"unaddressable {t['unaddressable']} (NULL key, cannot be written)")
        if t.get("stale"):
            why = ", ".join(f"{k} {v}" for k, v in t.get("stale_reasons", {}).items() if v)
            notes.append(f"stale {t['stale']}{f' ({why})' if why else ''}")
        if t.get("unknown"):
            notes.append(f"unknown {t['unknown']} (no provenance; --adopt-existing records it)")
        if notes:
            lines.append(wrap("; ".join(notes), " " * 11))
    verdict = stats_dict["verdict"]
    lines.append(f"Health: {paint(verdict, VERDICT_STYLE.get(verdict, 'bold'))}")
    if stats_dict.get("recommendation"):
        lines.append(wrap(f"Recommendation: {stats_dict['recommendation']}", "  "))
    return "\n".join(lines)


class Progress:
    """Progress: a rich bar on a terminal, one JSON object per committed batch on a pipe.

    The bar counts rows as they are embedded (`embedded`, called by the runner's request threads after
    each chunk), not only when their page commits, so it moves while a page is in flight; at commit the
    page's rows replace what it had shown."""

    def __init__(self, job_id: int, total: int, label: str = "embedding") -> None:
        import threading

        self.job_id = job_id
        self.total = max(total, 0)
        self.done = 0  # rows committed
        self.live = 0  # vectors received for pages not yet committed
        self.tokens = 0  # tokens committed
        self.live_tokens = 0  # tokens of requests answered for pages not yet committed
        self.started: float | None = None
        self._bar: Bar | None = None  # the progress bar on a terminal (None: JSON lines)
        self._task: TaskID | None = None
        self.label = label
        self._lock = threading.Lock()

    def __enter__(self) -> Progress:
        import time

        self.started = time.monotonic()
        event("job_started", job=self.job_id, rows_to_do=self.total)
        if not is_json():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("[bold]job {task.fields[job]}[/] {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.1f} rows/s"),
                TextColumn("{task.fields[tokens]:,} tokens"),
                TextColumn("ETA {task.fields[eta]}"),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total or None, job=self.job_id, rate=0.0, tokens=0,
                                            eta="-:--:--")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()

    @property
    def count(self) -> int:
        """Rows shown as done: committed, plus embedded in pages still in flight."""
        return self.done + self.live

    def embedded(self, rows: int, tokens: int = 0) -> None:
        """`rows` more vectors arrived (from a request thread); their page has not committed yet."""
        with self._lock:
            self.live += rows
            self.live_tokens += tokens
            self._draw()

    def note(self, text: str) -> None:
        """A line for people above the bar (human mode only; safe from any thread)."""
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)

    def _rate(self) -> tuple[float, float, float | None]:
        import time

        elapsed = max(time.monotonic() - (self.started or time.monotonic()), 1e-6)
        rate = self.count / elapsed
        remaining = max(self.total - self.count, 0)
        return elapsed, rate, (remaining / rate if rate > 0 else None)

    def _draw(self, description: str | None = None) -> None:
        if self._bar is None or self._task is None:
            return
        _elapsed, rate, eta = self._rate()
        if self.total and self.count > self.total:
            self._bar.update(self._task, total=self.count)
        fields: dict[str, Any] = dict(completed=self.count, rate=rate, tokens=self.tokens + self.live_tokens,
                                      eta="-:--:--" if eta is None else clock(eta))
        if description:
            fields["description"] = description
        self._bar.update(self._task, **fields)

    def batch(self, runner: Any, target: str, rows: list, result: Any, cursor: int | None) -> None:
        with self._lock:
            self.done += len(rows)
            self.live = max(self.live - getattr(result, "live", 0), 0)
            self.live_tokens = max(self.live_tokens - getattr(result, "live_tokens", 0), 0)
            self.tokens += result.tokens
            elapsed, _rate, _eta = self._rate()
            rate = self.done / elapsed  # of committed rows, as before
            remaining = max(self.total - self.done, 0)
            eta = remaining / rate if rate > 0 else None
            self._draw(target)
        o = runner.outcome
        event(
            "batch_committed", job=self.job_id, target=target, batch=o.batches, rows=len(rows),
            embedded=len(getattr(result, "written", result.vectors)), failed=len(result.failures),
            skipped=len(result.skipped), changed=len(getattr(result, "changed", ())),
            gone=len(getattr(result, "gone", ())),
            tokens=result.tokens, elapsed_ms=round(elapsed * 1000), rate=round(rate, 2),
            eta_s=None if eta is None else round(eta, 1), cursor=cursor,
            totals={"selected": o.selected, "embedded": o.embedded, "failed": o.failed, "skipped": o.skipped,
                    "changed": getattr(o, "changed", 0), "gone": getattr(o, "gone", 0)},
        )


def clock(seconds: float) -> str:
    """H:MM:SS, for the progress bar's ETA."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def cut(text: str, width: int) -> str:
    """One line of at most `width` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def reason_lines(reasons: list[dict[str, Any]], width: int = 70) -> list[str]:
    """`    12 x reason`, one per reason ({reason, count}), each cut to `width` characters."""
    return [f"{r['count']:>6} x {cut(r['reason'], width)}" for r in reasons]


def final_block(outcome: Any, coverage: float | None, total_rows: int | None) -> str:
    """The seed's closing statistics, kept because users know it."""
    line = "=" * 60
    done = outcome.status == "done"
    head = "Backfill complete!" if done and not outcome.failed else (
        "Backfill finished with failures" if done else f"Backfill stopped: {outcome.stop_reason}")
    head = paint(head, "green" if done and not outcome.failed else ("yellow" if done else "red"))
    rows = [line, head, "", "Final Statistics:",
            f"   Total rows processed: {outcome.selected}",
            f"   Successfully generated: {outcome.embedded}",
            f"   Failed: {outcome.failed}",
            f"   Skipped (nothing to embed): {outcome.skipped}"]
    if getattr(outcome, "unaddressable", 0):
        rows.append(f"   Unaddressable (NULL key, cannot be written): {outcome.unaddressable}")
    if coverage is not None:
        rows.append(f"   Coverage: {coverage:.0f}% of {total_rows} rows")
    rows += [
        f"   Batches processed: {outcome.batches}",
        f"   Tokens: {outcome.tokens:,}  Cost: ${outcome.cost_usd:.4f}",
    ]
    if getattr(outcome, "tokens_saved", 0):
        rows.append(f"   Tokens saved by same-text dedupe: {outcome.tokens_saved:,}")
    if outcome.failed_ids:
        rows += ["", f"Failed IDs ({len(outcome.failed_ids)}):"]
        rows += [f"   - {t}:{i}" for t, i in outcome.failed_ids[:10]]
        if len(outcome.failed_ids) > 10:
            rows.append(f"   ... and {len(outcome.failed_ids) - 10} more")
        reasons = getattr(outcome, "failure_reasons", None)
        if reasons:
            rows += ["Top failure reasons:", *reason_lines(reasons, width=60)]
            rows.append(f"All of them: {suggest(f'backfill failures {outcome.job_id}')}")
        rows.append(f"Re-run only these with: {suggest(f'backfill retry-failed {outcome.job_id}')}")
    if outcome.status == "interrupted":
        rows.append(f"Resume with: {suggest(f'backfill resume {outcome.job_id}')}")
    rows.append(line)
    return "\n".join(rows)
