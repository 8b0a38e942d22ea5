"""Batch API mode (`run --mode batch`): the rows as JSONL request files, run by the provider's
Batch API at half the price, collected when each batch ends.

Every step is committed before the remote call it leads to, so a process killed at any instant
and resumed never uploads, nor pays for, the same row twice:

    planned    rows chosen and chunked into request lines; the cursor moves (one transaction)
               `upload_started_at`: lines and hashes fixed; a resume first looks for the file by name
    uploaded   the input file's id is recorded
               `submit_started_at`: a resume first looks for a batch made from that file
    submitted  the remote batch's id is recorded; polled until it ends
    collected  result lines written a group of whole request lines (about 1,000 rows) at a time:
               their embeddings, provenance, failure rows, states and the job's counters in ONE
               transaction; a line already written is skipped (its state is checked), so reading
               an output file again after a kill is harmless

Files hold at most 50,000 request lines and 200 MB; a line is one embeddings request of up to
-b inputs. Failed lines become failure rows (`backfill retry-failed` re-sends them synchronously).
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import IO, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from backfill import db, jobs, packing, report, stopping, tables, writer
from backfill import runner as _runner
from backfill import vectors as _vectors
from backfill.batch_api import ENDPOINT, TERMINAL, BatchApi
from backfill.config import Settings
from backfill.errors import BackfillError, ConfigError, LeaseHeld
from backfill.providers.base import BATCH_PRICE_FACTOR, ProviderError, check_vectors
from backfill.schema import backfill_batch_chunks as chunks_t
from backfill.schema import backfill_batches as batches_t

MODES = ("sync", "batch")
MAX_LINES = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024
PLAN_BYTES = 190 * 1024 * 1024  # headroom: texts are read again when the file is built
PRICE_FACTOR = BATCH_PRICE_FACTOR
OPEN_STATES = ("planned", "uploaded", "submitted")
_PAGE = 2000
_LINE_BYTES = 400  # a request line's JSON besides its texts (custom_id, method, url, model, ...)


@dataclass
class BatchOptions:
    file_lines: int = MAX_LINES  # request lines per JSONL file (and so per remote batch)
    poll_interval_s: float = 60.0


def validate(provider: str, file_lines: int, poll_interval_s: float) -> None:
    if provider != "openai":
        raise ConfigError("--mode batch needs --provider openai (the Batch API is OpenAI's)")
    if not 1 <= file_lines <= MAX_LINES:
        raise ConfigError(f"--batch-file-lines must be between 1 and {MAX_LINES}")
    if poll_interval_s <= 0:
        raise ConfigError("--poll-interval must be > 0 seconds")


def api_for(settings: Settings, job: jobs.Job, timeout: float = 60.0) -> BatchApi:
    if not settings.openai_api_key:
        raise ConfigError(
            f"OPENAI_API_KEY not found in environment: job {job.id} runs on the OpenAI Batch API; put the key in "
            ".env.local or .env"
        )
    return BatchApi(api_key=settings.openai_api_key, base_url=settings.openai_base_url or job.params.get("base_url"),
                    timeout=timeout)


def runner_factory(settings: Settings, job: jobs.Job, timeout: float, poll_interval_s: float) -> Callable[..., Any]:
    """What `commands.runs._drive` builds instead of the synchronous `Runner` for a batch job."""
    options = BatchOptions(file_lines=int(job.params.get("file_lines") or MAX_LINES), poll_interval_s=poll_interval_s)
    return functools.partial(BatchRunner, api=api_for(settings, job, timeout), batch=options)


def is_batch(job: jobs.Job) -> bool:
    return job.params.get("mode") == "batch"


class BatchRunner:
    """Plan → upload → create → poll → collect, with the `Runner`'s constructor and `run()`."""

    def __init__(self, engine: Engine, provider: Any, job: jobs.Job, worker: str, options: _runner.RunOptions,
                 progress: Any, stop: stopping.StopFlag, *, api: BatchApi, batch: BatchOptions) -> None:
        self.engine = engine
        self.provider = provider
        self.job = job
        self.worker = worker
        self.options = options
        self.progress = progress
        self.stop = stop
        self.api = api
        self.batch = batch
        self.dialect = engine.dialect.name
        self.cap = min(int(job.params.get("batch_size") or options.batch_size), packing.MAX_REQUEST_INPUTS)
        self.cursors = dict(job.cursors)
        self.outcome = _runner.Outcome(job.id, "running", None)
        self.started = time.monotonic()
        self._elapsed_committed = 0.0
        self._limited = False

    # --- entry points ---------------------------------------------------------------------
    def run(self) -> _runner.Outcome:
        self._count_waiting_rows()
        for b in self._batches(("planned", "uploaded")):  # a killed run's files: reconcile, never resend
            if self.stop.reason:
                break
            self._send(b)
        planning = True
        while not self.stop.reason:
            if planning:
                made = self._plan_next()
                if made is None:
                    planning = False
                elif made:
                    self._send(self._batch(made))
            elif not self._batches(OPEN_STATES):
                break
            else:
                if not self._batches(("submitted",)):  # files that waited for room in the provider's queue
                    for b in self._batches(("uploaded",)):
                        self._send(b)
                self._poll()
                if self._batches(OPEN_STATES):
                    self._pause(self.batch.poll_interval_s)
            self._check_stop()
        waiting = len(self._batches(OPEN_STATES))
        if self._limited and not self.stop.reason:
            self.stop.set(stopping.LIMIT_REACHED)
        if waiting and self.stop.reason:
            report.say(f"{waiting} batch(es) still at the provider: `backfill resume {self.job.id}` or "
                       f"`backfill status {self.job.id}` collects them when they finish")
        return self.outcome

    def poll_once(self) -> None:
        """Collect whatever batches have finished (what `status` does for a batch job)."""
        self._poll()

    def complete(self) -> bool:
        """Every row planned and every batch collected."""
        if self._batches(OPEN_STATES):
            return False
        with self.engine.connect() as conn:
            return sum(_runner.count_remaining(conn, spec, self.job.dimensions, self.options,
                                               self.cursors.get(spec.name, 0))
                       for spec in tables.specs_for(self.job.target)) == 0

    # --- plan -----------------------------------------------------------------------------
    def _plan_next(self) -> int | None:
        """Choose the next file's rows and chunk them into request lines, in one transaction.

        Returns the new file's id, 0 when only blank rows were consumed, None when nothing is left."""
        chunks: list[tuple[str, list[int], int]] = []
        skipped: list[tuple[str, int]] = []
        size = 0
        cursors = dict(self.cursors)
        with self.engine.begin() as conn:
            for spec in tables.specs_for(self.job.target):
                if self._full(chunks, size) or self._limit_left(len(skipped), chunks) == 0:
                    break
                size += self._plan_spec(conn, spec, cursors, chunks, skipped, size)
            if not chunks and not skipped:
                return None
            stamp = jobs.now_iso()
            batch_id = 0
            if chunks:
                name = f"backfill-job{self.job.id}-{uuid.uuid4().hex[:12]}.jsonl"
                batch_id = int(conn.execute(batches_t.insert().values(
                    job_id=self.job.id, name=name, state="planned", lines=len(chunks),
                    rows=sum(len(ids) for _t, ids, _n in chunks), created_at=stamp, updated_at=stamp,
                )).inserted_primary_key[0])
                conn.execute(chunks_t.insert(), [
                    {"batch_id": batch_id, "custom_id": f"job{self.job.id}-file{batch_id}-line{n}-{t}-{ids[0]}-{ids[-1]}",
                     "target": t, "row_ids": json.dumps(ids), "tokens": tokens, "state": "planned",
                     "created_at": stamp, "updated_at": stamp}
                    for n, (t, ids, tokens) in enumerate(chunks, 1)
                ])
            jobs.upsert_failures(conn, self.job.id, [
                {"target": t, "row_id": rid, "kind": "skipped", "error": "blank text: nothing to embed"}
                for t, rid in skipped])
            selected = sum(len(ids) for _t, ids, _n in chunks) + len(skipped)
            jobs.advance(conn, self.job.id, self.worker, cursors=cursors, selected=selected, skipped=len(skipped),
                         **self._elapsed())
        self.cursors = cursors
        self.outcome.selected += selected
        self.outcome.skipped += len(skipped)
        report.event("batch_file_planned", job=self.job.id, file=batch_id, lines=len(chunks), rows=selected,
                     cursors=cursors)
        return batch_id

    def _plan_spec(self, conn: Connection, spec: tables.Spec, cursors: dict[str, int],
                   chunks: list[tuple[str, list[int], int]], skipped: list[tuple[str, int]], size: int) -> int:
        """Consume this table's rows after its cursor into `chunks`; returns the bytes added."""
        cursor = cursors.get(spec.name, 0)
        current: list[int] = []
        used = added = 0
        done = False
        while not done:
            left = self._limit_left(len(skipped), chunks, len(current))
            if left == 0:
                break
            rows = conn.execute(
                sa.select(*tables.select_columns(spec))
                .where(spec.key > cursor, _runner.needing(spec, self.dialect, self.job.dimensions, self.options),
                       *tables.scope(spec, self.options.user_id))
                .order_by(spec.key).limit(_PAGE if left is None else min(_PAGE, left))
            ).all()
            if not rows:
                break
            for row in rows:
                rid = int(row[0])
                text = tables.recipe_text(spec, row._mapping, self.options.recipe)
                if not text:
                    skipped.append((spec.name, rid))
                    cursor = rid
                    continue
                size_bytes = len(text.encode("utf-8", "surrogatepass"))
                # an upper bound of the tokens sent (a token is at least one byte; fit() caps each input):
                # the exact count is taken when the file is built, so planning never tokenizes
                count = min(size_bytes, self.provider.max_input_tokens or size_bytes)
                grow = 2 * size_bytes + 4  # JSON escapes can double a text
                over = size + added + grow + _LINE_BYTES > PLAN_BYTES  # the file would pass 200 MB
                if current and (len(current) >= self.cap or used + count > packing.MAX_REQUEST_TOKENS or over):
                    chunks.append((spec.name, current, used))
                    current, used = [], 0
                    added += _LINE_BYTES
                    if over or self._full(chunks, size + added):
                        done = True
                        break
                elif over and chunks:
                    done = True
                    break
                current.append(rid)
                used += count
                added += grow
                cursor = rid
            else:
                continue
        if current:
            chunks.append((spec.name, current, used))
            added += _LINE_BYTES
        cursors[spec.name] = cursor
        return added

    def _full(self, chunks: list, size: int) -> bool:
        return len(chunks) >= self.batch.file_lines or size >= PLAN_BYTES

    def _limit_left(self, skipped: int, chunks: list, current: int = 0) -> int | None:
        if self.options.limit is None:
            return None
        left = self.options.limit - self.outcome.selected - skipped - current - sum(len(c[1]) for c in chunks)
        if left <= 0:
            self._limited = True
            return 0
        return left

    # --- upload and create ----------------------------------------------------------------
    def _send(self, b: dict[str, Any]) -> None:
        if b["state"] == "planned":
            file_id = self.api.find_file(b["name"]) if b["upload_started_at"] else None
            if file_id is None:
                content, lines = self._build(b)
                with content:
                    if not lines:
                        self._set(b, "planned", state="collected", error="no row needs an embedding any more")
                        return
                    file_id = self._heartbeating(lambda: self.api.upload(b["name"], content))
                report.event("batch_file_uploaded", job=self.job.id, file=b["id"], file_id=file_id, lines=lines)
            else:
                report.event("batch_file_found", job=self.job.id, file=b["id"], file_id=file_id)
            b = self._set(b, "planned", state="uploaded", input_file_id=file_id)
        if b["state"] == "uploaded":
            remote = self.api.find_batch(b["name"], b["input_file_id"]) if b["submit_started_at"] else None
            if remote is None:
                b = self._set(b, "uploaded", submit_started_at=jobs.now_iso(), submits=int(b["submits"]) + 1)
                remote = self._heartbeating(lambda: self.api.create(
                    b["name"], b["input_file_id"], {"backfill_file": b["name"], "backfill_job": str(self.job.id)}))
            self._set(b, "uploaded", state="submitted", remote_batch_id=remote.id, remote_status=remote.status)
            report.event("batch_submitted", job=self.job.id, file=b["id"], batch_id=remote.id, status=remote.status)

    def _build(self, b: dict[str, Any]) -> tuple[IO[bytes], int]:
        """Write the file's request lines (rows read again: one edited or filled since is handled) and
        commit their rows and hashes before anything is uploaded."""
        out = tempfile.TemporaryFile()
        lines = 0
        body_extra = {"dimensions": self.job.dimensions} if self.provider.model.startswith("text-embedding-3") else {}
        with self.engine.begin() as conn:
            for ch in conn.execute(sa.select(chunks_t).where(chunks_t.c.batch_id == b["id"],
                                                             chunks_t.c.state == "planned")
                                   .order_by(chunks_t.c.id)).mappings().all():
                spec = tables.SPECS[ch["target"]]
                rows = conn.execute(
                    sa.select(*tables.select_columns(spec))
                    .where(spec.key.in_(json.loads(ch["row_ids"])),
                           _runner.needing(spec, self.dialect, self.job.dimensions, self.options),
                           *tables.scope(spec, self.options.user_id))
                    .order_by(spec.key)
                ).all()
                ids, texts, hashes, tokens = [], [], [], 0
                for row in rows:
                    text = tables.recipe_text(spec, row._mapping, self.options.recipe)
                    if text:
                        hashes.append(tables.content_hash(text))  # of the full recipe text, as the sync path
                        text, count, _cut = self.provider.fit(text)
                        ids.append(int(row[0]))
                        texts.append(text)
                        tokens += count
                values: dict[str, Any] = {"row_ids": json.dumps(ids), "tokens": tokens, "updated_at": jobs.now_iso(),
                                          "content_hashes": json.dumps(hashes)}
                if not ids:
                    values["state"] = "empty"
                conn.execute(chunks_t.update().where(chunks_t.c.id == ch["id"]).values(**values))
                if ids:
                    line = {"custom_id": ch["custom_id"], "method": "POST", "url": ENDPOINT,
                            "body": {"model": self.provider.model, "input": texts, "encoding_format": "float",
                                     **body_extra}}
                    out.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))
                    out.write(b"\n")
                    lines += 1
            if out.tell() > MAX_FILE_BYTES:
                raise ConfigError(f"file {b['name']} would exceed 200 MB: use a smaller --batch-file-lines")
            self._update(conn, b, "planned", upload_started_at=jobs.now_iso(), lines=lines)
            jobs.advance(conn, self.job.id, self.worker, **self._elapsed())
        out.seek(0)
        return out, lines

    # --- poll and collect -----------------------------------------------------------------
    def _poll(self) -> None:
        for b in self._batches(("submitted",)):
            if self.stop.reason:
                return
            remote = self.api.retrieve(b["remote_batch_id"])
            if remote.status != b["remote_status"]:
                b = self._set(b, "submitted", remote_status=remote.status)
                report.event("batch_status", job=self.job.id, file=b["id"], batch_id=remote.id, status=remote.status)
            else:
                self._heartbeat()
            if remote.status in TERMINAL:
                self._collect(b, remote)

    def _collect(self, b: dict[str, Any], remote: Any) -> None:
        if self._requeue(b, remote):
            return
        for file_id in (remote.output_file_id, remote.error_file_id):
            if not file_id:
                continue
            group: list[dict[str, Any]] = []
            for line in self.api.lines(file_id):
                if self.stop.signalled:
                    return  # a resume reads the file again; written chunks are skipped
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    group.append(obj)
                if len(group) >= self._group_lines:
                    self._write_lines(b, group)
                    group = []
            if group:
                self._write_lines(b, group)
        why = {
            "completed": "the batch returned no result for this request",
            "expired": "the batch expired before this request ran",
            "cancelled": "the batch was cancelled",
            "failed": "the batch failed: " + "; ".join(
                str(getattr(e, "message", e)) for e in (getattr(remote.errors, "data", None) or []))[:900],
        }[remote.status]
        with self.engine.begin() as conn:
            left = conn.execute(sa.select(chunks_t).where(chunks_t.c.batch_id == b["id"],
                                                          chunks_t.c.state == "planned")).mappings().all()
            failed = []
            for ch in left:
                conn.execute(chunks_t.update().where(chunks_t.c.id == ch["id"], chunks_t.c.state == "planned")
                             .values(state="failed", updated_at=jobs.now_iso()))
                failed += [{"target": ch["target"], "row_id": rid, "kind": "failed", "error": why}
                           for rid in json.loads(ch["row_ids"])]
            jobs.upsert_failures(conn, self.job.id, failed)
            jobs.advance(conn, self.job.id, self.worker, failed=len(failed), **self._elapsed())
            self._update(conn, b, "submitted", state="collected", error=why if failed else None)
        self.outcome.failed += len(failed)
        self.outcome.failed_ids.extend((f["target"], f["row_id"]) for f in failed)
        report.event("batch_collected", job=self.job.id, file=b["id"], batch_id=remote.id, status=remote.status,
                     unanswered_rows=len(failed))

    def _requeue(self, b: dict[str, Any], remote: Any) -> bool:
        """A batch refused for the provider's enqueued-token limit waits until none of the job's batches
        runs and is created again from the same file (nothing is uploaded again; a refused batch is not
        billed). Refused again with the queue to itself, its rows become failures."""
        codes = {getattr(e, "code", None) for e in (getattr(remote.errors, "data", None) or [])}
        if remote.status != "failed" or "token_limit_exceeded" not in codes:
            return False
        others = [x for x in self._batches(("submitted",)) if x["id"] != b["id"]]
        if not others and int(b["submits"]) > 1:
            return False  # created again with the queue to itself and still refused: too big for the account

        self._set(b, "submitted", state="uploaded", remote_batch_id=None, remote_status=None, submit_started_at=None,
                  error=f"batch {remote.id} refused: enqueued token limit; created again when the queue has room")
        report.event("batch_requeued", job=self.job.id, file=b["id"], batch_id=remote.id)
        return True

    @property
    def _group_lines(self) -> int:
        """Result lines per transaction: whole request lines, about 1,000 rows (or one sync page if larger)."""
        return max(1, max(self.options.page_size, 1000) // self.cap)

    def _write_lines(self, b: dict[str, Any], objs: list[dict[str, Any]]) -> None:
        """Result lines: each chunk's vectors (checked like the sync path) or its failure rows, their
        provenance and the job's counters, in one transaction; a chunk already written is skipped."""
        results: dict[str, _runner.PageResult] = {}
        hashes: dict[str, dict[int, str]] = {}
        with self.engine.begin() as conn:
            db.lock_for_write(conn)
            chunks = {ch["custom_id"]: ch for ch in conn.execute(
                sa.select(chunks_t).where(chunks_t.c.batch_id == b["id"], chunks_t.c.state == "planned",
                                          chunks_t.c.custom_id.in_([str(o.get("custom_id")) for o in objs]))
            ).mappings()}
            for obj in objs:
                ch = chunks.pop(str(obj.get("custom_id")), None)
                if ch is None:  # written before a kill, or not ours
                    continue
                ids = json.loads(ch["row_ids"])
                vectors, error, tokens = _parse_line(obj, len(ids), self.job.dimensions)
                changed = conn.execute(chunks_t.update().where(chunks_t.c.id == ch["id"], chunks_t.c.state == "planned")
                                       .values(state="written" if vectors else "failed",
                                               updated_at=jobs.now_iso())).rowcount
                if changed != 1:
                    raise BackfillError(f"request line {ch['custom_id']} changed under this worker; stopping")
                result = results.setdefault(ch["target"], _runner.PageResult())
                result.requests += 1
                if vectors:
                    result.vectors.update(zip(ids, vectors))
                    hashes.setdefault(ch["target"], {}).update(zip(ids, json.loads(ch["content_hashes"] or "[]")))
                    result.tokens += tokens if tokens is not None else int(ch["tokens"])
                else:
                    result.failures.update((rid, error or "unknown error") for rid in ids)
            for target, result in results.items():
                spec = tables.SPECS[target]
                if result.vectors:
                    self._write_vectors(conn, spec, result, hashes[target])
                jobs.upsert_failures(conn, self.job.id, [
                    *({"target": target, "row_id": rid, "kind": "failed", "error": err[:1000]}
                      for rid, err in result.failures.items()),
                    *jobs.notices(target, result.changed, result.gone)])
            tokens = sum(r.tokens for r in results.values())
            cost = tokens * self.provider.price_per_mtok * PRICE_FACTOR / 1_000_000
            jobs.advance(conn, self.job.id, self.worker, embedded=sum(len(r.written) for r in results.values()),
                         failed=sum(len(r.failures) for r in results.values()), batches=1 if results else 0,
                         requests=sum(r.requests for r in results.values()), tokens=tokens, cost_usd=cost,
                         **self._elapsed())
        o = self.outcome
        o.batches += 1 if results else 0
        o.cost_usd += cost
        for target, result in results.items():
            o.embedded += len(result.written)
            o.changed += len(result.changed)
            o.gone += len(result.gone)
            o.failed += len(result.failures)
            o.tokens += result.tokens
            o.failed_ids.extend((target, rid) for rid in result.failures)
            self.progress.batch(self, target, list(result.vectors) + list(result.failures), result, None)

    def _write_vectors(self, conn: Connection, spec: tables.Spec, result: _runner.PageResult,
                       hashes: dict[int, str]) -> None:
        """Compare-and-set as the sync path (writer.current): rows edited or deleted since their text was
        uploaded keep what the server wrote; `result` records written, changed and gone rows."""
        still_needs = None if (self.options.reembed_all or self.options.reembed_stale) else \
            tables.needs_embedding(spec, self.dialect, self.job.dimensions)
        fresh, result.changed, result.gone = writer.current(
            conn, spec, self.options.user_id, {rid: hashes[rid] for rid in result.vectors},
            recipe=self.options.recipe, still_needs=still_needs)
        result.written = fresh
        vectors = {rid: result.vectors[rid] for rid in fresh}
        writer.write_vectors(conn, spec, self.options.user_id,
                              {rid: writer.encode_vector(vec) for rid, vec in vectors.items()})
        for mirror in _vectors.configured(conn, spec, self.job.dimensions):  # a native column never goes stale
            mirror.apply(conn, spec, fresh)
        stamp = jobs.now_iso()
        writer.record_provenance(conn, [
            {"target": spec.name, "row_id": rid, "provider": self.provider.name, "model": self.provider.model,
             "dimensions": self.job.dimensions, "recipe_version": self.options.recipe, "content_hash": hashes[rid],
             "job_id": self.job.id, "embedded_at": stamp}
            for rid in vectors
        ])

    # --- state ----------------------------------------------------------------------------
    def _batches(self, states: tuple[str, ...]) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(
                sa.select(batches_t).where(batches_t.c.job_id == self.job.id, batches_t.c.state.in_(states))
                .order_by(batches_t.c.id)).mappings()]

    def _batch(self, batch_id: int) -> dict[str, Any]:
        with self.engine.connect() as conn:
            return dict(conn.execute(sa.select(batches_t).where(batches_t.c.id == batch_id)).mappings().one())

    def _update(self, conn: Connection, b: dict[str, Any], expected: str, **values: Any) -> None:
        """Move one file's record; exactly one row must change (a surprise is an error)."""
        changed = conn.execute(batches_t.update().where(batches_t.c.id == b["id"], batches_t.c.state == expected)
                               .values(updated_at=jobs.now_iso(), **values)).rowcount
        if changed != 1:
            raise BackfillError(f"batch file {b['name']} is no longer {expected}; stopping")

    def _set(self, b: dict[str, Any], expected: str, **values: Any) -> dict[str, Any]:
        with self.engine.begin() as conn:
            self._update(conn, b, expected, **values)
            jobs.advance(conn, self.job.id, self.worker)
        return {**b, **values}

    def _heartbeating(self, call: Callable[[], Any]) -> Any:
        """Run a long remote call (a 200 MB upload) while keeping the job's lease alive."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-api") as pool:
            future = pool.submit(call)
            while True:
                try:
                    return future.result(timeout=15)
                except FutureTimeout:
                    self._heartbeat()

    def _heartbeat(self) -> None:
        jobs.heartbeat(self.engine, self.job.id, self.worker)

    def _elapsed(self) -> dict[str, float]:
        now = time.monotonic() - self.started
        delta, self._elapsed_committed = now - self._elapsed_committed, now
        return {"elapsed_s": delta}

    def _count_waiting_rows(self) -> None:
        with self.engine.connect() as conn:
            waiting = rows_waiting(conn, self.job.id)
        if self.progress is not None and hasattr(self.progress, "total"):
            self.progress.total += waiting

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stop.reason and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
            if self.options.max_runtime_s is not None and time.monotonic() - self.started >= self.options.max_runtime_s:
                return

    def _check_stop(self) -> None:
        stopping.check(self.stop, self.engine, self.job.id, started=self.started,
                       max_runtime_s=self.options.max_runtime_s)


def _parse_line(obj: dict[str, Any], expected: int, dimensions: int) -> tuple[list[list[float]] | None, str | None,
                                                                               int | None]:
    """(vectors, None, tokens) for a good answer, else (None, error, None)."""
    response = obj.get("response") or {}
    body = response.get("body") or {}
    status = response.get("status_code")
    if status != 200:
        inner = (body.get("error") if isinstance(body, dict) else None) or obj.get("error") or {}
        message = inner.get("message") if isinstance(inner, dict) else str(inner)
        return None, f"{status or 'error'}: {message or 'request failed in the batch'}"[:1000], None
    try:
        data = sorted(body["data"], key=lambda d: d["index"])
        vectors = check_vectors([d["embedding"] for d in data], expected, dimensions)
        usage = body.get("usage") or {}
        return vectors, None, int(usage["prompt_tokens"]) if "prompt_tokens" in usage else None
    except ProviderError as exc:
        return None, str(exc), None
    except (KeyError, TypeError, ValueError) as exc:
        return None, f"malformed result line: {type(exc).__name__}", None


# --- status and cancel ----------------------------------------------------------------------------

def summary(conn: Connection, job_id: int) -> dict[str, Any]:
    """Files by state, rows waiting at the provider, and every file and batch id."""
    files = [dict(r) for r in conn.execute(
        sa.select(batches_t.c.id, batches_t.c.name, batches_t.c.state, batches_t.c.lines, batches_t.c.rows,
                  batches_t.c.input_file_id, batches_t.c.remote_batch_id, batches_t.c.remote_status)
        .where(batches_t.c.job_id == job_id).order_by(batches_t.c.id)).mappings()]
    by_state: dict[str, int] = {}
    for f in files:
        by_state[f["state"]] = by_state.get(f["state"], 0) + 1
    return {"files": files, "by_state": by_state, "rows_waiting": rows_waiting(conn, job_id)}


def rows_waiting(conn: Connection, job_id: int) -> int:
    """Rows in request lines sent (or about to be) and not yet written, counted in SQL."""
    ids = chunks_t.c.row_ids
    length = sa.func.json_array_length(sa.cast(ids, sa.JSON) if conn.dialect.name == "postgresql" else ids)
    return int(conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(length), 0)).select_from(chunks_t)
        .join(batches_t, batches_t.c.id == chunks_t.c.batch_id)
        .where(batches_t.c.job_id == job_id, chunks_t.c.state == "planned")).scalar() or 0)


class _Quiet:
    total = 0

    def batch(self, *_args: Any) -> None:
        pass


def collect_for_status(settings: Settings, engine: Engine, job: jobs.Job) -> str:
    """Poll an open batch job once and write what finished; returns what happened, for the report."""
    if job.status not in jobs.OPEN_STATUSES:
        return ""
    if not settings.openai_api_key:
        return "not polled: set OPENAI_API_KEY to collect finished batches"
    from backfill import providers

    provider = providers.build("openai", settings, model=job.model, dimensions=job.dimensions)
    options = _runner.RunOptions(target=job.target, user_id=job.user_id, recipe=job.recipe_version,
                                 reembed_all=bool(job.params.get("reembed_all")))
    worker = jobs.worker_identity()
    status, reason = "interrupted", job.stop_reason
    try:
        with engine.begin() as conn:
            job = jobs.claim(conn, jobs.get(conn, job.id), worker)
    except LeaseHeld:
        return f"not polled: worker {job.worker_id} is collecting"
    run = BatchRunner(engine, provider, job, worker, options, _Quiet(), stopping.StopFlag(),
                      api=api_for(settings, job), batch=BatchOptions())
    try:
        run.poll_once()
        if run.complete():
            status, reason = "done", None
    finally:
        with engine.begin() as conn:
            jobs.finish(conn, job.id, worker, status, reason)
    return f"polled: {run.outcome.embedded} row(s) written, {run.outcome.failed} failed"


def cancel_remote(settings: Settings, engine: Engine, job: jobs.Job) -> int:
    """Cancel the job's batches at the provider; files not yet submitted are dropped. Returns how many."""
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(batches_t).where(
            batches_t.c.job_id == job.id, batches_t.c.state.in_(OPEN_STATES))).mappings()]
    submitted = [b for b in rows if b["state"] == "submitted"]
    api = api_for(settings, job) if submitted else None
    cancelled = 0
    for b in rows:
        status = b["remote_status"]
        if api is not None and b["state"] == "submitted":
            try:
                status = api.cancel(b["remote_batch_id"]).status
                cancelled += 1
            except ProviderError as exc:
                if exc.status not in (400, 404, 409):  # 409: it had already finished, nothing to cancel
                    raise
                status = f"{status} (not cancelled: {exc})"[:300]
        with engine.begin() as conn:
            conn.execute(batches_t.update().where(batches_t.c.id == b["id"]).values(
                state="cancelled", remote_status=status, updated_at=jobs.now_iso()))
    return cancelled
