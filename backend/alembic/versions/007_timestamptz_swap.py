"""timestamptz, step 2 of 3 (post-deploy): the timestamptz copies take the columns' names.

Revision ID: 007
Revises: 006
Create Date: 2026-12-03

Once the new release serves (post-deploy: releases older than the one before it compare stored
times as naive ones and fail on aware ones, so a rollback to one of them must not meet the swapped
columns; the release before it, from 006 on, reads both types), for each column of 006, in one
short transaction per column under
lock_timeout (ACCESS EXCLUSIVE for catalog changes only; the runner retries the revision when the
lock does not come in time): the column becomes `<column>__old`, its timestamptz copy takes the
name, the default (now()) and the index names, and the trigger now keeps `<column>__old` equal to
the new column (`AT TIME ZONE 'UTC'` again), so that rolling back past this step stays one short
transaction until 008.

The downgrade swaps back the same way; with the old columns kept in sync, no value is lost.

Static on purpose: it never imports the application's models.
"""

from collections.abc import Sequence

from backend.migrations import ops

revision: str = "007"
down_revision: str | None = "006"
phase = "post-deploy"
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
        change.swap()


def downgrade() -> None:
    for change in reversed(CHANGES):
        change.undo_swap()
