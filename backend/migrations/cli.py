"""``kraken-migrations``: the ledger's commands, which Alembic's CLI cannot take.

    uv run kraken-migrations ledger [--limit N]   # the steps recorded, newest first
    uv run kraken-migrations validate             # applied revisions against their files; exit 1 on a mismatch
    uv run kraken-migrations repair               # accept the files as they are (a repair row each)
    uv run kraken-migrations backfills [--limit N] # the backfills' progress (alembic_backfill), newest first
    uv run kraken-migrations lint [REVISION ...]   # squawk on the revisions' offline SQL, as CI runs it

The database is found as the alembic CLI finds it (MIGRATIONS_DATABASE_URL, DATABASE_URL, or the
embedded server), and a failure is one ``FAILED:`` line that never holds a password: exit 2 for a
configuration mistake, 1 otherwise. ``-c alembic.ini`` points at another script directory.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from backend.config import ConfigError, Settings, get_settings
from backend.db.errors import first_line, sqlstate
from backend.migrations import backfills, ledger
from backend.migrations import lint as revision_lint
from backend.migrations.lock import MigrationLockTimeout, TransactionPooler, migration_lock
from backend.migrations.moments import when
from backend.migrations.revisions import ALEMBIC_DIR, SchemaStatus, read_revisions
from backend.migrations.runner import (
    DatabaseUnavailable,
    MigrationError,
    ahead_of_code,
    migrations_target,
    open_connection,
    run_on_connection,
)


class Failed(Exception):
    """A command's outcome that is a failure (exit 1); the message is what to print."""


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


# --- ledger ----------------------------------------------------------------------------------


def _duration(ms: int | None) -> str:
    if ms is None:
        return "-"
    return f"{ms} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


def _result(success: bool | None, error: str | None) -> str:
    if success:
        return "ok"
    if success is None:
        return "running"
    if error == ledger.INTERRUPTED:
        return "interrupted"
    return f"failed: {error}"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest value; the last one (free text) is not."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]) for row in rows]


async def show_ledger(settings: Settings, script_location: Path, args: argparse.Namespace) -> None:
    conn = await open_connection(await migrations_target(settings))
    try:
        rows = await conn.fetch(ledger.LIST_QUERY, args.limit)
    except asyncpg.UndefinedTableError:
        _out("no ledger in this database yet: the next 'uv run alembic upgrade head' creates it")
        return
    finally:
        await conn.close()
    if not rows:
        _out("the ledger is empty")
        return
    files = read_revisions(script_location).by_revision
    table = [("started (UTC)", "run", "revision", "direction", "phase", "duration", "who", "result")]
    for r in rows:
        # The phase is the revision file's (its checksum covers it), for the steps that ran it.
        known = files.get(r["revision"]) if r["direction"] in ("upgrade", "downgrade") else None
        who = f"{r['db_role']}@{r['client_host']} {r['application_name'] or '-'} {r['service_version']}"
        table.append(
            (
                when(r["started_at"]).removesuffix(" UTC"),
                str(r["run_id"])[:8],
                r["revision"],
                r["direction"],
                known.phase if known is not None else "-",
                _duration(r["duration_ms"]),
                who,
                _result(r["success"], r["error"]),
            )
        )
    for line in _table(table):
        _out(line)


# --- backfills ------------------------------------------------------------------------------


def _backfill_state(r: asyncpg.Record, rate: float) -> str:
    if r["finished_at"] is not None:
        return f"finished in {backfills.duration((r['finished_at'] - r['started_at']).total_seconds())}"
    left = backfills.duration(backfills.estimated_seconds(r["rows_total"] - r["rows_done"], rate))
    return (
        f"unfinished: last batch committed {when(r['updated_at'])}, about {left} to go; "
        "a running upgrade goes on, the next one continues after that batch"
    )


async def show_backfills(settings: Settings, script_location: Path, args: argparse.Namespace) -> None:
    conn = await open_connection(await migrations_target(settings))
    try:
        rows = await conn.fetch(backfills.LIST_QUERY, args.limit)
    except asyncpg.UndefinedTableError:
        rows = []
    finally:
        await conn.close()
    if not rows:
        _out("no backfill recorded in this database yet (ops.backfill_by_key records its progress)")
        return
    table = [("started (UTC)", "revision", "table", "label", "walked", "changed", "rate", "state")]
    for r in rows:
        rate = backfills.rate_of(r["rows_done"], r["updated_at"] - r["started_at"])
        share = f" ({min(100, 100 * r['rows_done'] // r['rows_total'])}%)" if r["rows_total"] else ""
        table.append(
            (
                when(r["started_at"]).removesuffix(" UTC"),
                r["revision"] or "-",
                r["table_name"],
                r["label"],
                f"{r['rows_done']:,} of about {r['rows_total']:,}{share}",
                f"{r['rows_changed']:,}",
                f"{rate:,.0f} rows/s",
                _backfill_state(r, rate),
            )
        )
    for line in _table(table):
        _out(line)


# --- validate --------------------------------------------------------------------------------


def _ahead_note(status: SchemaStatus) -> str:
    return ahead_of_code(status) + ": checking the revisions it knows"


async def validate(settings: Settings, script_location: Path, args: argparse.Namespace) -> None:
    files = read_revisions(script_location).by_revision
    conn = await open_connection(await migrations_target(settings))
    try:
        current, recorded = await ledger.fetch_state(conn)
        status = SchemaStatus(current, read_revisions(script_location))
        applied = ledger.applied_revisions(status, recorded or {})
        since = await ledger.fetch_since(conn, applied) if recorded is not None else {}
        shipped = await ledger.fetch_shipped(conn, applied) if recorded is not None else None
    finally:
        await conn.close()
    if status.ahead:
        _out(_ahead_note(status))
    if recorded is None:
        _out(
            f"no ledger yet: {len(applied)} applied revision(s) have no checksum on record"
            + (f" ({', '.join(sorted(applied))}); the next upgrade adopts them" if applied else "")
        )
        return
    verdict = ledger.verify(status, recorded, files, since, shipped)
    refused = verdict.refused(settings.env)
    if refused:
        raise Failed("\n".join(f"FAILED: {m.problem()}" for m in refused))
    for mismatch in verdict.tolerated(settings.env):
        _out(ledger.tolerance(mismatch))
    for rev in verdict.matching:
        _out(f"{rev} ok: checksum {ledger.short(recorded[rev])}, {since[rev]}")
    for rev in verdict.unrecorded:
        _out(f"{rev} not on record yet: the next upgrade adopts it (checksum {ledger.short(files[rev].checksum)})")
    checked = len(verdict.matching)
    _out(
        f"{checked} applied revision(s) match their files"
        if checked or verdict.unrecorded
        else "no revision applied yet: nothing to validate"
    )


# --- repair ----------------------------------------------------------------------------------


def _repair(connection: Connection, settings: Settings, script_location: Path) -> list[str]:
    revisions = read_revisions(script_location)
    files = revisions.by_revision
    run_id = uuid.uuid4()  # one run, like a migration's
    # Like a migration: the pooler check first (a session lock behind one serializes nothing).
    with migration_lock(connection.engine, settings.migration_lock_timeout, work=connection):
        ledger.prepare(connection)
        connection.commit()
        status = SchemaStatus(ledger.read_versions(connection), revisions)
        recorded, since = ledger.read_records(connection)
        verdict = ledger.verify(status, recorded, files, since)
        repaired = ledger.repair(connection, run_id, verdict.mismatches, revisions, files, settings.env)
        adopted = ledger.adopt(connection, run_id, verdict.unrecorded, revisions, files, settings.env)
        connection.commit()
    lines = [_ahead_note(status)] if status.ahead else []
    lines += [
        f"repaired {m.revision}: checksum {ledger.short(m.checksum)} accepted "
        f"(was {ledger.short(m.recorded)}, {m.since})"
        for m in verdict.mismatches
        if m.revision in repaired
    ]
    lines += [f"adopted {rev}: checksum {ledger.short(files[rev].checksum)}" for rev in adopted]
    if not repaired and not adopted:
        lines.append(f"nothing to repair: {len(verdict.matching)} applied revision(s) match their files")
    return lines


async def repair(settings: Settings, script_location: Path, args: argparse.Namespace) -> None:
    lines: list[str] = []

    def work(connection: Connection) -> None:
        lines.extend(_repair(connection, settings, script_location))

    await run_on_connection(await migrations_target(settings), work, statement_cache=settings.db_statement_cache)
    for line in lines:
        _out(line)


# --- lint ------------------------------------------------------------------------------------


def lint(script_location: Path, args: argparse.Namespace) -> None:
    """squawk on each revision's offline SQL (or the ones named), as CI runs it; no database."""
    results = revision_lint.lint(script_location, args.revisions)
    for result in results:
        if result.report.strip():
            _out(result.report.rstrip())
        for waiver in result.waivers:
            why = f"reason: {waiver.reason}" if waiver.reason else "no reason given"
            _out(f"{result.revision}: waives {waiver.rules} ({why}), line {waiver.line}: {waiver.statement.strip()}")
        _out(f"{result.revision}: {'ok' if result.ok else 'squawk found problems (above)'}")
    failed = [result.revision for result in results if not result.ok]
    if failed:
        raise Failed(
            f"FAILED: squawk found problems in the offline SQL of revision(s) {', '.join(failed)}: fix the "
            "statements, or waive a rule for one statement with ops.waive(rule, reason=...) just before it"
        )


# --- the command -----------------------------------------------------------------------------

COMMANDS: dict[str, Any] = {
    "ledger": show_ledger,
    "validate": validate,
    "repair": repair,
    "backfills": show_backfills,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kraken-migrations",
        description="The migration ledger (alembic_ledger): list it, validate applied revisions, repair.",
    )
    parser.add_argument("-c", "--config", type=Path, help="an alembic.ini whose script directory to use")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("ledger", help="the steps recorded, newest first")
    listing.add_argument("--limit", type=int, default=50, help="rows to show (default 50)")
    commands.add_parser("validate", help="compare applied revisions with their files; exit 1 on a mismatch")
    commands.add_parser("repair", help="accept the files as they are: a repair row per changed revision")
    linting = commands.add_parser("lint", help="squawk on the revisions' offline SQL, as CI runs it (no database)")
    linting.add_argument(
        "revisions", nargs="*", metavar="REVISION", help="the revision(s) to lint, or head (default: all)"
    )
    progress = commands.add_parser("backfills", help="the backfills' progress (alembic_backfill), newest first")
    progress.add_argument("--limit", type=int, default=50, help="rows to show (default 50)")
    return parser


def _script_location(config: Path | None) -> Path:
    if config is None:
        return ALEMBIC_DIR
    if not config.is_file():
        raise ConfigError(f"no alembic configuration at {config}")
    return Path(ScriptDirectory.from_config(Config(str(config))).dir)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `uv run kraken-migrations`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)-5.5s [%(name)s] %(message)s")
    try:
        if args.command == "lint":  # offline: no settings, no database
            lint(_script_location(args.config), args)
            return
        settings = get_settings()
        asyncio.run(COMMANDS[args.command](settings, _script_location(args.config), args))
    except ConfigError as exc:
        _out(f"FAILED: {exc}")
        sys.exit(2)
    except revision_lint.LintError as exc:
        _out(f"FAILED: {exc}")
        sys.exit(2)
    except Failed as exc:
        _out(str(exc))
        sys.exit(1)
    except (DatabaseUnavailable, MigrationError, MigrationLockTimeout, TransactionPooler) as exc:
        _out(f"FAILED: {exc}")
        sys.exit(1)
    except (DBAPIError, asyncpg.PostgresError) as exc:
        _out(f"FAILED: {first_line(exc)} (SQLSTATE {sqlstate(exc)})")
        sys.exit(1)
