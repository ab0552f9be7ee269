"""The lock-safe helpers of backend/migrations/ops.py, each on a real database: what they build, that
they finish an interrupted run, that a second run changes nothing, and the SQL they emit offline."""

import asyncio
import re

import asyncpg
import pytest
from alembic import op
from alembic.util import CommandError
from sqlalchemy.exc import DBAPIError

from backend.db.engine import connect, create_migration_engine
from backend.db.url import DatabaseTarget
from backend.migrations import ops
from backend.tests.helpers import fetch, offline_ops, run_ops, run_ops_async, sql, until_waiting_for_a_lock

TABLES = [
    "CREATE TABLE parents (id uuid PRIMARY KEY DEFAULT gen_random_uuid())",
    "CREATE TABLE items (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), parent_id uuid NOT NULL,"
    " n integer NOT NULL, tag text NOT NULL DEFAULT 'x')",
    "INSERT INTO parents (id) SELECT gen_random_uuid() FROM generate_series(1, 10)",
    "INSERT INTO items (parent_id, n) SELECT p.id, g FROM parents p, generate_series(1, 100) g",
]


@pytest.fixture
def db(empty_db: DatabaseTarget) -> DatabaseTarget:
    """Two tables with rows: 10 parents, 100 items each (n = 1..100 per parent)."""
    for statement in TABLES:
        sql(empty_db, statement)
    return empty_db


def index(db: DatabaseTarget, name: str) -> tuple[int, bool, bool, list[str]] | None:
    """(oid, valid, unique, columns) of an index, or None."""
    rows = sql(
        db,
        "SELECT i.indexrelid::int, i.indisvalid, i.indisunique,"
        " array(SELECT a.attname::text FROM unnest(i.indkey::int2[]) k JOIN pg_attribute a"
        "       ON a.attrelid = i.indrelid AND a.attnum = k)"
        " FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
        name,
    )
    return (rows[0][0], rows[0][1], rows[0][2], list(rows[0][3])) if rows else None


def constraint(db: DatabaseTarget, table: str, name: str) -> tuple[str, bool, str] | None:
    """(type, validated, definition) of a constraint, or None."""
    rows = sql(
        db,
        "SELECT contype::text, convalidated, pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = $1::regclass AND conname = $2",
        table,
        name,
    )
    return (rows[0][0], rows[0][1], rows[0][2]) if rows else None


def constraint_names(db: DatabaseTarget, table: str) -> set[str]:
    return {r[0] for r in sql(db, "SELECT conname FROM pg_constraint WHERE conrelid = $1::regclass", table)}


# --- indexes -----------------------------------------------------------------------------------


def test_index_is_built_concurrently_once(db: DatabaseTarget) -> None:
    run_ops(db, lambda: ops.create_index_concurrently("ix_items_n", "items", ["n"]))
    built = index(db, "ix_items_n")
    assert built is not None
    assert built[1:] == (True, False, ["n"])

    run_ops(db, lambda: ops.create_index_concurrently("ix_items_n", "items", ["n"]))
    assert index(db, "ix_items_n") == built  # same oid: a valid index is left alone


async def test_an_invalid_index_left_by_an_interrupted_build_is_rebuilt(db: DatabaseTarget) -> None:
    # A writer's open transaction makes the build wait; lock_timeout cancels it half-way, and
    # PostgreSQL leaves the INVALID index of the cancelled build behind.
    writer = await connect(db)
    try:
        async with writer.transaction():
            await writer.execute("INSERT INTO items (parent_id, n) SELECT id, 0 FROM parents LIMIT 1")
            with pytest.raises(DBAPIError, match="lock timeout"):
                await run_ops_async(
                    db, lambda: ops.create_index_concurrently("ix_items_n", "items", ["n"]), lock_timeout="200ms"
                )
    finally:
        await writer.close()
    left = await asyncio.to_thread(index, db, "ix_items_n")
    assert left is not None
    assert left[1] is False  # INVALID: IF NOT EXISTS alone would keep it forever

    await run_ops_async(db, lambda: ops.create_index_concurrently("ix_items_n", "items", ["n"]))
    rebuilt = await asyncio.to_thread(index, db, "ix_items_n")
    assert rebuilt is not None
    assert rebuilt[1] is True
    assert rebuilt[0] != left[0]


def test_a_unique_build_over_duplicates_fails_and_leaves_nothing(db: DatabaseTarget) -> None:
    with pytest.raises(CommandError, match=r"items has rows with the same \(n\); nothing was left behind"):
        run_ops(db, lambda: ops.create_index_concurrently("ix_items_n_unique", "items", ["n"], unique=True))
    assert index(db, "ix_items_n_unique") is None


def test_an_index_of_that_name_with_other_columns_is_refused(db: DatabaseTarget) -> None:
    sql(db, "CREATE INDEX ix_items_n ON items (tag)")
    with pytest.raises(CommandError, match="index ix_items_n already exists with another definition"):
        run_ops(db, lambda: ops.create_index_concurrently("ix_items_n", "items", ["n"]))


def test_drop_index_concurrently_is_idempotent(db: DatabaseTarget) -> None:
    sql(db, "CREATE INDEX ix_items_n ON items (n)")
    run_ops(db, lambda: ops.drop_index_concurrently("ix_items_n"))
    assert index(db, "ix_items_n") is None
    run_ops(db, lambda: ops.drop_index_concurrently("ix_items_n"))


# --- constraints ---------------------------------------------------------------------------------


def test_check_is_enforced_at_once_and_validated_later(db: DatabaseTarget) -> None:
    sql(db, "UPDATE items SET n = -1 WHERE n = 1")  # 10 old rows break the rule
    run_ops(db, lambda: ops.add_check_not_valid("items_n_check", "items", "n >= 0"))
    assert constraint(db, "items", "items_n_check") == ("c", False, "CHECK ((n >= 0)) NOT VALID")
    with pytest.raises(asyncpg.CheckViolationError):  # new rows are checked already
        sql(db, "INSERT INTO items (parent_id, n) SELECT id, -5 FROM parents LIMIT 1")

    with pytest.raises(DBAPIError, match="is violated by some row"):
        run_ops(db, lambda: ops.validate_constraint("items_n_check", "items"))
    assert constraint(db, "items", "items_n_check") == ("c", False, "CHECK ((n >= 0)) NOT VALID")

    sql(db, "UPDATE items SET n = 1 WHERE n = -1")
    run_ops(db, lambda: ops.validate_constraint("items_n_check", "items"))
    assert constraint(db, "items", "items_n_check") == ("c", True, "CHECK ((n >= 0))")

    def again() -> None:
        ops.add_check_not_valid("items_n_check", "items", "n >= 0")
        ops.validate_constraint("items_n_check", "items")

    run_ops(db, again)
    assert constraint(db, "items", "items_n_check") == ("c", True, "CHECK ((n >= 0))")


def test_validate_never_shares_a_transaction_with_the_add(db: DatabaseTarget) -> None:
    # Validating in the ADD's transaction would scan the table under the ADD's ACCESS EXCLUSIVE lock.
    added_by: list[str] = []

    def add_and_validate() -> None:
        bind = op.get_bind()
        bind.exec_driver_sql("ALTER TABLE items ADD CONSTRAINT items_n_check CHECK (n >= 0) NOT VALID")
        added_by.append(bind.exec_driver_sql("SELECT (txid_current() % 4294967296)::text").scalar_one())
        ops.validate_constraint("items_n_check", "items")

    run_ops(db, add_and_validate)
    assert constraint(db, "items", "items_n_check") == ("c", True, "CHECK ((n >= 0))")
    # VALIDATE rewrites the catalog row, so its xmin names the transaction that validated it.
    validated_by = sql(db, "SELECT xmin::text FROM pg_constraint WHERE conname = 'items_n_check'")[0][0]
    assert validated_by != added_by[0]


def test_foreign_key_is_enforced_at_once_and_validated_later(db: DatabaseTarget) -> None:
    sql(db, "CREATE TABLE notes (id serial PRIMARY KEY, item_id uuid)")
    sql(db, "INSERT INTO notes (item_id) VALUES (gen_random_uuid())")  # an orphan

    def add() -> None:
        ops.add_foreign_key_not_valid("notes_item_id_fkey", "notes", ["item_id"], "items", on_delete="CASCADE")

    run_ops(db, add)
    definition = "FOREIGN KEY (item_id) REFERENCES items(id) ON DELETE CASCADE"
    assert constraint(db, "notes", "notes_item_id_fkey") == ("f", False, definition + " NOT VALID")
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        sql(db, "INSERT INTO notes (item_id) VALUES (gen_random_uuid())")
    with pytest.raises(DBAPIError, match="violates foreign key constraint"):
        run_ops(db, lambda: ops.validate_constraint("notes_item_id_fkey", "notes"))

    sql(db, "DELETE FROM notes")
    run_ops(db, lambda: ops.validate_constraint("notes_item_id_fkey", "notes"))
    assert constraint(db, "notes", "notes_item_id_fkey") == ("f", True, definition)
    run_ops(db, add)  # already there: nothing to do
    with pytest.raises(CommandError, match="exists with another definition; replace it with replace_foreign_key"):
        run_ops(db, lambda: ops.add_foreign_key_not_valid("notes_item_id_fkey", "notes", ["item_id"], "items"))


def test_unique_constraint_is_attached_to_a_concurrently_built_index(db: DatabaseTarget) -> None:
    def add() -> None:
        ops.add_unique_constraint("items_parent_id_n_key", "items", ["parent_id", "n"])

    # Interrupted after the build, before the attach: the valid index is taken as it is.
    sql(db, "CREATE UNIQUE INDEX items_parent_id_n_key ON items (parent_id, n)")
    built = index(db, "items_parent_id_n_key")
    run_ops(db, add)
    assert constraint(db, "items", "items_parent_id_n_key") == ("u", True, "UNIQUE (parent_id, n)")
    assert index(db, "items_parent_id_n_key") == built
    with pytest.raises(asyncpg.UniqueViolationError):
        sql(db, "INSERT INTO items (parent_id, n) SELECT parent_id, n FROM items LIMIT 1")
    run_ops(db, add)
    assert index(db, "items_parent_id_n_key") == built


def test_unique_constraint_from_nothing(db: DatabaseTarget) -> None:
    run_ops(db, lambda: ops.add_unique_constraint("items_parent_id_n_key", "items", ["parent_id", "n"]))
    assert constraint(db, "items", "items_parent_id_n_key") == ("u", True, "UNIQUE (parent_id, n)")
    found = index(db, "items_parent_id_n_key")
    assert found is not None
    assert found[1:] == (True, True, ["parent_id", "n"])


def test_replace_foreign_key_keeps_its_name_and_changes_its_action(db: DatabaseTarget) -> None:
    sql(db, "ALTER TABLE items ADD CONSTRAINT items_parent_id_fkey FOREIGN KEY (parent_id) REFERENCES parents (id)")
    before = constraint_names(db, "items")

    def cascade() -> None:
        ops.replace_foreign_key("items_parent_id_fkey", "items", ["parent_id"], "parents", on_delete="CASCADE")

    run_ops(db, cascade)
    cascading = "FOREIGN KEY (parent_id) REFERENCES parents(id) ON DELETE CASCADE"
    assert constraint(db, "items", "items_parent_id_fkey") == ("f", True, cascading)
    assert constraint_names(db, "items") == before  # no temporary key left behind
    sql(db, "DELETE FROM parents WHERE id = (SELECT min(parent_id::text)::uuid FROM items)")
    assert sql(db, "SELECT count(*) FROM items")[0][0] == 900

    run_ops(db, cascade)
    assert constraint(db, "items", "items_parent_id_fkey") == ("f", True, cascading)

    run_ops(db, lambda: ops.replace_foreign_key("items_parent_id_fkey", "items", ["parent_id"], "parents"))
    plain = "FOREIGN KEY (parent_id) REFERENCES parents(id)"
    assert constraint(db, "items", "items_parent_id_fkey") == ("f", True, plain)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        sql(db, "DELETE FROM parents")


@pytest.mark.parametrize("validated", [False, True])
def test_replace_foreign_key_finishes_an_interrupted_replacement(db: DatabaseTarget, validated: bool) -> None:
    sql(db, "ALTER TABLE items ADD CONSTRAINT items_parent_id_fkey FOREIGN KEY (parent_id) REFERENCES parents (id)")
    # Where a killed run stops: the replacement added (and maybe validated), the old key still there.
    sql(
        db,
        "ALTER TABLE items ADD CONSTRAINT items_parent_id_fkey_new FOREIGN KEY (parent_id)"
        " REFERENCES parents (id) ON DELETE CASCADE NOT VALID",
    )
    if validated:
        sql(db, "ALTER TABLE items VALIDATE CONSTRAINT items_parent_id_fkey_new")
    run_ops(
        db,
        lambda: ops.replace_foreign_key("items_parent_id_fkey", "items", ["parent_id"], "parents", on_delete="CASCADE"),
    )
    assert constraint(db, "items", "items_parent_id_fkey") == (
        "f",
        True,
        "FOREIGN KEY (parent_id) REFERENCES parents(id) ON DELETE CASCADE",
    )
    assert constraint(db, "items", "items_parent_id_fkey_new") is None


async def test_replacing_a_foreign_key_does_not_deadlock_with_a_writer(db: DatabaseTarget) -> None:
    # The service's order: a parent, then its children. A writer holding a new parent while the
    # replacement waits for it must still be able to add the children.
    await fetch(
        db, "ALTER TABLE items ADD CONSTRAINT items_parent_id_fkey FOREIGN KEY (parent_id) REFERENCES parents (id)"
    )
    writer, watcher = await connect(db), await connect(db)
    try:
        async with writer.transaction():
            parent = await writer.fetchval("INSERT INTO parents DEFAULT VALUES RETURNING id")
            replacing = asyncio.ensure_future(
                run_ops_async(
                    db,
                    lambda: ops.replace_foreign_key(
                        "items_parent_id_fkey", "items", ["parent_id"], "parents", on_delete="CASCADE"
                    ),
                )
            )
            blocked = (
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'kraken-migrate' AND wait_event_type = 'Lock'"
            )
            while not await watcher.fetchval(blocked):
                assert not replacing.done()
                await asyncio.sleep(0.01)
            # Had the replacement locked items first, this insert would deadlock with it.
            await writer.execute("INSERT INTO items (parent_id, n) VALUES ($1, 1)", parent)
        await replacing
    finally:
        await writer.close()
        await watcher.close()
    definition = await fetch(
        db, "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'items_parent_id_fkey'"
    )
    assert definition[0][0] == "FOREIGN KEY (parent_id) REFERENCES parents(id) ON DELETE CASCADE"


async def test_helpers_refuse_a_connection_already_inside_a_transaction(db: DatabaseTarget) -> None:
    # Alembic's connection-sharing recipe with `engine.begin()`: the caller owns the transaction,
    # so a helper cannot commit part-way. It says so instead of failing obscurely.
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import Connection

    def inside_callers_transaction(connection: Connection) -> None:
        context = MigrationContext.configure(connection, opts={"transaction_per_migration": True})
        with Operations.context(context), context.begin_transaction(_per_migration=True):
            ops.create_index_concurrently("ix_items_n", "items", ["n"])

    engine = create_migration_engine(db)
    try:
        async with engine.begin() as connection:
            with pytest.raises(CommandError, match="already inside a transaction"):
                await connection.run_sync(inside_callers_transaction)
    finally:
        await engine.dispose()
    assert (await fetch(db, "SELECT to_regclass('ix_items_n') IS NULL"))[0][0]


# --- offline SQL -------------------------------------------------------------------------------


def statements(text: str) -> list[str]:
    """The emitted SQL, one entry per statement (with the comment lines right above it)."""
    return [s.strip() for s in text.split(";\n") if s.strip()]


def test_offline_index_build_runs_between_transactions() -> None:
    emitted = statements(offline_ops(lambda: ops.create_index_concurrently("ix_items_n", "items", ["n"], unique=True)))
    assert emitted == [
        "BEGIN",
        "COMMIT",
        'CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS "ix_items_n" ON "items" ("n")',
        "BEGIN",
        "COMMIT",
    ]


def test_offline_constraint_is_validated_in_a_later_transaction() -> None:
    def add_and_validate() -> None:
        ops.add_check_not_valid("items_n_check", "items", "n >= 0")
        ops.validate_constraint("items_n_check", "items")

    assert statements(offline_ops(add_and_validate)) == [
        "BEGIN",
        'ALTER TABLE "items" ADD CONSTRAINT "items_n_check" CHECK (n >= 0) NOT VALID',
        "COMMIT",
        "BEGIN",
        'ALTER TABLE "items" VALIDATE CONSTRAINT "items_n_check"',
        "COMMIT",
        "BEGIN",
        "COMMIT",
    ]


def test_offline_foreign_key_replacement() -> None:
    emitted = statements(
        offline_ops(
            lambda: ops.replace_foreign_key(
                "items_parent_id_fkey", "items", ["parent_id"], "parents", on_delete="CASCADE"
            )
        )
    )
    assert emitted == [
        "BEGIN",
        'LOCK TABLE "parents" IN SHARE ROW EXCLUSIVE MODE',  # the referenced table first
        'ALTER TABLE "items" ADD CONSTRAINT "items_parent_id_fkey_new" FOREIGN KEY ("parent_id")'
        ' REFERENCES "parents" ("id") ON DELETE CASCADE NOT VALID',
        "COMMIT",
        "BEGIN",
        'ALTER TABLE "items" VALIDATE CONSTRAINT "items_parent_id_fkey_new"',
        "COMMIT",
        "BEGIN",
        'LOCK TABLE "parents" IN ACCESS EXCLUSIVE MODE',
        # squawk applies an ignore comment to the statement right below it only.
        '-- squawk-ignore ban-drop-constraint\nALTER TABLE "items" DROP CONSTRAINT IF EXISTS "items_parent_id_fkey"',
        "-- squawk-ignore renaming-object\n"
        'ALTER TABLE "items" RENAME CONSTRAINT "items_parent_id_fkey_new" TO "items_parent_id_fkey"',
        "COMMIT",
        "BEGIN",
        "COMMIT",
    ]


async def test_offline_violation_guard_refuses_on_a_database(db: DatabaseTarget) -> None:
    rules = [ops.Rule.check("items", "n <= 100", show=["n"]), ops.Rule.unique("items", ["parent_id", "n"])]
    emitted = offline_ops(lambda: ops.refuse_violations("042", rules))
    found = re.search(r"DO \$guard\$.*?\$guard\$", emitted, re.DOTALL)
    assert found is not None, emitted
    guard = found.group(0)
    await fetch(db, guard)  # no violations yet: passes
    await fetch(db, "UPDATE items SET n = 101 WHERE n IN (99, 100)")
    with pytest.raises(asyncpg.RaiseError) as raised:
        await fetch(db, guard)
    assert str(raised.value) == (
        "revision 042 changed nothing: rows break rules it adds; items: n <= 100: 20 row(s);"
        " items: unique (parent_id, n): 20 row(s)"
    )


def test_backfill_runs_batch_after_batch_each_in_its_own_transaction(db: DatabaseTarget) -> None:
    sql(db, "ALTER TABLE items ADD COLUMN doubled integer")
    done: list[int] = []
    batch = "UPDATE items SET doubled = n * 2 WHERE id IN (SELECT id FROM items WHERE doubled IS NULL LIMIT 150)"
    run_ops(db, lambda: done.append(ops.backfill_in_batches(batch)))
    assert done == [1000]
    assert sql(db, "SELECT count(*) FROM items WHERE doubled IS DISTINCT FROM n * 2")[0][0] == 0
    # 7 batches, 7 transactions: each row's xmin names the transaction that wrote it.
    assert sql(db, "SELECT count(DISTINCT xmin::text) FROM items")[0][0] == 7


def test_offline_backfill_is_emitted_once_with_a_note() -> None:
    batch = "UPDATE items SET doubled = n * 2 WHERE id IN (SELECT id FROM items WHERE doubled IS NULL LIMIT 150)"
    assert statements(offline_ops(lambda: ops.backfill_in_batches(batch))) == [
        "BEGIN",
        f"-- repeat the next statement until it reports 0 rows\n{batch}",
        "COMMIT",
        "BEGIN",
        "COMMIT",
    ]


# --- backfill by key -------------------------------------------------------------------------

DOUBLE_BATCH = "UPDATE items SET doubled = n * 2 WHERE id = ANY(:keys) AND doubled IS DISTINCT FROM n * 2"


def test_backfill_by_key_walks_batch_after_batch_each_in_its_own_transaction(db: DatabaseTarget) -> None:
    sql(db, "ALTER TABLE items ADD COLUMN doubled integer")
    sql(db, "UPDATE items SET doubled = n * 2 WHERE n <= 10")  # 100 rows already done
    done: list[int] = []
    # target_seconds=None: every batch 150 keys, not tuned to a batch time.
    run_ops(db, lambda: done.append(ops.backfill_by_key("items", "id", DOUBLE_BATCH, 150, target_seconds=None)))
    assert done == [900]  # what the batches changed, not what they walked
    assert sql(db, "SELECT count(*) FROM items WHERE doubled IS DISTINCT FROM n * 2")[0][0] == 0
    # The 900 rows changed in 7 batches (150 keys each, 1000 in all), 7 transactions: a row's xmin
    # names the transaction that wrote it. The 100 done before were not written again.
    assert sql(db, "SELECT count(DISTINCT xmin::text) FROM items WHERE n > 10")[0][0] == 7
    assert sql(db, "SELECT count(DISTINCT xmin::text) FROM items WHERE n <= 10")[0][0] == 1

    run_ops(db, lambda: done.append(ops.backfill_by_key("items", "id", DOUBLE_BATCH, 150)))
    assert done[-1] == 0


def test_backfill_by_key_locks_only_the_rows_still_to_do(db: DatabaseTarget) -> None:
    sql(db, "ALTER TABLE items ADD COLUMN doubled integer")
    sql(db, "UPDATE items SET doubled = n * 2 WHERE n <= 10")
    sql(db, "VACUUM items")  # no xmax left by the update's own scan
    done: list[int] = []
    pending = "doubled IS DISTINCT FROM n * 2"
    run_ops(db, lambda: done.append(ops.backfill_by_key("items", "id", DOUBLE_BATCH, 150, pending=pending)))
    assert done == [900]
    assert sql(db, "SELECT count(*) FROM items WHERE doubled IS DISTINCT FROM n * 2")[0][0] == 0
    # A row locked (FOR NO KEY UPDATE) keeps the locker in its xmax; the rows done before were never locked.
    assert sql(db, "SELECT count(*) FROM items WHERE n <= 10 AND xmax::text <> '0'")[0][0] == 0


def test_backfill_by_key_ends_while_rows_keep_coming_after_its_upper_bound(db: DatabaseTarget) -> None:
    """Each batch writes a row past the highest key, as live writes do; the bound fixed at the
    start ends the walk anyway, and rows written after it are not its business."""
    sql(db, "CREATE TABLE ticks (id bigint PRIMARY KEY, seen boolean NOT NULL DEFAULT false)")
    sql(db, "INSERT INTO ticks (id) SELECT generate_series(1, 100)")
    batch = (
        "WITH more AS (INSERT INTO ticks (id) SELECT max(id) + 1 FROM ticks)"
        " UPDATE ticks SET seen = true WHERE id = ANY(:keys)"
    )
    done: list[int] = []
    # Untuned, 10 batches of 10: 10 rows written past the bound.
    run_ops(
        db, lambda: done.append(ops.backfill_by_key("ticks", "id", batch, 10, key_type="bigint", target_seconds=None))
    )
    assert done == [100]
    assert sql(db, "SELECT array_agg(id ORDER BY id) FROM ticks WHERE NOT seen")[0][0] == list(range(101, 111))
    with pytest.raises(ValueError, match="batch_size must be at least 1, not 0"):
        run_ops(db, lambda: ops.backfill_by_key("ticks", "id", batch, 0))


@pytest.mark.parametrize(
    "pending", ["true", "items IS DISTINCT FROM (SELECT count(*) FROM items AS i WHERE i.parent_id = parents.id)"]
)
async def test_a_backfill_batch_waits_for_a_writer_of_its_rows_and_sees_its_commit(
    db: DatabaseTarget, pending: str
) -> None:
    """A parent's count lags; a writer adds an item and writes the right count, in one transaction,
    as the service appends a turn to a lagging conversation. The batch that counts the items again
    waits for the parent's row lock, then reads the items in a new snapshot: it finds the writer's
    item, and leaves the right count. (One statement that read first and waited after would write
    the count its snapshot saw, one short, over the writer's.)"""
    await fetch(db, "ALTER TABLE parents ADD COLUMN items bigint")
    await fetch(db, "UPDATE parents p SET items = (SELECT count(*) FROM items i WHERE i.parent_id = p.id)")
    recount = (
        "UPDATE parents AS p SET items = c.n"
        " FROM (SELECT parent_id, count(*) AS n FROM items WHERE parent_id = ANY(:keys) GROUP BY parent_id) AS c"
        " WHERE p.id = c.parent_id AND p.items IS DISTINCT FROM c.n"
    )
    [parent] = await fetch(db, "SELECT id FROM parents ORDER BY id LIMIT 1 OFFSET 4")
    await fetch(db, "UPDATE parents SET items = 50 WHERE id = $1", parent["id"])
    writer = await connect(db)
    try:
        async with writer.transaction():
            await writer.execute("UPDATE parents SET items = 101 WHERE id = $1", parent["id"])
            await writer.execute("INSERT INTO items (parent_id, n) VALUES ($1, 101)", parent["id"])
            walk = asyncio.create_task(
                run_ops_async(db, lambda: ops.backfill_by_key("parents", "id", recount, 3, pending=pending))
            )
            await until_waiting_for_a_lock(db)
        await walk
    finally:
        await writer.close()
    counts = await fetch(
        db, "SELECT p.items, (SELECT count(*) FROM items i WHERE i.parent_id = p.id) AS n FROM parents p"
    )
    assert sorted((r["items"], r["n"]) for r in counts) == [(100, 100)] * 9 + [(101, 101)]


async def test_offline_backfill_by_key_is_one_block_that_commits_each_batch(db: DatabaseTarget) -> None:
    emitted = offline_ops(lambda: ops.backfill_by_key("items", "id", DOUBLE_BATCH, 150))
    found = re.search(r"DO \$backfill\$.*?\$backfill\$", emitted, re.DOTALL)
    assert found is not None, emitted
    block = found.group(0)
    # Between transactions (a DO block commits only outside one), and nothing else.
    assert statements(emitted.replace(block, "DO")) == ["BEGIN", "COMMIT", "DO", "BEGIN", "COMMIT"]
    assert ":keys" not in block

    # Run as psql would, outside a transaction block: the same walk as online.
    await fetch(db, "ALTER TABLE items ADD COLUMN doubled integer")
    conn = await connect(db)
    notices: list[str] = []
    conn.add_log_listener(lambda _, message: notices.append(message.message))
    try:
        await conn.execute(block)
    finally:
        await conn.close()
    assert notices == ["backfill of items by id: 1000 row(s) changed"]
    assert (await fetch(db, "SELECT count(*) FROM items WHERE doubled IS DISTINCT FROM n * 2"))[0][0] == 0
    assert (await fetch(db, "SELECT count(DISTINCT xmin::text) FROM items"))[0][0] == 7
