"""The process's start: the command line's entry point, with Python's cycle collector held back while the
modules load.

Loading the OpenAI SDK, SQLAlchemy and alembic makes ~200,000 objects that live as long as the process. At
the default thresholds (a young-generation pass every 700 new objects, a full pass each time a quarter more
have survived) the collector walks them again and again on the way and finds next to nothing to free:
measured on `up` with rows to embed, 0.1-0.2 s of the ~1.1-1.4 s before its first request. So until
`settled()` a pass runs only after STARTING_THRESHOLD new objects, more than the loading makes (a command
that never calls `settled()` still collects its cycles, after that many objects); `settled()` freezes what is
loaded by then (no pass walks it again) and puts the usual thresholds back. `drive` calls it before a job's
first page.
"""

from __future__ import annotations

import gc

STARTING_THRESHOLD = 300_000  # new objects between two passes while the modules load

_usual: tuple[int, ...] | None = None


def main() -> None:
    hold()
    from backfill.cli import main as cli

    cli()


def hold() -> None:
    global _usual
    if _usual is None:
        _usual = gc.get_threshold()
        gc.set_threshold(STARTING_THRESHOLD, *_usual[1:])


def settled() -> None:
    """The modules are loaded: keep the collector off them and run it as usual from here."""
    global _usual
    if _usual is not None:
        gc.freeze()
        gc.set_threshold(*_usual)
        _usual = None
