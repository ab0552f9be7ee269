"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

Writing it lock-safe (see backend/alembic/README.md, "Writing a revision"):
- Static: never import the application's models; spell the DDL out here.
- Each revision runs in its own transaction with lock_timeout (KRAKEN_DDL_LOCK_TIMEOUT, 5 s)
  and is retried from scratch if it cannot get a table lock in time. A statement that needs
  longer may raise it for this revision only: op.execute("SET LOCAL lock_timeout = '10s'").
- Indexes on live tables: CREATE INDEX CONCURRENTLY inside op.get_context().autocommit_block().
- Backfills: in batches, never one UPDATE over a whole large table.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}
revision: str = ${repr(up_revision)}
down_revision: str | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
