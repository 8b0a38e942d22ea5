"""SQLAlchemy Core tables: the mcp-memory-ts data tables (baseline) and the tool's own.

The data tables list the columns the tool reads and writes (and what `sample.py` fills); a live
database may hold more, which the tool leaves alone (`adoption.py` checks the ones it needs).
`verify` compares only the tool's own `backfill_*` tables with this metadata.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

Text = sa.Text
Integer = sa.Integer


def _fk_user() -> sa.ForeignKey:
    return sa.ForeignKey("users.id", ondelete="CASCADE")


users = sa.Table(
    "users",
    metadata,
    sa.Column("id", Text, primary_key=True),
    sa.Column("email", Text, nullable=False, unique=True),
    sa.Column("name", Text),
    sa.Column("organization", Text),
    sa.Column("api_key_hash", Text),
    sa.Column("oauth_provider", Text),
    sa.Column("oauth_id", Text),
    sa.Column("is_active", sa.Boolean, server_default=sa.true()),
    sa.Column("metadata", Text),
    sa.Column("created_at", Text, nullable=False),
    sa.Column("updated_at", Text, nullable=False),
)

entities = sa.Table(
    "entities",
    metadata,
    sa.Column("id", Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", Text, _fk_user()),
    sa.Column("name", Text, nullable=False),
    sa.Column("entity_type", Text, nullable=False),
    sa.Column("person_type", Text),
    sa.Column("description", Text),
    sa.Column("company", Text),
    sa.Column("title", Text),
    sa.Column("email", Text),
    sa.Column("phone", Text),
    sa.Column("address", Text),
    sa.Column("website", Text),
    sa.Column("social_media", Text),
    sa.Column("notes", Text),
    sa.Column("importance", Integer, server_default=sa.text("2")),
    sa.Column("tags", Text),
    sa.Column("relationships", Text),
    sa.Column("last_interaction", Text),
    sa.Column("interaction_count", Integer, server_default=sa.text("0")),
    sa.Column("metadata", Text),
    sa.Column("created_at", Text, nullable=False),
    sa.Column("updated_at", Text, nullable=False),
    sa.Column("embedding", Text),
    sqlite_autoincrement=True,
)

memories = sa.Table(
    "memories",
    metadata,
    sa.Column("id", Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", Text, _fk_user()),
    sa.Column("title", Text, nullable=False),
    sa.Column("content", Text, nullable=False),
    sa.Column("memory_type", Text, nullable=False),
    sa.Column("importance", Integer, server_default=sa.text("2")),
    sa.Column("tags", Text),
    sa.Column("entity_ids", Text),
    sa.Column("embedding", Text),
    sa.Column("metadata", Text),
    sa.Column("is_archived", sa.Boolean, server_default=sa.false()),
    sa.Column("created_at", Text, nullable=False),
    sa.Column("updated_at", Text, nullable=False),
    sqlite_autoincrement=True,
)

interactions = sa.Table(
    "interactions",
    metadata,
    sa.Column("id", Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", Text, _fk_user()),
    sa.Column("user_prompt", Text, nullable=False),
    sa.Column("assistant_response", Text, nullable=False),
    sa.Column("context", Text),
    sa.Column("feedback", Text),
    sa.Column("sentiment", Text),
    sa.Column("metadata", Text),
    sa.Column("created_at", Text, nullable=False),
    sa.Column("updated_at", Text, nullable=False),
    sqlite_autoincrement=True,
)

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", Text, nullable=False),
)

api_usage_tracking = sa.Table(
    "api_usage_tracking",
    metadata,
    sa.Column("id", Text, primary_key=True),
    sa.Column("user_id", Text, _fk_user(), nullable=False),
    sa.Column("api_provider", Text, nullable=False),
    sa.Column("model", Text, nullable=False),
    sa.Column("tokens_used", Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("cost_usd", sa.Float().with_variant(sa.REAL(), "sqlite"), nullable=False),
    sa.Column("operation_type", Text, nullable=False),
    sa.Column("timestamp", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False),
    sa.Column("date", Text, nullable=False),
    sa.Column("metadata", Text),
    sa.CheckConstraint("api_provider IN ('openai', 'openrouter')", name="ck_api_usage_provider"),
)

sa.Index("idx_users_email", users.c.email)
sa.Index("idx_users_api_key_hash", users.c.api_key_hash)
sa.Index("idx_entities_user_type", entities.c.user_id, entities.c.entity_type)
sa.Index("idx_entities_user_importance", entities.c.user_id, entities.c.importance.desc())
sa.Index("idx_entities_user_created", entities.c.user_id, entities.c.created_at.desc())
sa.Index("idx_memories_user_type", memories.c.user_id, memories.c.memory_type)
sa.Index("idx_memories_user_importance", memories.c.user_id, memories.c.importance.desc())
sa.Index("idx_memories_user_archived", memories.c.user_id, memories.c.is_archived)
sa.Index("idx_memories_created", memories.c.created_at.desc())
sa.Index("idx_memories_user_updated", memories.c.user_id, memories.c.updated_at.desc())
# An expression index: DATE() of TEXT is not IMMUTABLE on PostgreSQL, where revision 0001 indexes
# substr(created_at, 1, 10) instead.
sa.Index(
    "idx_interactions_user_date", interactions.c.user_id, sa.func.date(interactions.c.created_at)
).ddl_if(dialect="sqlite")
sa.Index(
    "idx_usage_user_provider_date",
    api_usage_tracking.c.user_id,
    api_usage_tracking.c.api_provider,
    api_usage_tracking.c.date,
)

DATA_TABLE_NAMES = frozenset(t.name for t in metadata.sorted_tables)

# ---------------------------------------------------------------------------------------------
# The tool's own tables (revision 0002). Times are ISO-8601 UTC text, like the data tables.

backfill_jobs = sa.Table(
    "backfill_jobs",
    metadata,
    sa.Column("id", Integer, primary_key=True, autoincrement=True),
    sa.Column("status", Text, nullable=False),  # pending|running|interrupted|done|failed|cancelled
    sa.Column("kind", Text, nullable=False, server_default="run"),  # run|retry
    sa.Column("target", Text, nullable=False),  # memories|entities|all
    sa.Column("user_id", Text),
    sa.Column("user_email", Text),
    sa.Column("provider", Text, nullable=False),
    sa.Column("model", Text, nullable=False),
    sa.Column("dimensions", Integer, nullable=False),
    sa.Column("recipe_version", Text, nullable=False),
    sa.Column("batch_size", Integer, nullable=False),
    sa.Column("params", Text, nullable=False, server_default="{}"),  # JSON: options that define the job
    sa.Column("cursors", Text, nullable=False, server_default="{}"),  # JSON: {target: last committed key}
    sa.Column("selected", Integer, nullable=False, server_default="0"),
    sa.Column("embedded", Integer, nullable=False, server_default="0"),
    sa.Column("failed", Integer, nullable=False, server_default="0"),
    sa.Column("skipped", Integer, nullable=False, server_default="0"),
    sa.Column("batches", Integer, nullable=False, server_default="0"),
    sa.Column("requests", Integer, nullable=False, server_default="0"),
    sa.Column("tokens", Integer, nullable=False, server_default="0"),
    sa.Column("cost_usd", sa.Float, nullable=False, server_default="0"),
    sa.Column("elapsed_s", sa.Float, nullable=False, server_default="0"),
    sa.Column("worker_id", Text),
    sa.Column("heartbeat_at", Text),
    sa.Column("lease_expires_at", Text),
    sa.Column("stop_reason", Text),
    sa.Column("created_at", Text, nullable=False),
    sa.Column("updated_at", Text, nullable=False),
    sa.Column("finished_at", Text),
    sa.Column("tokens_saved", Integer, nullable=False, server_default="0"),  # 0004: same-text dedupe
    sqlite_autoincrement=True,
)
sa.Index("ix_backfill_jobs_status", backfill_jobs.c.status)

backfill_failures = sa.Table(
    "backfill_failures",
    metadata,
    sa.Column("job_id", Integer, sa.ForeignKey("backfill_jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("target", Text, primary_key=True),
    sa.Column("row_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("kind", Text, nullable=False),  # failed|skipped
    sa.Column("error", Text, nullable=False),
    sa.Column("attempts", Integer, nullable=False, server_default="1"),
    sa.Column("resolved", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", Text, nullable=False),
    sa.Column("updated_at", Text, nullable=False),
)
sa.Index(
    "ix_backfill_failures_open", backfill_failures.c.job_id, backfill_failures.c.kind, backfill_failures.c.resolved
)

backfill_embeddings = sa.Table(
    "backfill_embeddings",
    metadata,
    sa.Column("target", Text, primary_key=True),
    sa.Column("row_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("provider", Text, nullable=False),
    sa.Column("model", Text, nullable=False),
    sa.Column("dimensions", Integer, nullable=False),
    sa.Column("recipe_version", Text, nullable=False),
    sa.Column("content_hash", Text, nullable=False),
    sa.Column("job_id", Integer),
    sa.Column("embedded_at", Text, nullable=False),
)
sa.Index("ix_backfill_embeddings_model", backfill_embeddings.c.target, backfill_embeddings.c.model)
sa.Index("ix_backfill_embeddings_hash", backfill_embeddings.c.target, backfill_embeddings.c.content_hash)  # 0004

OWN_TABLE_NAMES = frozenset({"backfill_jobs", "backfill_failures", "backfill_embeddings", "backfill_batches",
                             "backfill_batch_chunks", "backfill_changes", "backfill_change_seeds"})

# ---------------------------------------------------------------------------------------------
# Batch API mode (revision 0003): one row per JSONL file / remote batch, one per request line.
# A step is committed before the remote call it leads to, so a killed run reconciles, never repeats.

backfill_batches = sa.Table(
    "backfill_batches",
    metadata,
    sa.Column("id", Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", Integer, sa.ForeignKey("backfill_jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", Text, nullable=False, unique=True),  # the uploaded file's name, unique per database and job
    sa.Column("state", Text, nullable=False),  # planned|uploaded|submitted|collected|cancelled
    sa.Column("lines", Integer, nullable=False, server_default="0"),
    sa.Column("rows", Integer, nullable=False, server_default="0"),
    sa.Column("input_file_id", Text),
    sa.Column("remote_batch_id", Text),
    sa.Column("remote_status", Text),
    sa.Column("output_file_id", Text),
    sa.Column("error_file_id", Text),
    sa.Column("upload_started_at", Text),  # set (committed) before the upload: resume looks for the file first
    sa.Column("submit_started_at", Text),  # set (committed) before batches.create: resume looks for the batch first
    sa.Column("submits", Integer, nullable=False, server_default="0"),  # batches created from the file
    sa.Column("error", Text),
    sa.Column("created_at", Text, nullable=False),
    sa.Column("updated_at", Text, nullable=False),
    sqlite_autoincrement=True,
)
sa.Index("ix_backfill_batches_job_state", backfill_batches.c.job_id, backfill_batches.c.state)

backfill_batch_chunks = sa.Table(
    "backfill_batch_chunks",
    metadata,
    sa.Column("id", Integer, primary_key=True, autoincrement=True),
    sa.Column("batch_id", Integer, sa.ForeignKey("backfill_batches.id", ondelete="CASCADE"), nullable=False),
    sa.Column("custom_id", Text, nullable=False, unique=True),
    sa.Column("target", Text, nullable=False),
    sa.Column("row_ids", Text, nullable=False),  # JSON list, the order of the request's inputs
    sa.Column("content_hashes", Text),  # JSON list, hashes of the texts as uploaded
    sa.Column("tokens", Integer, nullable=False, server_default="0"),
    sa.Column("state", Text, nullable=False),  # planned|written|failed|empty|cancelled
    sa.Column("created_at", Text, nullable=False),
    sa.Column("updated_at", Text, nullable=False),
    sqlite_autoincrement=True,
)
sa.Index("ix_backfill_batch_chunks_batch_state", backfill_batch_chunks.c.batch_id, backfill_batch_chunks.c.state)

# ---------------------------------------------------------------------------------------------
# The change queue (revision 0008, changes.py): rows the tool's triggers saw inserted, edited in a recipe
# column or in `embedding`, or deleted; and, per table, when a scan last seeded the queue.

backfill_changes = sa.Table(
    "backfill_changes",
    metadata,
    sa.Column("target", Text, primary_key=True),
    sa.Column("row_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("queued_at", Text),
)

backfill_change_seeds = sa.Table(
    "backfill_change_seeds",
    metadata,
    sa.Column("target", Text, primary_key=True),
    sa.Column("seeded_at", Text, nullable=False),
    sa.Column("dimensions", Integer),  # the column's most common vector length as last seen (compat check)
)
