"""Revision 005 on real databases: every conversation's totals become the sums of its turns, in
batches, online and offline, beside an append in flight; nothing refused, nothing to undo."""

import asyncio
import re
from decimal import Decimal

from backend.conversations import service
from backend.conversations.schemas import TurnCreate
from backend.db.engine import connect
from backend.db.url import DatabaseTarget
from backend.tests.helpers import fetch, out, run_alembic, sql, turn_body, until_waiting_for_a_lock

# Conversations as 004 may hold them, by session_id: (turns' input_tokens, stored totals). Each
# turn costs 0.25 and has 1 output token.
CASES: dict[str, tuple[list[int], tuple[int, int, str]]] = {
    "right": ([10, 20, 30], (3, 63, "0.75")),
    "lagging": ([10, 20, 30], (1, 11, "0.25")),  # the original client died after its first turn's totals
    "never": ([10, 20], (0, 0, "0")),
    "ahead": ([10], (5, 11, "0.25")),
    "tokens": ([10, 20], (2, 5, "0.5")),
    "no turns, counted": ([], (2, 7, "1")),
    "no turns": ([], (0, 0, "0")),
    "beyond the columns": ([2_000_000_000, 2_000_000_000], (0, 0, "0")),  # no writer could store these sums
}
RECONCILED = {"lagging", "never", "ahead", "tokens", "no turns, counted"}
MANY_RIGHT = 2100  # more conversations, all right: three batches of 1000


def seed(db: DatabaseTarget) -> None:
    for session, (tokens, (turns, total_tokens, cost)) in CASES.items():
        sql(
            db,
            "WITH c AS (INSERT INTO kraken_conversations (session_id, model, system_prompt_hash, agent_version,"
            " total_turns, total_tokens, total_cost_usd) VALUES ($1, 'm', 'h', 'v', $2, $3, $4::numeric) RETURNING id)"
            " INSERT INTO kraken_turns (conversation_id, turn_number, user_query, assistant_response, model,"
            " input_tokens, output_tokens, cost_usd)"
            " SELECT c.id, n, 'q', 'a', 'm', t, 1, 0.25 FROM c, unnest($5::int[]) WITH ORDINALITY AS turn(t, n)",
            session,
            turns,
            total_tokens,
            cost,
            tokens,
        )
    sql(
        db,
        "INSERT INTO kraken_conversations (session_id, model, system_prompt_hash, agent_version)"
        f" SELECT 'many', 'm', 'h', 'v' FROM generate_series(1, {MANY_RIGHT})",
    )


def totals(db: DatabaseTarget) -> dict[str, tuple[int, int, Decimal, str]]:
    """Each case's (total_turns, total_tokens, total_cost_usd, xmin: the transaction that last wrote it)."""
    found = sql(
        db,
        "SELECT session_id, total_turns, total_tokens, total_cost_usd, xmin::text AS xmin"
        " FROM kraken_conversations WHERE session_id <> 'many'",
    )
    return {r["session_id"]: (r["total_turns"], r["total_tokens"], r["total_cost_usd"], r["xmin"]) for r in found}


def sums(tokens: list[int]) -> tuple[int, int, Decimal]:
    return len(tokens), sum(tokens) + len(tokens), Decimal("0.25") * len(tokens)


def migrate(db: DatabaseTarget, *args: str) -> str:
    result = run_alembic(*args, target=db)
    assert result.returncode == 0, out(result)
    return out(result)


def test_005_reconciles_every_conversation_whose_totals_differ_and_logs_how_many(empty_db: DatabaseTarget) -> None:
    migrate(empty_db, "upgrade", "004")
    seed(empty_db)
    before = totals(empty_db)

    logged = migrate(empty_db, "upgrade", "005")

    walked = len(CASES) + MANY_RIGHT
    # "to do": the conversations locked, those whose totals differed (the one beyond the columns too).
    assert (
        f"005 reconciled conversation totals: {len(RECONCILED)} of {walked} row(s) changed"
        f" ({len(RECONCILED) + 1} to do), in "
    ) in logged
    after = totals(empty_db)
    for session, (tokens, _) in CASES.items():
        if session in RECONCILED:
            assert after[session][:3] == sums(tokens), session
        else:
            # Left alone, not even rewritten with the same values.
            assert after[session] == before[session], session
    assert before["beyond the columns"][:3] == (0, 0, Decimal(0))
    # The conversations whose totals were right were not even locked (a lock leaves its xmax).
    many = (
        "SELECT count(*) FROM kraken_conversations WHERE session_id = 'many' AND total_turns = 0 AND xmax::text = '0'"
    )
    assert sql(empty_db, many)[0][0] == MANY_RIGHT

    migrate(empty_db, "downgrade", "004")  # nothing to undo
    assert totals(empty_db) == after
    assert f"0 of {walked} row(s) changed" in migrate(empty_db, "upgrade", "005")


async def test_005_waits_for_an_append_in_flight_and_counts_its_turn(empty_db: DatabaseTarget) -> None:
    """An append to a lagging conversation holds its row until it commits; 005 locks the row before
    it sums the turns, so it waits, and then sees the new turn. (Summing first and writing after
    the wait would store the sums without it, over the append's right totals.)"""
    await asyncio.to_thread(migrate, empty_db, "upgrade", "004")
    await asyncio.to_thread(seed, empty_db)
    [lagging] = await fetch(empty_db, "SELECT id FROM kraken_conversations WHERE session_id = 'lagging'")
    turn = TurnCreate.model_validate(turn_body(input_tokens=100, output_tokens=5, cost_usd="0.5", tool_calls=[]))
    in_flight = await connect(empty_db)
    try:
        async with in_flight.transaction():
            appended = await service.append_turn(in_flight, lagging["id"], turn, tool_result_max_bytes=10240)
            upgrade = asyncio.ensure_future(asyncio.to_thread(migrate, empty_db, "upgrade", "005"))
            await until_waiting_for_a_lock(empty_db)
        logged = await upgrade
    finally:
        await in_flight.close()

    assert appended.value.turn_number == 4
    [row] = await fetch(
        empty_db,
        "SELECT total_turns, total_tokens, total_cost_usd FROM kraken_conversations WHERE id = $1",
        lagging["id"],
    )
    assert tuple(row) == (4, 63 + 105, Decimal("1.25"))
    # The append healed its own conversation; 005 fixed the other four.
    assert f"reconciled conversation totals: {len(RECONCILED) - 1} of" in logged


async def test_005_offline_sql_reconciles_as_the_online_run_does(empty_db: DatabaseTarget) -> None:
    offline = await asyncio.to_thread(run_alembic, "upgrade", "004:005", "--sql", target=None)
    assert offline.returncode == 0, out(offline)
    found = re.search(r"DO \$backfill\$.*?\$backfill\$", offline.stdout, re.DOTALL)
    assert found is not None, offline.stdout
    await asyncio.to_thread(migrate, empty_db, "upgrade", "004")
    await asyncio.to_thread(seed, empty_db)

    conn = await connect(empty_db)
    try:
        await conn.execute(found.group(0))  # outside a transaction block, as psql runs it
    finally:
        await conn.close()

    after = await asyncio.to_thread(totals, empty_db)
    assert {s for s, (tokens, _) in CASES.items() if after[s][:3] == sums(tokens)} == RECONCILED | {"right", "no turns"}
