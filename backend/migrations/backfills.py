"""What the backfill engine (``ops.backfill_by_key``) records and decides: the progress table
``alembic_backfill``, the batch size it tunes, and how it reports progress.

One row per backfill, keyed by the revision that runs it, the table it walks and its label: the
upper bound fixed when it started, the last key of the last committed batch, the rows walked and
changed, the estimated total. The row is updated in each batch's own transaction, so it commits
with the batch: a run killed half-way leaves the key it had reached, and the next run of the same
revision continues from there. A finished row (``finished_at``) is started afresh by the next run
(a revision upgraded again after a downgrade walks the whole table again).

The table is created on demand, as the ledger is. ``uv run kraken-migrations backfills`` lists it.
Imports only the standard library, so ``ops`` (which revisions import) can use it.
"""

from __future__ import annotations

from datetime import timedelta

# Where the runner leaves the id of the revision being run, on the migration connection's ``info``
# (ledger.Recorder.track): ops.backfill_by_key keys its progress row by it ('' without a runner).
RUNNING_REVISION = "kraken_running_revision"

TABLE = "alembic_backfill"

CREATE_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} ("
    "revision text NOT NULL, "
    "table_name text NOT NULL, "
    "label text NOT NULL, "
    "upper_key text, "
    "last_key text, "
    "rows_done bigint NOT NULL DEFAULT 0, "
    "rows_changed bigint NOT NULL DEFAULT 0, "
    "rows_total bigint NOT NULL, "
    "batch_size integer NOT NULL, "
    "started_at timestamptz NOT NULL DEFAULT clock_timestamp(), "
    "updated_at timestamptz NOT NULL DEFAULT clock_timestamp(), "
    "finished_at timestamptz, "
    "PRIMARY KEY (revision, table_name, label))"
)
_KEY = "revision = :revision AND table_name = :table AND label = :label"
# The row of an unfinished walk; key_type is the walked key's SQL type (the keys are kept as text).
RESUME = (
    "SELECT CAST(upper_key AS {key_type}), CAST(last_key AS {key_type}), rows_done, rows_changed, started_at"
    f" FROM {TABLE} WHERE {_KEY} AND finished_at IS NULL"
)
START = (
    f"INSERT INTO {TABLE} (revision, table_name, label, upper_key, rows_total, batch_size)"
    " VALUES (:revision, :table, :label, :upper, :total, :batch_size)"
    " ON CONFLICT (revision, table_name, label) DO UPDATE SET upper_key = EXCLUDED.upper_key, last_key = NULL,"
    " rows_done = 0, rows_changed = 0, rows_total = EXCLUDED.rows_total, batch_size = EXCLUDED.batch_size,"
    " started_at = clock_timestamp(), updated_at = clock_timestamp(), finished_at = NULL"
)
# Returns what the engine decides on next, in the batch's last statement before its commit: how
# many sessions wait for the rows the batch locked (pg_stat_activity, read once in the transaction)
# and the size of the walked table's main fork (a file size, cheap), which says when to vacuum.
ADVANCE = (
    f"UPDATE {TABLE} SET last_key = :last, rows_done = rows_done + :walked, rows_changed = rows_changed + :changed,"
    f" batch_size = :batch_size, updated_at = clock_timestamp() WHERE {_KEY}"
    " RETURNING (SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
    " AND pg_backend_pid() = ANY(pg_blocking_pids(pid))), pg_relation_size(CAST(:walked_table AS regclass))"
)
FINISH = f"UPDATE {TABLE} SET finished_at = clock_timestamp(), updated_at = clock_timestamp() WHERE {_KEY}"
LIST_QUERY = (
    "SELECT revision, table_name, label, rows_done, rows_changed, rows_total, batch_size, started_at, updated_at,"
    f" finished_at FROM {TABLE} ORDER BY started_at DESC LIMIT $1"
)

# Batches take about this long (seconds) unless a revision asks otherwise: long enough that the
# per-batch overhead stays small, short enough that a writer waiting for a batch's rows waits little.
TARGET_BATCH_SECONDS = 0.1
MAX_BATCH_SIZE = 50_000
# Without a vacuum_every, a VACUUM runs when the table has grown by this share of its size at the
# start since the walk began or the last VACUUM. A walk in the order of random keys (uuid) rarely
# needs one: when it comes back to a page for another of its rows, the page is pruned of the row
# versions that earlier batches replaced, and the row's new version stays on the page (a HOT
# update, no index entry), so mostly the first row walked of each page moves (1M turns: 82% of the
# updates HOT, the table 1.18x with no VACUUM). A walk whose key follows the table's physical order
# moves every row: there each VACUUM lets the next batches reuse the space the last ones left, and
# the table ends 1.4-1.5x (bigint keys in order: 200k rows 1.42x, 40k rows 1.49x; a quarter: 1.52x).
# Each VACUUM during a walk by random keys is a pass over nearly the whole table, whose WAL the
# service's commits wait behind: the rows-changed rule (a quarter of the table) cost 4 of them.
VACUUM_GROWTH = 0.2
VACUUM_AT_LEAST = 10_000
MIN_BATCH_SIZE = 10
# Seconds between two progress lines in the log.
PROGRESS_INTERVAL = 10.0


# How far one batch's time moves the next batch's size: down by up to half, up by at most a
# quarter. A batch finished early (its pages were cached) says little about the next one's pages;
# doubling after it made the next batch meet uncached pages at twice the size, and those overshoots
# were the walk's p99 (1M turns: batches p50 148 ms, p99 329 ms with doubling allowed).
SHRINK_AT_MOST = 0.5
GROW_AT_MOST = 1.25


def next_batch_size(size: int, seconds: float, target: float, smallest: int, largest: int) -> int:
    """The size of the batch after one of ``size`` rows that took ``seconds``, to take ``target``.

    Proportional, within SHRINK_AT_MOST and GROW_AT_MOST: one batch slowed by a checkpoint or a
    busy neighbour does not swing the next by more, and one sped up by a warm cache grows it a little."""
    factor = GROW_AT_MOST if seconds <= 0 else min(GROW_AT_MOST, max(SHRINK_AT_MOST, target / seconds))
    grown = round(size * factor)
    if factor > 1:
        grown = max(grown, size + 1)  # a batch of 1 or 2 rows grows too (round(2 * 1.25) is 2)
    return max(smallest, min(largest, grown))


def estimated_seconds(remaining: int, rate: float) -> float | None:
    """Seconds to go at ``rate`` rows/s; None when nothing has been measured yet."""
    return max(0, remaining) / rate if rate > 0 else None


def duration(seconds: float | None) -> str:
    """'42 s', '3 min 20 s', '1 h 05 min'; '-' when unknown."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def progress_line(label: str, done: int, total: int, changed: int, rate: float, batch_size: int) -> str:
    """One progress line: the rows walked of the total, the rate, the time to go."""
    share = f" ({min(100.0, 100 * done / total):.0f}%)" if total else ""
    left = duration(estimated_seconds(total - done, rate))
    return (
        f"{label}: {done:,} of about {total:,} row(s) walked{share}, {changed:,} changed, "
        f"{rate:,.0f} rows/s, about {left} to go, batches of {batch_size:,}"
    )


def rate_of(rows: int, elapsed: timedelta) -> float:
    seconds = elapsed.total_seconds()
    return rows / seconds if seconds > 0 else 0.0
