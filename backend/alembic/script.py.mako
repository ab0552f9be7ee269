"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

Writing it lock-safe (backend/alembic/README.md, "Writing a revision"; 002 is the worked example).
--autogenerate writes the helpers below for what the models changed: read what it wrote, lint it
(uv run kraken-migrations lint), then apply it.
- Static: never import the application's models; spell the DDL out here.
- It runs with lock_timeout (KRAKEN_DDL_LOCK_TIMEOUT, 5 s) and is retried from scratch when a lock
  does not come in time, or it may be killed half-way: make it idempotent.
- On existing tables, use the helpers (ops.*): create_index_concurrently, add_unique_constraint,
  add_check_not_valid / add_foreign_key_not_valid then validate_constraint, replace_foreign_key.
- New tables: ops.create_table / ops.drop_table; a column's type: ops.ColumnTypeChange (expand, swap, contract).
- New rules over old rows: ops.refuse_violations(revision, [...]) before the first change.
- Backfills: ops.backfill_by_key(...) (or backfill_in_batches), never one UPDATE over a whole large table.
- A downgrade that drops data calls ops.refuse_data_loss(revision, ...) first.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from backend.migrations import ops
${"\n".join(line for line in (imports or "").splitlines() if not line.startswith("# autogenerate:"))}
revision: str = ${repr(up_revision)}
down_revision: str | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}
% if "# autogenerate: post-deploy" in (imports or ""):
# It takes away what the previous release reads: it runs once the new release serves (rule 8).
phase = "post-deploy"
% endif


<%
    def body(text):
        # Alembic's "please adjust!" banner left out: what autogenerate writes is meant to be applied as it is.
        kept = [line for line in (text or "").splitlines() if not line.strip().startswith("# ### ")]
        return "\n".join(kept).strip() or "pass"
%>
def upgrade() -> None:
    ${body(upgrades)}


def downgrade() -> None:
    ${body(downgrades)}
