"""Revision 004 on real databases: the usage index by time in, the two redundant indexes out,
a downgrade that puts them back, and GET /usage's query answered from the new index."""

from datetime import datetime, timedelta
from typing import get_args

import pytest

from backend.conversations.schemas import UsageGrouping
from backend.conversations.service import USAGE
from backend.db.url import DatabaseTarget
from backend.tests.helpers import (
    EXPECTED_INDEXES_003,
    EXPECTED_INDEXES_004,
    assert_indexes,
    out,
    run_alembic,
    sql,
)

# 20,000 turns over 100 days (200 a day) in 200 conversations: enough rows for the planner to
# prefer an index for one day, few enough to write in well under a second.
DAYS, CONVERSATIONS, TURNS_EACH = 100, 200, 100
FIRST_DAY = datetime(2025, 1, 1)
FILL = f"""
WITH c AS (
    INSERT INTO kraken_conversations (session_id, model, system_prompt_hash, agent_version)
    SELECT 's' || g, 'm', 'h', 'v' FROM generate_series(1, {CONVERSATIONS}) g RETURNING id
), t AS (
    INSERT INTO kraken_turns (conversation_id, turn_number, user_query, assistant_response, model,
                              input_tokens, output_tokens, created_at)
    SELECT c.id, n, 'q', 'a', 'model-' || (n % 3), 100, 30,
           TIMESTAMP '{FIRST_DAY.isoformat()}' + (random() * interval '{DAYS} days')
    FROM c, generate_series(1, {TURNS_EACH}) n RETURNING id
)
INSERT INTO kraken_tool_calls (turn_id, tool_name, tool_args, tool_result, sequence_order)
SELECT id, 'search', '{{}}', '{{}}', 1 FROM t
"""


def migrate(db: DatabaseTarget, *args: str) -> None:
    result = run_alembic(*args, target=db)
    assert result.returncode == 0, out(result)


def test_004_adds_the_usage_index_drops_the_redundant_ones_and_downgrade_restores_them(
    empty_db: DatabaseTarget,
) -> None:
    migrate(empty_db, "upgrade", "003")
    sql(empty_db, FILL)
    assert_indexes(empty_db, EXPECTED_INDEXES_003)

    migrate(empty_db, "upgrade", "004")
    assert_indexes(empty_db, EXPECTED_INDEXES_004)

    migrate(empty_db, "downgrade", "003")
    assert_indexes(empty_db, EXPECTED_INDEXES_003)
    assert sql(empty_db, "SELECT count(*) FROM kraken_turns")[0][0] == CONVERSATIONS * TURNS_EACH

    migrate(empty_db, "upgrade", "004")  # and up again
    assert_indexes(empty_db, EXPECTED_INDEXES_004)


# The groupings 004 serves from its index; per user (issue 20) reads each turn's conversation too,
# a column the index does not hold (and one 004 has no user_id for).
@pytest.mark.parametrize("group_by", [g for g in get_args(UsageGrouping) if g != "user"])
def test_a_days_usage_is_an_index_only_scan_at_004(empty_db: DatabaseTarget, group_by: UsageGrouping) -> None:
    migrate(empty_db, "upgrade", "004")
    sql(empty_db, FILL)
    # Index-only scans need the visibility map; in production autovacuum keeps it current.
    sql(empty_db, "VACUUM ANALYZE")
    day = FIRST_DAY + timedelta(days=DAYS // 2)

    plan = "\n".join(r[0] for r in sql(empty_db, "EXPLAIN " + USAGE[group_by].sql, day, day + timedelta(days=1)))

    assert "Index Only Scan using ix_kraken_turns_created_at" in plan, plan
    assert "Seq Scan" not in plan, plan
