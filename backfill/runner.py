"""The loop: select a page by key, pack requests by tokens, embed concurrently, write back.

Named parts (after Shopify's job-iteration): `_pages` enumerates (rows, cursor) by keyset, never
OFFSET; `_embed_page` processes one page; `_commit` records progress. A page's embeddings, their
provenance, its failure rows, the job's counters and its cursor commit in ONE transaction, so a
process killed at any instant repeats at most the pages that were in flight.

Pipelining: up to PIPELINE_PAGES pages have their requests queued on the pool (`--concurrency`
requests in flight), while this thread, the only database writer, commits the oldest page as soon
as its requests are done. Pages commit strictly in key order, so the cursor never moves past a row
whose page has not committed. One more page is read and prepared ahead (recipe texts, tokens,
hashes) on a "prepare" thread, which also encodes answers as stored text: the Python work runs
there while the writer's statements run with the GIL released (writer.py).

What the loop uses lives beside it: packing.py (inputs into requests by tokens), stopping.py (the stop
flag and signals), writer.py (a page's writes, a vector's stored text), tables.py (a table's columns
and user scope). The one-model-per-column check before a job starts is compat.py.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from backfill import changes, db, dedupe, jobs, partial, stale, stopping, tables, vectors
from backfill.packing import Item, pack_requests
from backfill.providers.base import (
    BadInput,
    FatalProviderError,
    Provider,
    ProviderError,
)
from backfill.stopping import LIMIT_REACHED, StopFlag
from backfill.tables import scope, select_columns
from backfill.writer import current, encode_vector, record_provenance, write_vectors

PIPELINE_PAGES = 3  # pages selected and queued ahead of the one being committed
FIRST_PAGE_PER_THREAD = 4  # rows per request thread in a job's first page (a provider fed in chunks)
GIL_SWITCH_S = 0.001  # while a job runs (CPython's default is 0.005)


@dataclass
class RunOptions:
    target: str = "all"
    user_id: str | None = None
    batch_size: int = 100  # inputs per request (seed: -b)
    concurrency: int = 4  # requests in flight
    delay_ms: int = 0  # extra pause between requests (seed: -d)
    limit: int | None = None  # rows to select in this invocation
    max_runtime_s: float | None = None
    recipe: str = tables.DEFAULT_RECIPE
    reembed_all: bool = False
    reembed_stale: bool = False  # also re-embed rows whose vector is stale (stale.py)
    model: str | None = None  # the job's model: the reference for --reembed-stale counts
    vector_column: str | None = None  # libSQL F32_BLOB column written beside the JSON (vectors.py)

    @property
    def page_size(self) -> int:
        return max(1, self.batch_size * self.concurrency)


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


@dataclass
class Outcome:
    job_id: int
    status: str
    stop_reason: str | None
    selected: int = 0
    embedded: int = 0
    failed: int = 0
    skipped: int = 0
    batches: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    elapsed_s: float = 0.0
    tokens_saved: int = 0
    changed: int = 0
    gone: int = 0
    failed_ids: list[tuple[str, int]] = field(default_factory=list)


def needing(spec: tables.Spec, dialect: str, dimensions: int, options: RunOptions) -> sa.ColumnElement[bool]:
    if options.reembed_all:
        return sa.true()
    return tables.needs_embedding(spec, dialect, dimensions)


def count_remaining(conn: Connection, spec: tables.Spec, dimensions: int, options: RunOptions, after: int) -> int:
    if options.reembed_stale and not options.reembed_all:
        ref = stale.Reference(options.model, dimensions, options.recipe)
        return stale.remaining(conn, spec, ref, options.user_id, after)
    if not options.reembed_all and changes.seeded(conn, spec):  # change queue (changes.py): no table scan
        return changes.pending(conn, spec, options.user_id, dimensions, after)
    q = sa.select(sa.func.count()).select_from(spec.table).where(
        spec.key > after, needing(spec, conn.dialect.name, dimensions, options), *scope(spec, options.user_id))
    return int(conn.execute(q).scalar() or 0)


class Runner:
    def __init__(self, engine: Engine, provider: Provider, job: jobs.Job, worker: str, options: RunOptions,
                 progress: Any, stop: StopFlag) -> None:
        self.engine = engine
        self.provider = provider
        self.job = job
        self.worker = worker
        self.options = options
        self.progress = progress
        self.stop = stop
        self.dialect = engine.dialect.name
        self.started = time.monotonic()
        self.outcome = Outcome(job.id, "running", None)
        self._last_request = 0.0
        self._request_lock = threading.Lock()
        self.job_elapsed_committed = 0.0
        self.queued = 0  # rows selected so far (ahead of what has committed)
        self._in_flight_texts: dict[str, tuple[PageResult, int]] = {}  # text hash -> (uncommitted page, row)
        self._cpu: ThreadPoolExecutor | None = None  # the prepare thread, while run() is on
        self._batches: int | None = None  # the job's batch counter as of our last commit (jobs.batch_landed)
        self._mirror_cache: dict[str, list[vectors.Mirror]] = {}
        self._sent_pages = 0
        self._holes: set[str] = set()  # tables where a stop left rows unsent: the cursor stays before them
        self._chunked = bool(provider.chunk_tokens)  # fed in chunks: the local model
        self._flight = threading.Lock()  # guards the two counts below against the stop check (rows_in_flight)
        self._embedding_now = 0  # rows in the chunks being embedded at this moment
        self._embedded_live = 0  # vectors received so far in this run (committed or not)

    # --- enumerate ------------------------------------------------------------------------
    def _pages(self, spec: tables.Spec, cursor: int) -> Iterator[list[sa.Row]]:
        if self.options.reembed_stale and not self.options.reembed_all:
            yield from stale.pages(self, spec, cursor)
            return
        while not self.stop.reason:
            size = self.options.page_size
            if not self.queued and self._chunked:
                # a slow (local) model's first page is small, a few inputs per thread: prepared and sent within
                # moments, so the first vectors arrive (and the bar moves) while the next, full page is prepared
                size = min(size, FIRST_PAGE_PER_THREAD * self.options.concurrency)
            if self.options.limit is not None:
                size = min(size, self.options.limit - self.queued)
                if size <= 0:
                    self.stop.set(LIMIT_REACHED)
                    return
            query = (sa.select(*select_columns(spec))
                     .where(spec.key > cursor, needing(spec, self.dialect, self.job.dimensions, self.options),
                            *scope(spec, self.options.user_id))
                     .order_by(spec.key)
                     .limit(size))

            def read(conn: Connection, size: int = size, cursor: int = cursor, query: sa.Select = query) -> list[sa.Row]:
                if not self.options.reembed_all and changes.seeded(conn, spec):  # change queue (changes.py)
                    return changes.next_page(conn, spec, cursor, size, self.options.user_id, self.job.dimensions)
                return list(conn.execute(query).all())
            rows = db.retrying(self.engine, read, write=False)
            if not rows:
                return
            self.queued += len(rows)
            yield rows
            cursor = int(rows[-1][0])

    def pages_for_retry(self, spec: tables.Spec, row_ids: Sequence[int]) -> Iterator[list[sa.Row]]:
        ids = list(row_ids)
        for start in range(0, len(ids), self.options.page_size):
            if self.stop.reason:
                return
            query = (sa.select(*select_columns(spec))
                     .where(spec.key.in_(ids[start:start + self.options.page_size]), *scope(spec, self.options.user_id))
                     .order_by(spec.key))
            rows = db.retrying(self.engine, lambda conn, q=query: conn.execute(q).all(), write=False)
            if rows:
                yield rows

    # --- process one page -----------------------------------------------------------------
    def _items(self, spec: tables.Spec, rows: list[sa.Row], result: PageResult) -> list[Item]:
        items = []
        for row in rows:
            mapping = row._mapping
            row_id = int(mapping["id"])
            why = tables.unreadable(spec, mapping)
            if why is not None:
                result.failures[row_id] = why
                continue
            text = tables.recipe_text(spec, mapping, self.options.recipe)
            if not text:
                result.skipped[row_id] = "blank text: nothing to embed"
                continue
            result.hashes[row_id] = tables.content_hash(text)  # of the full recipe text (stale.py recomputes it)
            text, count, cut = self.provider.fit(text)
            items.append(Item(spec.name, row_id, text, count, cut))
        return items

    def _prepare(self, spec: tables.Spec, rows: list[sa.Row]) -> tuple[PageResult, list[Item]]:
        result = PageResult()
        return result, self._items(spec, rows, result)

    def _prepared_pages(self, prep: ThreadPoolExecutor, spec: tables.Spec,
                        cursor: int) -> Iterator[tuple[list[sa.Row], tuple[PageResult, list[Item]]]]:
        """`_pages`, each page read and its items made (recipe, tokens, hashes) on the prepare thread, one
        page ahead: that Python work overlaps the writer's statements, which release the GIL (writer.py)."""
        pages = self._pages(spec, cursor)

        def step() -> tuple[list[sa.Row], tuple[PageResult, list[Item]]] | None:
            rows = next(pages, None)
            return None if rows is None else (rows, self._prepare(spec, rows))

        ahead = prep.submit(step)
        while (staged := ahead.result()) is not None:
            if self.stop.halts_new_pages:  # read before the stop, never sent: a resume reads it again
                return
            ahead = prep.submit(step)
            yield staged

    def _requests(self, items: list[Item]) -> list[list[Item]]:
        if not self._sent_pages and self._chunked:  # the first page (small, `_pages`) goes out on every thread
            self._sent_pages += 1
            return pack_requests(items, max(1, -(-len(items) // self.options.concurrency)))
        return pack_requests(items, self.options.batch_size)

    def _pace(self) -> None:
        if not self.options.delay_ms:
            return
        with self._request_lock:
            gap = self.options.delay_ms / 1000.0 - (time.monotonic() - self._last_request)
            if gap > 0:
                time.sleep(gap)
            self._last_request = time.monotonic()

    def _embed(self, items: list[Item]) -> tuple[list[tuple[Item, list[float] | None, str | None]], int, int]:
        """Embed one request; a 400 is split in halves until the bad input stands alone."""
        self._pace()
        try:
            got = self.provider.embed([i.text for i in items], sum(i.tokens for i in items))
        except BadInput as exc:
            if len(items) == 1:
                return [(items[0], None, str(exc))], 0, 1
            mid = len(items) // 2
            left, lt, lr = self._embed(items[:mid])
            right, rt, rr = self._embed(items[mid:])
            return left + right, lt + rt, lr + rr + 1
        except FatalProviderError:
            raise
        except ProviderError as exc:
            return [(i, None, str(exc)) for i in items], 0, 1
        return [(i, v, None) for i, v in zip(items, got.vectors)], got.tokens, got.requests

    def _chunks(self, items: list[Item]) -> list[list[Item]]:
        """A request as the provider takes it: whole, or in chunks of about `chunk_tokens` tokens (the local
        model, which needs seconds for a request of 100 inputs) so the bar moves and a stop is seen between them."""
        budget = self.provider.chunk_tokens
        if not budget:
            return [items]
        out: list[list[Item]] = [[]]
        used = 0
        for item in items:
            if out[-1] and used + item.tokens > budget:
                out.append([])
                used = 0
            out[-1].append(item)
            used += item.tokens
        return out

    def _embed_request(self, items: list[Item]) -> tuple[list[tuple[Item, list[float] | None, str | None]], int, int,
                                                         list[Item]]:
        """One request, chunk by chunk. Once the run is told to stop, no chunk starts: the rest of the request
        (all of it, if it had not started) is abandoned: not written, not failed; a resume sends it."""
        outcomes: list[tuple[Item, list[float] | None, str | None]] = []
        used = requests = 0
        chunks = self._chunks(items)
        for n, chunk in enumerate(chunks):
            stopping.check_runtime(self.stop, started=self.started, max_runtime_s=self.options.max_runtime_s)
            with self._flight:  # the check and the count together: rows_in_flight() sees every chunk that starts
                if self.stop.halts_new_pages:
                    return outcomes, used, requests, [i for c in chunks[n:] for i in c]
                self._embedding_now += len(chunk)
            got: list[tuple[Item, list[float] | None, str | None]] = []
            u = 0
            try:
                got, u, r = self._embed(chunk)
                used, requests = used + u, requests + r
                outcomes += got
            finally:
                ok = sum(1 for _i, v, _e in got if v is not None)
                with self._flight:
                    self._embedding_now -= len(chunk)
                    self._embedded_live += ok
            live = getattr(self.progress, "embedded", None)
            if live is not None and (ok or u):
                live(ok, u)
        return outcomes, used, requests, []

    def rows_in_flight(self) -> tuple[int, int]:
        """(rows being embedded now, vectors received so far): once the stop flag is set, the first is
        all that can still be added to the second."""
        with self._flight:
            return self._embedding_now, self._embedded_live

    def _embed_page(self, pool: ThreadPoolExecutor, spec: tables.Spec, rows: list[sa.Row]) -> PageResult:
        result = self._collect(*self._submit(pool, spec, rows))
        self._settle(result)
        return result

    def _submit(self, pool: ThreadPoolExecutor, spec: tables.Spec, rows: list[sa.Row],
                prepared: tuple[PageResult, list[Item]] | None = None) -> tuple[PageResult, Future]:
        """Dedupe a page's items (that reads the database, so it runs on the writer thread) and queue its
        requests. The items (texts, tokens, hashes) are made here unless `_prepare` made them already."""
        result, page_items = prepared or self._prepare(spec, rows)
        items = dedupe.reduce(self.engine, spec, page_items, result, model=self.provider.model,
                              dimensions=self.job.dimensions, recipe=self.options.recipe, user_id=self.options.user_id,
                              across_jobs=not self.options.reembed_all)
        prepared: Future = Future()
        prepared.set_result([pool.submit(self._send, req) for req in self._requests(self._in_run_copies(items, result))])
        return result, prepared

    def _in_run_copies(self, items: list[Item], result: PageResult) -> list[Item]:
        """A text already sent by an earlier page of this run that has not committed yet (so the
        provenance lookup cannot see it) is not sent again: the row takes that page's vector at commit."""
        send = []
        for item in items:
            digest = result.hashes[item.row_id]
            source = self._in_flight_texts.get(digest)
            if source is not None and source[0] is not result:
                result.cross[item.row_id] = source
                result.tokens_saved += item.tokens
                continue
            self._in_flight_texts.setdefault(digest, (result, item.row_id))
            result.sent_hashes.append(digest)
            send.append(item)
        return send

    def _settle(self, result: PageResult) -> None:
        """Before a page commits: rows copied from an earlier page of this run take its vector (or its error),
        then rows copied within the page take theirs. A copy of a row a stop left unsent is left unsent too."""
        for row_id, (source, source_row) in result.cross.items():
            if source_row in source.vectors:
                result.vectors[row_id] = source.vectors[source_row]
                if source_row in source.encoded:
                    result.encoded[row_id] = source.encoded[source_row]
            elif source_row in source.abandoned:
                result.abandoned.add(row_id)
            else:
                result.failures[row_id] = source.failures.get(source_row, "its identical text failed")
        for row_id, source_row in list(result.copies.items()):
            if source_row in result.abandoned:
                result.abandoned.add(row_id)
                del result.copies[row_id]
        dedupe.spread(result)  # after the above: a row copied within the page may copy one copied from an earlier page

    def _forget(self, result: PageResult) -> None:
        """After a page commits its texts are in the provenance table, where later pages find them."""
        for digest in result.sent_hashes:
            if self._in_flight_texts.get(digest, (None,))[0] is result:
                del self._in_flight_texts[digest]

    def _send(self, items: list[Item]) -> tuple[list[tuple[Item, list[float] | None, str | None]], int, int, Future,
                                                list[Item]]:
        """One request (on a pool thread); its vectors are encoded as stored text on the prepare thread,
        so the Python work stays on one thread beside the writer instead of all of them (writer.py)."""
        outcomes, used, requests, abandoned = self._embed_request(items)
        vectors = [(i.row_id, v) for i, v, _e in outcomes if v is not None]
        if self._cpu is not None:
            return outcomes, used, requests, self._cpu.submit(_encode_all, vectors), abandoned
        encoded: Future = Future()
        encoded.set_result(_encode_all(vectors))
        return outcomes, used, requests, encoded, abandoned

    def _wait(self, futures: list[Future]) -> None:
        """Wait for futures, heartbeating the lease while nothing finishes."""
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=15, return_when=FIRST_COMPLETED)
            if pending and not done:
                self._heartbeat()

    @staticmethod
    def _page_done(prepared: Future) -> bool:
        return prepared.done() and all(f.done() for f in prepared.result())

    def _collect(self, result: PageResult, prepared: Future) -> PageResult:
        """Wait for a page's requests and gather their outcomes."""
        self._wait([prepared])
        futures = prepared.result()
        self._wait(futures)
        for fut in futures:
            outcomes, used, requests, encoded, abandoned = fut.result()
            encoded = encoded.result()
            result.tokens += used
            result.requests += requests
            result.encoded.update(encoded)
            result.abandoned.update(i.row_id for i in abandoned)
            for item, vector, error in outcomes:
                if vector is not None:
                    result.vectors[item.row_id] = vector
                    result.live += 1
                else:
                    result.failures[item.row_id] = error or "unknown error"
            result.live_tokens += used
        return result

    # --- record progress ------------------------------------------------------------------
    def _heartbeat(self) -> None:
        jobs.heartbeat(self.engine, self.job.id, self.worker)

    def _commit(self, spec: tables.Spec, rows: list[sa.Row], result: PageResult, cursors: dict[str, int] | None,
                retry: bool) -> None:
        """Everything is prepared first (stored texts, failure rows); the transaction then takes the write lock,
        checks each row is still the one embedded (writer.current), writes, and commits: the lock is held for
        those statements alone, so the server's own writes beside a job wait milliseconds, not a page."""
        elapsed = time.monotonic() - self.started
        cost = result.tokens * self.provider.price_per_mtok / 1_000_000
        stamp = jobs.now_iso()
        encoded = {rid: result.encoded.get(rid) or encode_vector(vec) for rid, vec in result.vectors.items()}
        hashes = {rid: result.hashes[rid] for rid in encoded}
        still_needs = None if (self.options.reembed_all or self.options.reembed_stale) else \
            tables.needs_embedding(spec, self.dialect, self.job.dimensions)
        problems = [
            *({"target": spec.name, "row_id": rid, "kind": "failed", "error": err[:1000]}
              for rid, err in result.failures.items()),
            *({"target": spec.name, "row_id": rid, "kind": "skipped", "error": why}
              for rid, why in result.skipped.items()),
        ]

        def _write(conn: Connection) -> None:  # one transaction; retried whole on a locked/dropped database
            db.lock_for_write(conn)
            fresh, changed, gone = current(conn, spec, self.options.user_id, hashes, recipe=self.options.recipe,
                                           still_needs=still_needs) if hashes else ([], [], [])
            deltas: dict[str, float] = dict(
                embedded=len(fresh), batches=1, requests=result.requests, tokens=result.tokens,
                cost_usd=cost, elapsed_s=elapsed - self.job_elapsed_committed, tokens_saved=result.tokens_saved)
            if retry:  # recorded failures that now succeeded, or whose row changed or went meanwhile
                deltas["failed"] = -(len(fresh) + len(changed) + len(gone))
            else:
                deltas.update(selected=len(rows), failed=len(result.failures), skipped=len(result.skipped))
            jobs.advance(conn, self.job.id, self.worker, cursors=cursors, **deltas)
            if fresh:
                write_vectors(conn, spec, self.options.user_id, {rid: encoded[rid] for rid in fresh})
                for mirror in self._mirrors(conn, spec):  # native columns kept in step, flag or not (vectors.py)
                    mirror.apply(conn, spec, fresh)
                self._provenance(conn, spec, result, stamp, fresh)
                changes.done(conn, spec, fresh, self.job.dimensions)  # change queue: written rows leave it
            jobs.upsert_failures(conn, self.job.id, [*problems, *jobs.notices(spec.name, changed, gone)])
            if retry:
                jobs.resolve_failures(conn, self.job.id, spec.name, fresh)
            result.written, result.changed, result.gone = fresh, changed, gone
        if self._batches is None:
            self._batches = db.retrying(self.engine, lambda conn: jobs.batches(conn, self.job.id), write=False)
        db.retrying(self.engine, _write, landed=jobs.batch_landed(self.job.id, self._batches))
        self._batches += 1
        self.job_elapsed_committed = elapsed

    def _mirrors(self, conn: Connection, spec: tables.Spec) -> list[vectors.Mirror]:
        if spec.name not in self._mirror_cache:
            self._mirror_cache[spec.name] = vectors.configured(conn, spec, self.job.dimensions, self.options.vector_column)
        return self._mirror_cache[spec.name]

    def _provenance(self, conn: Connection, spec: tables.Spec, result: PageResult, stamp: str,
                    written: list[int]) -> None:
        record_provenance(conn, [
            {"target": spec.name, "row_id": rid, "provider": self.provider.name, "model": self.provider.model,
             "dimensions": self.provider.dimensions, "recipe_version": self.options.recipe,
             "content_hash": result.hashes[rid], "job_id": self.job.id, "embedded_at": stamp}
            for rid in written
        ])

    def _account(self, spec: tables.Spec, rows: list[sa.Row], result: PageResult, cursor: int | None) -> None:
        o = self.outcome
        if cursor is not None:
            o.selected += len(rows)
            o.skipped += len(result.skipped)
            o.failed += len(result.failures)
        else:
            o.failed -= len(result.written) + len(result.changed) + len(result.gone)
        o.embedded += len(result.written)
        o.changed += len(result.changed)
        o.gone += len(result.gone)
        o.batches += 1
        o.tokens += result.tokens
        o.tokens_saved += result.tokens_saved
        o.cost_usd += result.tokens * self.provider.price_per_mtok / 1_000_000
        o.failed_ids.extend((spec.name, rid) for rid in result.failures)
        self.progress.batch(self, spec.name, rows, result, cursor)

    def _check_stop(self) -> None:
        stopping.check(self.stop, self.engine, self.job.id, started=self.started,
                       max_runtime_s=self.options.max_runtime_s)

    # --- entry points ---------------------------------------------------------------------
    def run(self) -> Outcome:
        cursors = dict(self.job.cursors)
        pool = ThreadPoolExecutor(max_workers=self.options.concurrency, thread_name_prefix="embed")
        # one thread for the Python work beside the writer: pages made in key order, answers encoded
        prep = self._cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        # the writer gives up the GIL inside each statement; it should not then wait CPython's default 5 ms
        # for the prepare thread to hand it back (measured: ~8 % more rows/s at 1 ms, scripts/bench (b))
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, GIL_SWITCH_S))
        try:
            for spec in tables.specs_for(self.job.target):
                inflight: deque[tuple[list[sa.Row], PageResult, Future]] = deque()
                for rows, prepared in self._prepared_pages(prep, spec, cursors.get(spec.name, 0)):
                    inflight.append((rows, *self._submit(pool, spec, rows, prepared)))
                    # commit every finished page at the head, and the oldest once the pipeline is full
                    while inflight and (len(inflight) >= PIPELINE_PAGES or self._page_done(inflight[0][2])):
                        self._commit_next(spec, inflight, cursors)
                while inflight:
                    self._commit_next(spec, inflight, cursors)
                if self.stop.reason:
                    break
        except BaseException:
            wait_for = not self.stop.aborted  # aborted: requests still on the wire are not waited for
            pool.shutdown(wait=wait_for, cancel_futures=True)  # first: a request finishing now still hands its vectors on
            prep.shutdown(wait=wait_for, cancel_futures=True)
            raise
        finally:
            self._cpu = None
            sys.setswitchinterval(switch)
        pool.shutdown(wait=True)
        prep.shutdown(wait=True)
        return self.outcome

    def _commit_next(self, spec: tables.Spec, inflight: deque, cursors: dict[str, int]) -> None:
        """Commit the oldest page in flight: its rows are the next ones in key order."""
        rows, result, prepared = inflight.popleft()
        self._collect(result, prepared)
        self._settle(result)
        holed = spec.name in self._holes
        if result.abandoned or holed:  # stopped part-way: what was embedded commits, the cursor stops before the rest
            rows, cursor = partial.trim(rows, result, cursors.get(spec.name, 0),
                                        keep_beyond=not self.options.reembed_all, hole_before=holed)
            self._holes.add(spec.name)  # later pages must not move the cursor past this page's unsent rows
            if not rows:
                self._forget(result)
                return
        else:
            cursor = int(rows[-1][0])
        cursors[spec.name] = cursor
        self._commit(spec, rows, result, cursors, retry=False)
        self._forget(result)
        self._account(spec, rows, result, cursors[spec.name])
        self._check_stop()

    def retry(self) -> Outcome:
        with self.engine.connect() as conn:
            open_rows = jobs.open_failures(conn, self.job.id, "failed")
        self.outcome.failed = len(open_rows)
        with ThreadPoolExecutor(max_workers=self.options.concurrency, thread_name_prefix="embed") as pool:
            for spec in tables.specs_for(self.job.target):
                ids = [r["row_id"] for r in open_rows if r["target"] == spec.name]
                for rows in self.pages_for_retry(spec, ids):
                    result = self._embed_page(pool, spec, rows)
                    self._commit(spec, rows, result, None, retry=True)
                    self._forget(result)
                    self._account(spec, rows, result, None)
                    self._check_stop()
                if self.stop.reason:
                    break
        return self.outcome


def _encode_all(vectors: list[tuple[int, list[float]]]) -> dict[int, str]:
    return {row_id: encode_vector(v) for row_id, v in vectors}

