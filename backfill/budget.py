"""The `--max-cost` refusal before a run, and the plan it (and `plan`) is computed on."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from backfill import jobs, report
from backfill import plan as planning
from backfill.errors import ConfigError
from backfill.page import RunOptions
from backfill.providers.base import Provider
from backfill.request import RunRequest


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
