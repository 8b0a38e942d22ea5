"""`plan`: what a run would cost, sending nothing."""

from __future__ import annotations

from types import SimpleNamespace

from sqlalchemy.engine import Engine

from backfill import changes, jobs, report, tables
from backfill import plan as planning
from backfill import stats as coverage
from backfill.budget import new_plan, open_cursors
from backfill.commands.database import open_database
from backfill.config import Settings
from backfill.errors import ConfigError
from backfill.providers import DEFAULT_MODEL
from backfill.providers.base import DEFAULT_DIMENSIONS
from backfill.request import RunRequest, resolve_provider, run_options, validate


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
