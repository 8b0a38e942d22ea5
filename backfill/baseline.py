"""The mcp-memory-ts schema as the server's startup creates it (1.7.5, its schema version 2), on SQLite/libSQL.

Read off a database the server's own code made (tests/fixtures/): `initializeSchema` creates
`entities` with `contact_info` and without `embedding` (the server's separate script
`scripts/add-entity-embeddings.ts` adds that column later: `ENTITY_EMBEDDING_SCRIPT`), and no
`idx_entities_user_created` / `idx_memories_user_updated` (its migration 002 would add them, but its
runner counts 002 as applied from `schema_version = 2`, so real databases lack them).

Revision 0001 creates exactly this on an empty SQLite/libSQL database; `migrate` adopts a live
database by what the tool needs (`requirements.py`), not by equality with this. `sample.py` builds
server-like databases from it. Never edit a statement here; add a revision instead.
"""

from __future__ import annotations

SCHEMA_VERSION = 2

TABLES = [
    """CREATE TABLE IF NOT EXISTS users (
      id TEXT PRIMARY KEY,
      email TEXT UNIQUE NOT NULL,
      name TEXT,
      organization TEXT,
      api_key_hash TEXT,
      oauth_provider TEXT,
      oauth_id TEXT,
      is_active BOOLEAN DEFAULT 1,
      metadata TEXT,
      created_at TEXT NOT NULL,
      updated_at TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS entities (
      id INTEGER PRIMARY KEY AUTOINCREMENT,
      user_id TEXT,
      name TEXT NOT NULL,
      entity_type TEXT NOT NULL,
      person_type TEXT,
      description TEXT,
      company TEXT,
      title TEXT,
      contact_info TEXT,
      email TEXT,
      phone TEXT,
      address TEXT,
      website TEXT,
      social_media TEXT,
      notes TEXT,
      importance INTEGER DEFAULT 2,
      tags TEXT,
      relationships TEXT,
      last_interaction TEXT,
      interaction_count INTEGER DEFAULT 0,
      metadata TEXT,
      created_at TEXT NOT NULL,
      updated_at TEXT NOT NULL,
      FOREIGN KEY (user_id) REFERENCES users(id) ON DELETE CASCADE
    )""",
    """CREATE TABLE IF NOT EXISTS memories (
      id INTEGER PRIMARY KEY AUTOINCREMENT,
      user_id TEXT,
      title TEXT NOT NULL,
      content TEXT NOT NULL,
      memory_type TEXT NOT NULL,
      importance INTEGER DEFAULT 2,
      tags TEXT,
      entity_ids TEXT,
      embedding TEXT,
      metadata TEXT,
      is_archived BOOLEAN DEFAULT 0,
      created_at TEXT NOT NULL,
      updated_at TEXT NOT NULL,
      FOREIGN KEY (user_id) REFERENCES users(id) ON DELETE CASCADE
    )""",
    """CREATE TABLE IF NOT EXISTS interactions (
      id INTEGER PRIMARY KEY AUTOINCREMENT,
      user_id TEXT,
      user_prompt TEXT NOT NULL,
      assistant_response TEXT NOT NULL,
      context TEXT,
      feedback TEXT,
      sentiment TEXT,
      metadata TEXT,
      created_at TEXT NOT NULL,
      updated_at TEXT NOT NULL,
      FOREIGN KEY (user_id) REFERENCES users(id) ON DELETE CASCADE
    )""",
    """CREATE TABLE IF NOT EXISTS schema_version (
      version INTEGER PRIMARY KEY,
      applied_at TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS api_usage_tracking (
      id TEXT PRIMARY KEY,
      user_id TEXT NOT NULL,
      api_provider TEXT NOT NULL CHECK(api_provider IN ('openai', 'openrouter')),
      model TEXT NOT NULL,
      tokens_used INTEGER NOT NULL DEFAULT 0,
      cost_usd REAL NOT NULL,
      operation_type TEXT NOT NULL,
      timestamp INTEGER NOT NULL,
      date TEXT NOT NULL,
      metadata TEXT,
      FOREIGN KEY (user_id) REFERENCES users(id) ON DELETE CASCADE
    )""",
]

INDEXES = [
    "CREATE INDEX IF NOT EXISTS idx_users_email ON users(email)",
    "CREATE INDEX IF NOT EXISTS idx_users_api_key_hash ON users(api_key_hash)",
    "CREATE INDEX IF NOT EXISTS idx_entities_user_type ON entities(user_id, entity_type)",
    "CREATE INDEX IF NOT EXISTS idx_entities_user_importance ON entities(user_id, importance DESC)",
    "CREATE INDEX IF NOT EXISTS idx_memories_user_type ON memories(user_id, memory_type)",
    "CREATE INDEX IF NOT EXISTS idx_memories_user_importance ON memories(user_id, importance DESC)",
    "CREATE INDEX IF NOT EXISTS idx_memories_user_archived ON memories(user_id, is_archived)",
    "CREATE INDEX IF NOT EXISTS idx_memories_created ON memories(created_at DESC)",
    "CREATE INDEX IF NOT EXISTS idx_interactions_user_date ON interactions(user_id, DATE(created_at))",
    "CREATE INDEX IF NOT EXISTS idx_usage_user_provider_date ON api_usage_tracking(user_id, api_provider, date)",
]

# SQLite/libSQL only: FTS5 external-content tables and the triggers that keep them in sync.
FTS = [
    """CREATE VIRTUAL TABLE IF NOT EXISTS memories_fts USING fts5(
      title, content, tags,
      content='memories',
      content_rowid='id'
    )""",
    """CREATE VIRTUAL TABLE IF NOT EXISTS entities_fts USING fts5(
      name, description, notes, tags,
      content='entities',
      content_rowid='id'
    )""",
    """CREATE TRIGGER IF NOT EXISTS memories_fts_insert AFTER INSERT ON memories BEGIN
      INSERT INTO memories_fts(rowid, title, content, tags)
      VALUES (new.id, new.title, new.content, new.tags);
    END""",
    """CREATE TRIGGER IF NOT EXISTS memories_fts_delete AFTER DELETE ON memories BEGIN
      DELETE FROM memories_fts WHERE rowid = old.id;
    END""",
    """CREATE TRIGGER IF NOT EXISTS memories_fts_update AFTER UPDATE ON memories BEGIN
      DELETE FROM memories_fts WHERE rowid = old.id;
      INSERT INTO memories_fts(rowid, title, content, tags)
      VALUES (new.id, new.title, new.content, new.tags);
    END""",
    """CREATE TRIGGER IF NOT EXISTS entities_fts_insert AFTER INSERT ON entities BEGIN
      INSERT INTO entities_fts(rowid, name, description, notes, tags)
      VALUES (new.id, new.name, new.description, new.notes, new.tags);
    END""",
    """CREATE TRIGGER IF NOT EXISTS entities_fts_delete AFTER DELETE ON entities BEGIN
      DELETE FROM entities_fts WHERE rowid = old.id;
    END""",
    """CREATE TRIGGER IF NOT EXISTS entities_fts_update AFTER UPDATE ON entities BEGIN
      DELETE FROM entities_fts WHERE rowid = old.id;
      INSERT INTO entities_fts(rowid, name, description, notes, tags)
      VALUES (new.id, new.name, new.description, new.notes, new.tags);
    END""",
]

# the server's `scripts/add-entity-embeddings.ts`: without it `createEntity` fails, so every database
# holding entities has run it; revision 0006 runs it where it has not been run
ENTITY_EMBEDDING_SCRIPT = "ALTER TABLE entities ADD COLUMN embedding TEXT"

FTS_TABLES = ("memories_fts", "entities_fts")
FTS_TRIGGERS = (
    "memories_fts_insert",
    "memories_fts_delete",
    "memories_fts_update",
    "entities_fts_insert",
    "entities_fts_delete",
    "entities_fts_update",
)
DATA_TABLES = ("users", "entities", "memories", "interactions", "schema_version", "api_usage_tracking")


def sqlite_statements() -> list[str]:
    """Every statement, in order, that builds the baseline on SQLite/libSQL."""
    return [*TABLES, *INDEXES, *FTS]
