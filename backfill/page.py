"""A page of work and what a run is asked to do: the types every mode shares.

`Item` is one input to embed, `PageResult` what became of a page's rows, `Outcome` a run's totals,
`RunOptions` the job's parameters (one constructor from a job row: `RunOptions.from_job`; one way
back to the row: `job_params`). The sync runner, the stale path, retry-failed and Batch API mode
all commit a `PageResult` through `commit.Committer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backfill import tables
from backfill.config import DEFAULT_BATCH_SIZE, DEFAULT_CONCURRENCY

MODES = ("sync", "batch")
MAX_FILE_LINES = 50_000  # request lines per Batch API file (the provider's limit)
POLL_INTERVAL_S = 60.0  # Batch API mode: seconds between polls
FOLLOW_POLL_S = 1.0  # --follow: seconds between polls of the change queue


@dataclass
class Item:
    target: str
    row_id: int
    text: str
    tokens: int
    truncated: bool = False


@dataclass
class RunOptions:
    target: str = "all"
    user_id: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE  # inputs per request (seed: -b)
    concurrency: int = DEFAULT_CONCURRENCY  # requests in flight
    delay_ms: int = 0  # extra pause between requests (seed: -d)
    limit: int | None = None  # rows to select in this invocation
    max_runtime_s: float | None = None
    recipe: str = tables.DEFAULT_RECIPE
    reembed_all: bool = False
    reembed_stale: bool = False  # also re-embed rows whose vector is stale (stale.py)
    model: str | None = None  # the job's model: the reference for --reembed-stale counts
    vector_column: str | None = None  # libSQL F32_BLOB column written beside the JSON (vectors.py)
    mode: str = "sync"  # or "batch": the provider's Batch API (batch_api.py)
    file_lines: int = MAX_FILE_LINES  # Batch API mode: request lines per file
    price_per_mtok: float | None = None  # USD per 1M tokens, over the model's price table
    base_url: str | None = None  # the provider's base URL when the job started
    follow: bool = False  # --follow: this invocation keeps embedding what the change queue gets (follow.py)

    @property
    def page_size(self) -> int:
        return max(1, self.batch_size * self.concurrency)

    @classmethod
    def from_job(cls, job: Any, **pacing: Any) -> RunOptions:
        """A job's parameters as recorded when it started; `pacing` (batch size, concurrency, delay, limit,
        runtime) is how fast this invocation runs, which a job does not fix."""
        p = job.params
        return cls(target=job.target, user_id=job.user_id, recipe=job.recipe_version, model=job.model,
                   reembed_all=bool(p.get("reembed_all")), reembed_stale=bool(p.get("reembed_stale")),
                   vector_column=p.get("vector_column"), mode=p.get("mode") or "sync",
                   file_lines=int(p.get("file_lines") or MAX_FILE_LINES), price_per_mtok=p.get("price_per_mtok"),
                   base_url=p.get("base_url"), **pacing)

    def job_params(self) -> dict[str, Any]:
        """What a new job records (`backfill_jobs.params`), read back by `from_job`."""
        params: dict[str, Any] = {"batch_size": self.batch_size, "concurrency": self.concurrency,
                                  "delay_ms": self.delay_ms, "reembed_all": self.reembed_all,
                                  "base_url": self.base_url}
        if self.mode == "batch":
            params.update(mode="batch", file_lines=self.file_lines)
        if self.reembed_stale:
            params["reembed_stale"] = True
        if self.vector_column:
            params["vector_column"] = self.vector_column
        if self.price_per_mtok is not None:
            params["price_per_mtok"] = self.price_per_mtok  # so resume and retry-failed cost the same
        return params


@dataclass
class PageResult:
    vectors: dict[int, list[float]] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)
    hashes: dict[int, str] = field(default_factory=dict)  # row -> content hash of its full recipe text
    encoded: dict[int, str] = field(default_factory=dict)  # vectors as stored text, made off the writer thread
    tokens: int = 0
    requests: int = 0
    copies: dict[int, int] = field(default_factory=dict)  # row -> row with the identical text (dedupe.py)
    tokens_saved: int = 0
    cross: dict[int, tuple[PageResult, int]] = field(default_factory=dict)  # row -> (earlier page, its row)
    sent_hashes: list[str] = field(default_factory=list)
    # set by the commit (writer.current): rows whose vector was written, and rows left alone because the
    # server changed or deleted them while their page was in flight
    written: list[int] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)
    abandoned: set[int] = field(default_factory=set)  # rows left unsent by a stop: neither written nor failed
    live: int = 0  # vectors already shown on the progress bar before this page committed
    live_tokens: int = 0  # and their tokens
    # requests of this page whose vectors committed as they landed, before the page (runner.Runner._land)
    landed: list[PageResult] = field(default_factory=list)
    landed_requests: set[Any] = field(default_factory=set)  # their futures


@dataclass
class Outcome:
    job_id: int
    status: str
    stop_reason: str | None
    selected: int = 0
    embedded: int = 0
    failed: int = 0
    skipped: int = 0
    batches: int = 0  # pages committed (the job's `batches` counter)
    tokens: int = 0
    cost_usd: float = 0.0
    elapsed_s: float = 0.0
    tokens_saved: int = 0
    changed: int = 0
    gone: int = 0
    failed_ids: list[tuple[str, int]] = field(default_factory=list)
    unaddressable: int = 0  # rows no run can embed (set by the command, for the final block)
    failure_reasons: list[dict[str, Any]] = field(default_factory=list)

    def add_page(self, target: str, result: PageResult, *, selected: int, retry: bool, cost_usd: float,
                 pages: int = 1) -> None:
        """A committed page's rows in this run's totals (the job row got the same in the commit)."""
        if retry:  # recorded failures that now succeeded, or whose row changed or went meanwhile
            self.failed -= len(result.written) + len(result.changed) + len(result.gone)
        else:
            self.selected += selected
            self.skipped += len(result.skipped)
            self.failed += len(result.failures)
        self.embedded += len(result.written)
        self.changed += len(result.changed)
        self.gone += len(result.gone)
        self.batches += pages
        self.tokens += result.tokens
        self.tokens_saved += result.tokens_saved
        self.cost_usd += cost_usd
        self.failed_ids.extend((target, rid) for rid in result.failures)
