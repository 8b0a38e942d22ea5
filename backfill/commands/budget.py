"""`plan` (what a run would cost, sending nothing) and the `--max-cost` refusal before a run."""

from __future__ import annotations

from types import SimpleNamespace

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from backfill import changes, jobs, report, tables
from backfill import plan as planning
from backfill import stats as coverage
from backfill.commands.database import open_database
from backfill.commands.request import RunRequest, resolve_provider, run_options, validate
from backfill.config import Settings
from backfill.errors import ConfigError
from backfill.page import RunOptions
from backfill.providers import DEFAULT_MODEL
from backfill.providers.base import DEFAULT_DIMENSIONS, Provider


def new_plan(req: RunRequest, provider_name: str, model: str, dimensions: int) -> planning.Plan:
    price, source = planning.price_for(model, req.price_per_mtok)
    if provider_name == "local" and req.price_per_mtok is None:
        price, source = 0.0, "local"
    rpm, tpm, limits = planning.limits_for(provider_name, req.max_rpm, req.max_tpm)
    return planning.Plan(provider=provider_name, model=model, dimensions=dimensions, recipe=req.recipe,
                         price_per_mtok=price, price_source=source, rpm=rpm, tpm=tpm, limits_source=limits)


def open_cursors(engine: Engine, key: jobs.JobKey) -> dict[str, int]:
    """Where a run would start: the open job's cursors, or the beginning."""
    if not sa.inspect(engine).has_table("backfill_jobs"):
        return {}
    with engine.connect() as conn:
        job = jobs.find_open(conn, key)
    return job.cursors if job else {}


def refuse_over_budget(engine: Engine, req: RunRequest, provider: Provider, options: RunOptions,
                       key: jobs.JobKey) -> None:
    p = new_plan(req, provider.name, provider.model, provider.dimensions)
    p.price_per_mtok = provider.price_per_mtok
    planning.compute(engine, p, options, provider.fit, open_cursors(engine, key))
    report.event("plan", **p.as_dict())
    batch = req.mode == "batch"
    cost = p.cost_usd_batch if batch else p.cost_usd
    if req.max_cost is not None and cost > req.max_cost:
        raise ConfigError(
            f"this run would cost ${cost:.4f} ({p.tokens:,} tokens at ${p.price_per_mtok:g} per 1M"
            f"{', Batch API half price' if batch else ''}), above "
            f"--max-cost {req.max_cost:g}: raise --max-cost, or narrow it with -u/--target/--limit "
            "(see `backfill plan`)"
        )


def _refuse_like_run(engine: Engine, req: RunRequest, model: str, dims: int, user_id: str | None) -> None:
    """`run` refuses to mix models or dimensions in one column (changes.ensure_compatible): say so now."""
    wanted = SimpleNamespace(model=model, dimensions=dims)
    with engine.connect() as conn:
        for spec in tables.specs_for(req.target):
            try:
                changes.ensure_compatible(conn, spec, wanted, user_id)
            except ConfigError as exc:
                raise ConfigError(f"`run` with these options would refuse to start: {exc.message}") from None


def plan(settings: Settings, req: RunRequest) -> int:
    """What `run` with the same options would do: rows, tokens, requests, cost, ETA. Sends nothing.
    A run that would be refused (another model or dimension count in the column) is refused here too."""
    req = resolve_provider(settings, req)
    validate(req)
    _target, engine = open_database(settings)
    with engine.connect() as conn:
        user_id = coverage.user_id_for(conn, req.user_email) if req.user_email else None
    # the local model and the tokenizer load only for the provider asked for
    if req.provider == "local":
        from backfill.providers.local import LocalProvider

        local = LocalProvider()
        name, model, dims, fit = "local", local.model, local.dimensions, local.fit
    elif req.provider == "openai":
        from backfill.tokens import MAX_INPUT_TOKENS, truncate

        name, model = "openai", req.model or DEFAULT_MODEL
        known = req.dimensions or DEFAULT_DIMENSIONS.get(model)
        if not known:
            raise ConfigError(f"unknown dimensions for model {model!r}: pass --dimensions N")
        dims = known

        def fit(text: str) -> tuple[str, int, bool]:
            return truncate(text, MAX_INPUT_TOKENS)
    else:
        raise ConfigError(f"unknown provider {req.provider!r}: use --provider openai or --provider local")
    options = run_options(req, user_id)
    p = new_plan(req, name, model, dims)
    key = jobs.JobKey("run", req.target, user_id, name, model, dims, req.recipe)
    cursors = open_cursors(engine, key)
    if not cursors and not (req.reembed_all or req.reembed_stale):
        _refuse_like_run(engine, req, model, dims, user_id)
    planning.compute(engine, p, options, fit, cursors)
    if report.is_json():
        report.record("plan", p.as_dict())
    else:
        report.say(planning.render(p))
    if req.max_cost is not None and p.cost_usd > req.max_cost:
        raise ConfigError(f"the plan costs ${p.cost_usd:.4f}, above --max-cost {req.max_cost:g}")
    return 0
