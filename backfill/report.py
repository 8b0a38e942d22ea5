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
        )
    lines.append(f"Health: {stats_dict['verdict']}")
    if stats_dict.get("recommendation"):
        lines.append(f"Recommendation: {stats_dict['recommendation']}")
    return "\n".join(lines)
