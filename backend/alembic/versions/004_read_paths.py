"""Read paths: usage by time, redundant indexes dropped.

Revision ID: 004
Revises: 003
Create Date: 2026-11-27

Lock-safe on large live tables (backend/migrations/ops.py): every change is an index built or
dropped concurrently, outside a transaction; writes go on meanwhile.
- ix_kraken_turns_created_at on kraken_turns (created_at), INCLUDE the columns GET /usage groups
  by and sums: a day's usage is an index-only range scan instead of a scan of every turn;
- ix_kraken_turns_conversation_id and ix_kraken_tool_calls_turn_id dropped: 002's unique indexes
  on (conversation_id, turn_number) and (turn_id, sequence_order) lead with the same column and
  serve every lookup they served, and every insert no longer writes them.

The downgrade builds the two dropped indexes again (concurrently) and drops the new one; it drops
no data.

Static on purpose: it never imports the application's models.
"""

from collections.abc import Sequence

from backend.migrations import ops

revision: str = "004"
down_revision: str | None = "003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TURNS, TOOL_CALLS = "kraken_turns", "kraken_tool_calls"
USAGE_INDEX = "ix_kraken_turns_created_at"
# What the usage query reads besides created_at (backend/conversations/service.py, _USAGE).
USAGE_COLUMNS = ("model", "input_tokens", "output_tokens", "cache_creation_tokens", "cache_read_tokens", "cost_usd")
# (name, table, columns) as 001 made them.
REDUNDANT = (
    ("ix_kraken_turns_conversation_id", TURNS, ("conversation_id",)),
    ("ix_kraken_tool_calls_turn_id", TOOL_CALLS, ("turn_id",)),
)


def upgrade() -> None:
    ops.create_index_concurrently(USAGE_INDEX, TURNS, ("created_at",), include=USAGE_COLUMNS)
    for name, _, _ in REDUNDANT:
        ops.drop_index_concurrently(name)


def downgrade() -> None:
    for name, table, columns in REDUNDANT:
        ops.create_index_concurrently(name, table, columns)
    ops.drop_index_concurrently(USAGE_INDEX)
