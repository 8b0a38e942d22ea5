"""One library function per CLI command: open the database, do the work, report the result."""

from __future__ import annotations

import json

from sqlalchemy.engine import Engine

from backfill import db, locks, migrate as migrations, report, stats as coverage
from backfill.config import Settings
from backfill.errors import SchemaDrift


def open_database(settings: Settings, *, must_exist: bool = True) -> tuple[db.Target, Engine]:
    """Resolve, create the engine and check it answers; never creates a file unless asked."""
    target = db.resolve(settings.database_url, settings.auth_token)
    engine = db.engine_for(target, must_exist=must_exist)
    db.probe(engine, target, settings)
    return target, engine


def migrate(settings: Settings) -> int:
    target, engine = open_database(settings, must_exist=False)
    with locks.schema_lock(target, engine):  # concurrent `up`s migrate one after the other
        result = migrations.migrate(engine)
    messages = {
        "at-head": f"schema already at head ({result.to_revision}); nothing to do",
        "created": f"created the schema at {result.to_revision} in {target.display}",
        "adopted": f"adopted the existing mcp-memory-ts database (stamped 0001) and upgraded to {result.to_revision}",
        "upgraded": f"upgraded {result.from_revision} -> {result.to_revision}",
    }
    report.say(messages[result.action])
    report.event("migrate", action=result.action, from_revision=result.from_revision, to_revision=result.to_revision)
    return 0


def verify(settings: Settings) -> int:
    _target, engine = open_database(settings)
    result = migrations.verify(engine)
    report.event("verify", ok=result.ok, revision=result.revision, head=result.head, differences=result.differences)
    if result.ok:
        report.say(f"schema OK at {result.revision}")
        return 0
    raise SchemaDrift(f"schema drift: {len(result.differences)} difference(s)", details=result.differences)


def stats(settings: Settings, *, user_email: str | None = None) -> int:
    _target, engine = open_database(settings)
    with engine.connect() as conn:
        result = coverage.collect(conn, user_email)
    data = result.as_dict()
    if report.is_json():
        print(json.dumps(data), flush=True)
    else:
        report.say(report.stats_block(data))
    return 0


# --- the engine's commands -------------------------------------------------------------------

import time as _time
from dataclasses import dataclass, field as _field

import sqlalchemy as _sa

from backfill import jobs as _jobs, providers as _providers, runner as _runner, targets as _targets
from backfill.errors import ConfigError, Interrupted, LeaseHeld, RowsFailed
from backfill.limits import Limiter


@dataclass
class RunRequest:
    provider: str = "openai"
    model: str | None = None
    dimensions: int | None = None
    target: str = "all"
    user_email: str | None = None
    batch_size: int = 100
    concurrency: int = 4
    delay_ms: int = 0
    limit: int | None = None
    max_runtime_s: float | None = None
    recipe: str = _targets.DEFAULT_RECIPE
    reembed_all: bool = False
    max_rpm: float | None = None
    max_tpm: float | None = None
    timeout_s: float = 60.0
    wait: bool = False
    wait_timeout_s: float = 600.0
    extra: dict = _field(default_factory=dict)
    reembed_stale: bool = False
    adopt_existing: bool = False
    max_failed_ratio: float | None = None
    vector_column: str | None = None
    max_cost: float | None = None  # USD; refuse a run whose plan costs more
    price_per_mtok: float | None = None  # USD per 1M tokens, over the model's price table


def _require_tables(engine: Engine) -> None:
    if not _sa.inspect(engine).has_table("backfill_jobs"):
        raise ConfigError("backfill's tables are missing: run `backfill migrate` (or `backfill up`) first")


def _validate(req: RunRequest) -> None:
    if req.target not in _targets.TARGET_CHOICES:
        raise ConfigError(f"--target must be one of {', '.join(_targets.TARGET_CHOICES)}")
    if req.recipe not in _targets.RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(_targets.RECIPES)}")
    if not 1 <= req.batch_size <= _runner.MAX_REQUEST_INPUTS:
        raise ConfigError(f"-b/--batch-size must be between 1 and {_runner.MAX_REQUEST_INPUTS}")
    if not 1 <= req.concurrency <= 64:
        raise ConfigError("--concurrency must be between 1 and 64")
    if req.delay_ms < 0 or (req.limit is not None and req.limit < 1):
        raise ConfigError("-d/--delay-ms must be >= 0 and --limit >= 1")


def _options(req: RunRequest, user_id: str | None) -> _runner.RunOptions:
    return _runner.RunOptions(
        target=req.target, user_id=user_id, batch_size=req.batch_size, concurrency=req.concurrency,
        delay_ms=req.delay_ms, limit=req.limit, max_runtime_s=req.max_runtime_s, recipe=req.recipe,
        reembed_all=req.reembed_all, reembed_stale=req.reembed_stale, model=req.model,
        vector_column=req.vector_column,
    )


def _build_provider(settings: Settings, req: RunRequest):  # noqa: ANN202
    return _providers.build(
        req.provider, settings, model=req.model, dimensions=req.dimensions,
        limiter=Limiter(req.max_rpm, req.max_tpm), timeout=req.timeout_s, price_per_mtok=req.price_per_mtok,
    )


def _claim(engine: Engine, job: _jobs.Job, worker: str, req: RunRequest) -> _jobs.Job:
    deadline = _time.monotonic() + req.wait_timeout_s
    while True:
        try:
            return db.retrying(engine, lambda conn: _jobs.claim(conn, _jobs.get(conn, job.id), worker))
        except LeaseHeld:
            if not req.wait or _time.monotonic() >= deadline:
                raise
            report.say(f"job {job.id} is busy; waiting for its worker to finish")
            report.event("job_busy", job=job.id, waiting=True)
            _time.sleep(2.0)


def _drive(settings: Settings, engine: Engine, job: _jobs.Job, provider, req: RunRequest,  # noqa: ANN001
           options: _runner.RunOptions, *, retry: bool = False, runner_class=None) -> int:  # noqa: ANN001
    worker = _jobs.worker_identity()
    job = _claim(engine, job, worker, req)
    stop = _runner.StopFlag()
    with engine.connect() as conn:
        if retry:
            total = len(_jobs.open_failures(conn, job.id))
        else:
            total = sum(_runner.count_remaining(conn, spec, job.dimensions, options, job.cursors.get(spec.name, 0))
                        for spec in _targets.specs_for(job.target))
    run = (runner_class or _runner.Runner)(engine, provider, job, worker, options, None, stop)
    status, reason = "interrupted", None
    try:
        with _runner.signals_stop(stop), report.Progress(job.id, total, "retry" if retry else "embedding") as progress:
            run.progress = progress
            outcome = run.retry() if retry else run.run()
        reason = stop.reason
        status = "cancelled" if reason == "cancelled" else ("interrupted" if reason else "done")
    except _providers.base.FatalProviderError as exc:
        reason = str(exc)
        raise ConfigError(f"{exc} (job {job.id} is resumable: backfill resume {job.id})") from None
    except BaseException as exc:
        reason = f"{type(exc).__name__}"
        raise
    finally:
        db.retrying(engine, lambda conn: _jobs.finish(conn, job.id, worker, status, reason))
    with engine.connect() as conn:
        final = _jobs.get(conn, job.id)
        cov = coverage.collect(conn, job.user_email, with_stale=False)
    outcome.status, outcome.stop_reason = status, reason
    outcome.failed = int(final.failed)
    if not outcome.failed_ids and outcome.failed:
        with engine.connect() as conn:
            outcome.failed_ids = [(r["target"], r["row_id"]) for r in _jobs.open_failures(conn, job.id)]
    tables = [t for t in cov.tables if job.target in ("all", t.table)]
    outcome.unaddressable = sum(t.unaddressable for t in tables)
    total_rows = sum(t.total for t in tables)
    pct = 100.0 * sum(t.with_embedding for t in tables) / total_rows if total_rows else 100.0
    report.event("job_finished", job=job.id, status=status, stop_reason=reason, selected=final.selected,
                 embedded=final.embedded, failed=final.failed, skipped=final.skipped, batches=final.batches,
                 requests=final.requests, tokens=final.tokens, cost_usd=round(final.cost_usd, 6),
                 tokens_saved=final.tokens_saved, unaddressable=outcome.unaddressable,
                 coverage=round(pct, 2), failed_ids=[f"{t}:{i}" for t, i in outcome.failed_ids[:100]])
    report.say(report.final_block(outcome, pct, total_rows))
    if status == "interrupted" and stop.signalled:
        raise Interrupted(f"job {job.id} interrupted; resume with `backfill resume {job.id}`")
    if status == "done" and final.failed and _tolerated(req, final.failed, final.selected):
        report.say(f"{final.failed} of {final.selected} row(s) failed, within --max-failed-ratio "
                   f"{req.max_failed_ratio}: exit 0 (re-run them with `backfill retry-failed {job.id}`)")
        report.event("failures_tolerated", job=job.id, failed=final.failed, selected=final.selected,
                     max_failed_ratio=req.max_failed_ratio)
    elif status == "done" and final.failed:
        raise RowsFailed(f"job {job.id}: {final.failed} row(s) failed; re-run them with `backfill retry-failed {job.id}`")
    return 0


def _batch_runner(settings: Settings, job: _jobs.Job, req: RunRequest):  # noqa: ANN202
    """The batch-mode runner for a job started with `--mode batch`, else None (the sync runner)."""
    from backfill import batch as _batch

    if not _batch.is_batch(job):
        return None
    return _batch.runner_factory(settings, job, req.timeout_s, float(req.extra.get("poll_interval", 60.0)))


def _tolerated(req: RunRequest, failed: int, selected: int) -> bool:
    """--max-failed-ratio R: failures up to R of the selected rows do not fail the command."""
    return req.max_failed_ratio is not None and selected > 0 and failed / selected <= req.max_failed_ratio


def run(settings: Settings, req: RunRequest) -> int:
    _validate(req)
    mode = req.extra.get("mode", "sync")
    if mode != "sync":
        from backfill import batch as _batch

        if mode not in _batch.MODES:
            raise ConfigError(f"--mode must be one of {', '.join(_batch.MODES)}")
        _batch.validate(req.provider, int(req.extra.get("file_lines", _batch.MAX_LINES)),
                        float(req.extra.get("poll_interval", 60.0)))
        if req.reembed_stale or req.vector_column:
            raise ConfigError("--mode batch does not take --reembed-stale or --vector-column yet: run those in sync mode")
    target, engine = open_database(settings)
    if req.vector_column:
        from backfill import vectors

        vectors.check_backend(target.kind, req.vector_column)
    _require_tables(engine)
    with engine.connect() as conn:
        user_id = coverage.user_id_for(conn, req.user_email) if req.user_email else None
    provider = _build_provider(settings, req)
    req.model = provider.model
    options = _options(req, user_id)
    key = _jobs.JobKey("run", req.target, user_id, provider.name, provider.model, provider.dimensions, req.recipe)
    if req.max_cost is not None:
        _refuse_over_budget(engine, req, provider, options, key)
    with engine.begin() as conn:
        locks.jobs_lock(conn)  # find-or-create is atomic: workers started at once share one job
        job = _jobs.find_open(conn, key)
        if job is None:
            if not (req.reembed_all or req.reembed_stale):
                for spec in _targets.specs_for(req.target):
                    _runner.ensure_compatible(conn, spec, provider, user_id)
            elif req.reembed_stale and not req.reembed_all:
                from backfill import stale

                for spec in _targets.specs_for(req.target):
                    stale.refuse_mixing(conn, spec, provider.model, provider.dimensions, user_id)
            params = {"batch_size": req.batch_size, "concurrency": req.concurrency, "delay_ms": req.delay_ms,
                      "reembed_all": req.reembed_all, "base_url": settings.openai_base_url}
            if mode == "batch":
                params.update(mode="batch", file_lines=int(req.extra.get("file_lines", 50_000)))
            if req.reembed_stale:
                params["reembed_stale"] = True
            if req.vector_column:
                params["vector_column"] = req.vector_column
            if req.price_per_mtok is not None:
                params["price_per_mtok"] = req.price_per_mtok  # so resume and retry-failed cost the same
            job = _jobs.create(conn, key, user_email=req.user_email, batch_size=req.batch_size, params=params)
            report.say(f"started job {job.id}: {req.target} with {provider.model} ({provider.dimensions} dimensions)")
        elif job.params.get("mode", "sync") != mode:
            raise ConfigError(f"job {job.id} is open in {job.params.get('mode', 'sync')} mode: continue it with "
                              f"`backfill resume {job.id}` or stop it with `backfill cancel {job.id}`")
        else:
            report.say(f"resuming job {job.id} from its last committed batch")
        if req.vector_column:  # last: every refusal above comes before this DDL
            for name in vectors.prepare(conn, target.kind, _targets.specs_for(req.target), req.vector_column,
                                        provider.dimensions):
                report.say(f"added column {name}.{req.vector_column} F32_BLOB({provider.dimensions})")
    if req.adopt_existing:
        _adopt(engine, job, provider, req, user_id)
    return _drive(settings, engine, job, provider, req, options, runner_class=_batch_runner(settings, job, req))


def _job_request(job: _jobs.Job, req: RunRequest) -> RunRequest:
    params = job.params
    req.provider, req.model, req.dimensions = job.provider, job.model, job.dimensions
    req.target, req.user_email, req.recipe = job.target, job.user_email, job.recipe_version
    req.reembed_all = bool(params.get("reembed_all"))
    req.reembed_stale = bool(params.get("reembed_stale"))
    req.vector_column = params.get("vector_column")
    if req.price_per_mtok is None:
        req.price_per_mtok = params.get("price_per_mtok")
    return req


def _adopt(engine: Engine, job: _jobs.Job, provider, req: RunRequest, user_id: str | None) -> None:  # noqa: ANN001
    from backfill import stale

    for spec in _targets.specs_for(req.target):
        n = stale.adopt(engine, spec, provider=provider.name, model=provider.model, dimensions=provider.dimensions,
                        recipe=req.recipe, user_id=user_id, job_id=job.id)
        report.say(f"adopted {n} existing {spec.name} vector(s): provenance recorded, nothing sent")
        report.event("adopted", job=job.id, target=spec.name, rows=n)


def _pick_job(conn, job_id: int | None, statuses: tuple[str, ...], what: str) -> _jobs.Job:  # noqa: ANN001
    if job_id is not None:
        return _jobs.get(conn, job_id)
    job = _jobs.latest(conn, statuses)
    if job is None:
        raise ConfigError(f"no {what} job: see `backfill jobs`")
    return job


def resume(settings: Settings, job_id: int | None, req: RunRequest) -> int:
    _target, engine = open_database(settings)
    _require_tables(engine)
    with engine.connect() as conn:
        job = _pick_job(conn, job_id, _jobs.OPEN_STATUSES, "open")
    if job.status not in _jobs.OPEN_STATUSES:
        raise ConfigError(f"job {job.id} is {job.status}; nothing to resume (start a new one with `backfill run`)")
    req = _job_request(job, req)
    provider = _build_provider(settings, req)
    report.say(f"resuming job {job.id} from its last committed batch")
    return _drive(settings, engine, job, provider, req, _options(req, job.user_id),
                  runner_class=_batch_runner(settings, job, req))


def retry_failed(settings: Settings, job_id: int | None, req: RunRequest) -> int:
    _target, engine = open_database(settings)
    _require_tables(engine)
    with engine.connect() as conn:
        if job_id is None:
            row = conn.execute(_sa.text(
                "SELECT job_id FROM backfill_failures WHERE kind = 'failed' AND resolved = :f ORDER BY job_id DESC LIMIT 1"
            ), {"f": False}).first()
            if row is None:
                report.say("no recorded failures: nothing to retry")
                return 0
            job_id = int(row[0])
        job = _jobs.get(conn, job_id)
        pending = len(_jobs.open_failures(conn, job.id))
    if not pending:
        report.say(f"job {job.id} has no unresolved failures")
        return 0
    req = _job_request(job, req)
    provider = _build_provider(settings, req)
    report.say(f"retrying {pending} failed row(s) of job {job.id}")
    return _drive(settings, engine, job, provider, req, _options(req, job.user_id), retry=True)


def _job_view(conn, job: _jobs.Job, *, remaining: bool) -> dict:  # noqa: ANN001
    row = dict(job.row)
    row["cursors"] = job.cursors
    row["params"] = job.params
    rate = row["embedded"] / row["elapsed_s"] if row["elapsed_s"] else None
    row["rate_rows_s"] = None if rate is None else round(rate, 2)
    if remaining and job.status in _jobs.OPEN_STATUSES:
        opts = _runner.RunOptions(target=job.target, user_id=job.user_id,
                                  reembed_all=bool(job.params.get("reembed_all")),
                                  reembed_stale=bool(job.params.get("reembed_stale")), model=job.model,
                                  recipe=job.recipe_version)
        left = sum(_runner.count_remaining(conn, s, job.dimensions, opts, job.cursors.get(s.name, 0))
                   for s in _targets.specs_for(job.target))
        row["remaining"] = left
        row["eta_s"] = round(left / rate, 1) if rate else None
    return row


def status(settings: Settings, job_id: int | None) -> int:
    _target, engine = open_database(settings)
    _require_tables(engine)
    with engine.connect() as conn:
        job = _pick_job(conn, job_id, (), "")
    polled = _batch_status(settings, engine, job)
    with engine.connect() as conn:
        view = _job_view(conn, _jobs.get(conn, job.id), remaining=True)
        if polled is not None:
            from backfill import batch as _batch

            view["batch_api"] = {**_batch.summary(conn, job.id), "poll": polled}
    if report.is_json():
        print(json.dumps(view, default=str), flush=True)
        return 0
    report.say(f"job {view['id']}  {view['status']}  {view['kind']} {view['target']}"
               f"{' for ' + view['user_email'] if view['user_email'] else ''}")
    report.say(f"  model      {view['provider']}:{view['model']} ({view['dimensions']} dims, recipe {view['recipe_version']})")
    report.say(f"  rows       selected {view['selected']}  embedded {view['embedded']}  failed {view['failed']}  "
               f"skipped {view['skipped']}")
    report.say(f"  cursor     {view['cursors']}")
    report.say(f"  work       {view['batches']} batches, {view['requests']} requests, {view['tokens']:,} tokens, "
               f"${view['cost_usd']:.4f}")
    rate = view["rate_rows_s"]
    report.say(f"  rate       {rate if rate is not None else '-'} rows/s"
               + (f"   remaining {view['remaining']}   ETA {view['eta_s'] if view.get('eta_s') is not None else '-'} s"
                  if "remaining" in view else ""))
    if view["worker_id"]:
        report.say(f"  worker     {view['worker_id']} (lease until {view['lease_expires_at']})")
    if view["stop_reason"]:
        report.say(f"  stopped    {view['stop_reason']}")
    if "batch_api" in view:
        b = view["batch_api"]
        states = ", ".join(f"{n} {s}" for s, n in b["by_state"].items()) or "none yet"
        report.say(f"  batch api  files: {states}; {b['rows_waiting']} row(s) waiting at the provider"
                   + (f"; {b['poll']}" if b["poll"] else ""))
        for f in b["files"]:
            report.say(f"             {f['name']}  {f['state']}  file {f['input_file_id'] or '-'}  "
                       f"batch {f['remote_batch_id'] or '-'} ({f['remote_status'] or '-'})")
    return 0


def _batch_status(settings: Settings, engine: Engine, job: _jobs.Job) -> str | None:
    """For a batch job: poll the provider once and write what finished (None for a sync job)."""
    from backfill import batch as _batch

    return _batch.collect_for_status(settings, engine, job) if _batch.is_batch(job) else None


def list_jobs(settings: Settings) -> int:
    _target, engine = open_database(settings)
    _require_tables(engine)
    with engine.connect() as conn:
        views = [_job_view(conn, j, remaining=False) for j in _jobs.listing(conn)]
    if report.is_json():
        for v in views:
            print(json.dumps(v, default=str), flush=True)
        return 0
    if not views:
        report.say("no jobs yet: start one with `backfill up`")
    for v in views:
        report.say(f"{v['id']:>5}  {v['status']:<11} {v['kind']:<5} {v['target']:<8} {v['model']:<32} "
                   f"embedded {v['embedded']:>7}  failed {v['failed']:>5}  {v['updated_at']}")
    return 0


def cancel(settings: Settings, job_id: int) -> int:
    _target, engine = open_database(settings)
    _require_tables(engine)
    with engine.connect() as conn:
        job = _jobs.get(conn, job_id)
    if job.status in _jobs.OPEN_STATUSES and job.params.get("mode") == "batch":
        from backfill import batch as _batch

        report.say(f"cancelled {_batch.cancel_remote(settings, engine, job)} batch(es) at the provider")
    with engine.begin() as conn:
        job = _jobs.cancel(conn, job_id)
    report.say(f"job {job.id} cancelled; a running worker stops after its in-flight batch")
    report.event("job_cancelled", job=job.id)
    return 0


def up(settings: Settings, req: RunRequest) -> int:
    """migrate -> verify -> run (resuming the open job) -> stats; stops at the first failing step."""
    migrate(settings)
    verify(settings)
    try:
        run(settings, req)
    except RowsFailed as exc:
        stats(settings, user_email=req.user_email)
        raise exc
    stats(settings, user_email=req.user_email)
    return 0


def index(settings: Settings, column: str, target: str = "all") -> int:
    """Fill the native vector column where NULL, build its libsql_vector_idx index, check vector_top_k."""
    from backfill import vectors

    if target not in _targets.TARGET_CHOICES:
        raise ConfigError(f"--target must be one of {', '.join(_targets.TARGET_CHOICES)}")
    kind, engine = open_database(settings)
    vectors.check_backend(kind.kind, column)
    for spec in _targets.specs_for(target):
        res = vectors.build_and_check(engine, kind.kind, spec, column)
        report.say(f"{res.index}: {res.rows} vectors ({res.filled} filled now); vector_top_k found "
                   f"{res.found}/{res.probes} probes")
        report.event("index_built", table=res.table, index=res.index, rows=res.rows, filled=res.filled,
                     probes=res.probes, found=res.found)
    return 0


def sample_db(settings: Settings, *, memories: int, entities: int, dimensions: int, seed: int) -> int:
    from backfill import sample

    target = db.resolve(settings.database_url, settings.auth_token)
    if target.path is not None and target.path.exists():
        raise ConfigError(f"{target.path} already exists: pick a new file name")
    engine = db.engine_for(target, must_exist=False)
    sample.build(engine, sample.SampleSpec(memories=memories, entities=entities, dimensions=dimensions, seed=seed))
    report.say(f"built {target.display}: {memories} memories, {entities} entities (mcp-memory-ts schema, not yet migrated)")
    report.event("sample_db", path=str(target.path), memories=memories, entities=entities)
    return 0


# --- plan and --max-cost --------------------------------------------------------------------

from backfill import plan as _plan


def _new_plan(req: RunRequest, provider_name: str, model: str, dimensions: int) -> _plan.Plan:
    price, source = _plan.price_for(model, req.price_per_mtok)
    if provider_name == "local" and req.price_per_mtok is None:
        price, source = 0.0, "local"
    rpm, tpm, limits = _plan.limits_for(provider_name, req.max_rpm, req.max_tpm)
    return _plan.Plan(provider=provider_name, model=model, dimensions=dimensions, recipe=req.recipe,
                      price_per_mtok=price, price_source=source, rpm=rpm, tpm=tpm, limits_source=limits)


def _open_cursors(engine: Engine, key: _jobs.JobKey) -> dict[str, int]:
    """Where a run would start: the open job's cursors, or the beginning."""
    if not _sa.inspect(engine).has_table("backfill_jobs"):
        return {}
    with engine.connect() as conn:
        job = _jobs.find_open(conn, key)
    return job.cursors if job else {}


def _refuse_over_budget(engine: Engine, req: RunRequest, provider, options: _runner.RunOptions,  # noqa: ANN001
                        key: _jobs.JobKey) -> None:
    if req.max_cost < 0:
        raise ConfigError("--max-cost must be >= 0 (US dollars)")
    p = _new_plan(req, provider.name, provider.model, provider.dimensions)
    p.price_per_mtok = provider.price_per_mtok
    _plan.compute(engine, p, options, provider.fit, _open_cursors(engine, key))
    report.event("plan", **p.as_dict())
    batch = req.extra.get("mode", "sync") == "batch"
    cost = p.cost_usd_batch if batch else p.cost_usd
    if cost > req.max_cost:
        raise ConfigError(
            f"this run would cost ${cost:.4f} ({p.tokens:,} tokens at ${p.price_per_mtok:g} per 1M"
            f"{', Batch API half price' if batch else ''}), above "
            f"--max-cost {req.max_cost:g}: raise --max-cost, or narrow it with -u/--target/--limit "
            "(see `backfill plan`)"
        )


def plan(settings: Settings, req: RunRequest) -> int:
    """What `run` with the same options would do: rows, tokens, requests, cost, ETA. Sends nothing."""
    _validate(req)
    _target, engine = open_database(settings)
    with engine.connect() as conn:
        user_id = coverage.user_id_for(conn, req.user_email) if req.user_email else None
    if req.provider == "local":
        from backfill.providers.local import LocalProvider

        local = LocalProvider()
        name, model, dims, fit = "local", local.model, local.dimensions, local.fit
    elif req.provider == "openai":
        from backfill.providers import DEFAULT_MODEL
        from backfill.providers.base import DEFAULT_DIMENSIONS
        from backfill.tokens import MAX_INPUT_TOKENS, truncate

        name, model = "openai", req.model or DEFAULT_MODEL
        dims = req.dimensions or DEFAULT_DIMENSIONS.get(model)
        if not dims:
            raise ConfigError(f"unknown dimensions for model {model!r}: pass --dimensions N")

        def fit(text: str) -> tuple[str, int, bool]:
            return truncate(text, MAX_INPUT_TOKENS)
    else:
        raise ConfigError(f"unknown provider {req.provider!r}: use --provider openai or --provider local")
    options = _options(req, user_id)
    p = _new_plan(req, name, model, dims)
    key = _jobs.JobKey("run", req.target, user_id, name, model, dims, req.recipe)
    _plan.compute(engine, p, options, fit, _open_cursors(engine, key))
    if report.is_json():
        print(json.dumps(p.as_dict()), flush=True)
    else:
        report.say(_plan.render(p))
    if req.max_cost is not None and p.cost_usd > req.max_cost:
        raise ConfigError(f"the plan costs ${p.cost_usd:.4f}, above --max-cost {req.max_cost:g}")
    return 0
