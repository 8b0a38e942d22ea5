"""A page stopped part-way (a signal, `--max-runtime` or `cancel` while its requests ran): which of its
rows commit, and where the cursor stops.

The cursor moves to the last row before the first row left unsent, so a resume reads every unsent row
again (keyset: `key > cursor`). Rows after it that did get a vector are written too: they no longer need
one, so no later page selects them again, and they are counted once. Their failures and skips are not
recorded: the resume reads those rows again and records them then, once. Pages after it in the same
run (their requests may all have finished) commit the same way: the cursor never passes the first hole.
With `--reembed-all` a row is selected whether or not it holds a vector, so there the vectors past the cursor
are dropped too."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from backfill.page import PageResult


def trim(rows: list[Any], result: PageResult, cursor: int, *, keep_beyond: bool = True,
         hole_before: bool = False) -> tuple[list[Any], int]:
    """(the rows that commit, the new cursor); `rows` are in key order, each row's key first;
    `cursor` is the one before this page. Drops from `result` what must not be recorded.
    `keep_beyond=False` (`--reembed-all`, which selects rows whether or not they hold a vector) drops
    the vectors past the cursor too, since a resume would select and count those rows again.
    `hole_before`: an earlier page of this run left rows unsent, so the cursor stays where it is (before
    them) whatever this page did: every row of it is past the cursor."""
    first_open = 0 if hole_before else next((n for n, row in enumerate(rows) if int(row[0]) in result.abandoned),
                                            len(rows))
    done, rest = rows[:first_open], rows[first_open:]
    for row in rest:
        key = int(row[0])
        result.failures.pop(key, None)
        result.skipped.pop(key, None)
        if not keep_beyond:
            result.vectors.pop(key, None)
            result.encoded.pop(key, None)
    written = [row for row in rest if int(row[0]) in result.vectors]
    return done + written, int(done[-1][0]) if done else cursor
