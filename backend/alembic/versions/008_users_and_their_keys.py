"""Users and their keys (issue 20): kraken_users, and kraken_conversations.user_id referring to it.

Revision ID: 008
Revises: 007
Create Date: 2026-12-04 20:00:16.933246

Pre-deploy and additive: the previous release reads neither. kraken_users holds each user's key as
its SHA-256 (api_key_hash, unique: a key is looked up by it), never the key. user_id is nullable
with no default (a catalog change on the busiest table's parent), indexed concurrently, and its
foreign key added NOT VALID then validated (every existing row is NULL: the operator's key's).
The downgrade refuses to drop users, or conversations' user_id values, without
-x allow_data_loss=true. Written by autogenerate from backend/models.py, as generated.

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

revision: str = "008"
down_revision: str | None = "007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    ops.create_table(
        "kraken_users",
        {
            "id": "uuid NOT NULL DEFAULT gen_random_uuid()",
            "api_key_hash": "bytea NOT NULL",
            "name": "text NOT NULL",
            "created_at": "timestamptz NOT NULL DEFAULT now()",
            "last_active": "timestamptz",
            "is_active": "boolean NOT NULL DEFAULT true",
        },
        primary_key=["id"],
        uniques={"kraken_users_api_key_hash_key": ["api_key_hash"]},
    )
    ops.add_columns("kraken_conversations", {"user_id": "uuid"})
    ops.create_index_concurrently("ix_kraken_conversations_user_id", "kraken_conversations", ["user_id"])
    ops.add_foreign_key_not_valid(
        "kraken_conversations_user_id_fkey", "kraken_conversations", ["user_id"], "kraken_users"
    )
    ops.validate_constraint("kraken_conversations_user_id_fkey", "kraken_conversations")


def downgrade() -> None:
    # Before the first change: the helpers commit as they go.
    ops.refuse_data_loss(revision, tables=["kraken_users"], columns={"kraken_conversations": ["user_id"]})
    ops.drop_constraint("kraken_conversations_user_id_fkey", "kraken_conversations")
    ops.drop_index_concurrently("ix_kraken_conversations_user_id")
    ops.drop_columns("kraken_conversations", ["user_id"])
    ops.drop_table("kraken_users")
