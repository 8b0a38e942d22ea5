"""What `run`, `up`, `resume`, `retry-failed` and `plan` are asked to do, checked and turned into
the runner's options and a provider."""

from __future__ import annotations

from dataclasses import dataclass, field

from backfill import jobs, packing, page, providers, tables
from backfill.config import DEFAULT_BATCH_SIZE, DEFAULT_CONCURRENCY, Settings
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
    batch_size: int = DEFAULT_BATCH_SIZE
    concurrency: int = DEFAULT_CONCURRENCY
    delay_ms: int = 0
    limit: int | None = None
    max_runtime_s: float | None = None
    recipe: str = tables.DEFAULT_RECIPE
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

    # `extra` holds what only some commands are given; its defaults are these, written once
    @property
    def mode(self) -> str:
        return str(self.extra.get("mode", "sync"))

    @property
    def file_lines(self) -> int:
        return int(self.extra.get("file_lines", page.MAX_FILE_LINES))

    @property
    def poll_interval_s(self) -> float:
        poll = self.extra.get("poll_interval")
        return (page.FOLLOW_POLL_S if self.follow else page.POLL_INTERVAL_S) if poll is None else float(poll)

    @property
    def follow(self) -> bool:
        return bool(self.extra.get("follow"))

    def pacing(self) -> dict:
        """How fast and how long this invocation runs: what `resume` and `retry-failed` take over a job's own."""
        return {"batch_size": self.batch_size, "concurrency": self.concurrency, "delay_ms": self.delay_ms,
                "limit": self.limit, "max_runtime_s": self.max_runtime_s}


MAX_DIMENSIONS = 16_000  # more than any embedding model's vector (text-embedding-3-large: 3072)


def resolve_provider(settings: Settings, req: RunRequest) -> RunRequest:
    """--provider, else BACKFILL_PROVIDER (environment, .env.local, .env), else openai."""
    req.provider = (req.provider or settings.provider or "openai").strip()
    return req


def validate(req: RunRequest) -> None:
    """Every flag of `run`, `up` and `plan`, checked before anything is opened or written (exit 2)."""
    if req.provider not in providers.PROVIDERS:
        raise ConfigError(f"unknown provider {req.provider!r}: use --provider openai or --provider local")
    if req.target not in tables.TARGET_CHOICES:
        raise ConfigError(f"--target must be one of {', '.join(tables.TARGET_CHOICES)}")
    if req.recipe not in tables.RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(tables.RECIPES)}")
    if req.model is not None and not req.model.strip():
        raise ConfigError("--model is empty: name a model (e.g. text-embedding-3-small) or drop --model")
    if req.dimensions is not None and not 1 <= req.dimensions <= MAX_DIMENSIONS:
        raise ConfigError(f"--dimensions must be between 1 and {MAX_DIMENSIONS:,} (or drop it for the model's own)")
    if req.limit is not None and req.limit < 1:
        raise ConfigError("--limit must be >= 1 (rows)")
    if req.price_per_mtok is not None and req.price_per_mtok < 0:
        raise ConfigError("--price-per-mtok must be >= 0 (US dollars per 1M tokens)")
    if req.max_failed_ratio is not None and not 0.0 <= req.max_failed_ratio <= 1.0:
        raise ConfigError("--max-failed-ratio must be between 0 and 1 (e.g. 0.01 for 1 %)")
    if req.max_cost is not None and req.max_cost < 0:
        raise ConfigError("--max-cost must be >= 0 (US dollars)")
    validate_pacing(req)
    validate_follow(req)
    if req.mode != "sync":
        from backfill import batch_api

        if req.mode not in page.MODES:
            raise ConfigError(f"--mode must be one of {', '.join(page.MODES)}")
        batch_api.validate(req.provider, req.file_lines, req.poll_interval_s)
        if req.reembed_stale or req.vector_column:
            raise ConfigError("--mode batch does not take --reembed-stale or --vector-column yet: "
                              "run those in sync mode")


def validate_follow(req: RunRequest) -> None:
    """`--follow` runs until stopped, in sync mode, on the rows that need a vector: what it cannot combine with."""
    if not req.follow:
        return
    for flag, given in (("--mode batch", req.mode == "batch"), ("--limit", req.limit is not None),
                        ("--dry-run", bool(req.extra.get("dry_run"))), ("--reembed-all", req.reembed_all),
                        ("--reembed-stale", req.reembed_stale)):
        if given:
            raise ConfigError(f"--follow does not take {flag}: run that without --follow, then start the "
                              "follower (`backfill up --follow`)")


def validate_pacing(req: RunRequest) -> None:
    """The flags `resume` and `retry-failed` take too: how fast and how long, not what."""
    if not 1 <= req.batch_size <= packing.MAX_REQUEST_INPUTS:
        raise ConfigError(f"-b/--batch-size must be between 1 and {packing.MAX_REQUEST_INPUTS}")
    if not 1 <= req.concurrency <= 64:
        raise ConfigError("--concurrency must be between 1 and 64")
    if req.delay_ms < 0:
        raise ConfigError("-d/--delay-ms must be >= 0")
    if req.limit is not None and req.limit < 1:
        raise ConfigError("--limit must be >= 1 (rows)")
    if not req.timeout_s > 0:
        raise ConfigError("--timeout must be > 0 seconds (per API request)")
    if req.max_runtime_s is not None and not req.max_runtime_s > 0:
        raise ConfigError("--max-runtime must be > 0 seconds (or drop it to run until done)")
    for flag, value in (("--max-rpm", req.max_rpm), ("--max-tpm", req.max_tpm)):
        if value is not None and not value > 0:
            raise ConfigError(f"{flag} must be > 0 (or drop it to learn the limit from the provider's headers)")
    if not req.poll_interval_s > 0:
        raise ConfigError("--poll-interval must be > 0 seconds")


def run_options(req: RunRequest, user_id: str | None, base_url: str | None = None) -> page.RunOptions:
    """What a new run is asked to do (`resume` and `retry-failed` take `page.RunOptions.from_job`)."""
    return page.RunOptions(
        target=req.target, user_id=user_id, recipe=req.recipe, reembed_all=req.reembed_all,
        reembed_stale=req.reembed_stale, model=req.model, vector_column=req.vector_column, mode=req.mode,
        file_lines=req.file_lines, price_per_mtok=req.price_per_mtok, base_url=base_url, follow=req.follow,
        **req.pacing(),
    )


def build_provider(settings: Settings, req: RunRequest) -> Provider:
    return providers.build(
        req.provider, settings, model=req.model, dimensions=req.dimensions,
        limiter=Limiter(req.max_rpm, req.max_tpm), timeout=req.timeout_s, price_per_mtok=req.price_per_mtok,
    )


def from_job(job: jobs.Job, req: RunRequest) -> tuple[RunRequest, page.RunOptions]:
    """`resume` and `retry-failed` continue a job as it was started (its provider, model, target, recipe, ...),
    at this invocation's pace."""
    options = page.RunOptions.from_job(job, **req.pacing())
    req.provider, req.model, req.dimensions = job.provider, job.model, job.dimensions
    req.target, req.user_email, req.recipe = job.target, job.user_email, options.recipe
    req.reembed_all, req.reembed_stale, req.vector_column = options.reembed_all, options.reembed_stale, \
        options.vector_column
    if req.price_per_mtok is None:
        req.price_per_mtok = options.price_per_mtok
    return req, options
