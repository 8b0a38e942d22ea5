"""A dry run: what a run with these options would send, before it sends anything.

It walks the same keyset pages as the runner (same page size, same `--limit`, from the open job's
cursor when there is one), builds each row's recipe text, cuts it to the model's input limit with
the model's real tokenizer, and packs requests exactly as the runner does. So its token count is
the count the provider bills, its request count is the runner's, and its cost is tokens x price.
The ETA is the larger of requests / rpm and tokens / tpm, at the limits given or the defaults.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from backfill import dedupe, packing, sources, stopping, tables
from backfill.page import RunOptions
from backfill.providers.base import BATCH_PRICE_FACTOR, PRICES
from backfill.runner import Pager

# A new OpenAI account's embedding limits (tier 1); pass --max-rpm/--max-tpm for yours.
DEFAULT_LIMITS = {"rpm": 3_000.0, "tpm": 1_000_000.0}
SCAN_CHUNK = 2_000  # rows read per query when no run page size applies

Fit = Callable[[str], "tuple[str, int, bool]"]


@dataclass
class TargetPlan:
    rows: int = 0  # rows that need an embedding (selected)
    skipped: int = 0  # blank recipe text: recorded, never sent
    tokens: int = 0
    truncated: int = 0
    requests: int = 0
    copied: int = 0  # rows whose identical text is already embedded, or sent earlier in the run: not sent


@dataclass
class Plan:
    provider: str
    model: str
    dimensions: int
    recipe: str
    price_per_mtok: float
    price_source: str  # "table", "--price-per-mtok", "local" or "unknown"
    rpm: float | None
    tpm: float | None
    limits_source: str  # "flags", "defaults" or "none"
    targets: dict[str, TargetPlan] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.targets.values())

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self.targets.values())

    @property
    def requests(self) -> int:
        return sum(t.requests for t in self.targets.values())

    @property
    def cost_usd(self) -> float:
        return self.tokens * self.price_per_mtok / 1_000_000

    @property
    def cost_usd_batch(self) -> float:
        """The same tokens through the Batch API (`run --mode batch`), billed at half the price."""
        return self.cost_usd * BATCH_PRICE_FACTOR

    @property
    def eta_s(self) -> float | None:
        """Minutes of quota the work needs, in seconds (latency and our own overhead not included)."""
        if self.rpm is None and self.tpm is None:
            return None
        minutes = max(self.requests / self.rpm if self.rpm else 0.0, self.tokens / self.tpm if self.tpm else 0.0)
        return round(minutes * 60.0, 1)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(rows=self.rows, skipped=sum(t.skipped for t in self.targets.values()),
                   copied=sum(t.copied for t in self.targets.values()), tokens=self.tokens,
                   truncated=sum(t.truncated for t in self.targets.values()), requests=self.requests,
                   cost_usd=self.cost_usd, cost_usd_batch=self.cost_usd_batch, eta_s=self.eta_s)
        return out


def price_for(model: str, override: float | None) -> tuple[float, str]:
    if override is not None:
        return float(override), "--price-per-mtok"
    if model in PRICES:
        return PRICES[model], "table"
    return 0.0, "unknown"


def limits_for(provider: str, rpm: float | None, tpm: float | None) -> tuple[float | None, float | None, str]:
    if rpm is not None or tpm is not None:
        return rpm, tpm, "flags"
    if provider == "openai":
        return DEFAULT_LIMITS["rpm"], DEFAULT_LIMITS["tpm"], "defaults"
    return None, None, "none"


def compute(engine: Engine, plan: Plan, options: RunOptions, fit: Fit,
            cursors: dict[str, int] | None = None) -> Plan:
    """Fill `plan` with what a run of `options` would select, send and pay for."""
    cursors = cursors or {}
    # the runner's keyset pages (same size and `--limit`), without a job
    pager = Pager(engine, functools.partial(sources.missing_rows, dimensions=plan.dimensions, options=options),
                  options.limit)
    stop = stopping.StopFlag()
    provenance = not options.reembed_all and sa.inspect(engine).has_table("backfill_embeddings")  # none before migrate
    for spec in tables.specs_for(options.target):
        tp = plan.targets.setdefault(spec.name, TargetPlan())
        sent: set[str] = set()  # the runner sends each text once per run (dedupe.py, Runner._in_run_copies)
        for rows in pager.pages(spec, cursors.get(spec.name, 0), lambda: options.page_size, stop):
            fitted = []
            for row in rows:
                text = tables.recipe_text(spec, row._mapping, options.recipe)
                if not text:
                    tp.skipped += 1
                    continue
                _cut, count, truncated = fit(text)
                fitted.append((tables.content_hash(text), packing.Item(spec.name, int(row[0]), "", count, truncated)))
            known = {} if not provenance else dedupe.known_vectors(
                engine, spec, [h for h, _ in fitted], model=plan.model, dimensions=plan.dimensions,
                recipe=options.recipe, user_id=options.user_id)
            items = []
            for digest, item in fitted:
                if digest in known or digest in sent:
                    tp.copied += 1
                    continue
                sent.add(digest)
                items.append(item)
            tp.rows += len(rows)
            tp.tokens += sum(i.tokens for i in items)
            tp.truncated += sum(1 for i in items if i.truncated)
            tp.requests += len(packing.pack_requests(items, options.batch_size))
    return plan


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = math.ceil(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def render(plan: Plan) -> str:
    """The human table."""
    lines = [f"plan: {plan.provider}:{plan.model} ({plan.dimensions} dims), recipe {plan.recipe}",
             f"  {'target':<10}{'rows':>10}{'skipped':>10}{'copied':>10}{'tokens':>14}{'truncated':>11}"
             f"{'requests':>10}"]
    for name, t in plan.targets.items():
        lines.append(f"  {name:<10}{t.rows:>10,}{t.skipped:>10,}{t.copied:>10,}{t.tokens:>14,}{t.truncated:>11,}"
                     f"{t.requests:>10,}")
    total = plan.as_dict()
    lines.append(f"  {'total':<10}{total['rows']:>10,}{total['skipped']:>10,}{total['copied']:>10,}"
                 f"{total['tokens']:>14,}{total['truncated']:>11,}{total['requests']:>10,}")
    price = {"table": "price table", "--price-per-mtok": "--price-per-mtok", "local": "the local model is free",
             "unknown": "model not in the price table: pass --price-per-mtok"}[plan.price_source]
    lines.append(f"  cost      ${plan.cost_usd:.6f}  ({plan.tokens:,} tokens x ${plan.price_per_mtok:g} per 1M; "
                 f"{price})")
    if plan.cost_usd:
        lines.append(f"  batch     ${plan.cost_usd_batch:.6f}  with --mode batch "
                     "(the Batch API bills half; results within 24 h)")
    if plan.limits_source == "none":
        lines.append("  ETA       - (no quota for this provider; pass --max-rpm/--max-tpm to estimate)")
    else:
        limits = " and ".join(f"{v:,.0f} {unit}/min" for v, unit in ((plan.rpm, "requests"), (plan.tpm, "tokens")) if v)
        why = "given" if plan.limits_source == "flags" else "tier-1 defaults; pass --max-rpm/--max-tpm for yours"
        lines.append(f"  ETA       {_duration(plan.eta_s)} at {limits} ({why})")
    return "\n".join(lines)
