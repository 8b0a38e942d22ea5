"""Two tools around a backfill: `index` (native libSQL vector index) and `sample-db`."""

from __future__ import annotations

from backfill import db, report, sample, tables, vectors
from backfill.commands.database import open_database
from backfill.config import Settings
from backfill.errors import ConfigError


def index(settings: Settings, column: str, target: str = "all") -> int:
    """Fill the native vector column where NULL, build its libsql_vector_idx index, check vector_top_k."""
    if target not in tables.TARGET_CHOICES:
        raise ConfigError(f"--target must be one of {', '.join(tables.TARGET_CHOICES)}")
    kind, engine = open_database(settings)
    vectors.check_backend(kind.kind, column)
    for spec in tables.specs_for(target):
        res = vectors.build_and_check(engine, kind.kind, spec, column)
        report.say(f"{res.index}: {res.rows} vectors ({res.filled} filled now); vector_top_k found "
                   f"{res.found}/{res.probes} probes")
        report.event("index_built", table=res.table, index=res.index, rows=res.rows, filled=res.filled,
                     probes=res.probes, found=res.found)
    return 0


def sample_db(settings: Settings, *, memories: int, entities: int, dimensions: int, seed: int) -> int:
    for flag, value, low in (("--memories", memories, 0), ("--entities", entities, 0), ("--dimensions", dimensions, 1)):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, not {value}")
    if dimensions > 16_000:
        raise ConfigError(f"--dimensions must be <= 16,000, not {dimensions}")
    target = db.resolve(settings.database_url, settings.auth_token)
    if target.path is not None and target.path.exists():
        raise ConfigError(f"{target.path} already exists: pick a new file name")
    engine = db.engine_for(target, must_exist=False)
    sample.build(engine, sample.SampleSpec(memories=memories, entities=entities, dimensions=dimensions, seed=seed))
    report.say(f"built {target.display}: {memories} memories, {entities} entities "
               "(mcp-memory-ts schema, not yet migrated)")
    report.event("sample_db", path=str(target.path), memories=memories, entities=entities)
    return 0
