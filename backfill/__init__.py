"""backfill: resumable, checkpointed embedding backfill, run like a schema migration."""

__version__ = "0.1.0"
