"""entities.embedding: added where the server's startup left it out

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

mcp-memory-ts's startup (`initializeSchema`) creates `entities` without an `embedding` column; the
server's own script `scripts/add-entity-embeddings.ts` adds it later with
`ALTER TABLE entities ADD COLUMN embedding TEXT`. A database made by startup alone therefore has
no column to hold entity vectors. This revision runs the server's own statement where the column
is missing and does nothing where it exists, so entities can be backfilled on every database.
Downgrade leaves the column: the server's script added it, and the server's `createEntity` needs it.
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    columns = {c["name"] for c in sa.inspect(bind).get_columns("entities")}
    if "embedding" not in columns:
        op.execute("ALTER TABLE entities ADD COLUMN embedding TEXT")


def downgrade() -> None:
    pass
