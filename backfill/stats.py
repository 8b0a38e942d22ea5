"""Coverage statistics, as the server's `get_statistics` reports them, for the whole table.

For each embeddable table: total rows, rows with an embedding (a JSON array of numbers), rows
missing one (NULL, '' or '[]'), rows whose embedding is malformed, and coverage of the whole
table (not "of what was missing at start", the seed's mistake). Optionally per user.
Also stale rows (edited text, other model or recipe) and unknown ones (no provenance): stale.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from backfill import changes, stale
from backfill.errors import ConfigError
from backfill.schema import users
from backfill.tables import SPECS, Spec, missing, valid_vector

HEALTHY_COVERAGE = 90.0


@dataclass
class TableStats:
    table: str
    total: int
    with_embedding: int
    missing: int
    malformed: int
    coverage: float
    stale: int = 0  # valid vectors that no longer match (see stale.py), by reason in stale_reasons
    unknown: int = 0  # valid vectors without provenance (embedded before this tool)
    stale_reasons: dict = field(default_factory=dict)
    unaddressable: int = 0  # rows whose key is NULL: nothing can be written back to them

    @property
    def verdict(self) -> str:
        if self.total == 0 or self.coverage >= HEALTHY_COVERAGE:
            return "healthy"
        return "degraded" if self.coverage >= 50 else "critical"


@dataclass
class Stats:
    user_email: str | None
    tables: list[TableStats]

    @property
    def verdict(self) -> str:
        order = ["healthy", "degraded", "critical"]
        return max((t.verdict for t in self.tables), key=order.index, default="healthy")

    @property
    def recommendation(self) -> str | None:
        low = [t.table for t in self.tables if t.verdict != "healthy"]
        from backfill.report import suggest

        scope = f" -u {self.user_email}" if self.user_email else ""
        stale = sum(t.stale for t in self.tables)
        if not low:
            return f"{stale} stale row(s): run `{suggest('backfill run --reembed-stale' + scope)}`" if stale else None
        return f"coverage below {HEALTHY_COVERAGE:.0f}% for {', '.join(low)}: run `{suggest('backfill up' + scope)}`"

    def as_dict(self) -> dict:
        return {
            "user_email": self.user_email,
            "tables": {
                t.table: {**{k: v for k, v in asdict(t).items() if k != "table"}, "verdict": t.verdict}
                for t in self.tables
            },
            "verdict": self.verdict,
            "recommendation": self.recommendation,
        }


def user_id_for(conn: Connection, email: str) -> str:
    """The id of the user with this email, or a ConfigError that says so (exit 2)."""
    wanted = email.strip()
    rows = conn.execute(sa.select(users.c.id, users.c.email)
                        .where(sa.func.lower(users.c.email) == wanted.lower())).all()
    exact = [r.id for r in rows if r.email == wanted]
    if len(exact) == 1:
        return exact[0]
    if len(rows) == 1:  # emails match case-insensitively, as people type them
        return rows[0].id
    if not rows:
        raise ConfigError(f"no user with email {email!r}: check -u/--user-email (see the users table)")
    raise ConfigError(f"{len(rows)} users have an email equal to {email!r} but for case "
                      f"({', '.join(sorted(r.email for r in rows))}): give the exact one with -u")


def _has_embedding_column(conn: Connection, spec: Spec) -> bool:
    return any(c["name"] == spec.embedding.name for c in sa.inspect(conn).get_columns(spec.name))


def table_stats(conn: Connection, spec: Spec, user_id: str | None = None, with_stale: bool = True,
                deep: bool = False) -> TableStats:
    """From the change queue once it is seeded (changes.summary); `deep` reads every row instead."""
    dialect = conn.dialect.name
    if not deep and changes.seeded(conn, spec):
        return _from_queue(conn, spec, user_id, with_stale)
    if not _has_embedding_column(conn, spec):  # the server's startup alone: revision 0006 adds the column
        q = sa.select(sa.func.count()).select_from(spec.table)
        total = int(conn.execute(q.where(*([spec.user_id == user_id] if user_id is not None else []))).scalar_one())
        return TableStats(spec.name, total, 0, total, 0, 0.0 if total else 100.0)
    col = spec.embedding
    is_missing = missing(col)
    is_valid = sa.and_(sa.not_(is_missing), valid_vector(col, dialect))
    q = sa.select(
        sa.func.count(),
        sa.func.coalesce(sa.func.sum(sa.case((is_valid, 1), else_=0)), 0),
        sa.func.coalesce(sa.func.sum(sa.case((is_missing, 1), else_=0)), 0),
        sa.func.coalesce(sa.func.sum(sa.case((spec.key.is_(None), 1), else_=0)), 0),
    ).select_from(spec.table)
    if user_id is not None:
        q = q.where(spec.user_id == user_id)
    counted = conn.execute(q).one()
    total, good, miss, keyless = (int(v) for v in counted)
    coverage = round(100.0 * good / total, 2) if total else 100.0
    found = (stale.count(conn, spec, stale.reference_for(conn, spec.name), user_id) if with_stale
             else stale.StaleCounts())
    if not stale.has_provenance(conn):  # never migrated: every vector there is of unknown origin
        found.unknown = good
    return TableStats(spec.name, total, good, miss, total - good - miss, coverage, found.total, found.unknown,
                      found.stale, unaddressable=int(keyless))


def _from_queue(conn: Connection, spec: Spec, user_id: str | None, with_stale: bool) -> TableStats:
    s = changes.summary(conn, spec, user_id, stale.reference_for(conn, spec.name), with_stale=with_stale)
    good = s.with_embedding
    coverage = round(100.0 * good / s.total, 2) if s.total else 100.0
    stale_reasons = s.stale if with_stale else dict.fromkeys(stale.REASONS, 0)
    return TableStats(spec.name, s.total, good, s.missing, s.malformed, coverage, sum(stale_reasons.values()),
                      s.unknown if with_stale else 0, stale_reasons, unaddressable=s.unaddressable)


def collect(conn: Connection, user_email: str | None = None, *, with_stale: bool = True,
            deep: bool = False) -> Stats:
    """with_stale=False skips the stale scan (it hashes every embedded row's text in Python).
    Once the change queue is seeded the figures come from it; `deep` reads and re-validates every row."""
    user_id = user_id_for(conn, user_email) if user_email else None
    return Stats(user_email, [table_stats(conn, spec, user_id, with_stale, deep) for spec in SPECS.values()])
