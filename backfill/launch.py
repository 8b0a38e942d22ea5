"""Starting a job: what `run` and `up` check before it (one model per column, nothing to do, the change
queue for `--follow`), then find the open one with the same parameters or create it, under the jobs lock,
after every refusal (one model per column, `--reembed-stale` mixing, a job open in the other mode) and
before the one piece of DDL a run may issue (`--vector-column`), which comes last."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from backfill import adoption, changes, db, drive, jobs, locks, report, sources, stale, tables, vectors
from backfill import stats as coverage
from backfill.budget import refuse_over_budget
from backfill.config import Settings
from backfill.errors import ConfigError
from backfill.page import RunOptions
from backfill.providers import DEFAULT_MODEL
from backfill.providers.base import DEFAULT_DIMENSIONS, Provider
from backfill.request import RunRequest, build_provider, run_options


@dataclass
class Started:
    job: jobs.Job
    created: bool  # a new job, else the open one resumed
    added_columns: list[str] = field(default_factory=list)  # tables given the native vector column


def key_for(options: RunOptions, provider: Any) -> jobs.JobKey:
    """What makes two runs the same job."""
    return jobs.JobKey("run", options.target, options.user_id, provider.name, provider.model, provider.dimensions,
                       options.recipe)


def find_or_create(engine: Engine, options: RunOptions, provider: Any, *, user_email: str | None,
                   database_kind: str) -> Started:
    """The job a run of `options` continues or starts; atomic, so workers started at once share one job."""
    return db.retrying(engine, lambda conn: _find_or_create(conn, options, provider, user_email=user_email,
                                                            database_kind=database_kind))


def _find_or_create(conn: Connection, options: RunOptions, provider: Any, *, user_email: str | None,
                    database_kind: str) -> Started:
    """One transaction, retried whole on a locked or dropped database (a killed worker's stream may hold
    the write lock of a remote libSQL database until the server expires it)."""
    specs = tables.specs_for(options.target)
    locks.jobs_lock(conn)
    job = jobs.find_open(conn, key_for(options, provider))
    created = job is None
    if job is None:
        if not (options.reembed_all or options.reembed_stale):
            for spec in specs:
                changes.ensure_compatible(conn, spec, provider, options.user_id)
        elif options.reembed_stale and not options.reembed_all:
            for spec in specs:
                stale.refuse_mixing(conn, spec, provider.model, provider.dimensions, options.user_id)
        job = jobs.create(conn, key_for(options, provider), user_email=user_email,
                          batch_size=options.batch_size, params=options.job_params())
    elif job.params.get("mode", "sync") != options.mode:
        raise ConfigError(f"job {job.id} is open in {job.params.get('mode', 'sync')} mode: continue it with "
                          f"`backfill resume {job.id}` or stop it with `backfill cancel {job.id}`")
    added: list[str] = []
    if options.vector_column:  # last: every refusal above comes before this DDL
        added = list(vectors.prepare(conn, database_kind, specs, options.vector_column, provider.dimensions))
    return Started(job, created, added)


def run(settings: Settings, req: RunRequest, engine: Engine, database_kind: str) -> int:
    """`run` on an open database with backfill's tables, its flags checked: refuse, or say there is nothing
    to do, or find or start the job, then drive it to its end."""
    email = req.user_email
    user_id = db.retrying(engine, lambda conn: coverage.user_id_for(conn, email), write=False) if email else None
    for spec in tables.specs_for(req.target):  # change queue: seeded once (or --full-scan), then settled
        changes.refresh(engine, spec, _identity(req)[2], full_scan=bool(req.extra.get("full_scan")))

    def check(conn: Connection) -> bool:
        if req.follow:
            _require_queue(conn, req)
        return _idle(conn, req, user_id)

    if db.retrying(engine, check, write=False):  # reads only: a dropped connection is read again
        report.nothing("nothing to embed: every row in scope has its embedding (no job recorded)",
                       target=req.target, user_email=req.user_email)
        return 0
    provider = req.extra.pop("provider", None) or build_provider(settings, req)
    warming = req.extra.pop("warm", None)
    req.model = provider.model
    options = run_options(req, user_id, settings.openai_base_url)
    if req.max_cost is not None:
        refuse_over_budget(engine, req, provider, options, key_for(options, provider))
    started = find_or_create(engine, options, provider, user_email=req.user_email, database_kind=database_kind)
    job = started.job
    if started.created:
        report.say(f"started job {job.id}: {req.target} with {provider.model} ({provider.dimensions} dimensions)")
    else:
        report.say(f"resuming job {job.id} from its last committed batch")
    for name in started.added_columns:
        report.say(f"added column {name}.{req.vector_column} F32_BLOB({provider.dimensions})")
    if req.adopt_existing:
        _adopt(engine, job, provider, req, user_id)
    if warming is not None:
        warming.join()
    return drive.drive(settings, engine, job, provider, req, options,
                       runner_class=drive.batch_runner(settings, job, req))


def _require_queue(conn: Connection, req: RunRequest) -> None:
    if not all(changes.seeded(conn, spec) for spec in tables.specs_for(req.target)):
        raise ConfigError("--follow reads the change queue, which this database lacks: run `backfill migrate` "
                          "(or `backfill up --follow`)")


def _adopt(engine: Engine, job: jobs.Job, provider: Provider, req: RunRequest, user_id: str | None) -> None:
    for spec in tables.specs_for(req.target):
        n = stale.adopt(engine, spec, provider=provider.name, model=provider.model, dimensions=provider.dimensions,
                        recipe=req.recipe, user_id=user_id, job_id=job.id)
        report.say(f"adopted {n} existing {spec.name} vector(s): provenance recorded, nothing sent")
        report.event("adopted", job=job.id, target=spec.name, rows=n)


def _identity(req: RunRequest) -> tuple[str, str, int]:
    """The provider, model and dimensions a run would write, without a key or a request."""
    prov = req.extra.get("provider")
    if prov is None and req.provider == "local":
        prov = req.extra["provider"] = build_provider(Settings(), req)  # offline, no key; loads in < 1 s
    if prov is not None:
        return prov.name, prov.model, prov.dimensions
    model = req.model or DEFAULT_MODEL
    dims = req.dimensions or DEFAULT_DIMENSIONS.get(model)
    if not dims:
        raise ConfigError(f"unknown dimensions for model {model!r}: pass --dimensions N")
    return req.provider, model, dims


class _Found:
    """What the checks before a job read once, on one connection, when first asked: the open job with these
    parameters (if any) and the tables whose `embedding` column `migrate` has yet to add (a database the
    server's startup alone made)."""

    def __init__(self, conn: Connection, req: RunRequest, user_id: str | None) -> None:
        self.conn, self.req, self.user_id = conn, req, user_id

    @cached_property
    def job(self) -> jobs.Job | None:
        if not sa.inspect(self.conn).has_table("backfill_jobs"):
            return None
        name, model, dims = _identity(self.req)
        key = jobs.JobKey("run", self.req.target, self.user_id, name, model, dims, self.req.recipe)
        return jobs.find_open(self.conn, key)

    @cached_property
    def columnless(self) -> set[str]:
        return {table for table, _column in adoption.missing_added_columns(self.conn)}


def _refuse_mixing(conn: Connection, req: RunRequest, user_id: str | None, found: _Found) -> None:
    """One model per column (changes.ensure_compatible), asked without a key; `run` asks again under
    the job lock."""
    if req.reembed_all or req.reembed_stale or found.job is not None:
        return
    _name, model, dims = _identity(req)
    for spec in (s for s in tables.specs_for(req.target) if s.name not in found.columnless):
        changes.ensure_compatible(conn, spec, SimpleNamespace(model=model, dimensions=dims), user_id)


def _nothing_to_do(conn: Connection, req: RunRequest, user_id: str | None, found: _Found) -> bool:
    """No open job for these parameters and no row in scope that needs (or, with --reembed-*, deserves)
    a vector: then no key is needed and no job row is recorded."""
    _name, model, dims = _identity(req)
    if found.job is not None:
        return False
    if any(spec.name in found.columnless for spec in tables.specs_for(req.target)):
        return False  # a table without its embedding column yet: every row of it will need one
    stale_ok = req.reembed_stale and sa.inspect(conn).has_table("backfill_embeddings")
    opts = RunOptions(target=req.target, user_id=user_id, reembed_all=req.reembed_all, reembed_stale=stale_ok,
                      model=model, recipe=req.recipe)
    return not any(sources.remaining(conn, spec, dims, opts, 0) for spec in tables.specs_for(req.target))


def _idle(conn: Connection, req: RunRequest, user_id: str | None) -> bool:
    """Whether there is nothing to do; first, a refusal of another model in the column (before "nothing to do")."""
    found = _Found(conn, req, user_id)
    _refuse_mixing(conn, req, user_id, found)
    return not req.adopt_existing and not req.follow and _nothing_to_do(conn, req, user_id, found)


def preflight(settings: Settings, req: RunRequest, engine: Engine) -> None:
    """`up`, on a database that exists: the user, the key and provider, one model per column, checked before
    `migrate` writes anything (the flags and the backend are checked by the caller)."""
    def check(conn: Connection) -> bool | None:
        """None: nothing to check here; else whether there is nothing to do. Raises a refusal."""
        if not sa.inspect(conn).has_table("memories"):
            return None  # empty or foreign: `migrate` decides; nothing to embed here either
        if adoption.problems(conn):
            return None  # a needed column is missing or unusable: `migrate` (or `verify`) refuses, naming it
        return _idle(conn, req, user_id=coverage.user_id_for(conn, req.user_email) if req.user_email else None)

    idle = db.retrying(engine, check, write=False)  # reads only: a dropped connection is read again
    if idle is None:
        return
    if idle and not (req.extra.get("full_scan") and changes.missed(engine, tables.specs_for(req.target))):
        return  # nothing to embed: no key needed, and no provider built (the SDK and tokenizer take ~1.5 s)
    if req.provider == "openai" and not settings.openai_api_key:
        build_provider(settings, req)  # the missing-key refusal, before anything is written
    req.extra["provider"] = req.extra.get("provider") or build_provider(settings, req)
    warm(req)


def warm(req: RunRequest) -> None:
    """Load on a thread, while `migrate`, `verify` and the checks before the job run, what the first request
    needs: the provider's tokenizer (tiktoken's cl100k_base: ~0.15 s). `run` waits for it before the job's
    first page."""
    provider = req.extra.get("provider")
    if provider is None or "warm" in req.extra:
        return

    def load() -> None:
        try:
            provider.fit("")
        except Exception:  # noqa: S110 - the first page's own calls report it
            pass

    req.extra["warm"] = thread = threading.Thread(target=load, name="warm-tokenizer", daemon=True)
    thread.start()
