"""timestamptz, step 1 of 3 (pre-deploy): each timestamp column gets a timestamptz copy.

Revision ID: 006
Revises: 005
Create Date: 2026-12-03

Every `timestamp without time zone` of the three tables (kraken_conversations.started_at and
ended_at, kraken_turns.created_at; kraken_tool_calls has none) becomes `timestamptz`, with
ops.ColumnTypeChange (backend/alembic/README.md, "Type changes"). The stored times are UTC wall
clock times (the service writes timezone('UTC', ...) and its sessions run in UTC), so each
conversion names that zone: `x AT TIME ZONE 'UTC'`, in the backfill and the trigger alike.

This step, while the previous release serves: `<column>__new` (timestamptz) beside each column,
kept equal to it by a trigger on every write, filled on the rows already there by a keyset walk
(ops.backfill_by_key: resumable, throttled), its index (started_at's, created_at's with its INCLUDE
list) built concurrently, NOT NULL through a validated check. Neither release reads the copies.
Online, PostgreSQL is asked first whether it could change a column in place; with the zone named
it would rewrite each table, so all three go by copy.

The downgrade drops the copies and their triggers: they held the columns' values, nothing is lost.
007 swaps the names (post-deploy), 008 drops the old columns (post-deploy, in a later release).

Static on purpose: it never imports the application's models.
"""

from collections.abc import Sequence

from backend.migrations import ops

revision: str = "006"
down_revision: str | None = "005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The columns as 001-005 left them (what the offline SQL builds from; online the catalog is checked).
CHANGES = [
    ops.ColumnTypeChange(
        "kraken_conversations",
        "started_at",
        "timestamp without time zone",
        "timestamp with time zone",
        not_null=True,
        default="now()",
        indexes=[
            "CREATE INDEX ix_kraken_conversations_started_at ON public.kraken_conversations USING btree (started_at)"
        ],
    ),
    ops.ColumnTypeChange("kraken_conversations", "ended_at", "timestamp without time zone", "timestamp with time zone"),
    ops.ColumnTypeChange(
        "kraken_turns",
        "created_at",
        "timestamp without time zone",
        "timestamp with time zone",
        not_null=True,
        default="now()",
        indexes=[
            "CREATE INDEX ix_kraken_turns_created_at ON public.kraken_turns USING btree (created_at)"
            " INCLUDE (model, input_tokens, output_tokens, cache_creation_tokens, cache_read_tokens, cost_usd)"
        ],
    ),
]


def upgrade() -> None:
    for change in CHANGES:
        change.expand()


def downgrade() -> None:
    for change in reversed(CHANGES):
        change.undo_expand()
