"""Integrity and lookups: unique turn and tool-call order, cascading deletes, non-negative counts.

Revision ID: 002
Revises: 001
Create Date: 2025-01-15

Additive only, and safe on a large live table (backend/migration_ops.py):
- UNIQUE (conversation_id, turn_number) on kraken_turns and UNIQUE (turn_id, sequence_order) on
  kraken_tool_calls, each attached to a unique index built concurrently;
- both foreign keys become ON DELETE CASCADE: an equal key with the new action is added NOT VALID,
  validated, and takes over the old key's name;
- CHECK (... >= 0) on every token count, cost, duration and counter, added NOT VALID and validated
  in transactions of their own;
- an index on kraken_conversations (started_at), built concurrently, for recent-first listings.

Rows written before these rules may break them. The revision never changes a row to make a rule
pass: it first counts the rows that break each rule and, if there are any, stops before changing
anything, with a query per rule that lists them.

Static on purpose: it never imports the application's models.
"""

from collections.abc import Sequence

from backend.migrations import ops
from backend.migrations.ops import Rule

revision: str = "002"
down_revision: str | None = "001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TURNS, TOOL_CALLS, CONVERSATIONS = "kraken_turns", "kraken_tool_calls", "kraken_conversations"

# (name, table, columns): names as PostgreSQL (and the models' naming convention) spell them.
UNIQUES = (
    ("kraken_turns_conversation_id_turn_number_key", TURNS, ("conversation_id", "turn_number")),
    ("kraken_tool_calls_turn_id_sequence_order_key", TOOL_CALLS, ("turn_id", "sequence_order")),
)
# (name, table, column, referenced table)
FOREIGN_KEYS = (
    ("kraken_turns_conversation_id_fkey", TURNS, "conversation_id", CONVERSATIONS),
    ("kraken_tool_calls_turn_id_fkey", TOOL_CALLS, "turn_id", TURNS),
)
NON_NEGATIVE = {
    CONVERSATIONS: ("total_turns", "total_tokens", "total_cost_usd"),
    TURNS: (
        "input_tokens",
        "output_tokens",
        "cost_usd",
        "duration_ms",
        "tool_calls_count",
        "cache_creation_tokens",
        "cache_read_tokens",
    ),
}
CHECKS = tuple(
    (f"{table}_{column}_check", table, column) for table, columns in NON_NEGATIVE.items() for column in columns
)
STARTED_AT_INDEX = ("ix_kraken_conversations_started_at", CONVERSATIONS, ("started_at",))

RULES = (
    *(Rule.unique(table, columns) for _, table, columns in UNIQUES),
    *(Rule.check(table, f"{column} >= 0", show=[column]) for _, table, column in CHECKS),
    # 001 guarantees these keys, but a key created NOT VALID by hand may have let orphans in.
    *(Rule.references(table, column, ref_table) for _, table, column, ref_table in FOREIGN_KEYS),
)


def upgrade() -> None:
    ops.refuse_violations(revision, RULES)  # before the first change: index builds commit

    for name, table, columns in UNIQUES:
        ops.add_unique_constraint(name, table, columns)
    for name, table, column in CHECKS:
        ops.add_check_not_valid(name, table, f"{column} >= 0")
    for name, table, _ in CHECKS:
        ops.validate_constraint(name, table)
    for name, table, column, ref_table in FOREIGN_KEYS:
        ops.replace_foreign_key(name, table, [column], ref_table, on_delete="CASCADE")
    ops.create_index_concurrently(*STARTED_AT_INDEX)


def downgrade() -> None:
    # Nothing here drops data: constraints and indexes only.
    ops.drop_index_concurrently(STARTED_AT_INDEX[0])
    for name, table, column, ref_table in FOREIGN_KEYS:
        ops.replace_foreign_key(name, table, [column], ref_table)
    for name, table, _ in CHECKS:
        ops.drop_constraint(name, table)
    for name, table, _ in UNIQUES:
        ops.drop_constraint(name, table)
