"""Reconcile conversation totals: each conversation's totals become the sums of its turns.

Revision ID: 005
Revises: 004
Create Date: 2026-12-03

The original KRAKEN client wrote a turn, then in a second statement the conversation's totals; one
that died in between left total_turns (and total_tokens, total_cost_usd) behind the turns, and
adopted databases hold such rows. The service heals one when it next appends to it
(backend/conversations/service.py, APPEND); this revision fixes them all, the ones nobody
appends to again included, so the totals every reader sees are right:

    total_turns = count(*), total_tokens = sum(input_tokens + output_tokens),
    total_cost_usd = sum(cost_usd) over the conversation's turns.

Data only, lock-safe on a live table (ops.backfill_by_key): conversations are walked by id, 1000
at a time, up to the highest id when the walk starts. Each batch first finds, locking nothing,
which of its conversations' totals differ from their turns; then, in one short transaction, it
locks those (FOR NO KEY UPDATE, in id order: appends to them wait for the batch, inserts of turns
elsewhere do not) and in a second statement, whose snapshot sees every turn committed to them,
rewrites the totals that still differ. Conversations whose totals are right are never locked.
It refuses nothing: a conversation whose turns sum to more than its columns hold (which no
writer can have stored) keeps its totals. It logs how many it fixed.

The downgrade has nothing to undo: the old totals were wrong, and no schema changed.

Static on purpose: it never imports the application's models.
"""

from collections.abc import Sequence

from backend.migrations import ops

revision: str = "005"
down_revision: str | None = "004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def sums(conversation: str) -> str:
    """The sums of the turns of the conversation whose id is ``conversation`` (SQL): an index range
    of the unique (conversation_id, turn_number) index, and those turns' rows."""
    return (
        "SELECT count(*), COALESCE(sum(CAST(t.input_tokens AS bigint) + t.output_tokens), 0),"
        f" COALESCE(sum(t.cost_usd), 0) FROM kraken_turns AS t WHERE t.conversation_id = {conversation}"
    )


# Which conversations of a batch to lock: those whose totals differ, as read without locks (the
# totals are NOT NULL, the sums never NULL: <> is IS DISTINCT FROM here, and takes a subquery).
DIFFERS = f"(total_turns, total_tokens, total_cost_usd) <> ({sums('kraken_conversations.id')})"
# The locked ones, summed again in a snapshot that sees every turn committed to them: written where
# they still differ and fit the columns (integer, numeric(10, 6)).
RECONCILE = f"""
UPDATE kraken_conversations AS c
SET total_turns = sums.turns, total_tokens = sums.tokens, total_cost_usd = sums.cost_usd
FROM (
    SELECT batch.id, stored.*
    FROM unnest(CAST(:keys AS uuid[])) AS batch(id)
    CROSS JOIN LATERAL ({sums("batch.id")}) AS stored(turns, tokens, cost_usd)
) AS sums
WHERE c.id = ANY(CAST(:keys AS uuid[])) AND c.id = sums.id
  AND (c.total_turns, c.total_tokens, c.total_cost_usd) IS DISTINCT FROM (sums.turns, sums.tokens, sums.cost_usd)
  AND sums.turns <= 2147483647 AND sums.tokens <= 2147483647 AND sums.cost_usd <= 9999.999999
"""


def upgrade() -> None:
    ops.backfill_by_key(
        "kraken_conversations", "id", RECONCILE, 1000, pending=DIFFERS, label="005 reconciled conversation totals"
    )


def downgrade() -> None:
    pass  # nothing to undo: the totals it replaced were wrong, and no schema changed
