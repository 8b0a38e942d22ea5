"""The loop: select a page by key, pack requests by tokens, embed concurrently, write back.

Named parts (after Shopify's job-iteration): a page source (sources.py: missing, stale or failed rows)
read by `Pager`, which applies `--limit`, the stop flag and database retries, enumerates pages by
keyset, never OFFSET; `_embed_page` processes one page; `commit.Committer` records progress. Each
request's vectors, their provenance and the job's counters commit in ONE transaction as soon as the
request answers (`_land`), in any order; a page's failure rows, skips and cursor commit when all of it
is settled. So a process killed at any instant repeats only the requests that were on the wire.

Pipelining: up to PIPELINE_PAGES pages have their requests queued on the pool (`--concurrency`
requests in flight), while this thread, the only database writer, commits answers as they land and
closes the oldest page once its requests are done. Pages close strictly in key order, so the cursor
never moves past a row whose page is not settled: a resume reads those rows again, and the ones whose
vectors landed no longer need one. One more page is read and prepared ahead (recipe texts, tokens,
hashes) on a "prepare" thread, which also encodes answers as stored text: the Python work runs
there while the writer's statements run with the GIL released (writer.py).

What the loop uses lives beside it: page.py (the shared types), sources.py (where pages come from),
commit.py (the one commit step), packing.py (inputs into requests by tokens), stopping.py (the stop
flag and signals), writer.py (a vector's stored text), tables.py (a table's columns and user scope).
The one-model-per-column check before a job starts is compat.py.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from backfill import db, dedupe, jobs, partial, sources, stopping, tables
from backfill.commit import Committer
from backfill.packing import pack_requests
from backfill.page import Item, Outcome, PageResult, RunOptions
from backfill.providers.base import (
    BadInput,
    FatalProviderError,
    Provider,
    ProviderError,
)
from backfill.stopping import LIMIT_REACHED, StopFlag
from backfill.writer import encode_vector

__all__ = ["JobRun", "Outcome", "PageResult", "Pager", "RunOptions", "Runner"]

PIPELINE_PAGES = 3  # pages selected and queued ahead of the one being committed
FIRST_PAGE_PER_THREAD = 4  # rows per request thread in a job's first page (a provider fed in chunks)
LEFT_PAGE = 1_000  # rows per read when counting what is left (JobRun.left)
SLOT_WAIT_S = 2.0  # longest a request waits for a slot held by an answer not yet committed (then it goes anyway)
GIL_SWITCH_S = 0.001  # while a job runs (CPython's default is 0.005)


class Pager:
    """A page source read after a cursor: each page through `db.retrying` (a dropped or locked database is
    waited out), at most `--limit` rows in all (counted across tables and sources), none once stopped.
    The one place these rules live: the sync runner, retry-failed, Batch API planning and `plan` use it."""

    def __init__(self, engine: Engine, source: sources.Source, limit: int | None) -> None:
        self.engine = engine
        self.source = source
        self.limit = limit
        self.queued = 0  # rows handed out so far (ahead of what has committed)

    def room(self, size: int) -> int:
        """How many rows the next page may hold: `size`, less what `--limit` leaves (0: the limit is reached)."""
        return size if self.limit is None else max(0, min(size, self.limit - self.queued))

    def read(self, spec: tables.Spec, after: int, size: int) -> list[sa.Row]:
        """The next page after `after`, not counted against the limit (`take` counts what is used)."""
        return db.retrying(self.engine, lambda conn: self.source(conn, spec, after, size), write=False)

    def take(self, rows: int) -> None:
        self.queued += rows

    def pages(self, spec: tables.Spec, cursor: int, size: Callable[[], int], stop: StopFlag) -> Iterator[list[sa.Row]]:
        """Pages of `size()` rows after `cursor` until the source is done, the limit is reached (the stop
        flag then says so) or the run is stopped."""
        while not stop.reason:
            n = self.room(size())
            if n <= 0:
                stop.set(LIMIT_REACHED)
                return
            rows = self.read(spec, cursor, n)
            if not rows:
                return
            self.take(len(rows))
            yield rows
            cursor = int(rows[-1][0])


class JobRun:
    """What every way of running a job holds (the sync `Runner`, `batch_api.BatchRunner`): the job and its lease,
    the options, the stop flag, the run's totals, its page source (`pager`) and its commit step (`committer`)."""

    def __init__(self, engine: Engine, provider: Provider, job: jobs.Job, worker: str, options: RunOptions,
                 progress: Any, stop: StopFlag, *, price_factor: float = 1.0) -> None:
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
        self.committer = Committer(engine, job, worker, options, provider, started=self.started,
                                   price_per_mtok=provider.price_per_mtok * price_factor)
        source = sources.for_follow(job.id, job.dimensions, options) if options.follow else \
            sources.for_run(options, job.dimensions, provider.model)
        self.pager = Pager(engine, source, options.limit)

    def left(self) -> int:
        """Rows the page source still holds from key 0 (a follower's check that nothing is left in scope)."""
        total = 0
        for spec in tables.specs_for(self.job.target):
            after = 0
            while rows := self.pager.read(spec, after, LEFT_PAGE):
                total += len(rows)
                after = int(rows[-1][0])
        return total

    def _heartbeat(self) -> None:
        jobs.heartbeat(self.engine, self.job.id, self.worker)

    def _check_stop(self) -> None:
        stopping.check(self.stop, self.engine, self.job.id, started=self.started,
                       max_runtime_s=self.options.max_runtime_s)


class Runner(JobRun):
    """The sync mode: requests to the provider's embeddings endpoint, pipelined, committed page by page."""

    def __init__(self, engine: Engine, provider: Provider, job: jobs.Job, worker: str, options: RunOptions,
                 progress: Any, stop: StopFlag) -> None:
        super().__init__(engine, provider, job, worker, options, progress, stop)
        self._last_request = 0.0
        self._request_lock = threading.Lock()
        self._in_flight_texts: dict[str, tuple[PageResult, int]] = {}  # text hash -> (uncommitted page, row)
        self._cpu: ThreadPoolExecutor | None = None  # the prepare thread, while run() is on
        self._sent_pages = 0
        self._holes: set[str] = set()  # tables where a stop left rows unsent: the cursor stays before them
        self._chunked = bool(provider.chunk_tokens)  # fed in chunks: the local model
        self._flight = threading.Lock()  # guards the two counts below against the stop check (rows_in_flight)
        self._embedding_now = 0  # rows in the chunks being embedded at this moment
        self._embedded_live = 0  # vectors received so far in this run (committed or not)
        # --concurrency counts a request from its send until its answer is committed, not until it lands: an
        # answer waiting for the writer is lost to a kill as much as one on the wire (measured: with slots freed
        # at the answer, 250-300 rows were in flight at kills at -b 50 x 4, scripts/bench (e)). Only where
        # answers commit as they land (run, without --reembed-all); elsewhere they wait for their page.
        self._slots = threading.Condition()
        self._held = 0
        self._gated = False

    # --- enumerate ------------------------------------------------------------------------
    def _page_size(self) -> int:
        if not self.pager.queued and self._chunked:
            # a slow (local) model's first page is small, a few inputs per thread: prepared and sent within
            # moments, so the first vectors arrive (and the bar moves) while the next, full page is prepared
            return min(self.options.page_size, FIRST_PAGE_PER_THREAD * self.options.concurrency)
        return self.options.page_size

    def _pages(self, spec: tables.Spec, cursor: int) -> Iterator[list[sa.Row]]:
        return self.pager.pages(spec, cursor, self._page_size, self.stop)

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

    def _prepared_pages(self, prep: ThreadPoolExecutor, spec: tables.Spec, cursor: int,
                        inflight: deque) -> Iterator[tuple[list[sa.Row], tuple[PageResult, list[Item]]]]:
        """`_pages`, each page read and its items made (recipe, tokens, hashes) on the prepare thread, one
        page ahead: that Python work overlaps the writer's statements, which release the GIL (writer.py).
        While the next page is made, answers of the pages in flight commit as they land (`_land_until`)."""
        pages = self._pages(spec, cursor)

        def step() -> tuple[list[sa.Row], tuple[PageResult, list[Item]]] | None:
            rows = next(pages, None)
            return None if rows is None else (rows, self._prepare(spec, rows))

        ahead = prep.submit(step)
        while True:
            self._land_until(spec, inflight, ahead.done, also=ahead)
            if (staged := ahead.result()) is None:
                break
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
        return [(i, v, None) for i, v in zip(items, got.vectors, strict=False)], got.tokens, got.requests

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
        queued: Future = Future()
        queued.set_result([pool.submit(self._send, req) for req in self._requests(self._in_run_copies(items, result))])
        return result, queued

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
        self._take_slot()
        try:
            outcomes, used, requests, abandoned = self._embed_request(items)
        except BaseException:
            self._free_slots(1)
            raise
        vectors = [(i.row_id, v) for i, v, _e in outcomes if v is not None]
        if self._cpu is not None:
            return outcomes, used, requests, self._cpu.submit(_encode_all, vectors), abandoned
        encoded: Future = Future()
        encoded.set_result(_encode_all(vectors))
        return outcomes, used, requests, encoded, abandoned

    def _take_slot(self) -> None:
        if not self._gated:
            return
        with self._slots:
            self._slots.wait_for(lambda: self._held < self.options.concurrency, timeout=SLOT_WAIT_S)
            self._held += 1

    def _free_slots(self, n: int) -> None:
        if not self._gated or not n:
            return
        with self._slots:
            self._held = max(0, self._held - n)
            self._slots.notify(n)

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
        """Wait for a page's requests and gather the outcomes of those not landed already."""
        self._wait([prepared])
        futures = prepared.result()
        self._wait(futures)
        for fut in futures:
            if fut not in result.landed_requests:
                self._gather(result, fut)
                self._free_slots(1)
        return result

    @staticmethod
    def _gather(result: PageResult, fut: Future) -> None:
        outcomes, used, requests, encoded, abandoned = fut.result()
        result.tokens += used
        result.requests += requests
        result.encoded.update(encoded.result())
        result.abandoned.update(i.row_id for i in abandoned)
        for item, vector, error in outcomes:
            if vector is not None:
                result.vectors[item.row_id] = vector
                result.live += 1
            else:
                result.failures[item.row_id] = error or "unknown error"
        result.live_tokens += used

    def _land(self, spec: tables.Spec, pages: Iterable[tuple[Any, PageResult, Future]]) -> None:
        """Commit the vectors of the requests that have answered, in every page in flight, together and before
        their pages: a kill then repeats only the requests still on the wire. The selection (rows still needing a
        vector) is the truth and the cursor a hint: it moves when the whole page is settled (`_commit_next`).
        Not with --reembed-all, which selects rows whether or not they hold a vector. Failures, skips and
        copies wait for the page's own commit, so a stop part-way records them once (partial.py)."""
        if self.options.reembed_all:
            return
        parts: list[tuple[PageResult, PageResult]] = []  # (page, the part of it that landed)
        settled = 0  # answers handled here: their slots are free once the commit below is done
        for _rows, result, queued in pages:
            if not queued.done():
                continue
            for fut in queued.result():
                if fut in result.landed_requests or not fut.done() or fut.cancelled() or fut.exception() is not None:
                    continue
                part = PageResult()
                self._gather(part, fut)
                result.landed_requests.add(fut)
                settled += 1
                result.failures.update(part.failures)
                result.abandoned |= part.abandoned
                result.vectors.update(part.vectors)  # kept: copies of these texts take them when the page settles
                result.encoded.update(part.encoded)
                result.live += part.live
                result.live_tokens += part.live_tokens
                if not part.vectors:  # nothing to write: its tokens and failures commit with the page
                    result.tokens += part.tokens
                    result.requests += part.requests
                    continue
                part.failures, part.abandoned = {}, set()
                part.hashes = {rid: result.hashes[rid] for rid in part.vectors}
                parts.append((result, part))
        if parts:
            self.committer.commit([(spec, part) for _page, part in parts],
                                  selected=sum(len(part.vectors) for _page, part in parts))
            for page, part in parts:
                page.landed.append(part)
        self._free_slots(settled)

    def _land_until(self, spec: tables.Spec, inflight: deque, finished: Callable[[], bool],
                    also: Future | None = None) -> None:
        """Commit the answers of the pages in flight as they land until `finished()` (waiting on their requests
        and on `also`): an answer waits neither for its page nor for the next page to be made before it commits
        (a kill would send it again). The lease is renewed while nothing lands."""
        while True:
            self._land(spec, inflight)
            if finished():
                return
            pending = [f for _r, _res, q in inflight for f in ([q] if not q.done() else q.result()) if not f.done()]
            done, _ = wait([*pending, *([also] if also is not None else [])], timeout=15,
                           return_when=FIRST_COMPLETED)
            if not done:
                self._heartbeat()

    # --- record progress ------------------------------------------------------------------
    def _commit(self, spec: tables.Spec, rows: list[sa.Row], result: PageResult, cursors: dict[str, int] | None,
                retry: bool) -> None:
        """The page's one transaction (commit.Committer), then this run's totals and the progress report.
        Rows whose vectors landed already (`_land`) are left out of it and counted with the page."""
        landed = {rid for part in result.landed for rid in part.vectors}
        rest = result if not landed else dataclasses.replace(
            result, vectors={k: v for k, v in result.vectors.items() if k not in landed},
            encoded={k: v for k, v in result.encoded.items() if k not in landed})
        self.committer.commit([(spec, rest)], selected=len(rows) - len(landed), cursors=cursors, retry=retry)
        if landed:
            result.written = [r for part in result.landed for r in part.written] + rest.written
            result.changed = [r for part in result.landed for r in part.changed] + rest.changed
            result.gone = [r for part in result.landed for r in part.gone] + rest.gone
            result.tokens += sum(part.tokens for part in result.landed)
            result.requests += sum(part.requests for part in result.landed)
        self._forget(result)
        self.outcome.add_page(spec.name, result, selected=len(rows), retry=retry, pages=1 + len(result.landed),
                              cost_usd=self.committer.cost(result.tokens))
        self.progress.batch(self, spec.name, rows, result, None if retry else (cursors or {}).get(spec.name))

    # --- entry points ---------------------------------------------------------------------
    def run(self, cursors: dict[str, int] | None = None) -> Outcome:
        """One pass over the page source, from the job's cursors (or `cursors`: a follower's later passes
        start from key 0, follow.py)."""
        cursors = dict(self.job.cursors if cursors is None else cursors)
        self._gated, self._held = not self.options.reembed_all, 0
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
                for rows, prepared in self._prepared_pages(prep, spec, cursors.get(spec.name, 0), inflight):
                    inflight.append((rows, *self._submit(pool, spec, rows, prepared)))
                    self._land(spec, inflight)  # answers that landed meanwhile commit now
                    # commit every finished page at the head, and the oldest once the pipeline is full
                    while inflight and (len(inflight) >= PIPELINE_PAGES or self._page_done(inflight[0][2])):
                        self._commit_next(spec, inflight, cursors)
                while inflight:
                    self._commit_next(spec, inflight, cursors)
                if self.stop.reason:
                    break
        except BaseException:
            wait_for = not self.stop.aborted  # aborted: requests still on the wire are not waited for
            # first: a request finishing now still hands its vectors on
            pool.shutdown(wait=wait_for, cancel_futures=True)
            prep.shutdown(wait=wait_for, cancel_futures=True)
            raise
        finally:
            self._cpu = None
            self._gated = False
            sys.setswitchinterval(switch)
        pool.shutdown(wait=True)
        prep.shutdown(wait=True)
        return self.outcome

    def _commit_next(self, spec: tables.Spec, inflight: deque, cursors: dict[str, int]) -> None:
        """Commit the oldest page in flight: its rows are the next ones in key order."""
        self._land_until(spec, inflight, lambda: self._page_done(inflight[0][2]))  # the oldest page's requests
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
        self._check_stop()

    def retry(self) -> Outcome:
        """retry-failed: the job's recorded failures, page by page (sources.failed_rows)."""
        self.outcome.failed = db.retrying(
            self.engine, lambda conn: len(jobs.open_failures(conn, self.job.id, "failed")), write=False)
        pager = Pager(self.engine, sources.for_retry(self.job.id, self.options.user_id), None)
        with ThreadPoolExecutor(max_workers=self.options.concurrency, thread_name_prefix="embed") as pool:
            for spec in tables.specs_for(self.job.target):
                for rows in pager.pages(spec, 0, lambda: self.options.page_size, self.stop):
                    result = self._embed_page(pool, spec, rows)
                    self._commit(spec, rows, result, None, retry=True)
                    self._check_stop()
                if self.stop.reason:
                    break
        return self.outcome


def _encode_all(vectors: list[tuple[int, list[float]]]) -> dict[int, str]:
    return {row_id: encode_vector(v) for row_id, v in vectors}

