"""Build an mcp-memory-ts-shaped database the way the server does (no `alembic_version`).

Several users; memories and entities with a mix of missing (NULL, '', '[]'), present and
malformed embeddings; archived rows; very long texts (far over the token limit); non-ASCII texts;
blank contents. Deterministic for a given seed. Used by the tests, the benchmarks and the demo.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from backfill import baseline
from backfill.schema import api_usage_tracking, entities, interactions, memories, metadata, users

USERS = [
    ("u-alice", "alice@example.com", "Alice"),
    ("u-bob", "bob@example.com", "Bob"),
    ("u-carol", "carol@example.com", "Carol"),
    ("u-dave", "dave@example.com", "Dave"),
    ("u-test", "test@example.com", "Default User"),
]

_WORDS = (
    "project meeting deadline client invoice design review deploy database migration search "
    "vector embedding memory note idea travel flight hotel budget contract release roadmap "
    "customer feedback bug fix feature launch team sprint planning coffee lunch garden book "
    "music recipe doctor appointment birthday gift password reminder server backup monitor"
).split()
_NON_ASCII = [
    "Réunion avec l'équipe à Zürich, café crème et croissants",
    "東京での会議は来週の火曜日に変更されました",
    "Встреча с клиентом перенесена на пятницу",
    "Geburtstag von Jörg: Geschenk besorgen 🎁",
    "مراجعة العقد مع الفريق القانوني",
    "emoji only 🚀🔥✨ and ñandú",
]
MEMORY_TYPES = ["memory", "fact", "preference", "episodic", "semantic", "procedural"]
ENTITY_TYPES = ["person", "organization", "project", "place"]
MALFORMED = ['{"not": "an array"}', "not json at all", '[1, "two", 3]', "[1, 2,"]


@dataclass
class SampleSpec:
    memories: int = 600
    entities: int = 200
    seed: int = 7
    dimensions: int = 384
    present_ratio: float = 0.35  # rows that already carry a valid embedding
    long_every: int = 97  # one very long text every N rows
    interactions: int = 20


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "."


def _vector(rng: random.Random, dims: int) -> str:
    return json.dumps([round(rng.uniform(-1, 1), 6) for _ in range(dims)], separators=(",", ":"))


def _embedding(rng: random.Random, i: int, spec: SampleSpec) -> str | None:
    r = rng.random()
    if i % 53 == 11:
        return MALFORMED[i % len(MALFORMED)]
    if r < spec.present_ratio:
        return _vector(rng, spec.dimensions)
    return [None, "", "[]"][i % 3]


def _text(rng: random.Random, i: int, spec: SampleSpec) -> str:
    if spec.long_every and i % spec.long_every == 5:
        return " ".join(_sentence(rng, 12) for _ in range(1200))  # ~15k tokens: over the 8,191 limit
    if i % 41 == 7:
        return _NON_ASCII[i % len(_NON_ASCII)]
    if i % 89 == 13:
        return ["", "   ", "\n\t"][i % 3]  # blank content
    return " ".join(_sentence(rng, rng.randint(6, 18)) for _ in range(rng.randint(2, 8)))


def create_legacy_schema(engine: Engine) -> None:
    """The server's own DDL on SQLite/libSQL; the same tables (no FTS5) on PostgreSQL."""
    with engine.begin() as conn:
        if conn.dialect.name == "sqlite":  # the server's startup, then its add-entity-embeddings script
            for statement in [*baseline.sqlite_statements(), baseline.ENTITY_EMBEDDING_SCRIPT]:
                conn.exec_driver_sql(statement)
        else:
            data = [metadata.tables[name] for name in baseline.DATA_TABLES]
            metadata.create_all(conn, tables=data)
        now = datetime(2025, 1, 1, tzinfo=UTC).isoformat()
        conn.execute(sa.text("INSERT INTO schema_version (version, applied_at) VALUES (2, :t)"), {"t": now})


def fill(engine: Engine, spec: SampleSpec) -> None:
    rng = random.Random(spec.seed)
    start = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)

    def stamp(i: int) -> str:
        # the server's format: JavaScript's toISOString()
        return (start + timedelta(minutes=7 * i)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

    with engine.begin() as conn:
        conn.execute(
            users.insert(),
            [
                {"id": uid, "email": email, "name": name, "organization": "Example", "is_active": True,
                 "metadata": "{}", "created_at": stamp(0), "updated_at": stamp(0)}
                for uid, email, name in USERS
            ],
        )
        batch: list[dict] = []
        for i in range(spec.memories):
            user = USERS[i % len(USERS)][0]
            batch.append({
                "user_id": user,
                "title": _NON_ASCII[i % 6][:30] if i % 41 == 7 else _sentence(rng, rng.randint(2, 6)),
                "content": _text(rng, i, spec),
                "memory_type": MEMORY_TYPES[i % len(MEMORY_TYPES)],
                "importance": 1 + i % 4,
                "tags": json.dumps(rng.sample(_WORDS, rng.randint(0, 3))),
                "entity_ids": "[]",
                "embedding": _embedding(rng, i, spec),
                "metadata": json.dumps({"source": "sample", "n": i}),
                "is_archived": i % 17 == 0,
                "created_at": stamp(i),
                "updated_at": stamp(i + 1),
            })
            if len(batch) == 1000:
                conn.execute(memories.insert(), batch)
                batch = []
        if batch:
            conn.execute(memories.insert(), batch)
        batch = []
        for i in range(spec.entities):
            batch.append({
                "user_id": USERS[i % len(USERS)][0],
                "name": (_NON_ASCII[i % 6][:20] if i % 41 == 7
                         else f"{rng.choice(_WORDS).title()} {rng.choice(_WORDS).title()}"),
                "entity_type": ENTITY_TYPES[i % len(ENTITY_TYPES)],
                "description": _text(rng, i, spec) if i % 5 else None,
                "company": f"{rng.choice(_WORDS).title()} Inc" if i % 3 == 0 else None,
                "title": "Engineer" if i % 4 == 0 else None,
                "notes": _sentence(rng, 10) if i % 2 else None,
                "importance": 2,
                "tags": json.dumps(rng.sample(_WORDS, rng.randint(0, 2))),
                "interaction_count": i % 9,
                "metadata": "{}",
                "created_at": stamp(i),
                "updated_at": stamp(i + 2),
                "embedding": _embedding(rng, i + 1, spec),
            })
            if len(batch) == 1000:
                conn.execute(entities.insert(), batch)
                batch = []
        if batch:
            conn.execute(entities.insert(), batch)
        conn.execute(
            interactions.insert(),
            [{"user_id": USERS[i % len(USERS)][0], "user_prompt": _sentence(rng, 8),
              "assistant_response": _sentence(rng, 20), "created_at": stamp(i), "updated_at": stamp(i)}
             for i in range(spec.interactions)],
        )
        conn.execute(
            api_usage_tracking.insert(),
            [{"id": f"usage-{i}", "user_id": USERS[i % len(USERS)][0], "api_provider": "openai",
              "model": "text-embedding-3-small", "tokens_used": 100 + i, "cost_usd": 0.000002 * (100 + i),
              "operation_type": "embedding", "timestamp": 1735689600000 + i, "date": "2025-01-01"}
             for i in range(5)],
        )


def build(engine: Engine, spec: SampleSpec | None = None) -> None:
    """A fresh legacy database: the server's schema, data, no alembic_version."""
    spec = spec or SampleSpec()
    create_legacy_schema(engine)
    fill(engine, spec)
