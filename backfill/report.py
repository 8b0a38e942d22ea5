"""Output for people and for machines.

On a terminal: readable lines, a progress bar and the seed's final statistics block.
On a pipe, or with `--log-format json`: one JSON object per line (structlog), nothing else on stdout.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

import structlog

from backfill.config import Settings

_state: dict[str, Any] = {"json": False, "settings": None}


def configure_logging(log_format: str = "auto", settings: Settings | None = None, stream: TextIO | None = None) -> bool:
    """Pick human or JSON output; returns True for JSON. Called once per command."""
    stream = stream or sys.stdout
    use_json = log_format == "json" or (log_format == "auto" and not stream.isatty())
    _state["json"] = use_json
    _state["settings"] = settings
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


def say(text: str = "") -> None:
    """A line for people (human mode only)."""
    if not is_json():
        print(text, flush=True)


def error(message: str, details: list[str] | None = None, exit_code: int = 2) -> None:
    settings: Settings | None = _state["settings"]
    if settings is not None:
        message = settings.redact(message)
        details = [settings.redact(d) for d in details or []]
    if is_json():
        print(json.dumps({"event": "error", "level": "error", "message": message, "details": details or [],
                          "exit_code": exit_code}), flush=True)
    else:
        print(f"error: {message}", file=sys.stderr, flush=True)
        for line in details or []:
            print(f"  - {line}", file=sys.stderr, flush=True)


def stats_block(stats_dict: dict) -> str:
    lines = []
    scope = f" for {stats_dict['user_email']}" if stats_dict.get("user_email") else ""
    lines.append(f"Embedding coverage{scope}")
    for name, t in stats_dict["tables"].items():
        lines.append(
            f"  {name:<9} total {t['total']:>8}  with embedding {t['with_embedding']:>8}  "
            f"missing {t['missing']:>7}  malformed {t['malformed']:>5}  coverage {t['coverage']:6.2f}%  {t['verdict']}"
            + (f"  unaddressable {t['unaddressable']} (NULL key)" if t.get("unaddressable") else "")
        )
        if t.get("stale") or t.get("unknown"):
            why = ", ".join(f"{k} {v}" for k, v in t.get("stale_reasons", {}).items() if v)
            lines.append(f"  {'':<9} stale {t['stale']:>8}{f' ({why})' if why else ''}  "
                         f"unknown {t['unknown']:>8} (no provenance; --adopt-existing records it)")
    lines.append(f"Health: {stats_dict['verdict']}")
    if stats_dict.get("recommendation"):
        lines.append(f"Recommendation: {stats_dict['recommendation']}")
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
        self.started = None
        self._bar = None
        self._task = None
        self.label = label
        self._lock = threading.Lock()

    def __enter__(self) -> "Progress":
        import time

        self.started = time.monotonic()
        event("job_started", job=self.job_id, rows_to_do=self.total)
        if not is_json():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn

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
        if self._bar is None:
            return
        _elapsed, rate, eta = self._rate()
        if self.total and self.count > self.total:
            self._bar.update(self._task, total=self.count)
        fields: dict[str, Any] = dict(completed=self.count, rate=rate, tokens=self.tokens + self.live_tokens,
                                      eta="-:--:--" if eta is None else duration(eta))
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
            skipped=len(result.skipped), changed=len(getattr(result, "changed", ())), gone=len(getattr(result, "gone", ())),
            tokens=result.tokens, elapsed_ms=round(elapsed * 1000), rate=round(rate, 2),
            eta_s=None if eta is None else round(eta, 1), cursor=cursor,
            totals={"selected": o.selected, "embedded": o.embedded, "failed": o.failed, "skipped": o.skipped,
                    "changed": getattr(o, "changed", 0), "gone": getattr(o, "gone", 0)},
        )


def duration(seconds: float) -> str:
    """H:MM:SS."""
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
    rows = [line, head, "", "Final Statistics:",
            f"   Total rows processed: {outcome.selected}",
            f"   Successfully generated: {outcome.embedded}",
            f"   Failed: {outcome.failed}",
            f"   Skipped (nothing to embed): {outcome.skipped}"]
    if getattr(outcome, "unaddressable", 0):
        rows.append(f"   Unaddressable (NULL key, cannot be written): {outcome.unaddressable}")
    if coverage is not None:
        rows.append(f"   Coverage: {coverage:.0f}% of {total_rows} rows")
    rows += [f"   Batches processed: {outcome.batches}", f"   Tokens: {outcome.tokens:,}  Cost: ${outcome.cost_usd:.4f}"]
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
            rows.append(f"All of them: backfill failures {outcome.job_id}")
        rows.append("Re-run only these with: backfill retry-failed")
    if outcome.status == "interrupted":
        rows.append(f"Resume with: backfill resume {outcome.job_id}")
    rows.append(line)
    return "\n".join(rows)
