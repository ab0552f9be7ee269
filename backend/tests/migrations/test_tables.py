"""ops.create_table / ops.drop_table on a real database and offline: a new table with foreign keys to
busy ones, created whole or not at all, compared when it exists, dropped only when no data is lost;
and the rule that a check comes before a revision's first commit."""

import asyncio
import re

import asyncpg
import pytest
from alembic.util import CommandError

from backend.db.engine import connect
from backend.db.url import DatabaseTarget
from backend.migrations import ops
from backend.tests.helpers import fetch, offline_ops, run_ops, run_ops_async, sql
from backend.tests.migrations.test_ops import TABLES, constraint, statements


@pytest.fixture
def db(empty_db: DatabaseTarget) -> DatabaseTarget:
    """test_ops's two tables with rows: 10 parents, 100 items each."""
    for statement in TABLES:
        sql(empty_db, statement)
    return empty_db


NOTES = {
    "id": "bigint GENERATED ALWAYS AS IDENTITY",
    "item_id": "uuid NOT NULL",
    "parent_id": "uuid",
    "body": "text NOT NULL",
    "created_at": "timestamptz NOT NULL DEFAULT now()",
}
NOTE_KEYS = [
    ops.ForeignKey("notes_parent_id_fkey", ["parent_id"], "parents", on_delete="CASCADE"),
    ops.ForeignKey("notes_item_id_fkey", ["item_id"], "items", on_delete="CASCADE"),
]


def create_notes(**changes: object) -> None:
    definition: dict[str, object] = {
        "columns": NOTES,
        "primary_key": ["id"],
        "checks": {"notes_body_check": "body <> ''"},
        "indexes": {"ix_notes_item_id": ["item_id"]},
        "foreign_keys": NOTE_KEYS,
        **changes,
    }
    ops.create_table("notes", **definition)  # type: ignore[arg-type]


def columns_of(db: DatabaseTarget, table: str) -> list[tuple[str, str, bool]]:
    return [
        (r[0], r[1], r[2])
        for r in sql(
            db,
            "SELECT attname::text, format_type(atttypid, atttypmod), attnotnull FROM pg_attribute"
            " WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            table,
        )
    ]


def test_create_table_builds_the_table_then_its_foreign_keys_validated(db: DatabaseTarget) -> None:
    run_ops(db, create_notes)
    assert columns_of(db, "notes") == [
        ("id", "bigint", True),
        ("item_id", "uuid", True),
        ("parent_id", "uuid", False),
        ("body", "text", True),
        ("created_at", "timestamp with time zone", True),
    ]
    assert constraint(db, "notes", "notes_pkey") == ("p", True, "PRIMARY KEY (id)")
    assert constraint(db, "notes", "notes_body_check") == ("c", True, "CHECK ((body <> ''::text))")
    assert constraint(db, "notes", "notes_item_id_fkey") == (
        "f",
        True,
        "FOREIGN KEY (item_id) REFERENCES items(id) ON DELETE CASCADE",
    )
    assert constraint(db, "notes", "notes_parent_id_fkey") == (
        "f",
        True,
        "FOREIGN KEY (parent_id) REFERENCES parents(id) ON DELETE CASCADE",
    )
    assert sql(db, "SELECT to_regclass('ix_notes_item_id') IS NOT NULL")[0][0]
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        sql(db, "INSERT INTO notes (item_id, body) VALUES (gen_random_uuid(), 'x')")
    sql(db, "INSERT INTO notes (item_id, body) SELECT id, 'kept' FROM items LIMIT 1")

    run_ops(db, create_notes)  # run again (a retry, a rerun after a later step failed): nothing changes
    assert sql(db, "SELECT count(*) FROM notes")[0][0] == 1


def test_create_table_finishes_foreign_keys_a_failed_run_left_out(db: DatabaseTarget) -> None:
    # Killed after the table committed, during the first foreign key's validation.
    run_ops(db, lambda: create_notes(foreign_keys=[]))
    sql(db, "ALTER TABLE notes ADD CONSTRAINT notes_parent_id_fkey FOREIGN KEY (parent_id) REFERENCES parents (id)"
        " ON DELETE CASCADE NOT VALID")  # fmt: skip
    run_ops(db, create_notes)
    assert constraint(db, "notes", "notes_parent_id_fkey") is not None
    assert constraint(db, "notes", "notes_parent_id_fkey")[1] is True  # type: ignore[index]
    assert constraint(db, "notes", "notes_item_id_fkey")[1] is True  # type: ignore[index]


def test_an_existing_table_that_differs_is_refused_with_its_differences(db: DatabaseTarget) -> None:
    sql(db, "CREATE TABLE notes (id bigint PRIMARY KEY, item_id uuid NOT NULL, body varchar(200) NOT NULL, extra int)")
    with pytest.raises(CommandError) as refused:
        run_ops(db, create_notes)
    message = str(refused.value)
    assert message.startswith("table notes exists and differs from the one this revision creates: ")
    assert "column body is character varying(200) NOT NULL, not text NOT NULL" in message
    assert "column id is bigint NOT NULL, not bigint NOT NULL GENERATED ALWAYS AS IDENTITY" in message
    assert "column created_at is missing" in message
    assert "column extra is not in the revision" in message
    assert "index ix_notes_item_id is missing" in message
    assert "\n" not in message
    assert constraint(db, "notes", "notes_item_id_fkey") is None  # nothing was added to it


def test_inline_references_are_refused() -> None:
    with pytest.raises(ValueError, match="item_id has an inline REFERENCES; give it in foreign_keys="):
        offline_ops(lambda: ops.create_table("notes", {"item_id": "uuid REFERENCES items"}))


async def test_create_table_locks_the_referenced_table_first_and_does_not_deadlock_with_a_writer(
    db: DatabaseTarget,
) -> None:
    # The service's order: a parent row, then the rows that refer to it. A writer holding a new
    # parent while create_table waits for that table must still be able to write the new table.
    await asyncio.to_thread(run_ops, db, lambda: create_notes(foreign_keys=NOTE_KEYS[1:]))
    writer, watcher = await connect(db), await connect(db)
    try:
        async with writer.transaction():
            parent = await writer.fetchval("INSERT INTO parents DEFAULT VALUES RETURNING id")
            creating = asyncio.ensure_future(run_ops_async(db, create_notes))
            blocked = (
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'kraken-migrate' AND wait_event_type = 'Lock'"
                " AND query LIKE 'LOCK TABLE \"parents\"%'"
            )
            while not await watcher.fetchval(blocked):
                assert not creating.done()
                await asyncio.sleep(0.01)
            # Had it locked the new table first, this insert would deadlock with it.
            item = await writer.fetchval("INSERT INTO items (parent_id, n) VALUES ($1, 1) RETURNING id", parent)
            await writer.execute("INSERT INTO notes (item_id, parent_id, body) VALUES ($1, $2, 'x')", item, parent)
        await creating
    finally:
        await writer.close()
        await watcher.close()
    found = await fetch(db, "SELECT convalidated FROM pg_constraint WHERE conname = 'notes_parent_id_fkey'")
    assert found[0][0] is True


def test_offline_create_table_creates_then_adds_each_foreign_key_in_its_own_transactions() -> None:
    emitted = statements(offline_ops(create_notes))
    assert emitted[:4] == [
        "BEGIN",
        'CREATE TABLE IF NOT EXISTS "notes" (\n'
        '    "id" bigint GENERATED ALWAYS AS IDENTITY,\n'
        '    "item_id" uuid NOT NULL,\n'
        '    "parent_id" uuid,\n'
        '    "body" text NOT NULL,\n'
        '    "created_at" timestamptz NOT NULL DEFAULT now(),\n'
        '    CONSTRAINT "notes_pkey" PRIMARY KEY ("id"),\n'
        "    CONSTRAINT \"notes_body_check\" CHECK (body <> '')\n"
        ")",
        'CREATE INDEX IF NOT EXISTS "ix_notes_item_id" ON "notes" ("item_id")',
        "COMMIT",
    ]
    assert emitted[4:] == [
        "BEGIN",
        'LOCK TABLE "parents" IN SHARE ROW EXCLUSIVE MODE',  # the referenced table first
        'ALTER TABLE "notes" ADD CONSTRAINT "notes_parent_id_fkey" FOREIGN KEY ("parent_id")'
        ' REFERENCES "parents" ("id") ON DELETE CASCADE NOT VALID',
        "COMMIT",
        "BEGIN",
        'ALTER TABLE "notes" VALIDATE CONSTRAINT "notes_parent_id_fkey"',
        "COMMIT",
        "BEGIN",
        'LOCK TABLE "items" IN SHARE ROW EXCLUSIVE MODE',
        'ALTER TABLE "notes" ADD CONSTRAINT "notes_item_id_fkey" FOREIGN KEY ("item_id")'
        ' REFERENCES "items" ("id") ON DELETE CASCADE NOT VALID',
        "COMMIT",
        "BEGIN",
        'ALTER TABLE "notes" VALIDATE CONSTRAINT "notes_item_id_fkey"',
        "COMMIT",
        "BEGIN",
        "COMMIT",
    ]


async def test_offline_create_table_builds_on_a_database_what_online_does(db: DatabaseTarget) -> None:
    conn = await connect(db)
    try:
        for statement in statements(offline_ops(create_notes)):
            await conn.execute(statement)
    finally:
        await conn.close()
    found = await fetch(
        db,
        "SELECT conname::text, convalidated FROM pg_constraint WHERE conrelid = 'notes'::regclass"
        # PostgreSQL 18 records NOT NULL as constraints too (contype n); the columns cover those.
        " AND contype <> 'n'",
    )
    assert sorted((r[0], r[1]) for r in found) == [
        ("notes_body_check", True),
        ("notes_item_id_fkey", True),
        ("notes_parent_id_fkey", True),
        ("notes_pkey", True),
    ]


# --- drop_table ------------------------------------------------------------------------------


def test_drop_table_refuses_while_it_holds_rows(db: DatabaseTarget) -> None:
    run_ops(db, create_notes)
    sql(db, "INSERT INTO notes (item_id, body) SELECT id, 'x' FROM items LIMIT 3")
    with pytest.raises(CommandError, match=r"downgrade of this revision would drop notes \(3 row\(s\)\)"):
        run_ops(db, lambda: ops.drop_table("notes"))
    assert constraint(db, "notes", "notes_item_id_fkey") is not None  # refused before any change


def test_drop_table_drops_its_foreign_keys_then_the_table(db: DatabaseTarget) -> None:
    run_ops(db, create_notes)
    sql(db, "INSERT INTO notes (item_id, body) SELECT id, 'x' FROM items LIMIT 3")
    run_ops(db, lambda: ops.drop_table("notes"), x=["allow_data_loss=true"])
    assert sql(db, "SELECT to_regclass('notes') IS NULL")[0][0]
    # The foreign keys' triggers on the referenced tables went with them.
    triggers = "SELECT count(*) FROM pg_trigger WHERE tgrelid IN ('items'::regclass, 'parents'::regclass)"
    assert sql(db, triggers)[0][0] == 0
    run_ops(db, lambda: ops.drop_table("notes"))  # gone already: nothing to do, nothing to refuse


def test_drop_table_refuses_while_another_table_refers_to_it(db: DatabaseTarget) -> None:
    sql(db, "ALTER TABLE items ADD CONSTRAINT items_parent_fkey FOREIGN KEY (parent_id) REFERENCES parents (id)")
    with pytest.raises(
        CommandError, match=r"cannot drop table parents: foreign key\(s\) items.items_parent_fkey refer"
    ):
        run_ops(db, lambda: ops.drop_table("parents"), x=["allow_data_loss=true"])
    assert sql(db, "SELECT to_regclass('parents') IS NOT NULL")[0][0]


async def test_offline_drop_table_guards_then_drops_foreign_keys_one_at_a_time(db: DatabaseTarget) -> None:
    emitted = offline_ops(lambda: ops.drop_table("notes"))
    found = re.search(r"DO \$drop_table\$.*?\$drop_table\$", emitted, re.DOTALL)
    assert found is not None, emitted
    block = found.group(0)
    # The data-loss guard before anything else; the block between transactions (it commits after
    # each foreign key); then the table.
    order = [
        emitted.index(part) for part in ("DO $guard$", "COMMIT;\n\nDO $drop_table$", 'DROP TABLE IF EXISTS "notes"')
    ]
    assert order == sorted(order)
    assert emitted.count("$drop_table$;\n\nBEGIN;") == 1
    await asyncio.to_thread(run_ops, db, create_notes)
    conn = await connect(db)
    try:
        await conn.execute(block)  # as psql runs it, outside a transaction block
    finally:
        await conn.close()
    assert (
        await fetch(db, "SELECT conname FROM pg_constraint WHERE conrelid = 'notes'::regclass AND contype = 'f'") == []
    )


# --- checks before the first commit ------------------------------------------------------------


@pytest.mark.parametrize("offline", [False, True])
@pytest.mark.parametrize(
    ("change", "check", "committed"),
    [
        (lambda: ops.commit(), lambda: ops.refuse_data_loss("042", tables=["items"]), "ops.commit()"),
        (
            lambda: ops.add_columns("items", {"note": "text"}),
            lambda: ops.refuse_violations("042", [ops.Rule.check("items", "n > 0")]),
            "ops.add_columns()",
        ),
        (
            lambda: ops.create_index_concurrently("ix_items_n", "items", ["n"]),
            lambda: ops.drop_table("items"),
            "ops.create_index_concurrently()",
        ),
    ],
)
def test_a_check_after_the_first_commit_is_refused(
    db: DatabaseTarget, offline: bool, change: object, check: object, committed: str
) -> None:
    def revision() -> None:
        change()  # type: ignore[operator]
        check()  # type: ignore[operator]

    with pytest.raises(CommandError) as refused:
        offline_ops(revision) if offline else run_ops(db, revision)
    message = str(refused.value)
    assert f"would run after the revision already committed a step ({committed} commits)" in message
    assert "a refusal there would leave the database changed; move the check before the first change" in message


def test_checks_before_the_first_commit_and_drops_they_cover_pass(db: DatabaseTarget) -> None:
    run_ops(db, create_notes)
    run_ops(db, lambda: ops.create_table("more_notes", {"id": "bigint"}))

    def downgrade() -> None:
        ops.refuse_data_loss("042", tables=["notes", "more_notes"])
        ops.drop_table("notes")
        ops.drop_table("more_notes")  # covered by the check above: not counted again after a commit

    run_ops(db, downgrade)
    assert sql(db, "SELECT to_regclass('notes') IS NULL AND to_regclass('more_notes') IS NULL")[0][0]


# --- waivers -----------------------------------------------------------------------------------


def test_a_waiver_comments_the_next_statement_only() -> None:
    def revision() -> None:
        ops.waive("prefer-text-field", reason="the API limits it to 200 characters")
        ops.create_table("notes", {"body": "varchar(200)"})
        ops.create_table("others", {"body": "varchar(200)"})

    emitted = statements(offline_ops(revision))
    assert emitted[1].startswith(
        '-- squawk-ignore prefer-text-field -- the API limits it to 200 characters\nCREATE TABLE IF NOT EXISTS "notes"'
    )
    assert emitted[4].startswith('CREATE TABLE IF NOT EXISTS "others"')


def test_a_waiver_block_comments_each_statement_but_begin_and_commit() -> None:
    def revision() -> None:
        with ops.waive("ban-drop-table", "ban-drop-column", reason="nothing reads it since 006"):
            ops.drop_table("notes")
        ops.commit()

    emitted = statements(offline_ops(revision))
    comment = "-- squawk-ignore ban-drop-table, ban-drop-column -- nothing reads it since 006\n"
    commented = [s for s in emitted if s.startswith(comment)]
    assert [s.removeprefix(comment).split("\n")[0] for s in commented] == [
        "DO $guard$",
        "DO $drop_table$",
        'DROP TABLE IF EXISTS "notes"',
    ]
    assert "BEGIN" in emitted
    assert "COMMIT" in emitted


def test_a_waiver_needs_rule_names_and_a_reason() -> None:
    with pytest.raises(ValueError, match="give the reason, on one line"):
        offline_ops(lambda: ops.waive("prefer-text-field", reason=" "))
    with pytest.raises(ValueError, match="give squawk rule names"):
        offline_ops(lambda: ops.waive("prefer text", reason="why"))
