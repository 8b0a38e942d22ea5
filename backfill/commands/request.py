"""What `run`, `up`, `resume`, `retry-failed` and `plan` are asked to do, checked and turned into
the runner's options and a provider."""

from __future__ import annotations

from dataclasses import dataclass, field

from backfill import jobs, packing, providers, runner, targets
from backfill.config import Settings
from backfill.errors import ConfigError
from backfill.limits import Limiter
from backfill.providers.base import Provider


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
    recipe: str = targets.DEFAULT_RECIPE
    reembed_all: bool = False
    max_rpm: float | None = None
    max_tpm: float | None = None
    timeout_s: float = 60.0
    wait: bool = False
    wait_timeout_s: float = 600.0
    extra: dict = field(default_factory=dict)
    reembed_stale: bool = False
    adopt_existing: bool = False
    max_failed_ratio: float | None = None
    vector_column: str | None = None
    max_cost: float | None = None  # USD; refuse a run whose plan costs more
    price_per_mtok: float | None = None  # USD per 1M tokens, over the model's price table


def validate(req: RunRequest) -> None:
    if req.target not in targets.TARGET_CHOICES:
        raise ConfigError(f"--target must be one of {', '.join(targets.TARGET_CHOICES)}")
    if req.recipe not in targets.RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(targets.RECIPES)}")
    if not 1 <= req.batch_size <= packing.MAX_REQUEST_INPUTS:
        raise ConfigError(f"-b/--batch-size must be between 1 and {packing.MAX_REQUEST_INPUTS}")
    if not 1 <= req.concurrency <= 64:
        raise ConfigError("--concurrency must be between 1 and 64")
    if req.delay_ms < 0 or (req.limit is not None and req.limit < 1):
        raise ConfigError("-d/--delay-ms must be >= 0 and --limit >= 1")


def run_options(req: RunRequest, user_id: str | None) -> runner.RunOptions:
    return runner.RunOptions(
        target=req.target, user_id=user_id, batch_size=req.batch_size, concurrency=req.concurrency,
        delay_ms=req.delay_ms, limit=req.limit, max_runtime_s=req.max_runtime_s, recipe=req.recipe,
        reembed_all=req.reembed_all, reembed_stale=req.reembed_stale, model=req.model,
        vector_column=req.vector_column,
    )


def build_provider(settings: Settings, req: RunRequest) -> Provider:
    return providers.build(
        req.provider, settings, model=req.model, dimensions=req.dimensions,
        limiter=Limiter(req.max_rpm, req.max_tpm), timeout=req.timeout_s, price_per_mtok=req.price_per_mtok,
    )


def from_job(job: jobs.Job, req: RunRequest) -> RunRequest:
    """`resume` and `retry-failed` continue a job as it was started: its provider, model, target, recipe."""
    params = job.params
    req.provider, req.model, req.dimensions = job.provider, job.model, job.dimensions
    req.target, req.user_email, req.recipe = job.target, job.user_email, job.recipe_version
    req.reembed_all = bool(params.get("reembed_all"))
    req.reembed_stale = bool(params.get("reembed_stale"))
    req.vector_column = params.get("vector_column")
    if req.price_per_mtok is None:
        req.price_per_mtok = params.get("price_per_mtok")
    return req
