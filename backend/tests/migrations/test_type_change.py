"""ops.ColumnTypeChange on real databases: the plan PostgreSQL's own answer gives (in place, or
expand/contract), the copy's indexes (INCLUDE lists, predicates, uniqueness), NOT NULL, the
trigger in both directions, each step run again, the downgrades, the offline SQL, and instants
kept with the database's default time zone at America/New_York."""

import asyncio
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from alembic.util import CommandError
from sqlalchemy.exc import DBAPIError

from backend.db.engine import connect
from backend.db.url import DatabaseTarget
from backend.migrations import ops
from backend.tests.helpers import execute_script, offline_ops, run_ops, run_ops_async, sql

TABLE = [
    "CREATE TABLE events (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), at timestamp NOT NULL DEFAULT now(),"
    " ended timestamp, note varchar(16), n integer NOT NULL, code integer)",
    "CREATE INDEX ix_events_at ON events (at) INCLUDE (n) WHERE n > 0",
    "CREATE UNIQUE INDEX ix_events_n_at ON events (n, at)",
    "CREATE INDEX ix_events_note ON events (note)",
    "INSERT INTO events (at, ended, note, n) SELECT timestamp '2026-01-01 00:00' + g * interval '1 minute',"
    " CASE WHEN g % 2 = 0 THEN timestamp '2026-03-29 01:30' END, 'note ' || g, g FROM generate_series(1, 500) g",
]
# The indexes as pg_get_indexdef prints them: what a revision declares.
AT_INDEXES = [
    "CREATE INDEX ix_events_at ON public.events USING btree (at) INCLUDE (n) WHERE (n > 0)",
    "CREATE UNIQUE INDEX ix_events_n_at ON public.events USING btree (n, at)",
]
AT = ops.ColumnTypeChange(
    "events", "at", "timestamp", "timestamptz", not_null=True, default="now()", indexes=AT_INDEXES
)
NOTE = ops.ColumnTypeChange(
    "events",
    "note",
    "varchar(16)",
    "text",
    indexes=["CREATE INDEX ix_events_note ON public.events USING btree (note)"],
)
STEPS = ("expand", "swap", "contract")
SQUAWK = str(Path(sys.executable).parent / "squawk")
UNDO = ("undo_contract", "undo_swap", "undo_expand")


def table_in(target: DatabaseTarget) -> DatabaseTarget:
    """``events`` with 500 rows, in a database whose sessions default to America/New_York: the
    helper must keep every instant whatever the session's zone (the runner sets UTC; this does not)."""
    sql(target, f"ALTER DATABASE \"{target.database}\" SET timezone = 'America/New_York'")
    for statement in TABLE:
        sql(target, statement)
    return target


@pytest.fixture
def db(empty_db: DatabaseTarget) -> DatabaseTarget:
    return table_in(empty_db)


def step(db: DatabaseTarget, change: ops.ColumnTypeChange, name: str) -> None:
    run_ops(db, getattr(change, name))


def columns(db: DatabaseTarget) -> dict[str, tuple[str, bool, str | None]]:
    """column -> (type, NOT NULL, default)"""
    rows = sql(
        db,
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid)"
        " FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
        " WHERE a.attrelid = 'events'::regclass AND a.attnum > 0 AND NOT a.attisdropped",
    )
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def index_definitions(db: DatabaseTarget) -> dict[str, tuple[str, bool]]:
    rows = sql(
        db,
        "SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisvalid FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 'events'::regclass",
    )
    return {r[0]: (r[1], r[2]) for r in rows}


def schema(db: DatabaseTarget) -> dict[str, object]:
    """Everything a step may change: columns, indexes, constraints, triggers, functions."""
    # PostgreSQL 18 records NOT NULL as constraints too (contype n), named after the column they
    # were made on (a renamed column keeps its name there); the columns' NOT NULL covers those.
    constraints = (
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = 'events'::regclass AND contype <> 'n'"
    )
    triggers = "SELECT tgname FROM pg_trigger WHERE tgrelid = 'events'::regclass AND NOT tgisinternal"
    return {
        "columns": columns(db),
        "indexes": index_definitions(db),
        "constraints": sorted(tuple(r) for r in sql(db, constraints)),
        "triggers": [r[0] for r in sql(db, triggers)],
        "functions": [r[0] for r in sql(db, "SELECT proname FROM pg_proc WHERE proname LIKE 'events%'")],
    }


def files(db: DatabaseTarget) -> dict[str, str]:
    """The table's and its indexes' files: a rewrite or a rebuild gives a new one."""
    rows = sql(
        db,
        "SELECT c.relname, pg_relation_filenode(c.oid)::text FROM pg_class c WHERE c.oid = 'events'::regclass"
        " OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'events'::regclass)",
    )
    return {r[0]: r[1] for r in rows}


def instants(db: DatabaseTarget, column: str = "at") -> dict[int, datetime]:
    """n -> the row's instant, as an aware UTC datetime whichever type the column has."""
    found = {}
    for n, value in sql(db, f"SELECT n, {column} FROM events"):
        found[n] = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return found


# --- the plan -------------------------------------------------------------------------------


def test_in_place_when_postgresql_rewrites_nothing_and_rebuilds_no_index(db: DatabaseTarget) -> None:
    """varchar(16) to text, indexed: no rewrite, the index kept; so expand and contract do
    nothing and the swap is one ALTER. Its way back (text to varchar(16)) needs a rewrite, so
    undo_contract builds the old column beside it."""
    before, files_before = schema(db), files(db)
    step(db, NOTE, "expand")
    assert "note__new" not in columns(db)
    assert schema(db) == before
    step(db, NOTE, "swap")
    assert columns(db)["note"] == ("text", False, None)
    assert files(db) == files_before  # not the table, not ix_events_note: nothing rewritten
    step(db, NOTE, "contract")
    step(db, NOTE, "swap")  # again: done, nothing to do
    assert files(db) == files_before

    sql(db, "UPDATE events SET note = 'changed' WHERE n = 1")
    step(db, NOTE, "undo_contract")
    assert columns(db)["note__old"] == ("character varying(16)", False, None)
    assert "ix_events_note__old" in index_definitions(db)
    step(db, NOTE, "undo_swap")
    step(db, NOTE, "undo_expand")
    assert schema(db) == before
    assert sql(db, "SELECT note FROM events WHERE n = 1")[0][0] == "changed"


def test_expand_when_postgresql_would_rewrite_or_rebuild_an_index(db: DatabaseTarget) -> None:
    """integer to oid rewrites no row, but an index on the column would be rebuilt under ACCESS
    EXCLUSIVE: expand. Without the index it is in place. timestamp to timestamptz with its zone
    named (AT TIME ZONE) rewrites the table: expand even without an index."""
    code = ops.ColumnTypeChange("events", "code", "integer", "oid")
    step(db, code, "expand")
    assert "code__new" not in columns(db)
    sql(db, "CREATE INDEX ix_events_code ON events (code)")
    indexed = ops.ColumnTypeChange(
        "events", "code", "integer", "oid", indexes=["CREATE INDEX ix_events_code ON public.events USING btree (code)"]
    )
    step(db, indexed, "expand")
    assert columns(db)["code__new"] == ("oid", False, None)
    assert index_definitions(db)["ix_events_code__new"] == (
        "CREATE INDEX ix_events_code__new ON public.events USING btree (code__new)",
        True,
    )
    ended = ops.ColumnTypeChange("events", "ended", "timestamp", "timestamptz")
    step(db, ended, "expand")
    assert columns(db)["ended__new"] == ("timestamp with time zone", False, None)


def test_a_declaration_the_catalog_contradicts_is_refused_before_anything_changes(db: DatabaseTarget) -> None:
    before = schema(db)
    wrong = ops.ColumnTypeChange("events", "at", "timestamp", "timestamptz", not_null=True, default="now()")
    with pytest.raises(CommandError, match=r"the catalog says: indexes=\[.*ix_events_at ON public.events USING btree"):
        step(db, wrong, "expand")
    with pytest.raises(CommandError, match="is timestamp without time zone, neither bigint"):
        step(db, ops.ColumnTypeChange("events", "at", "bigint", "text"), "expand")
    assert schema(db) == before


def test_a_conversion_between_timestamp_and_timestamptz_must_name_its_zone() -> None:
    with pytest.raises(ValueError, match="must name the zone"):
        ops.ColumnTypeChange(
            "events", "at", "timestamp(6)", "timestamp with time zone", using="CAST({column} AS timestamptz)"
        )
    assert "AT TIME ZONE 'UTC'" in offline_ops(AT.expand)


# --- expand, swap, contract -------------------------------------------------------------------


def test_expand_swap_contract_keeps_every_instant_and_both_columns_in_sync(db: DatabaseTarget) -> None:
    at_before = instants(db)
    step(db, AT, "expand")
    expanded = schema(db)
    assert columns(db)["at__new"] == ("timestamp with time zone", True, None)  # NOT NULL, through the check
    assert expanded["constraints"] == [("events_pkey", "PRIMARY KEY (id)")]  # the check is gone once NOT NULL holds
    assert index_definitions(db)["ix_events_at__new"] == (
        "CREATE INDEX ix_events_at__new ON public.events USING btree (at__new) INCLUDE (n) WHERE (n > 0)",
        True,
    )
    assert index_definitions(db)["ix_events_n_at__new"] == (
        "CREATE UNIQUE INDEX ix_events_n_at__new ON public.events USING btree (n, at__new)",
        True,
    )
    assert instants(db, "at__new") == at_before  # under America/New_York: not shifted by its offset
    step(db, AT, "expand")
    assert schema(db) == expanded  # run again: nothing changes

    # The previous release writes the old column: the trigger fills the copy.
    sql(db, "INSERT INTO events (at, n) VALUES ('2026-06-01 12:00', 1001)")
    sql(db, "INSERT INTO events (n) VALUES (1002)")  # the default
    sql(db, "UPDATE events SET at = '2026-06-02 08:00' WHERE n = 1")
    rows = dict(sql(db, "SELECT n, at__new = at AT TIME ZONE 'UTC' FROM events WHERE n IN (1, 1001, 1002)"))
    assert rows == {1: True, 1001: True, 1002: True}
    assert instants(db, "at__new")[1001] == datetime(2026, 6, 1, 12, tzinfo=UTC)
    with pytest.raises(asyncpg.UniqueViolationError):  # the copy's unique index holds
        sql(db, "INSERT INTO events (at, n) VALUES ('2026-06-01 12:00', 1001)")
    at_expanded = instants(db)

    step(db, AT, "swap")
    swapped = schema(db)
    cols = columns(db)
    assert cols["at"] == ("timestamp with time zone", True, "now()")
    assert cols["at__old"] == ("timestamp without time zone", True, None)
    assert "at__new" not in cols
    assert index_definitions(db)["ix_events_at"][0] == (
        "CREATE INDEX ix_events_at ON public.events USING btree (at) INCLUDE (n) WHERE (n > 0)"
    )
    assert index_definitions(db)["ix_events_at__old"][0] == (
        "CREATE INDEX ix_events_at__old ON public.events USING btree (at__old) INCLUDE (n) WHERE (n > 0)"
    )
    assert instants(db) == at_expanded
    step(db, AT, "swap")
    assert schema(db) == swapped

    # The new release writes the new column: the trigger keeps the old one for a rollback.
    sql(db, "INSERT INTO events (at, n) VALUES ('2026-07-01 12:00+00', 1003)")
    sql(db, "INSERT INTO events (n) VALUES (1004)")
    rows = dict(sql(db, "SELECT n, at__old = at AT TIME ZONE 'UTC' FROM events WHERE n IN (1003, 1004)"))
    assert rows == {1003: True, 1004: True}
    assert instants(db, "at__old")[1003] == datetime(2026, 7, 1, 12, tzinfo=UTC)

    at_swapped = instants(db)
    step(db, AT, "contract")
    contracted = schema(db)
    assert set(columns(db)) == {"id", "at", "ended", "note", "n", "code"}
    assert (contracted["triggers"], contracted["functions"]) == ([], [])  # no trigger, no function
    assert {name for name in index_definitions(db) if "__" in name} == set()
    assert instants(db) == at_swapped
    step(db, AT, "contract")
    assert schema(db) == contracted


def test_each_downgrade_keeps_every_value_and_the_trigger_runs_the_other_way(db: DatabaseTarget) -> None:
    original = schema(db)
    for name in STEPS:
        step(db, AT, name)
    sql(db, "INSERT INTO events (at, n) VALUES ('2026-08-01 00:30+00', 2001)")
    at_done = instants(db)

    step(db, AT, "undo_contract")
    assert columns(db)["at__old"] == ("timestamp without time zone", True, None)
    assert index_definitions(db)["ix_events_n_at__old"][1] is True
    sql(db, "INSERT INTO events (at, n) VALUES ('2026-08-01 01:30+00', 2002)")
    assert instants(db, "at__old")[2002] == datetime(2026, 8, 1, 1, 30, tzinfo=UTC)
    undone = schema(db)
    step(db, AT, "undo_contract")
    assert schema(db) == undone

    step(db, AT, "undo_swap")
    assert columns(db)["at"] == ("timestamp without time zone", True, "now()")
    assert columns(db)["at__new"] == ("timestamp with time zone", True, None)
    sql(db, "INSERT INTO events (at, n) VALUES ('2026-08-01 02:30', 2003)")  # the old release again
    assert instants(db, "at__new")[2003] == datetime(2026, 8, 1, 2, 30, tzinfo=UTC)

    step(db, AT, "undo_expand")
    assert schema(db) == original
    kept = instants(db)
    assert {n: kept[n] for n in at_done} == at_done
    step(db, AT, "undo_expand")
    assert schema(db) == original


def test_each_downgrade_takes_the_column_back_from_a_later_step_its_revision_did_not_record(
    db: DatabaseTarget,
) -> None:
    """A revision changing several columns commits after each: stopped part-way, it is not recorded,
    so the downgrade that runs next is the step's before it. undo_expand on a swapped column undoes
    the swap first; undo_swap on a contracted one builds the old column again first."""
    original = schema(db)
    step(db, AT, "expand")
    sql(db, "INSERT INTO events (at, n) VALUES ('2026-06-01 12:00', 3001)")
    step(db, AT, "swap")
    sql(db, "INSERT INTO events (at, n) VALUES ('2026-07-01 12:00+00', 3002)")
    swapped = instants(db)
    step(db, AT, "undo_expand")
    assert schema(db) == original
    assert instants(db) == swapped

    for name in STEPS:
        step(db, AT, name)
    sql(db, "INSERT INTO events (at, n) VALUES ('2026-08-01 00:30+00', 3003)")
    contracted = instants(db)
    step(db, AT, "undo_swap")
    assert columns(db)["at"] == ("timestamp without time zone", True, "now()")
    assert columns(db)["at__new"] == ("timestamp with time zone", True, None)
    assert "at__old" not in columns(db)
    assert index_definitions(db)["ix_events_n_at__new"][1] is True
    assert instants(db) == instants(db, "at__new") == contracted
    step(db, AT, "undo_expand")
    assert schema(db) == original
    assert instants(db) == contracted


def test_an_expand_interrupted_half_way_is_finished_by_the_next_run(db: DatabaseTarget) -> None:
    """As a killed run leaves it: the copy added and half filled, by nothing that keeps it in
    sync, and its NOT NULL check added but not validated."""
    sql(db, "ALTER TABLE events ADD COLUMN at__new timestamptz")
    sql(db, "UPDATE events SET at__new = at AT TIME ZONE 'UTC' WHERE n <= 100")
    sql(db, "UPDATE events SET at__new = at WHERE n = 5")  # the session's zone: 5 hours off
    sql(db, "ALTER TABLE events ADD CONSTRAINT events_at__new_not_null CHECK (at__new IS NOT NULL) NOT VALID")
    step(db, AT, "expand")
    assert instants(db, "at__new") == instants(db)
    assert columns(db)["at__new"][1] is True
    assert schema(db)["constraints"] == [("events_pkey", "PRIMARY KEY (id)")]


def test_the_swap_refuses_a_copy_whose_expand_did_not_finish(db: DatabaseTarget) -> None:
    sql(db, "ALTER TABLE events ADD COLUMN at__new timestamptz")
    before = schema(db)
    with pytest.raises(
        CommandError, match="events.at__new lacks index ix_events_at__new, index ix_events_n_at__new, NOT NULL"
    ):
        step(db, AT, "swap")
    assert schema(db) == before


# --- offline --------------------------------------------------------------------------------


def test_offline_sql_of_each_step_does_what_the_online_step_does(
    db: DatabaseTarget, database_factory: Callable[[], DatabaseTarget]
) -> None:
    """Each step's --sql, applied by hand to a second database with the same table, leaves the
    schema and the instants the online step leaves, on the way there and back."""
    by_hand = table_in(database_factory())
    for name in (*STEPS, *UNDO):
        step(db, AT, name)
        asyncio.run(execute_script(by_hand, offline_ops(getattr(AT, name))))
        assert schema(by_hand) == schema(db), name
        assert instants(by_hand) == instants(db), name


def test_offline_sql_names_its_zone_and_passes_squawk(tmp_path: Path) -> None:
    """Each step's SQL as CI lints a revision's: squawk finds nothing (an ignore comment only
    before the statements whose warning does not apply: the swap's renames, the default that
    moves, the trigger's own function dropped, the check NOT NULL replaces, the old type back)."""
    sql_of = {name: offline_ops(getattr(AT, name)) for name in (*STEPS, *UNDO)}
    assert 'NEW."at__new" := NEW."at" AT TIME ZONE \'UTC\'' in sql_of["expand"]
    assert 'NEW."at__old" := NEW."at" AT TIME ZONE \'UTC\'' in sql_of["swap"]
    assert 'UPDATE "events" SET "at__new" = "at" AT TIME ZONE \'UTC\'' in sql_of["expand"]
    assert (
        'CREATE INDEX CONCURRENTLY IF NOT EXISTS "ix_events_at__new" ON public.events'
        ' USING btree ("at__new") INCLUDE (n) WHERE (n > 0)'
    ) in sql_of["expand"]
    for name, text in sql_of.items():
        path = tmp_path / f"{name}.sql"
        path.write_text("SET lock_timeout = '5s';\nSET statement_timeout = '0';\n\n" + text)  # as the runner's
        linted = subprocess.run([SQUAWK, "--pg-version", "15", str(path)], capture_output=True, text=True, timeout=60)
        assert linted.returncode == 0, (name, linted.stdout)


async def test_the_swap_waits_for_its_lock_within_lock_timeout_and_changes_all_or_nothing(db: DatabaseTarget) -> None:
    await asyncio.to_thread(step, db, AT, "expand")
    before = await asyncio.to_thread(schema, db)
    writer = await connect(db)
    try:
        async with writer.transaction():
            await writer.execute("INSERT INTO events (n) VALUES (3001)")  # ROW EXCLUSIVE until it ends
            with pytest.raises(DBAPIError, match="lock timeout"):
                await run_ops_async(db, AT.swap, lock_timeout="200ms")
    finally:
        await writer.close()
    assert await asyncio.to_thread(schema, db) == before  # the runner retries the revision from here
    await run_ops_async(db, AT.swap)
    assert (await asyncio.to_thread(columns, db))["at"][0] == "timestamp with time zone"


def test_the_copy_of_an_index_names_the_copy_wherever_the_index_names_the_column() -> None:
    """In keys, expressions, INCLUDE lists and predicates; not in string literals, casts to a type
    of the same name, or other columns whose names contain it."""
    change = ops.ColumnTypeChange(
        "docs",
        "text",
        "varchar(40)",
        "text",
        indexes=[
            "CREATE UNIQUE INDEX ix_docs_text ON public.docs USING btree (lower((text)::text), text_id)"
            " INCLUDE (text) WHERE ((text)::text <> 'text'::text)"
        ],
    )
    assert (
        'CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS "ix_docs_text__new" ON public.docs USING btree'
        ' (lower(("text__new")::text), text_id) INCLUDE ("text__new") WHERE (("text__new")::text <> \'text\'::text)'
    ) in offline_ops(change.expand)
