"""timestamptz, step 3 of 3 (post-deploy, a release after 007): the old timestamp columns dropped.

Revision ID: 009
Revises: 008
Create Date: 2026-12-03

For each column of 006: the trigger that kept `<column>__old` in sync, its function, the old
column's index (concurrently) and the old column itself are dropped. It ships in the release after
the one that swapped (007): until then a rollback past the swap is one short transaction (007's
downgrade) because the old columns are there and in sync; this step ends that, and with it the
double writes. It is post-deploy so that, should the release it ships in fail before it serves,
the old columns are still there.

The downgrade builds the old columns again beside the new ones, as 006 built the copies (a
trigger, a keyset backfill, the index concurrently, NOT NULL through a validated check), so 007's
downgrade can then swap back: no value is lost either way.

Static on purpose: it never imports the application's models.
"""

from collections.abc import Sequence

from backend.migrations import ops

revision: str = "009"
down_revision: str | None = "008"
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
        change.contract()


def downgrade() -> None:
    for change in reversed(CHANGES):
        change.undo_contract()
