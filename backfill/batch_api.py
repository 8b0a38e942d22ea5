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
               through the sync path's commit step (commit.Committer): their embeddings, provenance,
               failure rows, the lines' states and the job's counters in ONE transaction, retried on a
               dropped or locked database; a line already written is skipped (its state is checked),
               so reading an output file again after a kill is harmless

Rows are chosen by the sync runner's page source and `Pager` (sources.py, runner.py: `--limit` counted
the same way) and packed into request lines by `packing`, as the sync runner packs its requests.
Every transaction goes through `db.retrying` with a check of whether a lost answer's commit landed.

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

from backfill import db, jobs, packing, page, report, sources, stopping, tables
from backfill.config import Settings
from backfill.errors import BackfillError, ConfigError, LeaseHeld
from backfill.openai_batches import ENDPOINT, TERMINAL, BatchApi
from backfill.providers.base import BATCH_PRICE_FACTOR, ProviderError, check_vectors
from backfill.runner import JobRun
from backfill.schema import backfill_batch_chunks as chunks_t
from backfill.schema import backfill_batches as batches_t
from backfill.schema import backfill_jobs as jobs_t

MODES = page.MODES
MAX_LINES = page.MAX_FILE_LINES
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
    """What `drive.drive` builds instead of the synchronous `Runner` for a batch job."""
    options = BatchOptions(file_lines=page.RunOptions.from_job(job).file_lines, poll_interval_s=poll_interval_s)
    return functools.partial(BatchRunner, api=api_for(settings, job, timeout), batch=options)


class BatchRunner(JobRun):
    """Plan → upload → create → poll → collect, with the `Runner`'s constructor and `run()`."""

    def __init__(self, engine: Engine, provider: Any, job: jobs.Job, worker: str, options: page.RunOptions,
                 progress: Any, stop: stopping.StopFlag, *, api: BatchApi, batch: BatchOptions) -> None:
        super().__init__(engine, provider, job, worker, options, progress, stop, price_factor=PRICE_FACTOR)
        self.api = api
        self.batch = batch
        self.cap = min(int(job.params.get("batch_size") or options.batch_size), packing.MAX_REQUEST_INPUTS)
        self.cursors = dict(job.cursors)
        self._limited = False

    # --- entry points ---------------------------------------------------------------------
    def run(self) -> page.Outcome:
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
            return sum(sources.remaining(conn, spec, self.job.dimensions, self.options,
                                               self.cursors.get(spec.name, 0))
                       for spec in tables.specs_for(self.job.target)) == 0

    # --- plan -----------------------------------------------------------------------------
    def _plan_next(self) -> int | None:
        """Choose the next file's rows and pack them into request lines, in one transaction.

        Returns the new file's id, 0 when only blank rows were consumed, None when nothing is left."""
        lines: list[tuple[str, list[int], int]] = []
        skipped: list[tuple[str, int]] = []
        size = 0
        cursors = dict(self.cursors)
        for spec in tables.specs_for(self.job.target):
            if self._full(lines, size):
                break
            if self.pager.room(1) == 0:
                self._limited = True
                break
            size += self._plan_spec(spec, cursors, lines, skipped, size)
        if not lines and not skipped:
            return None
        name = f"backfill-job{self.job.id}-{uuid.uuid4().hex[:12]}.jsonl"
        selected = sum(len(ids) for _t, ids, _n in lines) + len(skipped)
        moved = json.dumps(cursors, sort_keys=True)

        def _write(conn: Connection) -> int:
            stamp = jobs.now_iso()
            batch_id = 0
            if lines:
                key = conn.execute(batches_t.insert().values(
                    job_id=self.job.id, name=name, state="planned", lines=len(lines),
                    rows=sum(len(ids) for _t, ids, _n in lines), created_at=stamp, updated_at=stamp,
                )).inserted_primary_key
                assert key is not None
                batch_id = int(key[0])
                conn.execute(chunks_t.insert(), [
                    {"batch_id": batch_id,
                     "custom_id": f"job{self.job.id}-file{batch_id}-line{n}-{t}-{ids[0]}-{ids[-1]}", "target": t,
                     "row_ids": json.dumps(ids), "tokens": tokens, "state": "planned",
                     "created_at": stamp, "updated_at": stamp}
                    for n, (t, ids, tokens) in enumerate(lines, 1)
                ])
            jobs.upsert_failures(conn, self.job.id, [
                {"target": t, "row_id": rid, "kind": "skipped", "error": "blank text: nothing to embed"}
                for t, rid in skipped])
            jobs.advance(conn, self.job.id, self.worker, cursors=cursors, selected=selected, skipped=len(skipped),
                         elapsed_s=self.committer.elapsed())
            return batch_id

        def _landed(conn: Connection) -> bool:  # the cursor moves in this transaction and in no other
            return bool(conn.execute(sa.select(jobs_t.c.cursors).where(jobs_t.c.id == self.job.id)).scalar() == moved)

        batch_id = db.retrying(self.engine, _write, landed=_landed)
        if batch_id is None:  # landed, its answer lost: the file is found by its name
            batch_id = db.retrying(self.engine, lambda conn: int(conn.execute(sa.select(batches_t.c.id).where(
                batches_t.c.name == name)).scalar() or 0), write=False)
        self.cursors = cursors
        self.outcome.selected += selected
        self.outcome.skipped += len(skipped)
        report.event("batch_file_planned", job=self.job.id, file=batch_id, lines=len(lines), rows=selected,
                     cursors=cursors)
        return batch_id

    def _plan_spec(self, spec: tables.Spec, cursors: dict[str, int], lines: list[tuple[str, list[int], int]],
                   skipped: list[tuple[str, int]], size: int) -> int:
        """Consume this table's rows after its cursor into request lines (`packing.pack_requests`, as the sync
        runner packs requests) while the file has room; returns the bytes added."""
        cursor = cursors.get(spec.name, 0)
        pending: list[tuple[int, page.Item | None]] = []  # rows read, not yet in a line: (key, item or blank)
        grow: dict[int, int] = {}  # row -> bytes its text may add to the file (JSON escapes can double a text)
        added = 0
        exhausted = full = False
        while not (exhausted or full):
            room = self.pager.room(_PAGE)
            if room == 0:
                self._limited = exhausted = True
            else:
                rows = self.pager.read(spec, pending[-1][0] if pending else cursor, room)
                self.pager.take(len(rows))
                exhausted = not rows
                for row in rows:
                    rid = int(row[0])
                    text = tables.recipe_text(spec, row._mapping, self.options.recipe)
                    if not text:
                        pending.append((rid, None))
                        continue
                    size_bytes = len(text.encode("utf-8", "surrogatepass"))
                    # an upper bound of the tokens sent (a token is at least one byte; fit() caps each input):
                    # the exact count is taken when the file is built, so planning never tokenizes
                    count = min(size_bytes, self.provider.max_input_tokens or size_bytes)
                    grow[rid] = 2 * size_bytes + 4
                    pending.append((rid, page.Item(spec.name, rid, "", count)))
            requests = packing.pack_requests([i for _k, i in pending if i is not None], self.cap)
            if not exhausted:
                requests = requests[:-1]  # the last line may still grow with the next page's rows
            boundary = None
            for req in requests:
                if self._full(lines, size + added):
                    full = True
                    break
                fits = self._fitting(req, grow, size + added, first=not lines)
                if fits < len(req):  # the file would pass its byte limit: its last line is cut short
                    full = True
                    req = req[:fits]
                if req:
                    lines.append((spec.name, [i.row_id for i in req], sum(i.tokens for i in req)))
                    added += sum(grow[i.row_id] for i in req) + _LINE_BYTES
                    boundary = req[-1].row_id
                if full:
                    break
            if exhausted and not full and pending:
                boundary = pending[-1][0]  # blank rows after the last line are consumed too
            if boundary is not None:
                done = [(k, i) for k, i in pending if k <= boundary]
                skipped.extend((spec.name, k) for k, i in done if i is None)
                pending = pending[len(done):]
                cursor = boundary
        self.pager.take(-len(pending))  # read past the file's end: the next file reads them again
        cursors[spec.name] = cursor
        return added

    @staticmethod
    def _fitting(req: list[page.Item], grow: dict[int, int], size: int, *, first: bool) -> int:
        """How many of a request line's inputs fit in the file's bytes (the file's first input always does)."""
        used = size + _LINE_BYTES
        for n, item in enumerate(req):
            used += grow[item.row_id]
            if used > PLAN_BYTES and not (first and n == 0):
                return n
        return len(req)

    def _full(self, lines: list, size: int) -> bool:
        return len(lines) >= self.batch.file_lines or size >= PLAN_BYTES

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
        body_extra = {"dimensions": self.job.dimensions} if self.provider.model.startswith("text-embedding-3") else {}

        def _write(conn: Connection) -> int:  # retried whole: the file is written again from its start
            out.seek(0)
            out.truncate()
            lines = 0
            for ch in conn.execute(sa.select(chunks_t).where(chunks_t.c.batch_id == b["id"],
                                                             chunks_t.c.state == "planned")
                                   .order_by(chunks_t.c.id)).mappings().all():
                spec = tables.SPECS[ch["target"]]
                rows = conn.execute(
                    sa.select(*tables.select_columns(spec))
                    .where(spec.key.in_(json.loads(ch["row_ids"])),
                           sources.needing(spec, self.dialect, self.job.dimensions, self.options),
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
                    request = json.dumps(line, ensure_ascii=False, separators=(",", ":"))
                    out.write(request.encode("utf-8", "surrogatepass"))
                    out.write(b"\n")
                    lines += 1
            if out.tell() > MAX_FILE_BYTES:
                raise ConfigError(f"file {b['name']} would exceed 200 MB: use a smaller --batch-file-lines")
            self._update(conn, b, "planned", upload_started_at=jobs.now_iso(), lines=lines)
            jobs.advance(conn, self.job.id, self.worker, elapsed_s=self.committer.elapsed())
            return lines

        lines = db.retrying(self.engine, _write,
                            landed=lambda conn: self._now(conn, b)["upload_started_at"] is not None)
        if lines is None:  # landed, its answer lost: the lines were written
            lines = int(self._batch(b["id"])["lines"])
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
        failed: list[dict[str, Any]] = []

        def _write(conn: Connection) -> None:
            failed.clear()
            left = conn.execute(sa.select(chunks_t).where(chunks_t.c.batch_id == b["id"],
                                                          chunks_t.c.state == "planned")).mappings().all()
            for ch in left:
                conn.execute(chunks_t.update().where(chunks_t.c.id == ch["id"], chunks_t.c.state == "planned")
                             .values(state="failed", updated_at=jobs.now_iso()))
                failed.extend({"target": ch["target"], "row_id": rid, "kind": "failed", "error": why}
                              for rid in json.loads(ch["row_ids"]))
            jobs.upsert_failures(conn, self.job.id, failed)
            jobs.advance(conn, self.job.id, self.worker, failed=len(failed), elapsed_s=self.committer.elapsed())
            self._update(conn, b, "submitted", state="collected", error=why if failed else None)

        db.retrying(self.engine, _write, landed=lambda conn: self._now(conn, b)["state"] == "collected")
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
        """Result lines: each line's vectors (checked like the sync path) or its failure rows, committed as one
        page by the sync path's commit step, with the lines' states; a line already written is skipped."""
        wanted = [str(o.get("custom_id")) for o in objs]
        chunks = {ch["custom_id"]: ch for ch in db.retrying(self.engine, lambda conn: [dict(r) for r in conn.execute(
            sa.select(chunks_t).where(chunks_t.c.batch_id == b["id"], chunks_t.c.state == "planned",
                                      chunks_t.c.custom_id.in_(wanted))).mappings()], write=False)}
        results: dict[str, page.PageResult] = {}
        states: list[tuple[dict[str, Any], str]] = []
        for obj in objs:
            ch = chunks.pop(str(obj.get("custom_id")), None)
            if ch is None:  # written before a kill, or not ours
                continue
            ids = json.loads(ch["row_ids"])
            vectors, error, tokens = _parse_line(obj, len(ids), self.job.dimensions)
            states.append((ch, "written" if vectors else "failed"))
            result = results.setdefault(ch["target"], page.PageResult())
            result.requests += 1
            if vectors:
                result.vectors.update(zip(ids, vectors, strict=True))
                result.hashes.update(zip(ids, json.loads(ch["content_hashes"] or "[]"), strict=True))
                result.tokens += tokens if tokens is not None else int(ch["tokens"])
            else:
                result.failures.update((rid, error or "unknown error") for rid in ids)
        if not results:
            return

        def _mark(conn: Connection) -> None:
            for ch, state in states:
                changed = conn.execute(chunks_t.update().where(chunks_t.c.id == ch["id"], chunks_t.c.state == "planned")
                                       .values(state=state, updated_at=jobs.now_iso())).rowcount
                if changed != 1:
                    raise BackfillError(f"request line {ch['custom_id']} changed under this worker; stopping")

        parts = [(tables.SPECS[target], result) for target, result in results.items()]
        self.committer.commit(parts, also=_mark)
        cost = self.committer.cost(sum(r.tokens for r in results.values()))
        for n, (target, result) in enumerate(results.items()):
            self.outcome.add_page(target, result, selected=0, retry=False, cost_usd=cost if n == 0 else 0.0,
                                  pages=1 if n == 0 else 0)
            self.progress.batch(self, target, list(result.vectors) + list(result.failures), result, None)

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

    def _now(self, conn: Connection, b: dict[str, Any]) -> dict[str, Any]:
        return dict(conn.execute(sa.select(batches_t).where(batches_t.c.id == b["id"])).mappings().one())

    def _set(self, b: dict[str, Any], expected: str, **values: Any) -> dict[str, Any]:
        """Move one file's record in a transaction of its own; a lost answer's commit is recognised by the values."""
        def _write(conn: Connection) -> None:
            self._update(conn, b, expected, **values)
            jobs.advance(conn, self.job.id, self.worker)

        def _landed(conn: Connection) -> bool:
            now = self._now(conn, b)
            return all(now[k] == v for k, v in values.items())

        db.retrying(self.engine, _write, landed=_landed)
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
    options = page.RunOptions.from_job(job)
    worker = jobs.worker_identity()
    status, reason = "interrupted", job.stop_reason
    try:
        job = db.retrying(engine, lambda conn: jobs.claim(conn, jobs.get(conn, job.id), worker))
    except LeaseHeld:
        return f"not polled: worker {job.worker_id} is collecting"
    run = BatchRunner(engine, provider, job, worker, options, _Quiet(), stopping.StopFlag(),
                      api=api_for(settings, job), batch=BatchOptions())
    try:
        run.poll_once()
        if run.complete():
            status, reason = "done", None
    finally:
        db.retrying(engine, lambda conn: jobs.finish(conn, job.id, worker, status, reason))
    return f"polled: {run.outcome.embedded} row(s) written, {run.outcome.failed} failed"


def _runs(statement: Any) -> Callable[[Connection], Any]:
    return lambda conn: conn.execute(statement)


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
        change = batches_t.update().where(batches_t.c.id == b["id"]).values(
            state="cancelled", remote_status=status, updated_at=jobs.now_iso())
        db.retrying(engine, _runs(change))
    return cancelled
