"""The one commit step: a page's vectors, provenance, failure rows, the job's counters and its cursor
in ONE transaction, whatever produced the page (sync requests, a retry, the stale path, a Batch API
result file).

Everything is prepared first (stored texts, failure rows); the transaction then takes the write lock,
checks each row is still the one embedded (writer.current), writes, and commits: the lock is held for
those statements alone, so the server's own writes beside a job wait milliseconds, not a page.

The transaction runs through `db.retrying`: a locked database or a dropped connection is retried whole,
and a commit whose answer was lost is not done twice: each commit adds exactly one to the job's page
counter (`backfill_jobs.batches`), which `jobs.batch_landed` reads before a retry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from backfill import changes, db, jobs, tables, vectors
from backfill.page import PageResult, RunOptions
from backfill.schema import backfill_embeddings as prov
from backfill.writer import current, encode_vector, record_provenance, write_vectors

Part = tuple[tables.Spec, PageResult]


class Committer:
    """Commits a job's pages; holds what a commit needs between pages (the page counter, the elapsed
    time already recorded, the native vector columns)."""

    def __init__(self, engine: Engine, job: Any, worker: str, options: RunOptions, provider: Any, *,
                 price_per_mtok: float | None = None, started: float | None = None) -> None:
        self.engine = engine
        self.job_id = int(job.id)
        self.dimensions = int(job.dimensions)
        self.worker = worker
        self.options = options
        self.provider = provider
        self.price_per_mtok = provider.price_per_mtok if price_per_mtok is None else price_per_mtok
        self.started = time.monotonic() if started is None else started
        self.elapsed_committed = 0.0  # seconds of this run already added to the job's elapsed_s
        self._pages: int | None = None  # the job's page counter as of our last commit (jobs.batch_landed)
        self._mirrors: dict[str, list[vectors.Mirror]] = {}

    def cost(self, tokens: int) -> float:
        return tokens * self.price_per_mtok / 1_000_000

    def elapsed(self) -> float:
        """The run time not yet recorded (seconds), for a transaction of the caller's that advances the job."""
        now = time.monotonic() - self.started
        delta, self.elapsed_committed = now - self.elapsed_committed, now
        return delta

    def commit(self, parts: Sequence[Part], *, selected: int = 0, cursors: dict[str, int] | None = None,
               retry: bool = False, also: Callable[[Connection], None] | None = None) -> None:
        """Commit one page (`parts`: its rows by table) and, with `cursors`, move the job's cursor past it.
        `selected`: rows this page takes off the table (0 where they were counted when planned);
        `retry`: the rows are recorded failures (retry-failed), resolved when written; `also`: the caller's
        own statements (a Batch API line's state) in the same transaction. Sets each result's
        `written`, `changed` and `gone`."""
        now = time.monotonic() - self.started
        stamp = jobs.now_iso()
        prepared = [self._prepare(spec, result) for spec, result in parts]
        tokens = sum(r.tokens for _s, r in parts)
        deltas: dict[str, float] = dict(batches=1, requests=sum(r.requests for _s, r in parts), tokens=tokens,
                                        cost_usd=self.cost(tokens), elapsed_s=now - self.elapsed_committed,
                                        tokens_saved=sum(r.tokens_saved for _s, r in parts))
        if not retry:
            deltas.update(selected=selected, failed=sum(len(r.failures) for _s, r in parts),
                          skipped=sum(len(r.skipped) for _s, r in parts))

        def _write(conn: Connection) -> None:  # one transaction; retried whole on a locked/dropped database
            db.lock_for_write(conn)
            if also is not None:
                also(conn)
            embedded = resolved = 0
            for (spec, result), (encoded, hashes, still_needs, problems) in zip(parts, prepared, strict=True):
                fresh, changed, gone = current(conn, spec, self.options.user_id, hashes, recipe=self.options.recipe,
                                               still_needs=still_needs) if hashes else ([], [], [])
                if fresh:
                    write_vectors(conn, spec, self.options.user_id, {rid: encoded[rid] for rid in fresh})
                    for mirror in self._mirror(conn, spec):  # native columns kept in step, flag or not (vectors.py)
                        mirror.apply(conn, spec, fresh)
                    record_provenance(conn, [
                        {"target": spec.name, "row_id": rid, "provider": self.provider.name,
                         "model": self.provider.model, "dimensions": self.dimensions,
                         "recipe_version": self.options.recipe, "content_hash": hashes[rid], "job_id": self.job_id,
                         "embedded_at": stamp}
                        for rid in fresh])
                    changes.done(conn, spec, fresh, self.dimensions)  # written rows leave the change queue
                jobs.upsert_failures(conn, self.job_id, [*problems, *jobs.notices(spec.name, changed, gone)])
                if retry:
                    jobs.resolve_failures(conn, self.job_id, spec.name, fresh)
                result.written, result.changed, result.gone = fresh, changed, gone
                embedded += len(fresh)
                resolved += len(fresh) + len(changed) + len(gone)
            if retry:  # recorded failures that now succeeded, or whose row changed or went meanwhile
                deltas["failed"] = -resolved
            jobs.advance(conn, self.job_id, self.worker, cursors=cursors, embedded=embedded, **deltas)

        if self._pages is None:
            self._pages = db.retrying(self.engine, lambda conn: jobs.batches(conn, self.job_id), write=False)
        db.retrying(self.engine, _write, landed=jobs.batch_landed(self.job_id, self._pages))
        self._pages += 1
        self.elapsed_committed = now

    def _prepare(self, spec: tables.Spec, result: PageResult) -> tuple[dict[int, str], dict[int, str], Any,
                                                                        list[dict[str, Any]]]:
        encoded = {rid: result.encoded.get(rid) or encode_vector(vec) for rid, vec in result.vectors.items()}
        hashes = {rid: result.hashes[rid] for rid in encoded}
        still_needs = None if (self.options.reembed_all or self.options.reembed_stale) else \
            tables.needs_embedding(spec, self.engine.dialect.name, self.dimensions)
        if still_needs is not None and self.options.follow:  # also a row whose text changed under our vector
            still_needs = sa.or_(still_needs, sa.exists().where(prov.c.target == spec.name, prov.c.row_id == spec.key))
        problems = [
            *({"target": spec.name, "row_id": rid, "kind": "failed", "error": err[:1000]}
              for rid, err in result.failures.items()),
            *({"target": spec.name, "row_id": rid, "kind": "skipped", "error": why}
              for rid, why in result.skipped.items()),
        ]
        return encoded, hashes, still_needs, problems

    def _mirror(self, conn: Connection, spec: tables.Spec) -> list[vectors.Mirror]:
        if spec.name not in self._mirrors:
            self._mirrors[spec.name] = vectors.configured(conn, spec, self.dimensions, self.options.vector_column)
        return self._mirrors[spec.name]
