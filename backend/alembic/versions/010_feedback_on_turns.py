"""Feedback on turns (issue 20): kraken_feedback, a thumbs up or down on a turn, one per turn.

Revision ID: 010
Revises: 009
Create Date: 2026-12-07 15:50:54.009603

Pre-deploy and additive: a new table, which the previous release never reads. One row per turn
(kraken_feedback_turn_id_key, which PUT's ON CONFLICT uses); feedback_type is 'positive' or
'negative' by a CHECK, not an enum (a CHECK can change beside live writes). Its foreign keys, to
kraken_conversations and to the busiest table, kraken_turns, both ON DELETE CASCADE, are added
NOT VALID after the table is created, each referenced table locked (SHARE ROW EXCLUSIVE, within
lock_timeout) for the catalog change only, then validated (the table is new: nothing to scan).
Indexed by conversation_id (the cascade, the shared view) and (created_at, id) (GET /feedback's
keyset pages, newest first, read backwards). The downgrade refuses to drop feedback rows without
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

revision: str = "010"
down_revision: str | None = "009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    ops.create_table(
        "kraken_feedback",
        {
            "id": "uuid NOT NULL DEFAULT gen_random_uuid()",
            "turn_id": "uuid NOT NULL",
            "conversation_id": "uuid NOT NULL",
            "feedback_type": "varchar NOT NULL",
            "comment": "text",
            "trace_id": "varchar",
            "created_at": "timestamptz NOT NULL DEFAULT now()",
            "updated_at": "timestamptz NOT NULL DEFAULT now()",
        },
        primary_key=["id"],
        uniques={"kraken_feedback_turn_id_key": ["turn_id"]},
        checks={"kraken_feedback_feedback_type_check": "feedback_type IN ('positive', 'negative')"},
        foreign_keys=[
            ops.ForeignKey(
                "kraken_feedback_conversation_id_fkey", ["conversation_id"], "kraken_conversations", on_delete="CASCADE"
            ),
            ops.ForeignKey("kraken_feedback_turn_id_fkey", ["turn_id"], "kraken_turns", on_delete="CASCADE"),
        ],
        indexes={
            "ix_kraken_feedback_conversation_id": ["conversation_id"],
            "ix_kraken_feedback_created_at_id": ["created_at", "id"],
        },
    )


def downgrade() -> None:
    # Before the first change: the helpers commit as they go.
    ops.refuse_data_loss(revision, tables=["kraken_feedback"])
    ops.drop_table("kraken_feedback")
